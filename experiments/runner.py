"""The one runner: trains every run of a study that is not finished, then
its early-exit sweeps, resumably.

Runs land in OUT/NAME/seedS, the log beside as NAME/seedS.log and the
seconds each attempt took in NAME/seedS.wall. A finished run (its metrics
hold the eval of its last step) is skipped, an unfinished one resumes from
its last checkpoint (ztt-train does), so a study can be stopped and started
again. Jobs run a few at a time, each pinned to one core; compiled programs
are shared through a JAX compilation cache in OUT/jax_cache.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time

from experiments import records
from experiments.study import Run, Study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def train_command(study: Study, run: Run, seed: int, path: str,
                  data: str = '', steps: int | None = None) -> list[str]:
  """ztt-train for one run; `data` '' keeps the study config's data."""
  return [os.path.join(BIN, 'ztt-train'),
          f'--config={study.config}', f'--workdir={path}',
          *([f'--config.data.path={data}'] if data else []),
          f'--config.train.steps={steps or study.steps_of(run)}',
          *study.step_flags, *run.flags(seed)]


def eval_command(study: Study, path: str, criterion: str = '') -> list[str]:
  """ztt-eval's early-exit sweep of one workdir by `criterion`."""
  return [os.path.join(BIN, 'ztt-eval'),
          f'--workdir={path}', f'--batches={study.eval_batches}',
          *study.early_exit_flags,
          *([f'--criterion={criterion}',
             f'--name={records.eval_name(criterion)}'] if criterion else [])]


def job_env(out: str) -> dict:
  """The environment of every job: a compilation cache shared in `out`."""
  return dict(os.environ, PYTHONUNBUFFERED='1',
              JAX_COMPILATION_CACHE_DIR=os.path.join(out, 'jax_cache'))


def _work(core, jobs: queue.Queue, env: dict, failures: list,
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
  threads = [threading.Thread(target=_work,
                              args=(c, jobs, env, failures, nice))
             for c in cores]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return failures


def train(study: Study, out: str, pairs, data: str = '', steps=None,
          n_jobs: int = 2, cores=None, nice: int = 0) -> list:
  """Trains the unfinished (run, seed) `pairs` of `study` under `out`;
  returns the labels that failed."""
  os.makedirs(out, exist_ok=True)
  todo = []
  for run, seed in pairs:
    path = records.workdir(out, run.name, seed)
    if not records.finished(path, steps or study.steps_of(run)):
      todo.append((f'{run.name} seed {seed}',
                   train_command(study, run, seed, path, data, steps),
                   path + '.log'))
  n = len(cores) if cores else n_jobs
  print(f'{len(todo)} run(s) to train, {n} at a time'
        + (f' (cores {cores})' if cores else ''), flush=True)
  return run_jobs(todo, n, job_env(out), cores, nice)


def sweep(study: Study, out: str, seed: int, steps=None,
          n_jobs: int = 2) -> list:
  """Runs the study's early-exit sweeps missing on the finished runs at
  `seed`; returns the labels that failed."""
  todo = []
  for name, criterion in study.early_exit_sweeps():
    path = records.workdir(out, name, seed)
    stem = records.eval_name(criterion)
    run_steps = steps or study.steps_of(study.by_name(name))
    if records.finished(path, run_steps) and not os.path.exists(
        os.path.join(path, 'eval', stem + '.json')):
      todo.append((f'ztt-eval {name} {criterion}'.rstrip(),
                   eval_command(study, path, criterion),
                   f'{path}.{stem}.log'))
  return run_jobs(todo, n_jobs, job_env(out))
