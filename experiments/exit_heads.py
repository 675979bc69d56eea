"""The cheaper exit heads' effect: validation loss, step time, loop overhead.

    python experiments/exit_heads.py --data=tinyshakespeare.txt       # train
    python experiments/exit_heads.py --data=tinyshakespeare.txt --bench

Without `--bench`: trains `configs/shakespeare_char.py:ztt` as configured
(2000 steps, char tokens) with every exit head on all positions and with
`model.exit_loss_fraction=0.25` (the intermediate exit losses on a random
quarter of the positions, the final head on all), seeds 0, 1, 2, two runs
at a time, resumably (runs/exit_heads/NAME/seedS; a finished run is
skipped), and prints the final validation loss per seed. `ce_chunk_len`
gives the plain path's loss and gradients (tests/test_exits.py), so it has
no run of its own here.

With `--bench` (on a quiet machine: one process at a time, nothing beside
it): ztt-bench's median step time of the same config at V = 32768 for the
four exit-head settings of experiments/exit_head_memory.py, as ratios to
the first, measured in one invocation; then the loop overhead: ztt-train's
logged tokens/s (steady state, no evals inside the window) against
ztt-bench's tokens/s for the same config and vocabulary.
Prints markdown tables; writes docs/results/exit_heads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from experiments import exit_head_memory
from experiments import records
from experiments import runner
from experiments.study import Run, Study

REPO = runner.REPO
CONFIG = 'configs/shakespeare_char.py:ztt'
BIN = runner.BIN
# The training runs: the config as it is, 2000 steps, seeds 0, 1, 2.
STUDY = Study(
    name='exit_heads', config=CONFIG, steps=2000,
    step_flags=('--config.sample.max_new_tokens=0',),
    main=(Run('all_positions', 'main', 'every exit head on all positions',
              ()),
          Run('fraction_0p25', 'main', 'intermediate exit losses on a '
              'random quarter of the positions',
              (('model.exit_loss_fraction', 0.25),))),
    seeds=(0, 1, 2), out='runs/exit_heads')


def final_val_loss(path: str) -> float:
  return records.final_eval(records.read_rows(path), STUDY.steps)['val_loss']


def train(data: str, out: str, jobs: int) -> dict:
  failures = runner.train(STUDY, out, STUDY.schedule(), data, n_jobs=jobs)
  if failures:
    sys.exit(f'failed: {", ".join(failures)}')
  result = {}
  print('| setting | val loss per seed (0, 1, 2) | mean | spread |\n'
        '|---|---|---|---|')
  for run in STUDY.main:
    name = run.name
    losses = [final_val_loss(records.workdir(out, name, s))
              for s in STUDY.seeds]
    result[name] = losses
    print(f'| `{name}` | {", ".join(f"{x:.4f}" for x in losses)} | '
          f'{statistics.mean(losses):.4f} | {max(losses) - min(losses):.4f} |')
  return result


def bench(extra: list[str], steps: int = 20) -> dict:
  out = subprocess.run(
      [os.path.join(BIN, 'ztt-bench'), f'--config={CONFIG}',
       f'--steps={steps}', *extra], cwd=REPO, check=True,
      capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def speed(data: str) -> dict:
  vocab = f'--config.model.vocab_size={exit_head_memory.VOCAB_SIZE}'
  rows = []
  for label, overrides in exit_head_memory.SETTINGS:
    flags = [vocab] + [f'--config.model.{k}={v}' for k, v in overrides.items()]
    r = bench(flags)
    rows.append({'setting': label, 'step_s_median': r['step_s_median'],
                 'tokens_per_s': r['tokens_per_s']})
  base = rows[0]['step_s_median']
  print(f'\nStep time at V = {exit_head_memory.VOCAB_SIZE} '
        '(ztt-bench, median of 20 steps):\n\n'
        '| setting | step (ms) | ratio to full logits |\n|---|---|---|')
  for r in rows:
    r['ratio'] = r['step_s_median'] / base
    print(f'| {r["setting"]} | {1e3 * r["step_s_median"]:.1f} | '
          f'{r["ratio"]:.2f} |')
  # Loop overhead: the training loop's tokens/s against the bare step's.
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [os.path.join(BIN, 'ztt-train'), f'--config={CONFIG}',
         f'--workdir={tmp}/run', f'--config.data.path={data}',
         '--config.train.steps=300', '--config.train.log_every_steps=100',
         '--config.train.eval_every_steps=1000',
         '--config.checkpoint.every_steps=1000',
         '--config.sample.max_new_tokens=0'],
        cwd=REPO, check=True, capture_output=True, text=True)
    with open(f'{tmp}/run/metrics.jsonl', encoding='utf-8') as f:
      logged = [json.loads(line) for line in f if line.strip()]
  train_tps = [r['tokens_per_s'] for r in logged
               if 'tokens_per_s' in r and r.get('step', 0) > 100]
  train_tps = statistics.median(train_tps)
  bench_tps = bench([])['tokens_per_s']
  loop = {'train_tokens_per_s': train_tps, 'bench_tokens_per_s': bench_tps,
          'ratio': train_tps / bench_tps}
  print(f'\nLoop overhead (steps 101-300 of ztt-train against ztt-bench, '
        f'same config): ztt-train {train_tps:.0f} tokens/s, ztt-bench '
        f'{bench_tps:.0f} tokens/s, ratio {loop["ratio"]:.2f}')
  return {'step_time': rows, 'loop': loop}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', required=True, help='tinyshakespeare text')
  p.add_argument('--out', default='runs/exit_heads')
  p.add_argument('--jobs', type=int, default=2)
  p.add_argument('--bench', action='store_true')
  args = p.parse_args()
  data = os.path.abspath(args.data)
  if not os.path.isfile(data):
    sys.exit(f'exit_heads.py: error: --data={args.data}: no such file; pass '
             'the tinyshakespeare text')
  if args.bench:
    key, value = 'speed', speed(data)
  else:
    key, value = 'val_loss', train(data, os.path.abspath(args.out), args.jobs)
  path = os.path.join(REPO, 'docs', 'results', 'exit_heads.json')
  try:  # Read now: the other mode may have written since this one started.
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except OSError:
    saved = {}
  saved[key] = value
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(saved, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
