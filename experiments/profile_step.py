"""Where the train step's time goes: time per XLA op kind, from a trace.

    python experiments/profile_step.py [VARIANT] [--config.model.x=y ...]

Traces 5 steps of `configs/shakespeare_char.py:VARIANT` (default ztt) with
`jax.profiler`, reads the trace back with `jax.profiler.ProfileData`, and
prints the time per step of each kind of leaf op on the XLA threads (the
HLO instruction name up to its first dot: `dot`, `ynn_fusion`, `copy`,
`dynamic-slice...`), largest first. `experiments/bench.py` saves its output
beside the benchmark JSON.
"""

from __future__ import annotations

import collections
import glob
import os
import sys
import tempfile

import jax

from ztt_jax import configlib
from ztt_jax import train

# The config file the rows start from (any working directory).
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'configs', 'shakespeare_char.py')

STEPS = 5
CONTAINERS = ('while', 'ThunkExecutor', 'conditional', 'call')


def profile(variant: str, overrides: list[str]) -> str:
  config = configlib.from_file(f'{CONFIG}:{variant}')
  config.model.vocab_size = 65
  config = configlib.override(config, dict(
      item.removeprefix('--config.').split('=', 1) for item in overrides))
  setup = train.Setup(config, None)
  step_fn, _, _, _ = setup.jit_train_step()
  b, t = config.train.batch_size, config.data.seq_len
  trace_dir = tempfile.mkdtemp(prefix='ztt_profile_')
  with setup.context():
    state = setup.jit_init()(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0, 65)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    for _ in range(3):
      state, out = step_fn(state, batch)
    jax.block_until_ready(out)
    jax.profiler.start_trace(trace_dir)
    for _ in range(STEPS):
      state, out = step_fn(state, batch)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                          recursive=True))[-1]
  kinds = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:
        continue
      for event in line.events:
        if not event.name.startswith(CONTAINERS):
          kinds[event.name.split('.')[0]] += event.duration_ns
  total = sum(kinds.values())
  lines = [f'{variant} {" ".join(overrides)}: {total / STEPS / 1e6:.1f} ms '
           'per step in leaf ops']
  for kind, ns in kinds.most_common(15):
    lines.append(f'{ns / STEPS / 1e6:8.2f} ms {100 * ns / total:5.1f}%  '
                 f'{kind}')
  return '\n'.join(lines)


if __name__ == '__main__':
  args = sys.argv[1:]
  name = args[0] if args and not args[0].startswith('--') else 'ztt'
  print(profile(name, [a for a in args if a.startswith('--')]))
