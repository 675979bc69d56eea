"""Crash loop: kill -9 a tiny training run at points it observes, resume it,
and compare every logged loss with an uninterrupted run.

    python scripts/crash_loop.py --trials=10 --kills=3

Each kill waits for something it sees in the run's workdir, then sends
SIGKILL: a logged step (a row with step >= a random target in
metrics.jsonl, once a checkpoint is complete) or, alternately, a checkpoint
being written in the background (async_save: Orbax's
`<step>.orbax-checkpoint-tmp*` directory, newer than a complete one). A kill
lands when it hits a running process (exit status -9); it cuts a save when
that temporary directory is still there after the process died. Every
restart must say it resumed from a checkpoint (`resumed from ... (step N)`,
N > 0, and N below a save that was cut), and every trial must log the same
losses as the uninterrupted run.

Prints one line per trial and a final JSON line
`{"trials": N, "exact": M, "kills": K, "kills_landed": L, ...}`; exits 1
unless every kill landed, every restart resumed and every trial is exact.
The corpus is a few standard-library modules (real text on every machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
EVERY_STEPS = 3  # Checkpoint interval of the runs.
KINDS = ('step', 'save')  # What a kill waits for; trials alternate.
TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax's save in progress.
POLL_S = 0.002
WAIT_S = 600.0  # A run that shows nothing for this long is an error.


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
          # No validation split: no final eval or early-exit sweep to compile.
          '--config.data.val_fraction=0',
          f'--config.checkpoint.every_steps={EVERY_STEPS}',
          '--config.checkpoint.async_save=True',
          '--config.sample.max_new_tokens=0']


def logged_losses(workdir: str) -> dict[int, list[float]]:
  """Every loss logged per step (a resumed run logs some steps twice)."""
  losses: dict[int, list[float]] = {}
  for row in _rows(os.path.join(workdir, 'metrics.jsonl')):
    losses.setdefault(row['step'], []).append(row['loss'])
  return losses


def _rows(path: str, offset: int = 0) -> list[dict]:
  """The complete JSON rows of a metrics file from byte `offset` on."""
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    f.seek(offset)
    lines = f.read().split(b'\n')
  rows = []
  for line in lines[:-1]:  # The last piece is unfinished (or empty).
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # A line cut by an earlier kill.
      continue
  return rows


def _checkpoints(workdir: str) -> tuple[list[int], set[tuple[int, int]]]:
  """(complete checkpoint steps, saves in progress as (step, ctime)).

  The change time tells a save apart from an earlier one cut at the same
  step, whose directory keeps its name until a restart replaces it.
  """
  directory = os.path.join(workdir, 'checkpoints')
  try:
    entries = list(os.scandir(directory))
  except FileNotFoundError:
    return [], set()
  in_progress = set()
  for e in entries:
    if TMP_SUFFIX in e.name:
      try:
        in_progress.add((int(e.name.split('.')[0]),
                         e.stat(follow_symlinks=False).st_ctime_ns))
      except FileNotFoundError:  # Renamed (finalised) meanwhile.
        continue
  return [int(e.name) for e in entries if e.name.isdigit()], in_progress


@dataclasses.dataclass
class Kill:
  kind: str  # 'step' or 'save'
  target: int  # 'step': a logged step >= target; 'save': a save >= target.
  landed: bool = False  # Exit status -9: the process was running.
  seen: str = ''  # What was observed when the signal went.
  cut_save: int | None = None  # The step whose save the kill cut short.


def _observed(kill: Kill, workdir: str, offset: int,
              tmp_before: set[tuple[int, int]]) -> str:
  """What the kill waits for, as a few words once it is there ('' before)."""
  complete, in_progress = _checkpoints(workdir)
  if not complete:  # Then a restart could not resume.
    return ''
  if kill.kind == 'step':
    steps = [r['step'] for r in _rows(os.path.join(workdir, 'metrics.jsonl'),
                                      offset)]
    return f'step {max(steps)} logged' if steps and max(
        steps) >= kill.target else ''
  for step, _ in in_progress - tmp_before:
    if step >= kill.target and step > min(complete):
      return f'save {step} in progress'
  return ''


def kill_when_seen(cmd, env, log_path: str, workdir: str,
                   kill: Kill) -> None:
  """Starts a run, waits until `kill` sees its point, sends SIGKILL and
  records whether it landed (and which save it cut)."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  offset = os.path.getsize(metrics) if os.path.exists(metrics) else 0
  tmp_before = _checkpoints(workdir)[1]
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(cmd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
  deadline = time.monotonic() + WAIT_S
  while proc.poll() is None and not kill.seen:
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      raise RuntimeError(f'{log_path}: nothing to kill at after {WAIT_S} s')
    kill.seen = _observed(kill, workdir, offset, tmp_before)
    if not kill.seen:
      time.sleep(POLL_S)
  proc.send_signal(signal.SIGKILL)
  kill.landed = proc.wait() == -signal.SIGKILL
  cut = _checkpoints(workdir)[1] - tmp_before
  if kill.landed and cut:
    kill.cut_save = max(step for step, _ in cut)


def resumed_step(log_path: str) -> int | None:
  """The step a run says it resumed from, None when it started afresh."""
  text = pathlib.Path(log_path).read_text(encoding='utf-8', errors='replace')
  match = re.search(r'resumed from \S+ \(step (\d+)\)', text)
  return int(match.group(1)) if match else None


def plan_kills(rng: random.Random, trial: int, kills: int,
               steps: int) -> list[Kill]:
  """Kill i targets a step in the i-th of `kills` equal spans of the run
  (room for the next), alternating what it waits for."""
  span = steps / (kills + 1)
  return [Kill(KINDS[(trial + i) % 2],
               rng.randint(int(i * span) + 1, max(int((i + 1) * span), 1)))
          for i in range(kills)]


def run_trial(cmd, env, workdir: str, kills: list[Kill]) -> list[bool]:
  """Kills and restarts one run; whether each restart resumed correctly."""
  resumed_ok = []
  for i, kill in enumerate(kills + [None]):
    log_path = f'{workdir}.run{i}.log'
    if kill is None:
      with open(log_path, 'w', encoding='utf-8') as log:
        subprocess.run(cmd, env=env, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    else:
      kill_when_seen(cmd, env, log_path, workdir, kill)
    if i:
      step, cut = resumed_step(log_path), kills[i - 1].cut_save
      resumed_ok.append(step is not None and step > 0 and
                        (cut is None or step < cut))
  return resumed_ok


def _describe(kill: Kill, resumed_ok: bool) -> str:
  """'save 9 in progress: killed, cut save 9, resumed' and the like."""
  words = [f'{kill.seen or "nothing seen"}: '
           + ('killed' if kill.landed else 'MISSED (run had ended)')]
  if kill.cut_save is not None:
    words.append(f'cut save {kill.cut_save}')
  words.append('resumed' if resumed_ok else 'NOT RESUMED')
  return ', '.join(words)


def run_straight(env, corpus: str, root: pathlib.Path,
                 steps: int) -> tuple[dict[int, float], float]:
  """The uninterrupted run: its loss per step and its wall time."""
  workdir = str(root / 'straight')
  start = time.perf_counter()
  subprocess.run(train_command(workdir, corpus, steps), env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  reference = {s: v[-1] for s, v in logged_losses(workdir).items()}
  assert sorted(reference) == list(range(1, steps + 1)), reference
  return reference, wall


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=5)
  parser.add_argument('--kills', type=int, default=3,
                      help='kill -9 per trial before the final run')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--root', default='', help='scratch directory')
  parser.add_argument('--xla_cache', default='',
                      help='persistent compilation cache (default: in root)')
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  root = pathlib.Path(args.root or tempfile.mkdtemp(prefix='ztt_crash_'))
  root.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, 'ZTT_CACHE_DIR': str(root / 'cache'),
         'JAX_PLATFORMS': 'cpu',
         # Restarts reuse compiled programs: kills land in training, not XLA.
         'JAX_COMPILATION_CACHE_DIR': args.xla_cache or str(root /
                                                            'xla_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}
  corpus = write_corpus(root / 'corpus.txt')
  reference, wall = run_straight(env, corpus, root, args.steps)

  exact = landed = cut = resumed = 0
  for trial in range(args.trials):
    workdir = str(root / f'trial{trial}')
    kills = plan_kills(rng, trial, args.kills, args.steps)
    resumed_ok = run_trial(train_command(workdir, corpus, args.steps), env,
                           workdir, kills)
    losses = logged_losses(workdir)
    same = (sorted(losses) == sorted(reference) and
            all(v == reference[s] for s, vs in losses.items() for v in vs))
    exact += same
    landed += sum(k.landed for k in kills)
    cut += sum(k.cut_save is not None for k in kills)
    resumed += sum(resumed_ok)
    what = '; '.join(_describe(k, ok) for k, ok in zip(kills, resumed_ok))
    print(f'trial {trial}: {what}; '
          f'{"exact" if same else "DIFFERENT"} losses over {len(losses)} '
          'steps', flush=True)
  n_kills = args.trials * args.kills
  print(json.dumps({'trials': args.trials, 'kills': n_kills,
                    'kills_landed': landed, 'saves_cut': cut,
                    'restarts_resumed': resumed, 'exact': exact,
                    'steps': args.steps,
                    'uninterrupted_wall_s': round(wall, 1)}))
  return 0 if landed == resumed == n_kills and exact == args.trials else 1


if __name__ == '__main__':
  sys.exit(main())
