"""Trains every run of a study that is not finished, then writes the report.

    python experiments/run_all.py --study=fair
    python experiments/run_all.py --study=grid \\
        --data=../shared/data/tinyshakespeare.txt

(or `python -m experiments.run_all ...`). `--study=fair` (fair.py, the
default: the fair grid in the regime where cycling pays, on the builtin
stdlib corpus; writes docs/results/summary.json and docs/RESULTS.md) or
`--study=grid` (grid.py, the first grid, on tinyshakespeare;
docs/results/shakespeare.md).

One command regenerates a study's report and plots. Runs land in
`--out` (default runs/fair or runs/experiments, NAME/seedS, with
NAME/seedS.log beside); a finished run (its metrics hold the final eval) is
skipped, an unfinished one resumes from its last checkpoint, so the command
can be stopped and started again (runner.py). `--jobs=2` trains two runs at
a time, each pinned to one core (on this 2-core machine that is about 1.3x
the throughput of one run on both cores); compiled programs are shared
through a JAX compilation cache in `--out`. `--report_only` rebuilds the
report from what is there.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import fair
from experiments import fair_report
from experiments import grid
from experiments import report
from experiments import runner
from experiments import summary

STUDIES = {'grid': grid.STUDY, 'fair': fair.STUDY}


def seed_list(text: str | None, default) -> list[int]:
  """Comma-separated seeds, or `default` when `text` is empty or None."""
  if not text:
    return list(default)
  return [int(s) for s in text.split(',') if s]


def write_reports(study, out: str, steps: int, seeds, ablation_seeds,
                  command: str) -> None:
  """The study's report (and, for the fair grid, summary.json) in docs/."""
  # The reports only read checkpoints' configs and shapes: no accelerator
  # (and no libtpu start-up probe on machines without TPUs).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  docs = os.path.join(runner.REPO, 'docs')
  if study is grid.STUDY:
    report.write_report(out, steps, docs, command=command)
    return
  path = os.path.join(docs, 'results', 'summary.json')
  summary.write_summary(study, out, steps, seeds, ablation_seeds, path)
  print(f'wrote {path}', flush=True)
  fair_report.write_report(out, docs, path)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--study', default='fair', choices=tuple(STUDIES))
  p.add_argument('--data', default=None, help='Default: tinyshakespeare '
                 'for grid, the config\'s own (builtin:stdlib) for fair.')
  p.add_argument('--out', default=None, help='Default: runs/experiments '
                 '(grid), runs/fair (fair).')
  p.add_argument('--steps', type=int, default=None)
  p.add_argument('--seeds', default=None)
  p.add_argument('--ablation_seeds', default=None)
  p.add_argument('--only', default='', help='Comma-separated run names.')
  p.add_argument('--jobs', type=int, default=2)
  p.add_argument('--report_only', action='store_true')
  args = p.parse_args()
  study = STUDIES[args.study]
  steps = args.steps or study.steps
  out = os.path.abspath(args.out or study.out)
  data = args.data if args.data is not None else study.data
  data = os.path.abspath(data) if data else ''
  if not args.report_only and data and not os.path.isfile(data):
    sys.exit(f'run_all.py: error: --data={args.data}: no such file; pass the '
             'tinyshakespeare text, e.g. ../shared/data/tinyshakespeare.txt')
  seeds = seed_list(args.seeds, study.seeds)
  ablation_seeds = seed_list(args.ablation_seeds, study.ablation_seeds)
  names = set(args.only.split(',')) if args.only else None
  # The report and the early-exit sweeps cover every seed of the study,
  # whichever this invocation trains.
  report_seeds = sorted(set(study.seeds) | set(seeds))
  report_ablation_seeds = sorted(set(report_seeds) | set(ablation_seeds))
  if not args.report_only:
    failures = runner.train(study, out, study.schedule(
        seeds, names, ablation_seeds), data, steps, args.jobs)
    failures += runner.sweep(study, out, report_seeds[0], steps, args.jobs)
    if failures:
      print(f'failed: {", ".join(failures)}', flush=True)
  write_reports(study, out, steps, report_seeds, report_ablation_seeds,
                ' '.join(['python experiments/run_all.py'] + sys.argv[1:]))


if __name__ == '__main__':
  main()
