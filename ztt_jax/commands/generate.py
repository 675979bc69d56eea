"""ztt-generate: continue a prompt with a trained workdir's checkpoint.

    ztt-generate --workdir=runs/demo --prompt="def main():"
    ztt-generate --workdir=runs/demo --prompt="def main():" \\
        --exit_threshold=0.5 --exit_criterion=zero_attention

Prints the prompt and its continuation, then the tokens generated, the mean
cycles each took (fewer with early exit) and the decoding speed. Runs
`generate.run_generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ztt_jax.commands import common

PROG = 'ztt-generate'


@dataclasses.dataclass(frozen=True)
class Options:
  workdir: str = common.flag(None, 'A training workdir.', required=True,
                             metavar='DIR')
  prompt: str = common.flag(None, 'Text to continue.', required=True)
  max_new_tokens: int = common.flag(200, 'Tokens to generate.')
  temperature: float = common.flag(0.8, 'Sampling temperature; 0: greedy.')
  top_k: int = common.flag(0, 'Top-k sampling; 0: off.')
  top_p: float = common.flag(1.0, 'Nucleus sampling; 1: off.')
  seed: int = common.flag(0, 'Sampling seed.')
  exit_threshold: float | None = common.flag(
      None, 'Early-exit threshold; unset: no early exit, every cycle runs.')
  exit_criterion: str = common.flag(
      'zero_attention', 'Exit statistic: zero_attention, zero_weight, '
      'zero_margin, gate, kl or fixed.')
  min_cycles: int = common.flag(1, 'No exit before this many cycles.')
  step: int | None = common.step_flag()


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-generate [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, overrides = common.parse(Options, argv, PROG, __doc__,
                                    common.SAVED_CONFIG)
  common.run(PROG, lambda: _generate(options, overrides))


def _generate(options: Options, overrides: dict[str, str]) -> None:
  # After the flags: --help and flag errors do not wait for jax.
  from ztt_jax import generate  # pylint: disable=g-import-not-at-top
  generate.run_generate(**dataclasses.asdict(options), overrides=overrides)


if __name__ == '__main__':
  main()
