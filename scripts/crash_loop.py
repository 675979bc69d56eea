"""Crash loop: kill -9 a tiny training run at random moments, resume it, and
compare every logged loss with an uninterrupted run.

    python scripts/crash_loop.py --trials=5 --kills=3

Prints one line per trial and a final JSON line
`{"trials": N, "exact": M, ...}`; exits 1 unless every trial resumed exactly.
The corpus is a few standard-library modules (real text on every machine).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_corpus(path: pathlib.Path) -> str:
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  path.write_text(''.join((stdlib / n).read_text(encoding='utf-8') for n in
                          ('textwrap.py', 'shlex.py', 'fnmatch.py')))
  return str(path)


def train_command(workdir: str, corpus: str, steps: int) -> list[str]:
  return [sys.executable, '-m', 'ztt_jax.commands.train',
          f'--config={REPO}/configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.path={corpus}', f'--config.train.steps={steps}',
          '--config.train.log_every_steps=1',
          '--config.train.eval_every_steps=0',
          '--config.checkpoint.every_steps=3',
          '--config.sample.max_new_tokens=0']


def logged_losses(workdir: str) -> dict[int, list[float]]:
  """Every loss logged per step (a resumed run logs some steps twice)."""
  losses: dict[int, list[float]] = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return losses
  for line in open(path, encoding='utf-8'):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # A line cut by the kill.
      continue
    losses.setdefault(row['step'], []).append(row['loss'])
  return losses


def run_to_end(cmd, env) -> float:
  start = time.perf_counter()
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=5)
  parser.add_argument('--kills', type=int, default=3,
                      help='kill -9 per trial before the final run')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--root', default='', help='scratch directory')
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  root = pathlib.Path(args.root or tempfile.mkdtemp(prefix='ztt_crash_'))
  root.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, 'ZTT_CACHE_DIR': str(root / 'cache'),
         'JAX_PLATFORMS': 'cpu',
         # Restarts reuse compiled programs: kills land in training, not XLA.
         'JAX_COMPILATION_CACHE_DIR': str(root / 'xla_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}
  corpus = write_corpus(root / 'corpus.txt')

  straight = str(root / 'straight')
  wall = run_to_end(train_command(straight, corpus, args.steps), env)
  reference = {s: v[-1] for s, v in logged_losses(straight).items()}
  assert sorted(reference) == list(range(1, args.steps + 1)), reference

  exact = 0
  for trial in range(args.trials):
    workdir = str(root / f'trial{trial}')
    cmd = train_command(workdir, corpus, args.steps)
    kill_times = []
    for _ in range(args.kills):
      delay = rng.uniform(0.2 * wall, 1.1 * wall)
      proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      try:
        proc.wait(timeout=delay)  # Finished before the kill: fine too.
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
      kill_times.append(round(delay, 2))
    run_to_end(cmd, env)
    losses = logged_losses(workdir)
    same = (sorted(losses) == sorted(reference) and
            all(v == reference[s] for s, vs in losses.items() for v in vs))
    exact += same
    print(f'trial {trial}: killed at {kill_times} s, resumed, '
          f'{"exact" if same else "DIFFERENT"} losses over {len(losses)} '
          'steps', flush=True)
  print(json.dumps({'trials': args.trials, 'kills_per_trial': args.kills,
                    'exact': exact, 'steps': args.steps,
                    'uninterrupted_wall_s': round(wall, 1)}))
  return 0 if exact == args.trials else 1


if __name__ == '__main__':
  sys.exit(main())
