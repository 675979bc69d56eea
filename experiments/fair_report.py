"""Builds docs/RESULTS.md (and docs/results/fair_*.png) from the fair grid.

    python experiments/run_all.py --study=fair --report_only

Every number is read from `docs/results/summary.json` (itself written from
the runs' files by `summary.py`), the runs' `metrics.jsonl` (gates,
zero-token mass, each exit head's loss) and their ztt-eval sweeps; the
verdicts on the paper's claims are written by hand in `fair_notes.md` and
appended. Comparisons are paired by seed (a seed fixes the init and the data
order of every variant alike).
"""

from __future__ import annotations

import json
import os
import statistics

from experiments import fair
from experiments import plots
from experiments import records
from experiments import tables

STUDY = fair.STUDY

NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     'fair_notes.md')
# The early-exit target of the issue: this share of middle cycles saved at
# no more than this relative rise of the validation loss.
TARGET_SAVED, TARGET_RISE = 0.30, 0.005
# Loss differences smaller than this are ties: an exit rule "beats" fixed
# depth or the random exit only by more (the sweeps' 65K tokens).
MARGIN = 0.001


def verdict(a: list[float], b: list[float]) -> str:
  """A plain reading of A - B over paired seeds (negative: A lower)."""
  if min(len(a), len(b)) < 2:
    return 'one seed: no spread to judge by'
  diffs = [x - y for x, y in zip(a, b)]
  mean = statistics.fmean(diffs)
  spread = max(max(a) - min(a), max(b) - min(b))
  lower = 'A' if mean < 0 else 'B'
  every = len({d < 0 for d in diffs}) == 1
  if every and abs(mean) > 2 * spread:
    return f'**{lower} lower**, at every seed, beyond twice the seed spread'
  if every and abs(mean) > spread:
    return (f'**{lower} lower** at every seed, beyond the seed spread (not '
            'twice it)')
  if every:
    return f'{lower} lower at every seed, within the seed spread'
  return 'no difference measured'


def _entries(summ: dict) -> dict:
  return {r['name']: r for r in summ['runs']}


def _paired(ea: dict, eb: dict) -> tuple[list[float], list[float]]:
  seeds = [s for s in ea['seeds'] if s in eb['seeds']]
  pick = lambda e: [e['val_loss'][e['seeds'].index(s)] for s in seeds]
  return pick(ea), pick(eb)


def main_table(summ: dict) -> str:
  runs = _entries(summ)
  lines = tables.header('run', 'distinct params', 'train FLOPs / token',
                        'val loss per seed', 'mean', 'spread')
  for run in STUDY.main:
    e = runs.get(run.name)
    if e is None:
      lines.append(f'| `{run.name}`: {run.label} | | | not run yet | | |')
      continue
    v = e['val_loss']
    lines.append(
        f'| `{run.name}`: {run.label} | {e["distinct_params"]:,} | '
        f'{e["flops_per_token"] / 1e6:.2f} M | '
        f'{", ".join(f"{x:.4f}" for x in v)} (seeds '
        f'{",".join(map(str, e["seeds"]))}) | {statistics.fmean(v):.4f} | '
        + (f'{max(v) - min(v):.4f} |' if len(v) > 1 else 'n/a |'))
  return '\n'.join(lines)


def comparison_pairs() -> list[tuple[str, str, str]]:
  """(A, B, what differs): every pair differs in one thing."""
  pairs = []
  for c in (2, 4):
    for ex in ('', '_exit'):
      heads = 'with exit heads' if ex else 'no exit heads'
      pairs += [(f'ztt_c{c}{ex}', f'htc_c{c}{ex}', f'zero tokens and gates, '
                 f'C={c}, {heads} (claim a)'),
                (f'ztt_c{c}{ex}', f'bc_c{c}{ex}', f'ZTT against BC, C={c}, '
                 f'{heads} (claim a)'),
                (f'htc_c{c}{ex}', f'bc_c{c}{ex}', f'head and tail kept out of '
                 f'the cycle, C={c}, {heads}')]
    pairs += [(f'htc_c{c}', 'vanilla', f'cycling the middle layer {c}x'),
              (f'ztt_c{c}', 'vanilla', f'ZTT C={c} against no cycling'),
              (f'vanilla_mid{c}', f'htc_c{c}', f'{c} distinct middle layers '
               f'against one cycled {c}x (equal compute)')]
    for v in ('bc', 'htc', 'ztt'):
      pairs.append((f'{v}_c{c}_exit', f'{v}_c{c}', f'exit heads on '
                    f'{v.upper()} C={c}'))
  return pairs


