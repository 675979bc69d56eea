"""Trains every run of a study that is not finished, then writes the report.

    python experiments/run_all.py --study=fair
    python experiments/run_all.py --study=grid \
        --data=../shared/data/tinyshakespeare.txt

`--study=fair` (fair.py, the default: the fair grid in the regime where
cycling pays, on the builtin stdlib corpus; writes
docs/results/summary.json and docs/RESULTS.md) or `--study=grid` (grid.py,
the first grid, on tinyshakespeare; docs/results/shakespeare.md).

One command regenerates a study's report and plots. Runs land in
`--out` (default runs/fair or runs/experiments, NAME/seedS, with NAME.seedS.log beside);
a finished run (its metrics hold the final eval) is skipped, an unfinished
one resumes from its last checkpoint, so the command can be stopped and
started again. `--jobs=2` trains two runs at a time, each pinned to one core
(on this 2-core machine that is about 1.3x the throughput of one run on both
cores); compiled programs are shared through a JAX compilation cache in
`--out`. `--report_only` rebuilds the report from what is there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grid  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workdir(out: str, name: str, seed: int) -> str:
  return os.path.join(out, name, f'seed{seed}')


def finished(path: str, steps: int) -> bool:
  """Whether the run's metrics hold the eval of its last step."""
  try:
    with open(os.path.join(path, 'metrics.jsonl'), encoding='utf-8') as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return False
  return any(r.get('step') == steps and 'val_loss' in r for r in rows)


def train_command(run: grid.Run, seed: int, path: str, data: str,
                  steps: int, study=grid) -> list[str]:
  """ztt-train for one run; `data` '' keeps the study config's data."""
  return [os.path.join(os.path.dirname(sys.executable), 'ztt-train'),
          f'--config={study.CONFIG}', f'--workdir={path}',
          *([f'--config.data.path={data}'] if data else []),
          f'--config.train.steps={steps}', *study.STEP_FLAGS,
          *run.flags(seed)]


def early_exit_sweeps(study=grid) -> list[tuple[str, str]]:
  """(run name, criterion) of every early-exit sweep of a study; criterion
  '' is ztt-eval's default for the run."""
  per_run = getattr(study, 'EARLY_EXIT', None) or {
      name: ('',) for name in study.EARLY_EXIT_RUNS}
  return [(name, c) for name, cs in per_run.items() for c in cs]


def eval_name(criterion: str) -> str:
  """The file stem under eval/ of a sweep by `criterion`."""
  return f'early_exit_{criterion}' if criterion else 'early_exit'


def eval_command(path: str, study=grid, criterion: str = '') -> list[str]:
  return [os.path.join(os.path.dirname(sys.executable), 'ztt-eval'),
          f'--workdir={path}', f'--batches={study.EVAL_BATCHES}',
          *getattr(study, 'EARLY_EXIT_FLAGS', ()),
          *([f'--criterion={criterion}', f'--name={eval_name(criterion)}']
            if criterion else [])]


def _worker(core, jobs: queue.Queue, env: dict, failures: list,
            nice: int) -> None:
  pin = ['nice', '-n', str(nice)] if nice else []
  if core is not None:
    pin += ['taskset', '-c', str(core)]
  while True:
    try:
      label, cmd, log = jobs.get_nowait()
    except queue.Empty:
      return
    start = time.time()
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, 'a', encoding='utf-8') as f:
      rc = subprocess.call(pin + cmd, stdout=f, stderr=subprocess.STDOUT,
                           cwd=REPO, env=env)
    seconds = time.time() - start
    # Beside the log: the seconds each attempt took (a resumed run adds one).
    with open(os.path.splitext(log)[0] + '.wall', 'a',
              encoding='utf-8') as f:
      f.write(f'{seconds:.1f}\n')
    status = 'ok' if rc == 0 else f'FAILED (exit {rc}, see {log})'
    print(f'[{time.strftime("%H:%M:%S")}] {label}: {status} '
          f'in {seconds:.0f}s', flush=True)
    if rc:
      failures.append(label)


