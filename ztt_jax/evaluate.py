"""Validation losses per exit head, and the early-exit trade-off.

`eval_outputs` is one whole-sequence pass: the loss of every exit head.
`early_exit_sweep` runs the real early-exit path (`generate.forward`: a
`while_loop` over cycles, each sequence exiting on its own) for fixed
depths 1..C and for thresholds of an exit criterion drawn from that
criterion's own distribution on the same batches; ztt-eval and ztt-train's
closing summary both print it. Statistics and losses come from exits.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import ztt_jax
from ztt_jax import data
from ztt_jax import difficulty
from ztt_jax import exits
from ztt_jax import generate
from ztt_jax import lru
from ztt_jax.errors import check


def eval_outputs(module, params, batch) -> dict[str, jax.Array]:
  """Per-sequence loss of every exit head, `ce_CxB` (C = 1: the final
  output only, without exit heads). A batch with a loss `mask` (synthetic
  tasks) gives sums over the targets it marks instead: `ce_sum_CxB`,
  `correct_CxB` (argmax hits) and their count `n_B`."""
  out = module.apply({'params': params}, batch['inputs'])
  ce_CxBxT = exits.head_losses(out, batch['targets'])
  if 'mask' not in batch:
    return {'ce_CxB': ce_CxBxT.mean(-1)}
  mask_BxT = batch['mask']
  hit_CxBxT = jnp.argmax(out.cycle_logits, -1) == batch['targets'][None]
  return {'ce_sum_CxB': (ce_CxBxT * mask_BxT).sum(-1),
          'correct_CxB': (hit_CxBxT * mask_BxT).sum(-1),
          'n_B': mask_BxT.sum(-1)}


def summarize_outputs(outs: list[Mapping[str, np.ndarray]],
                      exit_heads: bool) -> dict[str, Any]:
  """`val_loss` (and per exit head `val_loss_cycle`) over `eval_outputs`
  of several batches; masked batches add `val_accuracy` (and
  `val_accuracy_cycle`), both over the targets the mask marks."""
  if 'n_B' not in outs[0]:
    ce_CxB = np.concatenate([o['ce_CxB'] for o in outs], axis=1)
    result = {'val_loss': float(ce_CxB[-1].mean())}
    if exit_heads:
      result['val_loss_cycle'] = ce_CxB.mean(1).tolist()
    return result
  n = max(float(sum(o['n_B'].sum() for o in outs)), 1.0)
  ce_C = sum(o['ce_sum_CxB'].sum(1) for o in outs) / n
  correct_C = sum(o['correct_CxB'].sum(1) for o in outs) / n
  result = {'val_loss': float(ce_C[-1]), 'val_accuracy': float(correct_C[-1])}
  if exit_heads:
    result['val_loss_cycle'] = ce_C.tolist()
    result['val_accuracy_cycle'] = correct_C.tolist()
  return result


def token_statistics(module, params, batch) -> dict[str, jax.Array]:
  """Every exit criterion's per-token statistic [C, B, T] from one full
  pass (exits.output_statistics)."""
  out = module.apply({'params': params}, batch['inputs'])
  return exits.output_statistics(out)


PER = ('sequence', 'token')


_COMPILED = lru.LRU(32)


def _jitted(make, *args, out_sharding=None):
  """`jax.jit(make(*args))`, built once per arguments (hashable): repeated
  sweeps of one model (training summaries, tests) compile once."""
  kwargs = {} if out_sharding is None else {'out_shardings': out_sharding}
  return _COMPILED.get((make, args, out_sharding),
                       lambda: jax.jit(make(*args), **kwargs))


def _pass_fn(module, rule: exits.ExitRule, per: str):
  """`run(params, batch, threshold, forced_BxT or None)` -> `(ce_BxT,
  cycles_BxT, cycles_run, correct_BxT)` through the real early-exit loop: one call of
  `generate.forward` per batch (`per='sequence'`: each sequence exits on
  its own), or token by token with the KV cache (`per='token'`: each token
  exits on its own, as when generating). `cycles_run` is what the loop
  really ran: per call, the cycles of the row that exited last (a
  `while_loop` runs until every row stops), averaged over calls."""

  def sequence_pass(params, batch, threshold, forced_BxT):
    b, t = batch['inputs'].shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits_BxTxV, cycles_BxT, _ = generate.forward(
        module, params, batch['inputs'], positions_BxT, None, rule,
        threshold, forced_BxT)
    return (exits.cross_entropy(logits_BxTxV, batch['targets']), cycles_BxT,
            cycles_BxT.max().astype(jnp.float32),
            jnp.argmax(logits_BxTxV, -1) == batch['targets'])

  def token_pass(params, batch, threshold, forced_BxT):
    b, t = batch['inputs'].shape
    column = lambda a, i: jax.lax.dynamic_slice_in_dim(a, i, 1, axis=1)

    def step(cache, i):
      forced = None if forced_BxT is None else column(forced_BxT, i)
      logits_Bx1xV, cycles_Bx1, cache = generate.forward(
          module, params, column(batch['inputs'], i), jnp.full((b, 1), i),
          cache, rule, threshold, forced)
      return cache, (logits_Bx1xV[:, 0], cycles_Bx1[:, 0])

    _, (logits_TxBxV, cycles_TxB) = jax.lax.scan(
        step, generate.init_cache(module.cfg, b, t), jnp.arange(t))
    ce_BxT = exits.cross_entropy(logits_TxBxV, batch['targets'].T).T
    return (ce_BxT, cycles_TxB.T, cycles_TxB.max(1).astype(jnp.float32).mean(),
            jnp.argmax(logits_TxBxV, -1).T == batch['targets'])

  return {'sequence': sequence_pass, 'token': token_pass}[per]


def sweep(module, params, batches, criterion: str, thresholds,
          min_cycles: int = 1, per: str = 'sequence', random_baseline=False,
          seed: int = 0, out_sharding=None) -> list[dict]:
  """Val loss and cycles for fixed depths 1..C and each exit threshold,
  through the real early-exit loop (`_pass_fn`); one compile for all.

  With `random_baseline`, every threshold's row gets a twin that exits at
  random with the same distribution of cycles (the rule's cycles, shuffled
  over rows): what the rule's choice of *which* rows exit is worth.
  `out_sharding` (e.g. replicated over a mesh) for sharded batches.
  """
  cfg = module.cfg
  check(per in PER, f'per={per!r} is not one of {PER}')
  rule = exits.ExitRule(criterion, min_cycles).validate(cfg)
  run = _jitted(_pass_fn, module, rule, per, out_sharding=out_sharding)
  masked = 'mask' in batches[0]

  def evaluate_rule(threshold=0.0, forced=None):
    # Always a forced array (0: the rule decides): one compile for all rows.
    outs = [jax.device_get(run(
        params, b, jnp.float32(threshold),
        jnp.zeros(b['inputs'].shape, jnp.int32) if forced is None
        else forced[i])) for i, b in enumerate(batches)]
    cycles = [o[1] for o in outs]
    if masked:  # Synthetic tasks: the answers alone, by difficulty.
      stats = dict(per=per, **difficulty.scored(outs, batches))
    else:
      stats = dict(per=per, val_loss=float(np.mean([o[0] for o in outs])),
                   mean_cycles=float(np.mean(cycles)))
    stats['cycles_run'] = float(np.mean([o[2] for o in outs]))
    if per == 'token':  # Where the rule lets tokens go: by position.
      stats['mean_cycles_by_position'] = np.concatenate(cycles).mean(
          0).round(4).tolist()
    return stats, cycles

  def row(**fields):
    stats = fields.pop('stats')
    return dict(**fields, **stats,
                compute_saved=1 - stats['cycles_run'] / cfg.cycles)

  shape = lambda b: b['inputs'].shape
  rows = [row(criterion='fixed', fixed_cycles=k, stats=evaluate_rule(
      forced=[jnp.full(shape(b), k, jnp.int32) for b in batches])[0])
          for k in range(1, cfg.cycles + 1)]
  rng = np.random.default_rng(seed)
  for tau in thresholds:
    stats, cycles = evaluate_rule(threshold=float(tau))
    rows.append(row(criterion=criterion, threshold=float(tau), stats=stats))
    if random_baseline:
      # The same cycles, dealt to rows (sequences or tokens) at random.
      flat = rng.permutation(np.concatenate([c.ravel() for c in cycles]))
      if per == 'sequence':  # A sequence runs one depth throughout.
        flat = rng.permutation(np.concatenate([c[:, 0] for c in cycles]))
        flat = np.repeat(flat[:, None], cycles[0].shape[1], 1)
      split = np.split(flat.reshape(-1), np.cumsum(
          [c.size for c in cycles])[:-1])
      forced = [jnp.asarray(s.reshape(c.shape)) for s, c in zip(split,
                                                                cycles)]
      rows.append(row(criterion='random', matches=float(tau),
                      stats=evaluate_rule(forced=forced)[0]))
  return rows


def early_exit_sweep(module, params, batches, criterion: str = '',
                     n_thresholds: int = 7, min_cycles: int = 1,
                     per: str = 'sequence', random_baseline: bool = False,
                     out_sharding=None) -> tuple[str, list[dict]]:
  """`(criterion, rows)`: `sweep` at `n_thresholds` quantiles (10%..90%)
  of the criterion's statistic over cycles 1..C-1 of `batches`, per
  sequence (its mean over tokens) or per token, as `per` exits. The
  default criterion is zero_attention where the model has zero tokens,
  else kl. Needs a cycled model with exit heads."""
  cfg = module.cfg
  check(per in PER, f'per={per!r} is not one of {PER}')
  check(cfg.cycles > 1, f'this {cfg.variant} model runs one cycle: there is '
        'nothing to exit early from; evaluate a cycled variant')
  check(cfg.exit_heads, f'this {cfg.variant} model has no exit heads, so it '
        'cannot stop after an early cycle; train it with '
        'model.exit_loss=linear, uniform or last')
  if criterion:  # A criterion the model cannot give fails before any pass.
    exits.ExitRule(criterion, min_cycles).validate(cfg)
  stats_fn = _jitted(functools.partial, token_statistics, module,
                     out_sharding=out_sharding)
  stats = [jax.device_get(stats_fn(params, b)) for b in batches]
  criterion = criterion or ('zero_attention' if 'zero_attention' in stats[0]
                            else 'kl')
  check(criterion in stats[0], f'exit criterion {criterion!r} is not '
        f'available for this {cfg.variant} model; use one of '
        f'{sorted(stats[0])}')
  per_row = (lambda s: s) if per == 'token' else (lambda s: s.mean(-1))
  pooled = np.concatenate([per_row(s[criterion][:-1]).ravel()
                           for s in stats])
  pooled = pooled[np.isfinite(pooled)]
  # Empty when no early cycle has a finite statistic (KL at C=2: there is
  # no previous head to compare cycle 1's with): fixed depths only.
  thresholds = np.unique(np.quantile(pooled, np.linspace(
      0.1, 0.9, n_thresholds))) if pooled.size else np.zeros(0)
  if criterion in exits.LOW_EXITS:  # Exit when <= threshold: low ones first.
    thresholds = thresholds[::-1]
  return criterion, sweep(module, params, batches, criterion, thresholds,
                          min_cycles, per, random_baseline,
                          out_sharding=out_sharding)


def format_table(rows: list[dict]) -> str:
  lines = ['| exit rule | val loss | mean cycles | cycles run | middle '
           'compute saved |', '|---|---|---|---|---|']
  for r in rows:
    if r['criterion'] == 'fixed':
      rule = f"fixed {r['fixed_cycles']} cycles"
    elif r['criterion'] == 'random':
      rule = 'random, same cycles as the row above'
    else:
      op = '<=' if r['criterion'] in exits.LOW_EXITS else '>='
      rule = f"{r['criterion'].replace('_', ' ')} {op} {r['threshold']:.4g}"
    # Rows saved before cycles_run was counted show none.
    run = f"{r['cycles_run']:.2f}" if 'cycles_run' in r else 'n/a'
    lines.append(f"| {rule} | {r['val_loss']:.4f} | {r['mean_cycles']:.2f} "
                 f"| {run} | {100 * r['compute_saved']:.0f}% |")
  return '\n'.join(lines)


def draw(ax, rows: list[dict], title: str) -> None:
  """The sweep on a matplotlib axis: loss against mean cycles, fixed depth
  and the early-exit rule."""
  fixed = [r for r in rows if r['criterion'] == 'fixed']
  dynamic = [r for r in rows if r['criterion'] != 'fixed']
  ax.plot([r['mean_cycles'] for r in fixed], [r['val_loss'] for r in fixed],
          'o-', label='fixed depth (exit head k)')
  if dynamic:
    ax.plot([r['mean_cycles'] for r in dynamic],
            [r['val_loss'] for r in dynamic], 's--',
            label=f"early exit ({dynamic[0]['criterion']})")
  ax.set_xlabel('mean cycles per sequence')
  ax.set_ylabel('validation loss')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  draw(ax, rows, title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# --------------------------------------------------------------- ztt-eval --


def run_eval(workdir: str, split: str = 'val', criterion: str = '',
             per: str = 'sequence', random_baseline: bool = False,
             n_thresholds: int = 7, min_cycles: int = 1, batches: int = 0,
             step: int | None = None, name: str = 'early_exit',
             overrides: Mapping[str, Any] | None = None,
             stream=None) -> list[dict]:
  """ztt-eval: the early-exit sweep on a trained workdir; writes
  `eval/{name}.{json,md,png}` and returns the rows.

  `overrides` are set on the saved config (see `ztt_jax.load`), e.g.
  {'data.path': 'corpus.txt'} when the saved one does not resolve here.
  """
  stream = stream or sys.stdout
  check(split in ('val', 'train'), f'--split={split!r}: use val or train')
  check(per in PER, f'--per={per!r}: use sequence or token')
  check(bool(re.fullmatch(r'[A-Za-z0-9._-]+', name)) and name[0] != '.',
        f'--name={name!r}: use a plain file stem such as early_exit_kl '
        '(letters, digits, ._-)')
  module, params, config = ztt_jax.load(workdir, step, overrides)
  cfg = module.cfg
  corpus = data.load_corpus(config.data, workdir)
  eval_set = [jax.tree.map(jnp.asarray, b) for b in data.eval_set(
      corpus, config.data.seq_len, config.train.batch_size,
      batches or config.train.eval_batches, split)]
  check(bool(eval_set), f'the {split} split is shorter than one window of '
        f'{config.data.seq_len} tokens; use --split=train')
  criterion, rows = early_exit_sweep(module, params, eval_set, criterion,
                                     n_thresholds, min_cycles, per,
                                     random_baseline)
  out_dir = os.path.join(os.path.abspath(workdir), 'eval')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w',
            encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  table = format_table(rows)
  with open(os.path.join(out_dir, f'{name}.md'), 'w',
            encoding='utf-8') as f:
    f.write(table + '\n')
  plot(rows, os.path.join(out_dir, f'{name}.png'),
       f'{cfg.variant}, {cfg.cycles} cycles, {split} split')
  if corpus.task is not None:  # Known difficulty: per difficulty too.
    by = difficulty.format_table(rows)
    with open(os.path.join(out_dir, f'{name}.md'), 'a',
              encoding='utf-8') as f:
      f.write('\n' + by + '\n')
    difficulty.plot(rows, os.path.join(out_dir, f'{name}_difficulty.png'),
                    f'{cfg.variant}, {cfg.cycles} cycles, {corpus.task.name}')
    table += '\n\nby difficulty:\n' + by
  n_seq = sum(b['inputs'].shape[0] for b in eval_set)
  stream.write(f'early exit on {n_seq} {split} sequences of '
               f'{config.data.seq_len} tokens ({criterion}, per {per}):\n'
               f'{table}\nwrote {out_dir}/{name}.json, {name}.md, '
               f'{name}.png\n')
  return rows
