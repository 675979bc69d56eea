"""ztt-bench: train-step speed, MFU, compile time and compiled memory.

    ztt-bench --config=configs/shakespeare_char.py:ztt
    ztt-bench --config=configs/shakespeare_char.py:head_tail_cycle --steps=30
    ztt-bench --config=configs/shakespeare_char.py:ztt \
        --baseline=head_tail_cycle --compile_cycles=2,8

With `--baseline` the same config is also measured as that variant, and as
ZTT without exit heads (`exit_loss=none`: the zero tokens and gate alone),
and the step-time ratios are printed; with `--attention_baseline` the same
config is also measured with that `model.attention` (e.g. the fused
`dot_product` config against `xla`) and the step-time and temporary-memory
ratios are printed; with `--compile_cycles` the train step
is also compiled at each cycle count and the compile-time ratio (largest
count over smallest) is printed. `targets` holds the issue's targets with
the measured value and whether it is met.

Prints one JSON object. The step runs on random tokens of the config's
shape (no data is read), after warm-up; the time is the median of `--steps`
timed steps, each blocked until its metrics are ready. MFU divides model
FLOPs (`params.flops_per_token`, every executed layer) by a matmul peak
measured in the same run on the same devices, in the compute dtype.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections

from ztt_jax import metrics
from ztt_jax import model as model_lib
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax import train
from ztt_jax.errors import check


def bench(config: ml_collections.ConfigDict, steps: int = 20,
          warmup: int = 3, peak: float | None = None,
          compile_only: bool = False) -> dict:
  """Measures one config's train step; returns the numbers as a dict.

  `peak` (FLOP/s per device) skips measuring the matmul peak again;
  `compile_only` stops after lowering and compiling.
  """
  check(steps > 0 and warmup >= 0,
        f'--steps={steps} must be > 0 and --warmup={warmup} >= 0')
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.model.vocab_size:  # No data is read: the tokenizer's size.
    config.model.vocab_size = {'byte': 256, 'char': 65}.get(
        config.data.tokenizer, config.data.vocab_size)
  setup = train.Setup(config, None)
  # A new jitted step (reuse=False): the compile is timed.
  step_fn, abstract, shardings, batch_sharding = setup.jit_train_step(
      reuse=False)
  b, t = config.train.batch_size, config.data.seq_len
  batch_spec = {k: jax.ShapeDtypeStruct((b, t), jnp.int32,
                                        sharding=batch_sharding)
                for k in ('inputs', 'targets')}
  state_spec = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  with setup.context():
    t0 = time.perf_counter()
    lowered = step_fn.lower(state_spec, batch_spec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    if compile_only:
      return {'n_cycles': setup.model_cfg.cycles, 'trace_lower_s': t1 - t0,
              'compile_s': t2 - t1}
    state = setup.jit_init()(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0,
                                config.model.vocab_size)
    batch = jax.device_put({'inputs': tokens[:, :-1],
                            'targets': tokens[:, 1:]}, batch_sharding)
    for _ in range(warmup):
      state, _ = compiled(state, batch)
    jax.block_until_ready((state, batch))  # Also with --warmup=0.
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, out = compiled(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops_per_token = params_lib.flops_per_token(setup.model_cfg, t)
  if peak is None:
    peak = metrics.measure_matmul_peak(
        dtype=model_config.DTYPES[setup.model_cfg.dtype])
  n_devices = len(setup.mesh.devices.flat)
  # The model's own MLP matmul ([tokens, D] x [D, F]): how fast this machine
  # runs the shapes the step is made of, against the square-matmul peak.
  mlp_shape = (b * t // n_devices, setup.model_cfg.d_model,
               setup.model_cfg.resolved_d_ff)
  mlp_flops = metrics.measure_matmul_peak(
      dtype=model_config.DTYPES[setup.model_cfg.dtype], shape=mlp_shape,
      repeats=20)
  memory = compiled.memory_analysis()
  result = {
      'config': setup.model_cfg.variant,
      'attention': setup.model_cfg.attention,
      'n_cycles': setup.model_cfg.cycles,
      'params': params_lib.count_params(abstract.params),
      'batch_size': b, 'seq_len': t, 'devices': n_devices,
      'step_s_median': step_s,
      'step_s_min': min(times), 'step_s_max': max(times),
      'tokens_per_s': b * t / step_s,
      'flops_per_token': flops_per_token,
      'achieved_flops_per_s': flops_per_token * b * t / step_s,
      'matmul_peak_flops_per_s': peak,
      'mfu': flops_per_token * b * t / step_s / (peak * n_devices),
      'mlp_matmul_shape': list(mlp_shape),
      'mlp_matmul_flops_per_s': mlp_flops,
      'mlp_matmul_over_peak': mlp_flops / peak,
      'trace_lower_s': t1 - t0,
      'compile_s': t2 - t1,
  }
  if memory is not None:
    for name in ('argument_size_in_bytes', 'output_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes'):
      result[name] = int(getattr(memory, name, 0))
  return result


def _variant(config: ml_collections.ConfigDict, **model) -> (
    ml_collections.ConfigDict):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(model)
  return config


# The targets for this 2-core CPU (shakespeare config).
MFU_TARGET = 0.5
ZTT_OVER_HTC_TARGET = 1.05
COMPILE_RATIO_TARGET = 1.3


def compare(config: ml_collections.ConfigDict, steps: int = 20,
            warmup: int = 3, baseline: str = '',
            compile_cycles: tuple[int, ...] = (),
            attention_baseline: str = '') -> dict:
  """`bench` of `config`, plus the baseline, attention and compile-time
  comparisons."""
  check(not attention_baseline
        or attention_baseline in model_config.ATTENTIONS,
        f'--attention_baseline={attention_baseline!r} is not one of '
        f'{model_config.ATTENTIONS}')
  result = bench(config, steps, warmup)
  peak = result['matmul_peak_flops_per_s']
  targets = {'mfu': dict(value=result['mfu'], target=f'>= {MFU_TARGET}',
                         met=result['mfu'] >= MFU_TARGET)}
  if baseline:
    check(baseline in model_config.VARIANTS, f'--baseline={baseline!r} is not '
          f'one of {model_config.VARIANTS}')
    base = bench(_variant(config, variant=baseline, zero_pool='auto',
                          gate='auto', exit_loss='auto'), steps, warmup, peak)
    result['baseline'] = base
    ratio = result['step_s_median'] / base['step_s_median']
    result['step_ratio_vs_baseline'] = ratio
    name = f'{config.model.variant}_over_{baseline}_step_time'
    targets[name] = dict(value=ratio, target=f'<= {ZTT_OVER_HTC_TARGET}',
                         met=ratio <= ZTT_OVER_HTC_TARGET)
    if config.model.variant == 'ztt':
      bare = bench(_variant(config, exit_loss='none'), steps, warmup, peak)
      result['ztt_without_exit_heads'] = bare
      bare_ratio = bare['step_s_median'] / base['step_s_median']
      result['step_ratio_without_exit_heads_vs_baseline'] = bare_ratio
      targets[f'ztt_without_exit_heads_over_{baseline}_step_time'] = dict(
          value=bare_ratio, target=f'<= {ZTT_OVER_HTC_TARGET}',
          met=bare_ratio <= ZTT_OVER_HTC_TARGET)
  if attention_baseline:
    base = bench(_variant(config, attention=attention_baseline), steps,
                 warmup, result['matmul_peak_flops_per_s'])
    result['attention_baseline'] = base
    result['step_ratio_vs_attention_baseline'] = (
        result['step_s_median'] / base['step_s_median'])
    if 'temp_size_in_bytes' in result and base.get('temp_size_in_bytes'):
      result['temp_memory_ratio_vs_attention_baseline'] = (
          result['temp_size_in_bytes'] / base['temp_size_in_bytes'])
  if compile_cycles:
    by_cycles = {c: bench(_variant(config, n_cycles=c), compile_only=True)
                 for c in compile_cycles}
    result['compile_s_by_cycles'] = {
        str(c): r['compile_s'] for c, r in by_cycles.items()}
    lo, hi = min(compile_cycles), max(compile_cycles)
    ratio = by_cycles[hi]['compile_s'] / by_cycles[lo]['compile_s']
    result['compile_ratio'] = ratio
    targets[f'compile_{hi}_over_{lo}_cycles'] = dict(
        value=ratio, target=f'<= {COMPILE_RATIO_TARGET}',
        met=ratio <= COMPILE_RATIO_TARGET)
  result['targets'] = targets
  return result
