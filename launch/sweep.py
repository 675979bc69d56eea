#!/usr/bin/env python3
"""Runs the product of config overrides, one workdir each, and tabulates them.

    python launch/sweep.py --config=configs/tiny.py --workdir=runs/sweep \
        --sweep='model.n_cycles=2,4,8 model.variant=head_tail_cycle,ztt'

`--sweep` is space-separated `FIELD=V1,V2,...` axes; their product gives the
runs (here 6), each in `WORKDIR/<field>=<value>,...`, run one after another
with `python -m ztt_jax.commands.train` (or printed with `--dry_run`;
`--launcher` puts another launcher in front, e.g. `--launcher=
'launch/tpu_pod.sh --tpu=my-v5e --zone=us-west4-a --'`). Arguments after
`--` go to every run.
When the runs are done (or with `--summarize` alone, for runs that finished
elsewhere) it prints a table of each run's final `val_loss` from its
`metrics.jsonl` and writes it to `WORKDIR/summary.md` and `summary.json`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Sequence


class SweepError(ValueError):
  """A bad --sweep or --config; printed as one line, exit status 2."""


def parse_sweep(spec: str) -> list[tuple[str, list[str]]]:
  """'a.b=1,2 c.d=x' -> [('a.b', ['1', '2']), ('c.d', ['x'])]."""
  axes = []
  for item in spec.split():
    field, sep, values = item.partition('=')
    if not sep or not field or not values or any(
        not v for v in values.split(',')):
      raise SweepError(f'--sweep item {item!r} is not FIELD=V1,V2,...; e.g. '
                       "--sweep='model.n_cycles=2,4 model.variant=ztt'")
    if field in [f for f, _ in axes]:
      raise SweepError(f'--sweep names {field} twice; give it once with all '
                       'its values')
    axes.append((field, values.split(',')))
  if not axes:
    raise SweepError("--sweep is empty; e.g. --sweep='model.n_cycles=2,4'")
  return axes


def expand(axes: Sequence[tuple[str, list[str]]]) -> list[dict[str, str]]:
  """The product of the axes, in order: the last axis varies fastest."""
  fields = [f for f, _ in axes]
  return [dict(zip(fields, values))
          for values in itertools.product(*[v for _, v in axes])]


def run_name(overrides: dict[str, str]) -> str:
  """'n_cycles=2,variant=ztt': the last part of each field, then its value."""
  return ','.join(f"{field.rsplit('.', 1)[-1]}={value}"
                  for field, value in overrides.items()).replace('/', '_')


def load_config(config_arg: str):
  """Calls `get_config` of 'path/to/config.py[:arg]', like ztt-train."""
  path, _, arg = config_arg.partition(':')
  if not os.path.isfile(path):
    raise SweepError(f'--config={config_arg}: no such file {path}')
  spec = importlib.util.spec_from_file_location('_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_fields(config, axes) -> None:
  for field, _ in axes:
    node = config
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        raise SweepError(f'--sweep field {field!r} is not in the config; '
                         'use a dotted config field, e.g. model.n_cycles')
      node = node[part]


def commands(launcher: list[str], config_arg: str, workdir: str,
             runs: list[dict[str, str]], extra: list[str]
             ) -> list[tuple[str, list[str]]]:
  """(run workdir, argv) per run."""
  out = []
  for overrides in runs:
    run_dir = os.path.join(workdir, run_name(overrides))
    argv = [*launcher, f'--config={config_arg}', f'--workdir={run_dir}',
            *[f'--config.{k}={v}' for k, v in overrides.items()], *extra]
    out.append((run_dir, argv))
  return out


def final_metrics(run_dir: str) -> dict[str, Any]:
  """The last row with `val_loss` (and the last step) of a run's metrics."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  result: dict[str, Any] = {'step': None, 'val_loss': None}
  if not os.path.exists(path):
    return result
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      result['step'] = row.get('step', result['step'])
      if 'val_loss' in row:
        result['val_loss'] = row['val_loss']
        result['val_step'] = row.get('step')
  return result


def summarize(workdir: str, runs: list[dict[str, str]]) -> str:
  """A markdown table of final val loss per run; also written to WORKDIR."""
  fields = list(runs[0]) if runs else []
  rows = []
  for overrides in runs:
    metrics = final_metrics(os.path.join(workdir, run_name(overrides)))
    rows.append({**overrides, **metrics})
  header = '| ' + ' | '.join([*fields, 'step', 'val_loss']) + ' |'
  lines = [header, '|' + '---|' * (len(fields) + 2)]
  for row in rows:
    loss = row['val_loss']
    lines.append('| ' + ' | '.join(
        [*(str(row[f]) for f in fields),
         '-' if row['step'] is None else str(row['step']),
         '-' if loss is None else f'{loss:.4f}']) + ' |')
  table = '\n'.join(lines)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(table + '\n')
  with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  return table


def main(argv: list[str]) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='launch/sweep.py', description=__doc__.split('\n\n')[0],
      epilog="Example: python launch/sweep.py --config=configs/tiny.py "
      "--workdir=runs/sweep --sweep='model.n_cycles=2,4,8 "
      "model.variant=head_tail_cycle,ztt' -- --config.train.steps=200",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True,
                      help='config file, path[:arg], as for ztt-train')
  parser.add_argument('--workdir', required=True,
                      help='parent directory; one subdirectory per run')
  parser.add_argument('--sweep', required=True,
                      help="space-separated FIELD=V1,V2,... axes")
  parser.add_argument('--launcher',
                      default=f'{shlex.quote(sys.executable)} -m '
                      'ztt_jax.commands.train',
                      help='command in front of each run (default: this '
                      'python -m ztt_jax.commands.train)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands, run nothing')
  parser.add_argument('--summarize', action='store_true',
                      help='only gather the table of finished runs')
  parser.add_argument('--keep_going', action='store_true',
                      help='go on after a failed run')
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != '--']
  try:
    axes = parse_sweep(args.sweep)
    check_fields(load_config(args.config), axes)
  except SweepError as e:
    print(f'sweep.py: error: {e}', file=sys.stderr)
    return 2
  runs = expand(axes)
  todo = commands(shlex.split(args.launcher), args.config, args.workdir, runs,
                  extra)
  if args.dry_run:
    for _, argv_ in todo:
      print(shlex.join(argv_))
    return 0
  failed = []
  if not args.summarize:
    for i, (run_dir, argv_) in enumerate(todo):
      print(f'sweep.py: run {i + 1}/{len(todo)}: {shlex.join(argv_)}',
            flush=True)
      if subprocess.run(argv_, check=False).returncode != 0:
        failed.append(run_dir)
        if not args.keep_going:
          print(f'sweep.py: error: run {run_dir} failed; stopping (pass '
                '--keep_going to go on)', file=sys.stderr)
          break
  missing = [run_name(o) for o in runs if not os.path.exists(os.path.join(
      args.workdir, run_name(o), 'metrics.jsonl'))]
  if missing and len(missing) == len(runs):
    # A remote launcher (a pod, a cluster): its runs wrote WORKDIR there.
    print(f'sweep.py: no run has metrics under {args.workdir} on this '
          'machine: runs started through --launcher write WORKDIR on its '
          'machines; gather the table there with the same flags plus '
          '--summarize (e.g. on worker 0 of a pod), or pass a --workdir '
          'that both machines mount', file=sys.stderr)
    return 1 if failed else 0
  print(summarize(args.workdir, runs))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
