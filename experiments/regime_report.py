"""The regime search's report (regime.py): docs/results/regime.json and
regime_table.md, read from the runs under OUT/SETTING/VARIANT/seedS.

`settings` and `variants` are regime.py's SETTINGS and VARIANTS.
"""

from __future__ import annotations

import json
import os

from experiments import records


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
  seconds = records.wall_seconds(path)
  return None if seconds is None else round(seconds, 1)


def summarize(settings: dict, variants: dict, out: str) -> dict:
  """Every finished run under `out`, grouped by setting and variant."""
  summary = {'command': 'python experiments/regime.py', 'settings': {}}
  for setting, spec in settings.items():
    steps = int(spec['overrides'].get('train.steps', 600))
    o = spec['overrides']
    tokens = steps * int(o.get('train.batch_size', 16)) * int(
        o.get('data.seq_len', 64))
    entry = {'description': spec['description'], 'overrides': o,
             'tokens': tokens, 'variants': {}, 'vs_vanilla': {}}
    for variant in variants:
      vdir = os.path.join(out, setting, variant)
      if not os.path.isdir(vdir):
        continue
      per_seed, walls, unfinished, params = {}, {}, {}, None
      for name in sorted(os.listdir(vdir)):
        if not name.startswith('seed') or '.' in name:
          continue
        path = os.path.join(vdir, name)
        last = records.final_eval(records.read_rows(path), steps)
        loss = None if last is None else last['val_loss']
        params = params or _params(path)
        if loss is not None:
          per_seed[int(name[4:])] = round(loss, 5)
          walls[int(name[4:])] = _wall(path)
        else:
          evals = [r for r in records.read_rows(path) if 'val_loss' in r]
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


def table(summary: dict, variants: dict) -> str:
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
          f'{v["params"] or "?":,} | {variants[variant][2]} | {seeds} | '
          f'{_num(v["mean"])} | {_num(v["spread"])} | {diff} | {beats} |')
  return '\n'.join(lines) + '\n'


def write_summary(settings: dict, variants: dict, out: str,
                  results: str) -> None:
  """regime.json and regime_table.md in `results`; prints the table."""
  summary = summarize(settings, variants, out)
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, 'regime.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
    f.write('\n')
  text = table(summary, variants)
  with open(os.path.join(results, 'regime_table.md'), 'w',
            encoding='utf-8') as f:
    f.write('<!-- Written by experiments/regime.py; do not edit. -->\n\n')
    f.write(text)
  print(text, end='')
