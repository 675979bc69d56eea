"""ztt-bench: train-step speed, MFU, compile time and compiled memory.

    ztt-bench --config=configs/shakespeare_char.py:ztt
    ztt-bench --config=configs/shakespeare_char.py:ztt \\
        --baseline=head_tail_cycle --compile_cycles=2,8
    ztt-bench --config=configs/shakespeare_char.py:ztt \\
        --config.model.attention=dot_product --attention_baseline=xla

Times the config's train step on random tokens (no data is read) and prints
one JSON object; with --baseline also that variant (and ztt without exit
heads) and the step-time ratios; with --attention_baseline also the config
with that model.attention and the step-time and memory ratios; with
--compile_cycles the compile time at each cycle count. Runs `bench.compare`;
bench.py explains the numbers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from ztt_jax.commands import common
from ztt_jax.errors import check

PROG = 'ztt-bench'


@dataclasses.dataclass(frozen=True)
class Options:
  config: str = common.config_flag()
  steps: int = common.flag(20, 'Timed steps (the median is reported).')
  warmup: int = common.flag(3, 'Untimed steps after compilation.')
  baseline: str = common.flag(
      '', 'Also measure this variant (e.g. head_tail_cycle) and report the '
      'step-time ratio.', metavar='VARIANT')
  attention_baseline: str = common.flag(
      '', 'Also measure the config with this model.attention (xla or '
      'dot_product) and report the step-time and memory ratios.',
      metavar='ATTENTION')
  compile_cycles: str = common.flag(
      '', 'Also compile at these cycle counts (e.g. 2,8) and report the '
      'compile-time ratio.', metavar='C1,C2,...')


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-bench [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, overrides = common.parse(Options, argv, PROG, __doc__,
                                    common.CONFIG_FILE)
  common.run(PROG, lambda: _bench(options, overrides))


def _bench(options: Options, overrides: dict[str, str]) -> None:
  cycles = cycle_counts(options.compile_cycles)
  # After the flags: --help and flag errors do not wait for jax.
  from ztt_jax import bench, configlib  # pylint: disable=g-import-not-at-top
  config = configlib.override(configlib.from_file(options.config), overrides)
  result = bench.compare(config, options.steps, options.warmup,
                         options.baseline, cycles,
                         options.attention_baseline)
  print(json.dumps(result), flush=True)


def cycle_counts(text: str) -> tuple[int, ...]:
  """'2,8' -> (2, 8); '' -> (); raises ConfigError."""
  try:
    cycles = tuple(int(c) for c in text.split(',') if c.strip())
  except ValueError:
    cycles = ()
  check(not text or (len(cycles) >= 2 and min(cycles) > 0),
        f'--compile_cycles={text!r}: give two or more positive counts, '
        'e.g. --compile_cycles=2,8')
  return cycles


if __name__ == '__main__':
  main()
