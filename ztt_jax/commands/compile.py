"""ztt-compile: will a config fit a TPU slice? Compiled ahead of time.

    ztt-compile --config=configs/budget.py:1b --topology=v5e:16x16
    ztt-compile --config=configs/budget.py:350m,vanilla --topology=v5p:2x2x2 \\
        --mesh=1,-1,2

Lowers and compiles the exact sharded train step ztt-train runs for the TPU
topology, on any machine (needs libtpu: pip install -e ".[tpu]"), allocating
nothing; prints the per-device memory against the chip's HBM, the FLOPs and
a roofline estimate (lower bound on step time, upper bound on MFU), then the
report as one JSON line. Runs `compile.compile_for_topology`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ztt_jax.commands import common

PROG = 'ztt-compile'


@dataclasses.dataclass(frozen=True)
class Options:
  config: str = common.config_flag()
  topology: str = common.flag(
      None, 'TPU slice, GENERATION:CHIPS, e.g. v5e:16x16, v5p:2x2x2.',
      required=True, metavar='GEN:CHIPS')
  mesh: str | None = common.flag(
      None, 'DATA,FSDP,TENSOR sizes overriding config.mesh, e.g. 1,-1,4 '
      '(-1: the remaining devices).', metavar='D,F,T')


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-compile [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, overrides = common.parse(Options, argv, PROG, __doc__,
                                    common.CONFIG_FILE)
  common.run(PROG, lambda: _compile(options, overrides))


def _compile(options: Options, overrides: dict[str, str]) -> None:
  # After the flags: --help and flag errors do not wait for jax.
  from ztt_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from ztt_jax import configlib  # pylint: disable=g-import-not-at-top
  config = configlib.override(configlib.from_file(options.config), overrides)
  report = compile_lib.compile_for_topology(config, options.topology,
                                            options.mesh)
  print(compile_lib.format_report(report), flush=True)


if __name__ == '__main__':
  main()
