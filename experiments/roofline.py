"""Roofline table of the budget configs on v5e and v5p slices (issue 15).

    python experiments/roofline.py [ROW ...] [--table-only] [--timeout=S]

Runs `ztt-compile --config=configs/budget.py:SIZE --topology=TOPOLOGY
[EXTRA]` (variant ztt) for each row of ROWS, one after another, as a
subprocess of this interpreter's `ztt-compile` (needs libtpu: `pip install
-e ".[tpu]"`), saves each row's JSON report to
docs/results/roofline/ROW.json and prints the rows as a markdown table:
memory per device against HBM, XLA's and the model's FLOPs per device, the
bytes accessed and their time at peak HBM bandwidth (the memory term), the
roofline lower bound on the step time and which term set it, the upper
bound on MFU and the tokens/s/chip it allows. Resumable: a row with a saved
JSON is not compiled again (delete it to redo the row); a row that fails
prints one line and the next one runs. ROW names restrict the run to those
rows; --table-only prints the table of the saved rows.

Every figure is the compiler's (`compiled.memory_analysis()`,
`compiled.cost_analysis()`) or arithmetic on the config, so any machine
with the same jax and libtpu gives the same table; only `compile_s` is a
wall time of the machine that compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, 'docs', 'results', 'roofline')
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  size: str
  topology: str
  extra: tuple[str, ...] = ()

  def command(self, exe: str = 'ztt-compile') -> list[str]:
    return [exe, f'--config=configs/budget.py:{self.size}',
            f'--topology={self.topology}', *self.extra]


def _ga(n: int) -> str:
  return f'--config.train.grad_accum_steps={n}'


# Rows that fit in HBM (docs/SCALING.md's fit table, and each saved JSON's
# `fits`), each compiling in a few minutes on a 2-core machine.
ROWS = (
    Row('125m_v5e-4x4_ga4', '125m', 'v5e:4x4', (_ga(4),)),
    Row('350m_v5e-4x4_ga16', '350m', 'v5e:4x4', (_ga(16),)),
    Row('1b_v5e-4x4_ga16', '1b', 'v5e:4x4', (_ga(16),)),
    Row('125m_v5p-2x2x2', '125m', 'v5p:2x2x2'),
    Row('350m_v5p-2x2x2_ga2', '350m', 'v5p:2x2x2', (_ga(2),)),
    Row('1b_v5p-4x4x4', '1b', 'v5p:4x4x4'),
    # Unscanned layers and cycles: XLA's count covers every layer (still
    # one micro-batch of the 4).
    Row('125m_v5e-4x4_ga4_noscan', '125m', 'v5e:4x4',
        (_ga(4), '--config.model.scan_layers=false')),
)


def by_name(name: str) -> Row:
  for row in ROWS:
    if row.name == name:
      return row
  raise KeyError(f'no row {name!r}; rows: {", ".join(r.name for r in ROWS)}')


def json_path(row: Row, out_dir: str = OUT_DIR) -> str:
  return os.path.join(out_dir, f'{row.name}.json')


def last_json(stdout: str) -> dict[str, Any] | None:
  """ztt-compile's report: the last stdout line that parses as a JSON
  object."""
  for line in reversed(stdout.strip().splitlines()):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except ValueError:
        continue
  return None


def run_row(row: Row, out_dir: str = OUT_DIR,
            timeout: float | None = None) -> dict[str, Any] | None:
  """Compiles one row unless its JSON is saved; returns the report, or None
  after printing one line when the compile fails."""
  path = json_path(row, out_dir)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  exe = os.path.join(os.path.dirname(sys.executable), 'ztt-compile')
  cmd = row.command(exe)
  print(f'{row.name}: {" ".join(row.command())}', flush=True)
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f'{row.name}: FAILED, no report within {timeout:.0f} s', flush=True)
    return None
  report = last_json(proc.stdout) if proc.returncode == 0 else None
  if report is None:
    tail = (proc.stderr or proc.stdout or '').strip().splitlines()
    print(f'{row.name}: FAILED (exit {proc.returncode}): '
          f'{tail[-1][:200] if tail else "no output"}', flush=True)
    return None
  report = {'row': row.name, 'command': ' '.join(row.command()), **report}
  os.makedirs(out_dir, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
    f.write('\n')
  print(f'{row.name}: saved {os.path.relpath(path, ROOT)} (compiled in '
        f"{report.get('compile_s')} s)", flush=True)
  return report


def tokens_per_s_per_chip(report: dict[str, Any]) -> float | None:
  """The global batch's tokens over the roofline step time, per chip."""
  step_s = report.get('roofline_step_s')
  if not step_s:
    return None
  return report['batch_size'] * report['seq_len'] / step_s / report['chips']


def _sci(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.3g}'


def table(rows: Sequence[tuple[Row, dict[str, Any]]]) -> str:
  """The markdown table of (row, report) pairs."""
  lines = [
      '| size | topology (chips) | extra | fits | per device (GiB of HBM) '
      '| XLA FLOPs/device | model FLOPs/device | bytes accessed/device (GiB) '
      '| memory term (s) | roofline step (s) | bound | MFU upper bound '
      '| tokens/s/chip upper bound | compile (s) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for row, r in rows:
    extra = ' '.join(f'`{e}`' for e in row.extra) or '-'
    fits = {True: 'yes', False: 'no', None: 'n/a'}[r.get('fits')]
    hbm = r.get('hbm_bytes')
    mem = f"{r['per_device_bytes'] / GIB:.2f}" + (
        '' if hbm is None else f' of {hbm / GIB:.0f}')
    nbytes = r.get('bytes_accessed')
    bw = r.get('hbm_bytes_per_s_per_device')
    step = r.get('roofline_step_s')
    mfu = r.get('mfu_upper_bound')
    tps = tokens_per_s_per_chip(r)
    lines.append(' | '.join([
        f'| {row.size}', f"{row.topology} ({r['chips']})", extra, fits, mem,
        _sci(r.get('flops')), _sci(r.get('model_flops_per_device')),
        'n/a' if nbytes is None else f'{nbytes / GIB:.1f}',
        'n/a' if nbytes is None or not bw else f'{nbytes / bw:.3f}',
        'n/a' if step is None else f'{step:.3f}',
        r.get('roofline_bound') or 'n/a',
        'n/a' if mfu is None else f'{mfu:.0%}',
        'n/a' if tps is None else f'{tps:,.0f}',
        f"{r.get('compile_s', 'n/a')} |"]))
  return '\n'.join(lines)


def saved(out_dir: str = OUT_DIR) -> list[tuple[Row, dict[str, Any]]]:
  out = []
  for row in ROWS:
    path = json_path(row, out_dir)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        out.append((row, json.load(f)))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('rows', nargs='*', help='row names (default: all)')
  parser.add_argument('--table-only', action='store_true',
                      help='print the table of the saved rows, compile none')
  parser.add_argument('--timeout', type=float, default=1200,
                      help='seconds one compile may take (default 1200)')
  parser.add_argument('--out', default=OUT_DIR, help='JSON directory')
  args = parser.parse_args(argv)
  rows = [by_name(n) for n in args.rows] if args.rows else list(ROWS)
  if not args.table_only:
    for row in rows:
      run_row(row, args.out, args.timeout)
  done = [(row, r) for row, r in saved(args.out) if row in rows]
  print(table(done))


if __name__ == '__main__':
  main()