def comparisons(summ: dict) -> str:
  runs = _entries(summ)
  lines = tables.header('A', 'B', 'what differs', 'A - B, mean',
                        'A - B per seed', 'larger seed spread', 'verdict')
  for a, b, what in comparison_pairs():
    if a not in runs or b not in runs:
      lines.append(f'| `{a}` | `{b}` | {what} | not run yet | | | |')
      continue
    va, vb = _paired(runs[a], runs[b])
    if not va:
      continue
    diffs = [x - y for x, y in zip(va, vb)]
    spread = max(max(va) - min(va), max(vb) - min(vb))
    spread_text = f'{spread:.4f}' if len(va) > 1 else 'n/a'
    lines.append(f'| `{a}` | `{b}` | {what} | {statistics.fmean(diffs):+.4f} '
                 f'| {", ".join(f"{d:+.4f}" for d in diffs)} | {spread_text} '
                 f'| {verdict(va, vb)} |')
  return '\n'.join(lines)


def dynamics_table(out: str, names: list[str]) -> str:
  """Each exit head's val loss, the gates and the zero-token mass at the end
  of training, seed 0."""
  entries = []
  for name in names:
    rows = records.read_rows(records.workdir(out, name, 0))
    last = records.final_eval(rows, STUDY.steps)
    if last is not None:
      entries.append((name, last, rows))
  return tables.dynamics_table(
      ('run', 'val loss after cycle 1, 2, ...', 'gate per cycle',
       'zero-token mass per cycle'), entries)


def ablation_table(summ: dict) -> str:
  """Each ablation against the base run, paired by seed."""
  runs = _entries(summ)
  base = runs.get(STUDY.ablation_base)
  if base is None or 0 not in base['seeds']:
    return 'The base run has not finished seed 0 yet.'
  lines = ['| run | change from ZTT C=4 with exit heads | val loss per seed | '
           'minus the base at the same seed | verdict |',
           '|---|---|---|---|---|']
  b = dict(zip(base['seeds'], base['val_loss']))
  spread = max(base['val_loss']) - min(base['val_loss'])
  lines.append(f'| `{STUDY.ablation_base}` | none | '
               + ', '.join(f'{v:.4f} (s{s})' for s, v in b.items())
               + f' | (seed spread of the base: {spread:.4f}) | |')
  for run in STUDY.ablations:
    e = runs.get(run.name)
    if e is None:
      lines.append(f'| `{run.name}` | {run.label} | not run yet | | |')
      continue
    va, vb = _paired(e, base)
    lines.append(
        f'| `{run.name}` | {run.label} | '
        + ', '.join(f'{v:.4f} (s{s})' for s, v in zip(e['seeds'],
                                                      e['val_loss']))
        + ' | ' + ', '.join(f'{x - y:+.4f}' for x, y in zip(va, vb))
        + f' | {verdict(va, vb)} |')
  return '\n'.join(lines)


def below_fixed(row: dict, fixed: dict[int, float]) -> bool:
  """Whether a rule's loss lies below the fixed-depth curve (linear between
  integer depths) at its mean cycles, by more than MARGIN."""
  m = row['mean_cycles']
  lo = max(1, min(int(m), max(fixed)))
  hi = min(lo + 1, max(fixed))
  ref = fixed[lo] if hi == lo else (
      fixed[lo] + (m - lo) * (fixed[hi] - fixed[lo]))
  return row['val_loss'] < ref - MARGIN


