"""ztt-bench: train-step speed, MFU, compile time and compiled memory.

    ztt-bench --config=configs/shakespeare_char.py:ztt
    ztt-bench --config=configs/shakespeare_char.py:head_tail_cycle --steps=30

Prints one JSON object. The step runs on random tokens of the config's
shape (no data is read), after warm-up; the time is the median of `--steps`
timed steps, each blocked until its metrics are ready. MFU divides model
FLOPs (`model.flops_per_token`, every executed layer) by a matmul peak
measured in the same run on the same devices, in the compute dtype.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from ztt_jax import metrics
from ztt_jax import model as model_lib
from ztt_jax import train
from ztt_jax.errors import check


def bench(config: ml_collections.ConfigDict, steps: int = 20,
          warmup: int = 3) -> dict:
  """Measures one config's train step; returns the numbers as a dict."""
  check(steps > 0 and warmup >= 0,
        f'--steps={steps} must be > 0 and --warmup={warmup} >= 0')
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.model.vocab_size:  # No data is read: the tokenizer's size.
    config.model.vocab_size = {'byte': 256, 'char': 65}.get(
        config.data.tokenizer, config.data.vocab_size)
  setup = train.Setup(config, None)
  step_fn, abstract, shardings, batch_sharding = setup.jit_train_step()
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
    state = jax.jit(setup.init_state, out_shardings=shardings)(
        jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0,
                                config.model.vocab_size)
    batch = jax.device_put({'inputs': tokens[:, :-1],
                            'targets': tokens[:, 1:]}, batch_sharding)
    for _ in range(warmup):
      state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, out = compiled(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops_per_token = model_lib.flops_per_token(setup.model_cfg, t)
  peak = metrics.measure_matmul_peak(
      dtype=model_lib.DTYPES[setup.model_cfg.dtype])
  n_devices = len(setup.mesh.devices.flat)
  memory = compiled.memory_analysis()
  result = {
      'config': setup.model_cfg.variant,
      'n_cycles': setup.model_cfg.cycles,
      'params': model_lib.count_params(abstract.params),
      'batch_size': b, 'seq_len': t, 'devices': n_devices,
      'step_s_median': step_s,
      'step_s_min': min(times), 'step_s_max': max(times),
      'tokens_per_s': b * t / step_s,
      'flops_per_token': flops_per_token,
      'achieved_flops_per_s': flops_per_token * b * t / step_s,
      'matmul_peak_flops_per_s': peak,
      'mfu': flops_per_token * b * t / step_s / (peak * n_devices),
      'trace_lower_s': t1 - t0,
      'compile_s': t2 - t1,
  }
  if memory is not None:
    for name in ('argument_size_in_bytes', 'output_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes'):
      result[name] = int(getattr(memory, name, 0))
  return result


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ztt_jax import cli  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  cli.run_main('ztt-bench', lambda: print(json.dumps(
      bench(f.config, f.steps, f.warmup)), file=sys.stdout))


def run() -> None:
  """Console entry point: `ztt-bench --config=configs/X.py[:arg]`."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed steps (the median is reported).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.mark_flags_as_required(['config'])
  app.run(main)


if __name__ == '__main__':
  run()
