"""Pretraining: sharded jit train step, eval, metrics, checkpoints, resume.

    ztt-train --config=configs/default.py --workdir=runs/demo
    ztt-train --config=configs/tiny.py:ztt --workdir=runs/tiny \
        --config.train.steps=50

`train(config, workdir)` is the library call; `ztt-train` (its flags in
ztt_jax/commands/train.py) loads the config file and calls it.

The batch for step s is a pure function of (seed, s), the dropout key is
`fold_in(seed, s)`, and the data iterator is checkpointed with the model, so
a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ztt_jax import checkpoint
from ztt_jax import configlib
from ztt_jax import convert
from ztt_jax import data
from ztt_jax import evaluate
from ztt_jax import exits
from ztt_jax import generate
from ztt_jax import lru
from ztt_jax import metrics as metrics_lib
from ztt_jax import model as model_lib
from ztt_jax import model_config
from ztt_jax import multihost
from ztt_jax import optim
from ztt_jax import params as params_lib
from ztt_jax import sharding
from ztt_jax import watch
from ztt_jax.errors import check
from ztt_jax.errors import check_local_path


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def loss_fn(module, model_cfg: model_config.ModelConfig, params, batch, rng,
            deterministic: bool):
  """Training loss (exit heads weighted per `model.exit_loss`) and metrics.

  A batch's `mask` (synthetic tasks: 1 at answers) limits the loss to
  the targets it marks. With `model.exit_loss_fraction` < 1 or
  `model.ce_chunk_len` the model stops before the LM head and
  `exits.feature_losses` runs it (on a subset of positions for the early
  heads, in chunks), never holding the full [C, B, T, V] logits.
  """
  from_features = model_cfg.loss_from_features
  out = module.apply({'params': params}, batch['inputs'],
                     deterministic=deterministic, rngs={'dropout': rng},
                     logits=not from_features)
  mask_BxT = batch.get('mask')  # Where targets carry loss (None: all).
  if from_features:
    logits_fn = lambda h: module.apply({'params': params}, h,
                                       method=model_lib.Transformer.lm_logits)
    ce_C = exits.feature_losses(model_cfg, logits_fn, out.features,
                                batch['targets'], jax.random.fold_in(rng, 1),
                                mask_BxT)
  else:
    ce_CxBxT = exits.head_losses(out, batch['targets'])
    ce_C = (ce_CxBxT.mean((1, 2)) if mask_BxT is None
            else exits.masked_mean(ce_CxBxT, mask_BxT))
  loss = exits.training_loss(model_cfg, ce_C)
  aux = {'ce': ce_C[-1]}
  if model_cfg.exit_heads:
    aux['ce_cycle'] = ce_C
  if out.zero_attention is not None:
    aux['zero_attention'] = out.zero_attention.mean((1, 2))
  if out.gate is not None:
    aux['gate'] = out.gate.mean((1, 2))
  return loss, aux


def make_train_step(module, model_cfg, tx, schedule, accum_steps: int,
                    seed: int, debug_nan_at_step: int = -1):
  """The (unjitted) train step: grads, optional accumulation, AdamW.

  `train_step(state, batch)`: a step whose loss or gradients are not finite
  leaves params and optimizer state unchanged (only `step` advances) and
  reports `finite=False` (`train.nan_policy=skip`).

  `train_step(state, batch, healthy)` (`train.nan_policy=stop`): as above,
  and once a step is not finite (or `healthy` is False) the whole state,
  `step` included, stands still: it stays the state from before the first
  bad step, whichever later steps the loop dispatches before it reads the
  flags. Reports `healthy` (this step's and every earlier one's `finite`)
  for the next call. Either way the decision is made on the device: the
  loop never has to wait for a step to finish before dispatching the next.

  `debug_nan_at_step` (`train.debug_nan_at_step`, a debugging switch)
  makes that step's loss and grads NaN.
  """
  deterministic = model_cfg.dropout == 0
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, module, model_cfg, deterministic=deterministic),
      has_aux=True)

  def train_step(state: TrainState, batch, healthy=None):
    rng = jax.random.fold_in(jax.random.key(seed + 1), state.step)
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batches take every accum_steps-th row, keeping rows sharded.
      micro = jax.tree.map(
          lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1),
          batch)

      def accumulate(grads, i_and_batch):
        i, mb = i_and_batch
        (loss, aux), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, grads, g), (loss, aux)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, (loss, aux) = jax.lax.scan(
          accumulate, zeros, (jnp.arange(accum_steps), micro))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      loss, aux = jax.tree.map(lambda x: x.mean(0), (loss, aux))
    if debug_nan_at_step >= 0:
      poison = jnp.where(state.step + 1 == debug_nan_at_step, jnp.nan, 1.0)
      loss = loss * poison
      grads = jax.tree.map(lambda g: g * poison, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updated = TrainState(state.step + 1,
                         optax.apply_updates(state.params, updates), opt_state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
               'lr': schedule(state.step), **aux}
    if healthy is None:  # skip: drop the update, count the step.
      apply, kept = finite, state.replace(step=state.step + 1)
    else:  # stop: stand still from the first bad step on.
      apply, kept = finite & healthy, state
      metrics['healthy'] = apply
    state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), updated, kept)
    return state, metrics

  return train_step


def _boxed_params_and_state(module, tx, seq_len: int, rng):
  """The params with their logical axes, and the fresh train state."""
  tokens_1xT = jnp.zeros((1, seq_len), jnp.int32)
  boxed = module.init(rng, tokens_1xT)['params']
  params = nn.meta.unbox(boxed)
  return boxed, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def _init_state(module, tx, seq_len: int, rng):
  return _boxed_params_and_state(module, tx, seq_len, rng)[1]


# Jitted programs and shardings of the last setups built in this process, by
# `Setup._programs_key`: a second `train` with the same model, optimizer and
# mesh (a resumed or restarted run, an in-process sweep, the tests) traces
# and compiles nothing again.
_PROGRAMS = lru.LRU(16)
# `config.train` fields the loop reads on the host only (`nan_policy` picks
# the step's signature, which is part of the program's name).
_HOST_ONLY_TRAIN_FIELDS = frozenset({
    'log_every_steps', 'eval_every_steps', 'eval_batches', 'peak_flops',
    'nan_policy', 'profile_steps', 'wandb_project', 'wandb_entity',
    'wandb_name'})


class Setup:
  """Everything the loop needs, built from a config: model, mesh, data.

  With `workdir=None` no data is read (ahead-of-time compilation, see
  compile.py): `model.vocab_size` must then be set, and `devices` (default:
  all) may be another platform's, e.g. a TPU topology's.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None,
               devices=None):
    configlib.validate(config)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config)
    sharding.check_batch(config.train.batch_size,
                         config.train.grad_accum_steps, self.mesh, self.rules)
    # Multi-process: process 0 tokenizes and writes, the others then read.
    self.corpus = None if workdir is None else multihost.coordinated_corpus(
        config.data, workdir, multihost.Comms.from_jax())
    config = ml_collections.ConfigDict(config.to_dict())
    if self.corpus is not None:
      vocab = self.corpus.tokenizer.vocab_size
      if not config.model.vocab_size:
        config.model.vocab_size = vocab
      check(config.model.vocab_size >= vocab,
            f'model.vocab_size={config.model.vocab_size} is smaller than the '
            f'tokenizer vocabulary ({vocab}); set model.vocab_size=0')
    check(config.model.vocab_size > 0,
          'model.vocab_size=0 means the tokenizer\'s size, which needs the '
          'data; set --config.model.vocab_size (e.g. 32768)')
    self.config = config
    self.model_cfg = model_config.ModelConfig.from_config(config.model)
    self.module = model_lib.Transformer(self.model_cfg)
    self.tx, self.schedule = optim.make_optimizer(config.train)

  def _programs_key(self):
    """What the programs are built from: the model, optimizer, seed, batch
    shape and layout (the config less its data, checkpoint, sample and
    logging settings) and the mesh."""
    c = self.config
    train_cfg = {k: v for k, v in c.train.to_dict().items()
                 if k not in _HOST_ONLY_TRAIN_FIELDS}
    built_from = {'model': c.model.to_dict(), 'train': train_cfg,
                  'sharding': c.sharding.to_dict(), 'seed': c.seed,
                  'seq_len': c.data.seq_len}
    return (json.dumps(built_from, sort_keys=True, default=repr), self.mesh)

  def _reused(self, name, build, reuse: bool = True):
    """`build()`, or what it returned for an equal setup before in this
    process (`_PROGRAMS`): the program is traced and compiled once."""
    if not reuse:
      return build()
    return _PROGRAMS.get((name, self._programs_key()), build)

  def state_shardings(self):
    """Logical specs -> shardings for params and the optimizer's moments
    (one trace of the model gives both the specs and the state's shapes)."""
    return self._reused('state_shardings', self._state_shardings)

  def _state_shardings(self):
    boxed, abstract = jax.eval_shape(
        functools.partial(_boxed_params_and_state, self.module, self.tx,
                          self.config.data.seq_len), jax.random.key(0))
    param_specs = nn.get_partition_spec(boxed)
    opt_specs = optax.tree_map_params(
        self.tx, lambda _, spec: spec, abstract.opt_state, param_specs,
        transform_non_params=lambda _: jax.sharding.PartitionSpec())
    specs = TrainState(jax.sharding.PartitionSpec(), param_specs, opt_specs)
    return abstract, sharding.state_shardings(specs, abstract, self.mesh,
                                              self.rules)

  def jit_init(self):
    """The fresh train state `init(rng)` under `jax.jit`, already sharded
    (no full copy on any one device)."""
    _, shardings = self.state_shardings()
    return self._reused('init', lambda: jax.jit(
        functools.partial(_init_state, self.module, self.tx,
                          self.config.data.seq_len),
        out_shardings=shardings))

  def jit_train_step(self, stop_on_nonfinite: bool = False,
                     reuse: bool = True):
    """The sharded train step under `jax.jit` (state donated), with the
    abstract state and the state and batch shardings it takes.

    With `stop_on_nonfinite` it takes and reports the `healthy` flag too
    (`make_train_step`; what `train.nan_policy=stop` runs). By default an
    equal setup earlier in this process gives its jitted step, already
    traced and compiled; `reuse=False` builds a new one (what timing the
    compile needs).
    """
    abstract, shardings = self.state_shardings()
    batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    replicated = sharding.replicated(self.mesh)

    def build():
      return jax.jit(
          make_train_step(self.module, self.model_cfg, self.tx, self.schedule,
                          self.config.train.grad_accum_steps,
                          self.config.seed,
                          self.config.train.debug_nan_at_step),
          in_shardings=(shardings, batch_sharding)
          + ((replicated,) if stop_on_nonfinite else ()),
          out_shardings=(shardings, replicated),
          donate_argnums=0)

    step_fn = self._reused(f'train_step(stop={stop_on_nonfinite})', build,
                           reuse)
    return step_fn, abstract, shardings, batch_sharding

  def jit_eval(self):
    """`evaluate.eval_outputs(params, batch)` under `jax.jit`, sharded as
    the train step's params and batches, its outputs replicated."""
    _, shardings = self.state_shardings()
    return self._reused('eval', lambda: jax.jit(
        functools.partial(evaluate.eval_outputs, self.module),
        in_shardings=(shardings.params,
                      sharding.batch_sharding(self.mesh, self.rules)),
        out_shardings=sharding.replicated(self.mesh)))

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical rules, for tracing the model."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def train(config: ml_collections.ConfigDict, workdir: str, stream=None,
          stop_at: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the final summary.

  `stop_at` ends this run early at that step, with a checkpoint, as if it
  had been interrupted there (the schedule still follows `train.steps`).
  """
  check_local_path('--workdir', workdir)
  if config.init_from:
    check_local_path('init_from', config.init_from)
  workdir = os.path.abspath(workdir)
  check(not config.init_from
        or os.path.abspath(config.init_from) != workdir,
        f'--workdir={workdir} is the init_from directory, whose checkpoint has '
        'no optimizer state; fine-tune in a new --workdir')
  metrics_lib.require_wandb(config)
  _check_writable(workdir)
  check_resumable(workdir, config)
  multihost.check_shared_workdir(workdir, multihost.Comms.from_jax())
  setup = Setup(config, workdir)
  config, model_cfg = setup.config, setup.model_cfg
  t = config.train
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, t.steps, enabled=is_main,
                                    stream=stream, config=config)

  step_fn, abstract, shardings, batch_sharding = setup.jit_train_step(
      stop_on_nonfinite=t.nan_policy == 'stop')
  eval_fn = setup.jit_eval()

  # This process's rows of every batch: those its devices hold.
  rows_R = sharding.process_rows(batch_sharding,
                                 (t.batch_size, config.data.seq_len))
  dataset = data.train_dataset(setup.corpus, config.data.seq_len,
                               t.batch_size, config.seed, rows_R)
  data_iter = data.make_train_iterator(dataset)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                 config.checkpoint.every_steps,
                                 config.checkpoint.keep,
                                 config.checkpoint.async_save)
  n_params = params_lib.count_params(abstract.params)
  flops = params_lib.flops_per_token(model_cfg, config.data.seq_len)
  writer.print(f'ztt-train: {model_cfg.variant}, {n_params:,} distinct params, '
               f'{model_cfg.executed_layers} layers executed per token, '
               f'{flops / 1e6:.2f} MFLOPs/token (train), mesh '
               f'{dict(setup.mesh.shape)}, {len(jax.devices())} device(s)')

  with setup.context():
    latest, state = ckpt.latest_step(), None
    if latest is not None:
      target = checkpoint.with_sharding(abstract, shardings)
      state, latest = ckpt.restore_latest_good(target, data_iter,
                                               writer.print)
      if state is None:  # Every checkpoint was unreadable: start afresh.
        data_iter = data.make_train_iterator(dataset)
      else:
        writer.print(f'resumed from {ckpt.directory}/{latest} '
                     f'(step {latest})')
    if state is None and config.init_from:
      # Fine-tuning: params from a converted checkpoint, fresh optimizer.
      state = convert.init_state_from(config.init_from, setup, abstract,
                                      shardings)
      writer.print(f'initialised params from {config.init_from}')
    elif state is None:
      # Initialised already sharded: no full copy on any one device.
      state = setup.jit_init()(jax.random.key(config.seed))

    eval_set = [
        data.to_global_batch({k: v[rows_R] for k, v in b.items()},
                             batch_sharding, t.batch_size)
        for b in data.eval_set(setup.corpus, config.data.seq_len,
                               t.batch_size, t.eval_batches)
    ]
    peak = t.peak_flops or metrics_lib.measure_matmul_peak()
    tokens_per_step = t.batch_size * config.data.seq_len

    def run_eval(params) -> dict[str, Any]:
      if not eval_set:
        return {}
      outs = [jax.device_get(eval_fn(params, b)) for b in eval_set]
      return evaluate.summarize_outputs(outs, model_cfg.exit_heads)

    step = int(jax.device_get(state.step))
    start_step, last_log, t_last = step, step, time.perf_counter()
    last_eval = {}
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    preempted = None
    guard = watch.NonfiniteGuard(t.nan_policy, dataset, workdir, writer,
                           setup.mesh)
    profiler = watch.StepProfiler(configlib.profile_range(t),
                            os.path.join(workdir, 'profile'), is_main,
                            writer.print)
    with watch.StopSignals(jax.process_count() > 1, step) as signals, profiler:
      while step < end:
        local_batch = next(data_iter)
        batch = data.to_global_batch(local_batch, batch_sharding,
                                     t.batch_size)
        profiler.before_step(step + 1)
        # Dispatched without waiting for the step before it to finish.
        with profiler.annotate(step + 1):
          state, step_metrics = step_fn(state, batch, *guard.step_args())
        step += 1
        profiler.after_step(step, state)
        guard.record(step, step_metrics)
        if step == start_step + 1:
          jax.block_until_ready(state)
          compile_s = time.perf_counter() - t_last
          t_last, last_log = time.perf_counter(), step
          writer.print(f'first step (compile + run) took {compile_s:.1f}s')
        save = step % config.checkpoint.every_steps == 0
        do_eval = step == end or (t.eval_every_steps and
                                  step % t.eval_every_steps == 0)
        log = step % t.log_every_steps == 0 or do_eval
        if save or log:  # Steps that read the device anyway.
          guard.check(state)
        if save:
          ckpt.save(step, state, data_iter, config, force=True)
        if log:
          row = jax.device_get(step_metrics)
          row.pop('healthy', None)
          now = time.perf_counter()
          if step > last_log:
            tps = (step - last_log) * tokens_per_step / (now - t_last)
            row['tokens_per_s'] = tps
            row['mfu'] = flops * tps / (peak * len(jax.devices()))
          if do_eval:
            last_eval = run_eval(state.params)
            row.update(last_eval)
          writer.console(step, writer.write(step, row))
          t_last, last_log = time.perf_counter(), step
        preempted = signals.check(step)
        if preempted:
          break
    guard.check(state)
    if ckpt.latest_step() != step:  # The last step, saved and on disk.
      ckpt.save(step, state, data_iter, config, force=True)
    ckpt.wait()
    if preempted:
      ckpt.close()
      writer.print(f'stopped by {preempted} at step {step}: saved '
                   f'{ckpt.directory}/{step}; run the same command to '
                   'continue')
      writer.close()
      return {'step': step, 'preempted': preempted,
              'checkpoint': f'{ckpt.directory}/{step}'}
    if not last_eval and step == t.steps:
      last_eval = run_eval(state.params)
    summary = {'step': step, 'checkpoint': f'{ckpt.directory}/{step}',
               'params': n_params}
    summary.update(last_eval)
    if step == t.steps:
      _print_summary(writer, setup, state.params, eval_set, summary)
  ckpt.close()
  writer.close()
  return summary


def _check_writable(workdir: str) -> None:
  """The workdir (or its first existing parent) must be a writable dir."""
  path = workdir
  while not os.path.exists(path):
    path = os.path.dirname(path)
  check(os.path.isdir(path) and os.access(path, os.W_OK),
        f'--workdir={workdir}: {path} is not a writable directory; pick a '
        'workdir you can write to')


def check_resumable(workdir: str, config) -> None:
  """Refuses, before anything is written, to resume a workdir whose latest
  checkpoint was trained with other model settings than `config`'s: of
  those, only fields whose effect is 'none' (`model_config.effect`: dtype,
  remat policy, attention path, ...) may change on a resume."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return
  try:
    saved, _ = checkpoint.read_config(workdir)
  except Exception:  # pylint: disable=broad-except
    return  # Unreadable: restore_latest_good quarantines it.
  new = config.model.to_dict()
  # 0: the tokenizer's size, which a resume reads from this workdir.
  new['vocab_size'] = new['vocab_size'] or saved.model.vocab_size
  changes = model_config.changed(saved.model, new,
                                 model_config.RESUME_FIXED)
  check(not changes,
        f'the checkpoint in {checkpoint.checkpoint_dir(workdir)} was trained '
        f'with different model settings ({model_config.describe(changes)}); '
        'use a new --workdir or the same config')


