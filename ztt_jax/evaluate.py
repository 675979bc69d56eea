"""Validation loss per exit head, and the early-exit summary.

The summary replays sequence-level early exit from one full forward pass:
cycle c's output never depends on later cycles, so stopping a sequence after
cycle c gives exactly exit head c's loss. The exit statistic is the mean
zero-token attention of the cycle just finished (DESIGN.md), averaged over
the sequence's tokens; a sequence stops at the first cycle >= `min_cycles`
whose statistic reaches the threshold.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ztt_jax
from ztt_jax import data
from ztt_jax.errors import check


def cross_entropy(logits_xV: jax.Array, targets_x: jax.Array) -> jax.Array:
  """Float32 token cross-entropy, same shape as `targets_x`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_xV.astype(jnp.float32), targets_x)


def eval_outputs(module, params, batch) -> dict[str, jax.Array]:
  """Per-sequence losses per exit head and the exit statistic.

  Returns `ce_CxB` (the final head only, C=1, without exit heads) and
  `zero_attention_CxB` (absent without zero tokens).
  """
  out = module.apply({'params': params}, batch['inputs'])
  logits = out.cycle_logits if out.cycle_logits is not None else (
      out.logits[None])
  result = {'ce_CxB': cross_entropy(logits, batch['targets'][None]).mean(-1)}
  if out.zero_attention is not None:
    result['zero_attention_CxB'] = out.zero_attention.mean(-1)
  return result


def early_exit_table(ce_CxB: np.ndarray, stat_CxB: np.ndarray | None,
                     thresholds=(), min_cycles: int = 1) -> list[dict]:
  """Rows of (fixed depth or threshold) -> val loss, mean cycles, saving."""
  ce_CxB = np.asarray(ce_CxB)
  c = ce_CxB.shape[0]
  rows = [dict(criterion='fixed', fixed_cycles=k + 1,
               val_loss=float(ce_CxB[k].mean()), mean_cycles=float(k + 1),
               compute_saved=1 - (k + 1) / c) for k in range(c)]
  if stat_CxB is None:
    return rows
  stat_CxB = np.asarray(stat_CxB)
  for tau in thresholds:
    passed_CxB = stat_CxB >= tau
    passed_CxB[:min_cycles - 1] = False
    passed_CxB[-1] = True
    exit_B = passed_CxB.argmax(0)  # First cycle that passes.
    loss = ce_CxB[exit_B, np.arange(ce_CxB.shape[1])].mean()
    mean_cycles = float((exit_B + 1).mean())
    rows.append(dict(criterion='zero_attention', threshold=float(tau),
                     val_loss=float(loss), mean_cycles=mean_cycles,
                     compute_saved=1 - mean_cycles / c))
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ['| exit rule | val loss | mean cycles | middle compute saved |',
           '|---|---|---|---|']
  for r in rows:
    op = '>=' if r['criterion'] == 'zero_attention' else '<='
    rule = (f"fixed {r['fixed_cycles']} cycles" if r['criterion'] == 'fixed'
            else f"{r['criterion'].replace('_', ' ')} {op} {r['threshold']:.4g}")
    lines.append(f"| {rule} | {r['val_loss']:.4f} | {r['mean_cycles']:.2f} "
                 f"| {100 * r['compute_saved']:.0f}% |")
  return '\n'.join(lines)


# ------------------------------------------------- ztt-eval: the trade-off --


def exit_statistics(module, params, batch) -> dict[str, jax.Array]:
  """Per-sequence exit statistics of every cycle from one full pass, [C, B]:
  the distributions the threshold sweep is drawn from."""
  out = module.apply({'params': params}, batch['inputs'])
  stats = {}
  if out.zero_attention is not None:
    stats['zero_attention'] = out.zero_attention.mean(-1)
  if out.gate is not None:
    stats['gate'] = out.gate.mean(-1)
  if out.cycle_logits is not None:
    logp = jax.nn.log_softmax(out.cycle_logits)
    kl_CxBxT = jnp.sum(jnp.exp(logp[1:]) * (logp[1:] - logp[:-1]), -1)
    stats['kl'] = jnp.concatenate(
        [jnp.full((1,) + kl_CxBxT.shape[1:2], jnp.inf), kl_CxBxT.mean(-1)])
  return stats


