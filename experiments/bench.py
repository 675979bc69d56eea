"""Runs ztt-bench for docs/results/shakespeare.md's speed table; saves JSON.

    python experiments/bench.py

On a quiet machine (nothing else running: the matmul peak and the step time
are measured in the same process, but a busy neighbour skews both). Writes
docs/results/bench/NAME.json (ztt-bench's stdout) and NAME.profile.txt (time
per XLA op kind of the scanned ZTT step); `report.py` turns them into the
speed section.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, 'docs', 'results', 'bench')
CONFIG = 'configs/shakespeare_char.py:ztt'
# name: extra ztt-bench flags.
BENCHES = {
    'shakespeare_scanned': [],
    'shakespeare_unrolled': ['--config.model.scan_layers=False'],
    # Not a target: the same model 4x wider on 16 x 128 tokens, to show how
    # MFU depends on the matmul shapes on this CPU.
    'wide_512': ['--config.model.d_model=512', '--config.model.n_heads=8',
                 '--config.data.seq_len=128', '--config.train.batch_size=16',
                 '--steps=5', '--warmup=1'],
}
COMMON = ['--baseline=head_tail_cycle', '--compile_cycles=2,8', '--steps=50']
# (ztt-bench takes the last of a repeated flag: a row may override --steps.)


def command(extra: list[str]) -> list[str]:
  return [os.path.join(os.path.dirname(sys.executable), 'ztt-bench'),
          f'--config={CONFIG}', *COMMON, *extra]


def main() -> None:
  os.makedirs(OUT, exist_ok=True)
  only = set(sys.argv[1:])
  for name, extra in BENCHES.items():
    if only and name not in only:
      continue
    cmd = command(extra)
    print('$', ' '.join(['ztt-bench'] + cmd[1:]), flush=True)
    result = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True,
                            text=True)
    line = result.stdout.strip().splitlines()[-1]
    with open(os.path.join(OUT, f'{name}.json'), 'w', encoding='utf-8') as f:
      f.write(line + '\n')
    print(line, flush=True)
    prof = subprocess.run(
        [sys.executable, '-m', 'experiments.profile_step',
         'ztt', *[a for a in extra if a.startswith('--config.')]],
        cwd=REPO, check=True, capture_output=True, text=True).stdout
    with open(os.path.join(OUT, f'{name}.profile.txt'), 'w',
              encoding='utf-8') as f:
      f.write(prof)
    print(prof, flush=True)


if __name__ == '__main__':
  main()