def _print_summary(writer, setup: Setup, params, eval_set, summary):
  config = setup.config
  tok = setup.corpus.tokenizer
  if 'val_loss' in summary:
    writer.print(f"final val loss {summary['val_loss']:.4f}" + (
        ' (per exit head: ' + ', '.join(
            f'{x:.3f}' for x in summary['val_loss_cycle']) + ')'
        if 'val_loss_cycle' in summary else ''))
  if config.sample.max_new_tokens > 0:
    prompt = (tok.encode(config.sample.prompt) if config.sample.prompt
              else data.sample_prompt(setup.corpus, config.data.seq_len))
    new = generate.sample(setup.module, params, prompt,
                          config.sample.max_new_tokens,
                          jax.random.key(config.seed),
                          config.data.seq_len, config.sample.temperature,
                          config.sample.top_k)
    summary['sample'] = tok.decode(new)
    writer.print('--- sample (prompt, then model) ---\n'
                 f'{tok.decode(prompt)}\u2502{summary["sample"]}\n---')
  if eval_set and setup.model_cfg.exit_heads:
    # The same real early-exit loop as ztt-eval, on the validation batches.
    criterion, rows = evaluate.early_exit_sweep(
        setup.module, params, eval_set, n_thresholds=3,
        out_sharding=sharding.replicated(setup.mesh))
    summary['early_exit'] = rows
    writer.print(f'early exit on the validation batches ({criterion}, per '
                 'sequence; ztt-eval for more):\n'
                 + evaluate.format_table(rows))
  writer.print(f"checkpoint: {summary['checkpoint']}")