def early_exit_table(summ: dict) -> str:
  """Every rule row of every sweep against the target and the fixed curve."""
  lines = ['| run | rule | threshold | mean cycles | cycles run | middle '
           'cycles saved (mean / run) | val loss | rise over full depth | '
           'random, same cycles | below fixed depth | target met (mean / '
           'run) |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  by_run = {}
  for r in summ['early_exit']:
    by_run.setdefault(r['run'], []).append(r)
  for name, rows in by_run.items():
    n_cycles = _entries(summ).get(name, {}).get('n_cycles') or max(
        r['mean_cycles'] for r in rows if r['criterion'] == 'fixed')
    fixed = {int(round(r['mean_cycles'])): r['val_loss'] for r in rows
             if r['criterion'] == 'fixed'}
    full = fixed[max(fixed)]
    randoms = {(r.get('matches'), r['threshold']): r for r in rows
               if r['criterion'] == 'random'}
    for r in rows:
      if r['criterion'] in ('fixed', 'random'):
        continue
      twin = randoms.get((r['criterion'], r['threshold']))
      saved = 1 - r['mean_cycles'] / n_cycles
      saved_run = 1 - r['cycles_run'] / n_cycles
      rise = r['val_loss'] / full - 1
      good = (rise <= TARGET_RISE and below_fixed(r, fixed)
              and (twin is None or r['val_loss'] < twin['val_loss'] - MARGIN))
      met = ' / '.join('**yes**' if good and x >= TARGET_SAVED else 'no'
                       for x in (saved, saved_run))
      random_loss = f'{twin["val_loss"]:.4f}' if twin else ''
      lines.append(
          f'| `{name}` | {r["criterion"]} | {r["threshold"]:.4g} | '
          f'{r["mean_cycles"]:.2f} | {r["cycles_run"]:.2f} | '
          f'{saved:.0%} / {saved_run:.0%} | {r["val_loss"]:.4f} | '
          f'{rise:+.2%} | {random_loss} | '
          f'{"yes" if below_fixed(r, fixed) else "no"} | {met} |')
  return '\n'.join(lines)


def fixed_table(summ: dict) -> str:
  """Each sweep run's fixed depths (every token runs k cycles)."""
  lines = tables.header('run', 'val loss at fixed depth 1, 2, ... cycles')
  by_run = {}
  for r in summ['early_exit']:
    if r['criterion'] == 'fixed':
      by_run.setdefault(r['run'], []).append(r)
  for name, rows in by_run.items():
    rows.sort(key=lambda r: r['mean_cycles'])
    lines.append(f'| `{name}` | '
                 + ', '.join(f'{r["val_loss"]:.4f}' for r in rows) + ' |')
  return '\n'.join(lines)


POSITION_BANDS = ((0, 4), (4, 16), (16, 64), (64, 128))


def position_table(out: str, name: str, criteria) -> str:
  """Mean cycles run by position band for each rule at its threshold
  nearest to 2 mean cycles: a statistic that measures position exits early
  at the start of the window and late at its end."""
  bands = [f'{a}-{b - 1}' for a, b in POSITION_BANDS]
  lines = [f'| rule | threshold | mean cycles | '
           + ' | '.join(f'positions {b}' for b in bands) + ' |',
           '|---|---|---|' + '---|' * len(bands)]
  for c in criteria:
    ruled = [r for r in records.read_sweep(records.workdir(out, name, 0), c)
             if r['criterion'] not in ('fixed', 'random')
             and 'mean_cycles_by_position' in r]
    if not ruled:
      continue
    r = min(ruled, key=lambda r: abs(r['mean_cycles'] - 2))
    by_pos = r['mean_cycles_by_position']
    cells = [f'{statistics.fmean(by_pos[a:b]):.2f}' for a, b in
             POSITION_BANDS if len(by_pos) >= b]
    lines.append(f'| {r["criterion"]} | {r["threshold"]:.4g} | '
                 f'{r["mean_cycles"]:.2f} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ------------------------------------------------------------------ plots --


def plot_seeds(summ: dict, path: str) -> None:
  """Every main run's final val loss, one dot per seed."""
  plt = plots.pyplot()
  runs = [r for r in STUDY.main if r.name in _entries(summ)]
  if not runs:
    return
  fig, ax = plt.subplots(figsize=(10, 3.8), dpi=110)
  for i, run in enumerate(runs):
    e = _entries(summ)[run.name]
    ax.plot([i] * len(e['val_loss']), e['val_loss'], 'o', ms=4,
            color='C3' if run.name.startswith('ztt') else 'C0')
    ax.plot([i - 0.3, i + 0.3], [statistics.fmean(e['val_loss'])] * 2, 'k-',
            lw=1)
  ax.set_xticks(range(len(runs)))
  ax.set_xticklabels([r.name for r in runs], rotation=45, ha='right',
                     fontsize=7)
  ax.set_ylabel('final val loss (nats / byte)')
  ax.set_title('fair grid: one dot per seed, bar = mean', fontsize=9)
  plots.save(fig, path)


def plot_early_exit(out: str, name: str, criteria, path: str) -> None:
  """Val loss against mean cycles: fixed depth, each rule, random."""
  plt = plots.pyplot()
  sweeps = [(c, records.read_sweep(records.workdir(out, name, 0), c)) for c in criteria]
  sweeps = [(c, rows) for c, rows in sweeps if rows]
  if not sweeps:
    return
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  fixed = sorted((r for r in sweeps[0][1] if r['criterion'] == 'fixed'),
                 key=lambda r: r['mean_cycles'])
  ax.plot([r['mean_cycles'] for r in fixed], [r['val_loss'] for r in fixed],
          'k-o', label='fixed depth')
  for k, (c, rows) in enumerate(sweeps):
    for kind, style in ((c, '-s'), ('random', ':x')):
      pts = sorted((r for r in rows if r['criterion'] == kind),
                   key=lambda r: r['mean_cycles'])
      ax.plot([r['mean_cycles'] for r in pts], [r['val_loss'] for r in pts],
              style, color=f'C{k}', label=c if kind == c else f'random ({c})')
    # Where in the sequence each rule exits, at its threshold nearest to
    # two mean cycles.
    ruled = [r for r in rows if r['criterion'] == c and
             'mean_cycles_by_position' in r]
    if ruled:
      r = min(ruled, key=lambda r: abs(r['mean_cycles'] - 2))
      bx.plot(r['mean_cycles_by_position'], color=f'C{k}',
              label=f'{c} (mean {r["mean_cycles"]:.2f})')
  ax.set_xlabel('mean middle cycles per token')
  ax.set_ylabel('val loss')
  ax.set_title(f'{name}, seed 0: per-token exits (cached decoding)',
               fontsize=9)
  ax.legend(fontsize=7)
  bx.set_xlabel('position in the window')
  bx.set_ylabel('mean cycles run')
  bx.set_title('mean cycles by position, each rule near 2 mean cycles',
               fontsize=9)
  bx.legend(fontsize=7)
  plots.save(fig, path)


# ----------------------------------------------------------------- report --


def wall_hours(out: str) -> tuple[int, float]:
  """(number of runs that recorded wall time, their hours summed) over the
  training runs of `out` (run_all.py writes NAME/seedS.wall, one line per
  attempt)."""
  n, seconds = 0, 0.0
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else ():
    d = os.path.join(out, name)
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else ():
      if f.startswith('seed') and f.endswith('.wall') and f.count('.') == 1:
        seconds += records.wall_seconds(os.path.join(d, f[:-5])) or 0.0
        n += 1
  return n, seconds / 3600


def write_report(out: str, docs: str, summary_path: str) -> str:
  with open(summary_path, encoding='utf-8') as f:
    summ = json.load(f)
  fig_dir = os.path.join(docs, 'results')
  os.makedirs(fig_dir, exist_ok=True)
  plot_seeds(summ, os.path.join(fig_dir, 'fair_seeds.png'))
  plot_early_exit(out, 'ztt_c4_exit', STUDY.early_exit['ztt_c4_exit'],
                  os.path.join(fig_dir, 'fair_early_exit.png'))
  plot_early_exit(out, 'abl_gate_scalar', STUDY.early_exit['abl_gate_scalar'],
                  os.path.join(fig_dir, 'fair_early_exit_scalar_gate.png'))
  found = {(r['name'], seed) for r in summ['runs'] for seed in r['seeds']}
  scheduled = {(run.name, seed) for run, seed in STUDY.schedule()}
  n_done, n_all = len(found & scheduled), len(scheduled)
  n_extra = len(found - scheduled)
  extra = (f', and {n_extra} more seeds of ablations' if n_extra else '')
  n_timed, hours = wall_hours(out)
  timing = (f'the {n_timed} runs that recorded their wall time took {hours:.1f} '
            f'hours one after another, {hours / 2:.1f} two at a time on 2 cores, '
            'most of them beside other work; at that mean the '
            f'{n_all} runs take about {hours / n_timed * n_all / 2:.0f} hours '
            'two at a time' if n_timed else 'no wall times recorded')
  notes = records.read_notes(NOTES)
  exit_runs = [r.name for r in STUDY.main if r.name.endswith('_exit')
               or r.name.startswith('ztt')]
  flags = ' '.join(STUDY.step_flags)
  text = f"""# Results: does ZTT do the paper's job?

Regenerate everything below with one command, resumably (trains whatever is
missing, runs the ztt-eval sweeps, writes `docs/results/summary.json` and
this file; {n_done} of the {n_all} (run, seed) pairs it schedules found
when this copy was written{extra}; {timing}):

```bash
python experiments/run_all.py --study=fair
```

Every number is read from the runs' own files; the verdicts at the end are
written by hand (`experiments/fair_notes.md`). Older studies:
[`results/shakespeare.md`](results/shakespeare.md) (the first grid, on
tinyshakespeare, where cycling did not pay), [`results/regime.md`](results/regime.md)
(the search for a regime where it does), [`results/position.md`](results/position.md)
(what the zero-token statistic measures).

**Setup.** `{STUDY.config}` (byte tokens over the Python standard library's
sources, `builtin:stdlib`, 28 MB) with `{flags}`: 1 head + 1 middle + 1 tail
distinct layers 32 wide, {STUDY.steps} steps of 32 x 128 bytes (6.1M tokens).
Seeds fix the init and the data order of every variant alike, so
comparisons are paired by seed. Validation loss: 32 fixed batches of the
held-out tail after the last step. `_exit` runs train an exit head (the
shared tail, final norm and LM head) after every cycle with linear weights
(`model.exit_loss=linear`), alike for BC, HTC and ZTT; the others train only
the final output (`none`).

## 1. At a fixed parameter budget, does ZTT beat BC and HTC? (claim a)

{main_table(summ)}

![final val loss per seed](results/fair_seeds.png)

Pairs, each differing in one thing (negative: A lower). Verdict words:
"beyond twice the seed spread" is the issue's bar for a result; "beyond the
seed spread" is suggestive; "no difference" means the sign changes between
seeds.

{comparisons(summ)}

## 2. Gates, zero-token mass and exit heads (seed 0, end of training)

{dynamics_table(out, exit_runs)}

## 3. Ablations of ZTT's readings (ZTT C=4 with exit heads)

{ablation_table(summ)}

{dynamics_table(out, [STUDY.ablation_base] + [r.name for r in STUDY.ablations])}

## 4. Does the zero-token statistic tell when to stop? (claim b)

`ztt-eval --per=token --random_baseline --n_thresholds=4
--batches={STUDY.eval_batches} --criterion=C` on each run's seed 0: every
token decoded one at a time through the KV cache, as `ztt-generate` does,
exiting once the statistic of its last cycle passes the threshold; `random`
deals out the rule's own cycles at random; `cycles run` counts what the
decoding `while_loop` ran (the batch's slowest token); "saved" is 1 - cycles
/ C. Target: >= {TARGET_SAVED:.0%} of middle cycles saved at <= {TARGET_RISE:.1%} higher val
loss than full depth, below the fixed-depth curve (linear between depths)
at equal mean cycles and below the random exit with the same cycles, each
by more than {MARGIN} nats (smaller differences are ties); "met" is judged
on the mean cycles (what per-token routing could save) and on the cycles
the batched loop ran.

Fixed depths (the same {STUDY.eval_batches} batches):

{fixed_table(summ)}

{early_exit_table(summ)}

![early exit on ZTT C=4 with exit heads](results/fair_early_exit.png)

The same with a scalar gate (`abl_gate_scalar`, whose gates stay open):

![early exit with a scalar gate](results/fair_early_exit_scalar_gate.png)

Where in the window each rule exits (`ztt_c4_exit`, seed 0; mean cycles per
token by position, each rule at its threshold nearest to 2 mean cycles):

{position_table(out, 'ztt_c4_exit', STUDY.early_exit['ztt_c4_exit'])}
"""
  if notes:
    text += '\n' + notes + '\n'
  path = os.path.join(docs, 'RESULTS.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  print(f'wrote {path} and {fig_dir}/fair_*.png', flush=True)
  return path