def sweep(cfg, params, batches, criterion: str, thresholds, min_cycles: int = 1
          ) -> list[dict]:
  """Val loss and cycles for fixed depths 1..C and each exit threshold.

  Runs the real early-exit path (`generate.forward`, a `while_loop` over
  cycles with per-sequence exit), one compile for all thresholds.
  """
  from ztt_jax import generate  # pylint: disable=g-import-not-at-top
  params = generate.model_lib.convert_params(params, scan_layers=True)
  rule = generate.ExitRule(criterion, min_cycles).validate(cfg)

  @jax.jit
  def run(params, batch, threshold, forced_cycles):
    b, t = batch['inputs'].shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    forced = None if forced_cycles is None else jnp.full((b, t),
                                                         forced_cycles)
    logits, cycles_BxT, _ = generate.forward(
        cfg, params, batch['inputs'], positions_BxT, None, rule, threshold,
        forced)
    return cross_entropy(logits, batch['targets']).mean(-1), cycles_BxT[:, 0]

  def evaluate_rule(threshold=0.0, forced=None):
    ce, cycles = zip(*[jax.device_get(run(params, b, jnp.float32(threshold),
                                          forced)) for b in batches])
    ce, cycles = np.concatenate(ce), np.concatenate(cycles)
    mean_cycles = float(cycles.mean())
    return dict(val_loss=float(ce.mean()), mean_cycles=mean_cycles,
                compute_saved=1 - mean_cycles / cfg.cycles)

  rows = [dict(criterion='fixed', fixed_cycles=k,
               **evaluate_rule(forced=jnp.int32(k)))
          for k in range(1, cfg.cycles + 1)]
  rows += [dict(criterion=criterion, threshold=float(tau),
                **evaluate_rule(threshold=float(tau))) for tau in thresholds]
  return rows


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
             n_thresholds: int = 7, min_cycles: int = 1, batches: int = 0,
             step: int | None = None,
             overrides: Mapping[str, Any] | None = None,
             stream=None) -> list[dict]:
  """ztt-eval: the early-exit sweep on a trained workdir; writes
  `eval/early_exit.{json,md,png}` and returns the rows.

  `overrides` are set on the saved config (see `ztt_jax.load`), e.g.
  {'data.path': 'corpus.txt'} when the saved one does not resolve here.
  """
  stream = stream or sys.stdout
  check(split in ('val', 'train'), f'--split={split!r}: use val or train')
  module, params, config = ztt_jax.load(workdir, step, overrides)
  cfg = module.cfg
  check(cfg.cycles > 1, f'this {cfg.variant} model runs one cycle: there is '
        'nothing to exit early from; evaluate a cycled variant')
  check(cfg.exit_heads, f'this {cfg.variant} model has no exit heads '
        f'(model.exit_loss={cfg.exit_loss}): there is nothing to exit early '
        'with; train it with model.exit_loss=linear, uniform or last')
  corpus = data.prepare(config.data, workdir)
  tokens = corpus.val_N if split == 'val' else corpus.train_N
  check(len(tokens) > config.data.seq_len, f'the {split} split has '
        f'{len(tokens)} tokens, fewer than one window; use --split=train')
  eval_set = [jax.tree.map(jnp.asarray, b) for b in data.eval_batches(
      tokens, config.data.seq_len, config.train.batch_size,
      batches or config.train.eval_batches)]
  stats_fn = jax.jit(functools.partial(exit_statistics, module))
  stats = [jax.device_get(stats_fn(params, b)) for b in eval_set]
  criterion = criterion or ('zero_attention' if 'zero_attention' in stats[0]
                            else 'kl')
  check(criterion in stats[0], f'--criterion={criterion} is not available '
        f'for this {cfg.variant} model (have {sorted(stats[0])})')
  pooled = np.concatenate([s[criterion][:-1] for s in stats], axis=1)
  pooled = pooled[np.isfinite(pooled)]
  thresholds = np.unique(np.quantile(pooled, np.linspace(0.1, 0.9,
                                                         n_thresholds)))
  if criterion in ('gate', 'kl'):  # Exit when <= threshold: low ones first.
    thresholds = thresholds[::-1]
  rows = sweep(cfg, params, eval_set, criterion, thresholds, min_cycles)
  out_dir = os.path.join(os.path.abspath(workdir), 'eval')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'early_exit.json'), 'w',
            encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  table = format_table(rows)
  with open(os.path.join(out_dir, 'early_exit.md'), 'w',
            encoding='utf-8') as f:
    f.write(table + '\n')
  plot(rows, os.path.join(out_dir, 'early_exit.png'),
       f'{cfg.variant}, {cfg.cycles} cycles, {split} split')
  n_seq = sum(b['inputs'].shape[0] for b in eval_set)
  stream.write(f'early exit on {n_seq} {split} sequences of '
               f'{config.data.seq_len} tokens ({criterion}, per sequence):\n'
               f'{table}\nwrote {out_dir}/early_exit.json, early_exit.md, '
               'early_exit.png\n')
  return rows
