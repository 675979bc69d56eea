"""Looks for a regime where cycling pays: HTC against vanilla, equal params.

    python experiments/regime.py --out=/work/runs/regime \\
        --settings=s1_d64_l3_ctx128 --variants=vanilla,htc_c4 --seeds=0

Each setting in `SETTINGS` is a set of config overrides on top of
`configs/default.py` (byte-level `builtin:stdlib`, the Python standard
library's sources); each variant in `VARIANTS` adds only `model.variant` (and
`model.n_cycles`), so the two runs of a pair differ in nothing else. None has
exit heads (`model.exit_loss` is `auto`, which is `none` for vanilla and HTC).

Runs land in `--out`/SETTING/VARIANT/seedS (log beside as seedS.log, the
seconds each attempt took in seedS.wall). A finished run (its metrics hold the
eval of the last step) is skipped, an unfinished one resumes from its last
checkpoint, so the command can be stopped and started again. `--jobs=2` trains
two runs at a time, each pinned to one core with `taskset` and run under
`nice -n 19` (the machine is shared); `--cores=1` runs one at a time on
core 1. Compiled programs are shared through a
JAX compilation cache in `--out`/jax_cache.

At the end (or alone, with `--report_only`) it reads every run under `--out`
and writes docs/results/regime.json (per setting and variant: the final val
loss per seed, mean, spread = max - min over seeds; per setting and cycled
variant: its mean minus vanilla's and whether the gap exceeds twice the larger
spread) and docs/results/regime_table.md (the same as a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_all  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = run_all.REPO
CONFIG = 'configs/default.py'

# Shared by every setting unless it overrides them.
BASE = (
    ('sample.max_new_tokens', 0),
    ('train.log_every_steps', 100),
    ('train.eval_batches', 32),
    ('model.exit_loss', 'none'),
)


def _setting(description: str, **overrides) -> dict:
  flat = {k.replace('__', '.'): v for k, v in overrides.items()}
  return {'description': description, 'overrides': flat}


# Candidate settings, in the order they were tried. Names say what changes.
SETTINGS = {
    # 176,576 distinct params; vanilla runs 3 layers, HTC C=4 runs 6.
    's1_d64_l3_ctx128': _setting(
        'd_model 64, 4 heads, 1+1+1 layers, context 128, batch 16, lr 3e-3, '
        '1500 steps (3.1M tokens)',
        model__d_model=64, model__n_heads=4, model__n_mid_layers=1,
        data__seq_len=128, train__batch_size=16, train__lr=3e-3,
        train__warmup_steps=100, train__steps=1500,
        train__eval_every_steps=500, checkpoint__every_steps=500),
    # s1 with half the width (2 heads of 16): ~50K params, saturates sooner.
    's2_d32_l3_ctx128': _setting(
        'd_model 32, 2 heads, 1+1+1 layers, context 128, batch 16, lr 3e-3, '
        '1500 steps (3.1M tokens)',
        model__d_model=32, model__n_heads=2, model__n_mid_layers=1,
        data__seq_len=128, train__batch_size=16, train__lr=3e-3,
        train__warmup_steps=100, train__steps=1500,
        train__eval_every_steps=500, checkpoint__every_steps=500),
    # s1 with twice the context (batch halved: same tokens per step).
    's3_d64_l3_ctx256': _setting(
        'd_model 64, 4 heads, 1+1+1 layers, context 256, batch 8, lr 3e-3, '
        '1500 steps (3.1M tokens)',
        model__d_model=64, model__n_heads=4, model__n_mid_layers=1,
        data__seq_len=256, train__batch_size=8, train__lr=3e-3,
        train__warmup_steps=100, train__steps=1500,
        train__eval_every_steps=500, checkpoint__every_steps=500),
    # s2 with twice the batch: twice the tokens (6.1M) in as many steps.
    's4_d32_l3_ctx128_b32': _setting(
        'd_model 32, 2 heads, 1+1+1 layers, context 128, batch 32, lr 3e-3, '
        '1500 steps (6.1M tokens)',
        model__d_model=32, model__n_heads=2, model__n_mid_layers=1,
        data__seq_len=128, train__batch_size=32, train__lr=3e-3,
        train__warmup_steps=100, train__steps=1500,
        train__eval_every_steps=500, checkpoint__every_steps=500),
}

# name -> (variant, n_cycles or None, label, other model overrides). The
# pairs compared (vanilla against a cycled variant) differ only in
# model.variant and model.n_cycles; vanilla_mid4 is a reference, not a pair:
# the equal-compute vanilla of HTC C=4 when the setting has one middle layer
# (1 + 4 + 1 distinct layers, more parameters).
VARIANTS = {
    'vanilla': ('vanilla', None, 'vanilla', {}),
    'htc_c2': ('head_tail_cycle', 2, 'HTC C=2', {}),
    'htc_c4': ('head_tail_cycle', 4, 'HTC C=4', {}),
    'bc_c4': ('basic_cycle', 4, 'BC C=4', {}),
    'vanilla_mid4': ('vanilla', None, 'vanilla, 4 middle layers', {
        'model.n_mid_layers': 4}),
}


def workdir(out: str, setting: str, variant: str, seed: int) -> str:
  return os.path.join(out, setting, variant, f'seed{seed}')


def steps_of(setting: str) -> int:
  return int(SETTINGS[setting]['overrides'].get('train.steps', 600))


def _rows(path: str) -> list[dict]:
  try:
    with open(os.path.join(path, 'metrics.jsonl'), encoding='utf-8') as f:
      return [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return []


def final_val_loss(path: str, steps: int) -> float | None:
  """The val loss at the last step, or None while the run is unfinished."""
  vals = [r['val_loss'] for r in _rows(path)
          if r.get('step') == steps and 'val_loss' in r]
  return vals[-1] if vals else None


def train_command(setting: str, variant: str, seed: int,
                  path: str) -> list[str]:
  kind, cycles, _, extra = VARIANTS[variant]
  overrides = dict(BASE)
  overrides.update(SETTINGS[setting]['overrides'])
  overrides.update(extra)
  overrides['model.variant'] = kind
  if cycles is not None:
    overrides['model.n_cycles'] = cycles
  overrides['seed'] = seed
  return ([os.path.join(os.path.dirname(sys.executable), 'ztt-train'),
           f'--config={CONFIG}', f'--workdir={path}'] +
          [f'--config.{k}={v}' for k, v in overrides.items()])


def _params(path: str) -> int | None:
  """Distinct params, from the first line ztt-train logs."""
  try:
    with open(path + '.log', encoding='utf-8') as f:
      for line in f:
        if 'distinct params' in line:
          return int(line.split(',', 1)[1].split('distinct')[0]
                     .strip().replace(',', ''))
  except (OSError, ValueError, IndexError):
    pass
  return None


def _wall(path: str) -> float | None:
  try:
    with open(path + '.wall', encoding='utf-8') as f:
      return round(sum(float(x) for x in f if x.strip()), 1)
  except (OSError, ValueError):
    return None


def summarize(out: str) -> dict:
  """Every finished run under `out`, grouped by setting and variant."""
  summary = {'command': 'python experiments/regime.py', 'settings': {}}
  for setting, spec in SETTINGS.items():
    steps = steps_of(setting)
    o = spec['overrides']
    tokens = steps * int(o.get('train.batch_size', 16)) * int(
        o.get('data.seq_len', 64))
    entry = {'description': spec['description'], 'overrides': o,
             'tokens': tokens, 'variants': {}, 'vs_vanilla': {}}
    for variant in VARIANTS:
      vdir = os.path.join(out, setting, variant)
      if not os.path.isdir(vdir):
        continue
      per_seed, walls, unfinished, params = {}, {}, {}, None
      for name in sorted(os.listdir(vdir)):
        if not name.startswith('seed') or '.' in name:
          continue
        path = os.path.join(vdir, name)
        loss = final_val_loss(path, steps)
        params = params or _params(path)
        if loss is not None:
          per_seed[int(name[4:])] = round(loss, 5)
          walls[int(name[4:])] = _wall(path)
        else:
          evals = [r for r in _rows(path) if 'val_loss' in r]
          if evals:
            unfinished[int(name[4:])] = {
                'step': evals[-1]['step'],
                'val_loss': round(evals[-1]['val_loss'], 5)}
      if not per_seed and not unfinished:
        continue
      losses = list(per_seed.values())
      entry['variants'][variant] = {
          'val_loss': per_seed,
          'mean': round(sum(losses) / len(losses), 5) if losses else None,
          'spread': round(max(losses) - min(losses), 5) if losses else None,
          'params': params, 'wall_s': walls,
          # Stopped runs: their last eval (step, val loss).
          'unfinished': unfinished}
    van = entry['variants'].get('vanilla')
    for variant, v in entry['variants'].items():
      if variant.startswith('vanilla') or van is None:
        continue
      common = sorted(set(v['val_loss']) & set(van['val_loss']))
      if not common:
        continue
      diffs = {s: round(v['val_loss'][s] - van['val_loss'][s], 5)
               for s in common}
      mean = lambda d: sum(d[s] for s in common) / len(common)
      diff = mean(v['val_loss']) - mean(van['val_loss'])
      spread = max(v['spread'], van['spread'])
      entry['vs_vanilla'][variant] = {
          'seeds': common, 'diff_per_seed': diffs, 'diff': round(diff, 5),
          'larger_spread': spread,
          # Same seed = same init seed and data order for both runs.
          'lower_at_every_seed': all(x < 0 for x in diffs.values()),
          'beats_by_2x_spread': (len(common) >= 2 and diff < 0 and
                                 -diff > 2 * spread)}
    if entry['variants']:
      summary['settings'][setting] = entry
  return summary


def _num(x) -> str:
  return '' if x is None else f'{x:.4f}'


def table(summary: dict) -> str:
  lines = ['| setting | tokens | params | variant | val loss per seed | mean '
           '| spread | minus vanilla (per seed) | beats by >2x spread |',
           '|---|---|---|---|---|---|---|---|---|']
  for setting, e in summary['settings'].items():
    for variant, v in e['variants'].items():
      seeds = ', '.join(
          [f's{s}: {x:.4f}' for s, x in v['val_loss'].items()] +
          [f's{s}: stopped, {u["val_loss"]:.4f} at step {u["step"]}'
           for s, u in v['unfinished'].items()])
      d = e['vs_vanilla'].get(variant)
      diff = beats = ''
      if d:
        per = ', '.join(f'{x:+.4f}' for x in d['diff_per_seed'].values())
        diff = f'{d["diff"]:+.4f} ({per})'
        beats = ('yes' if d['beats_by_2x_spread'] else
                 'no' if len(d['seeds']) >= 2 else 'n/a (1 seed)')
        if len(d['seeds']) >= 2:
          beats += (' (lower at every seed)' if d['lower_at_every_seed']
                    else ' (not lower at every seed)')
      lines.append(
          f'| {setting} | {e["tokens"] / 1e6:.2f}M | '
          f'{v["params"] or "?":,} | {VARIANTS[variant][2]} | {seeds} | '
          f'{_num(v["mean"])} | {_num(v["spread"])} | {diff} | {beats} |')
  return '\n'.join(lines) + '\n'


def write_summary(out: str) -> None:
  summary = summarize(out)
  results = os.path.join(REPO, 'docs', 'results')
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, 'regime.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
    f.write('\n')
  text = table(summary)
  with open(os.path.join(results, 'regime_table.md'), 'w',
            encoding='utf-8') as f:
    f.write('<!-- Written by experiments/regime.py; do not edit. -->\n\n')
    f.write(text)
  print(text, end='')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/regime')
  p.add_argument('--settings', default='', help='Comma-separated; default '
                 'all.')
  p.add_argument('--variants', default='vanilla,htc_c4')
  p.add_argument('--seeds', default='0')
  p.add_argument('--jobs', type=int, default=2)
  p.add_argument('--cores', default='', help='Comma-separated cores to pin '
                 'to, one job each (overrides --jobs), e.g. 1 when core 0 '
                 'is busy; default 0..jobs-1.')
  p.add_argument('--report_only', action='store_true')
  args = p.parse_args()
  out = os.path.abspath(args.out)
  settings = [s for s in args.settings.split(',') if s] or list(SETTINGS)
  variants = [v for v in args.variants.split(',') if v]
  for name in settings:
    if name not in SETTINGS:
      sys.exit(f'regime.py: error: unknown setting {name!r}; one of '
               f'{", ".join(SETTINGS)}')
  for name in variants:
    if name not in VARIANTS:
      sys.exit(f'regime.py: error: unknown variant {name!r}; one of '
               f'{", ".join(VARIANTS)}')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  if not args.report_only:
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
        out, 'jax_cache'), PYTHONUNBUFFERED='1')
    todo = []
    for seed in seeds:
      for setting in settings:
        for variant in variants:
          path = workdir(out, setting, variant, seed)
          if final_val_loss(path, steps_of(setting)) is None:
            todo.append((f'{setting} {variant} seed {seed}',
                         train_command(setting, variant, seed, path),
                         path + '.log'))
    cores = ([int(c) for c in args.cores.split(',') if c] or
             list(range(args.jobs)))
    print(f'{len(todo)} run(s) to train, {len(cores)} at a time (cores '
          f'{cores})', flush=True)
    failures = run_all.run_jobs(todo, len(cores), env, cores, nice=19)
    if failures:
      print(f'failed: {", ".join(failures)}', flush=True)
  write_summary(out)


if __name__ == '__main__':
  main()