def run_jobs(todo, n_jobs: int, env: dict, cores=None, nice: int = 0
             ) -> list:
  """Runs `(label, command, log)` jobs, `n_jobs` at a time, each pinned to
  one core (`cores`, default 0..n_jobs-1; unpinned when one job), under
  `nice` when given. Returns the labels that failed."""
  jobs = queue.Queue()
  for item in todo:
    jobs.put(item)
  failures = []
  if cores is None:
    cores = [None] if n_jobs == 1 else list(range(n_jobs))
  threads = [threading.Thread(target=_worker,
                              args=(c, jobs, env, failures, nice))
             for c in cores]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return failures


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--study', default='fair', choices=('grid', 'fair'))
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
  study = importlib.import_module(args.study)
  is_grid = study is grid
  steps = args.steps or study.STEPS
  out = os.path.abspath(args.out or ('runs/experiments' if is_grid
                                     else f'runs/{args.study}'))
  data = args.data if args.data is not None else (
      '../shared/data/tinyshakespeare.txt' if is_grid else '')
  data = os.path.abspath(data) if data else ''
  if not args.report_only and data and not os.path.isfile(data):
    sys.exit(f'run_all.py: error: --data={args.data}: no such file; pass the '
             'tinyshakespeare text, e.g. ../shared/data/tinyshakespeare.txt')
  seeds = [int(s) for s in (args.seeds or ','.join(
      map(str, study.SEEDS))).split(',') if s]
  ablation_seeds = [int(s) for s in (args.ablation_seeds or ','.join(
      map(str, study.ABLATION_SEEDS))).split(',') if s]
  names = set(args.only.split(',')) if args.only else None
  # The report and the early-exit sweeps cover every seed of the study,
  # whichever this invocation trains.
  report_seeds = sorted(set(study.SEEDS) | set(seeds))
  report_ablation_seeds = sorted(set(report_seeds) | set(ablation_seeds))
  if not args.report_only:
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
        out, 'jax_cache'), PYTHONUNBUFFERED='1')
    todo = []
    for run, seed in study.schedule(seeds, names, ablation_seeds):
      path = workdir(out, run.name, seed)
      if not finished(path, steps):
        todo.append((f'{run.name} seed {seed}',
                     train_command(run, seed, path, data, steps, study),
                     path + '.log'))
    print(f'{len(todo)} run(s) to train, {args.jobs} at a time', flush=True)
    failures = run_jobs(todo, args.jobs, env)
    evals = []
    for name, criterion in early_exit_sweeps(study):
      path = workdir(out, name, report_seeds[0])
      stem = eval_name(criterion)
      if (finished(path, steps) and not os.path.exists(
          os.path.join(path, 'eval', stem + '.json'))):
        evals.append((f'ztt-eval {name} {criterion}'.rstrip(),
                      eval_command(path, study, criterion),
                      f'{path}.{stem}.log'))
    failures += run_jobs(evals, args.jobs, env)
    if failures:
      print(f'failed: {", ".join(failures)}', flush=True)
  if is_grid:
    import report  # pylint: disable=g-import-not-at-top
    report.write_report(out, steps, os.path.join(REPO, 'docs'),
                        command=' '.join(['python experiments/run_all.py'] +
                                         sys.argv[1:]))
  else:
    import summary  # pylint: disable=g-import-not-at-top
    path = os.path.join(REPO, 'docs', 'results', 'summary.json')
    summary.write_summary(study, out, steps, report_seeds,
                          report_ablation_seeds, path)
    print(f'wrote {path}', flush=True)
    import fair_report  # pylint: disable=g-import-not-at-top
    fair_report.write_report(out, os.path.join(REPO, 'docs'), path)


if __name__ == '__main__':
  main()
