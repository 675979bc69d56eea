"""ztt-train: pretrain (or resume, or fine-tune) a model in a workdir.

    ztt-train --config=configs/default.py --workdir=runs/demo
    ztt-train --config=configs/tiny.py:ztt --workdir=runs/tiny \\
        --config.train.steps=50

Runs `train.train(config, workdir)`. A workdir that holds a checkpoint is
resumed; SIGTERM/SIGINT save a checkpoint and exit 143/130 (run the same
command to continue; with several processes, a SIGTERM or SIGINT to any one
stops all of them at the same step, and each exits 143); a non-finite loss
with train.nan_policy=stop exits 1.
Multi-process runs are set up automatically on Cloud TPU, SLURM (srun) and
Open MPI; elsewhere pass all three of --coordinator_address, --num_processes
and --process_id.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

from ztt_jax.commands import common

PROG = 'ztt-train'


@dataclasses.dataclass(frozen=True)
class Options:
  config: str = common.config_flag()
  workdir: str = common.flag(
      None, 'Run directory: checkpoints, metrics.jsonl, tokenizer.',
      required=True, metavar='DIR')
  coordinator_address: str | None = common.flag(
      None, 'HOST:PORT of process 0, for multi-process runs.',
      metavar='HOST:PORT')
  num_processes: int | None = common.flag(
      None, 'Processes in a multi-process run.')
  process_id: int | None = common.flag(
      None, 'This process, 0 .. num_processes-1.')


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-train [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, overrides = common.parse(Options, argv, PROG, __doc__,
                                    common.CONFIG_FILE)
  code = common.run(PROG, lambda: _train(options, overrides))
  if code:
    sys.exit(code)


def _train(options: Options, overrides: dict[str, str]) -> int:
  """Trains; returns the exit status (0, 1 diverged, 130/143 preempted)."""
  # After the flags: --help and flag errors do not wait for jax.
  from ztt_jax import configlib, sharding, train, watch  # pylint: disable=g-import-not-at-top
  config = configlib.override(configlib.from_file(options.config), overrides)
  sharding.maybe_initialize_distributed(
      options.coordinator_address, options.num_processes, options.process_id)
  try:
    summary = train.train(config, options.workdir)
  except watch.TrainingDiverged as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 1
  return watch.EXIT_CODES[summary['preempted']] if summary.get(
      'preempted') else 0


if __name__ == '__main__':
  main()
