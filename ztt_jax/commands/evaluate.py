"""ztt-eval: the early-exit sweep on a trained workdir.

    ztt-eval --workdir=runs/demo
    ztt-eval --workdir=runs/demo --per=token --random_baseline
    ztt-eval --workdir=runs/demo --criterion=kl --split=train \\
        --config.data.path=/data/corpus.txt --name=early_exit_kl_train

Evaluates every exit head on fixed batches of the validation (or training)
split, then early exit at a range of thresholds of the exit statistic,
per sequence or per token (--per), through the real early-exit loop;
prints the table and writes WORKDIR/eval/NAME.{json,md,png} (NAME:
--name, default early_exit). Needs a
cycled model with exit heads (model.exit_loss linear, uniform or last).
Runs `evaluate.run_eval`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ztt_jax.commands import common

PROG = 'ztt-eval'


@dataclasses.dataclass(frozen=True)
class Options:
  workdir: str = common.flag(None, 'A training workdir.', required=True,
                             metavar='DIR')
  split: str = common.flag('val', 'The split to evaluate on.',
                           choices=('val', 'train'))
  criterion: str = common.flag(
      '', 'Exit statistic: zero_attention, zero_weight, zero_margin, gate '
      'or kl; empty: zero_attention with zero tokens, else kl.')
  per: str = common.flag(
      'sequence', 'Who exits: each sequence (one pass per batch) or each '
      'token (decoded one at a time with the KV cache, as ztt-generate '
      'does).', choices=('sequence', 'token'))
  random_baseline: bool = common.flag(
      False, 'Also exit at random with each threshold\'s own distribution '
      'of cycles.')
  n_thresholds: int = common.flag(7, 'Thresholds in the sweep.')
  min_cycles: int = common.flag(1, 'No exit before this many cycles.')
  batches: int = common.flag(0, 'Eval batches; 0: train.eval_batches.')
  step: int | None = common.step_flag()
  name: str = common.flag(
      'early_exit', 'File stem of the results under WORKDIR/eval (keep '
      'several sweeps side by side).')


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-eval [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, overrides = common.parse(Options, argv, PROG, __doc__,
                                    common.SAVED_CONFIG)
  common.run(PROG, lambda: _evaluate(options, overrides))


def _evaluate(options: Options, overrides: dict[str, str]) -> None:
  # After the flags: --help and flag errors do not wait for jax.
  from ztt_jax import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.run_eval(**dataclasses.asdict(options), overrides=overrides)


if __name__ == '__main__':
  main()
