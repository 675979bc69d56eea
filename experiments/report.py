"""Builds docs/results/shakespeare.md and its plots from the first grid.

    python experiments/run_all.py --study=grid --report_only

Reads each run's `metrics.jsonl`, its saved config (distinct params and
FLOPs per token are computed from it, not copied) and, for the early-exit
runs, `eval/early_exit.json` written by `ztt-eval`. Tables give the mean
final validation loss over the seeds found, the spread (max - min) and every
seed's value; a run with no finished seed is listed as missing.
"""

from __future__ import annotations

import json
import os
import statistics

from experiments import grid
from experiments import plots
from experiments import records
from experiments import tables

STUDY = grid.STUDY
NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'notes.md')


def collect(out: str, steps: int) -> dict:
  """name -> {'seeds': {seed: final eval row}, 'rows': {seed: rows}, ...}."""
  results = {}
  for run in STUDY.runs:
    entry = {'run': run, 'seeds': {}, 'rows': {}}
    for seed in sorted(set(STUDY.seeds) | set(STUDY.ablation_seeds)):
      path = records.workdir(out, run.name, seed)
      rows = records.read_rows(path)
      last = records.final_eval(rows, steps)
      if last is not None:
        entry['seeds'][seed] = last
        entry['rows'][seed] = rows
        if 'model' not in entry and os.path.isdir(
            os.path.join(path, 'checkpoints')):
          entry['model'] = records.model_numbers(path)
    results[run.name] = entry
  return results


def loss_summary(entry: dict, key: str = 'val_loss') -> dict | None:
  values = [row[key] for _, row in sorted(entry['seeds'].items())]
  if not values:
    return None
  return dict(mean=statistics.fmean(values), spread=max(values) - min(values),
              values=values)


def _fmt_loss(s: dict | None) -> tuple[str, str, str]:
  if s is None:
    return 'missing', '', ''
  return (f'{s["mean"]:.4f}', f'{s["spread"]:.4f}' if len(s['values']) > 1
          else 'n/a (1 seed)', ', '.join(f'{v:.4f}' for v in s['values']))


def main_table(results: dict) -> str:
  lines = tables.header('run', 'distinct params', 'layers run per token',
                        'train FLOPs per token', 'val loss (mean)', 'spread',
                        'per seed')
  for run in STUDY.main:
    entry = results[run.name]
    m = entry.get('model')
    mean, spread, seeds = _fmt_loss(loss_summary(entry))
    lines.append(
        f'| `{run.name}`: {run.label} | '
        f'{m["distinct_params"]:,} | {m["executed_layers"]} | '
        f'{m["flops_per_token"] / 1e6:.2f} M | '
        if m else f'| `{run.name}`: {run.label} | | | | ')
    lines[-1] += f'{mean} | {spread} | {seeds} |'
  return '\n'.join(lines)


def ablation_table(results: dict) -> str:
  """Each ablation against the base run at the same seeds (paired)."""
  base = results[STUDY.ablation_base]
  lines = tables.header('run', 'change from ZTT C=2', 'val loss (mean)',
                        'minus ZTT C=2 at the same seed(s)', 'spread',
                        'per seed')
  rows = [(STUDY.ablation_base, 'none (the default readings)')] + [
      (r.name, r.label) for r in STUDY.ablations]
  for name, label in rows:
    entry = results[name]
    mean, spread, seeds = _fmt_loss(loss_summary(entry))
    paired = [entry['seeds'][s]['val_loss'] - base['seeds'][s]['val_loss']
              for s in sorted(set(entry['seeds']) & set(base['seeds']))]
    delta = ', '.join(f'{d:+.4f}' for d in paired) if name != (
        STUDY.ablation_base) else ''
    lines.append(f'| `{name}` | {label} | {mean} | {delta} | {spread} | '
                 f'{seeds} |')
  return '\n'.join(lines)


def comparisons(results: dict) -> str:
  """Differences of mean val loss, each against the larger seed spread, and
  the paired differences seed by seed (a seed fixes the init and the data
  order of every variant alike, so pairs share most of the noise)."""
  pairs = []
  for c in (2, 4):
    eq = {2: 'vanilla_6', 4: 'vanilla_10'}[c]
    pairs += [(f'ztt_c{c}', f'htc_c{c}'), (f'ztt_c{c}', f'bc_c{c}'),
              (f'htc_c{c}', f'bc_c{c}'), (f'htc_c{c}', 'vanilla'),
              (f'ztt_c{c}', 'vanilla'), (f'ztt_c{c}', eq)]
  lines = tables.header('A', 'B', 'A - B (means)', 'larger seed spread',
                        'verdict', 'A - B per seed')
  for a, b in pairs:
    sa, sb = loss_summary(results[a]), loss_summary(results[b])
    if sa is None or sb is None:
      lines.append(f'| `{a}` | `{b}` | missing | | | |')
      continue
    delta = sa['mean'] - sb['mean']
    spread = max(sa['spread'], sb['spread'])
    if min(len(sa['values']), len(sb['values'])) < 2:
      verdict = 'one seed: no spread to judge by'
    elif abs(delta) <= spread:
      verdict = 'within the seed spread'
    else:
      verdict = f'{"A" if delta < 0 else "B"} better, beyond the spread'
    seeds = sorted(set(results[a]['seeds']) & set(results[b]['seeds']))
    paired = [results[a]['seeds'][s]['val_loss'] -
              results[b]['seeds'][s]['val_loss'] for s in seeds]
    signs = {d < 0 for d in paired}
    same = (' (same sign at every seed)' if len(paired) > 1 and
            len(signs) == 1 else '')
    lines.append(f'| `{a}` | `{b}` | {delta:+.4f} | {spread:.4f} | '
                 f'{verdict} | {", ".join(f"{d:+.4f}" for d in paired)}'
                 f'{same} |')
  return '\n'.join(lines)


def exit_head_table(results: dict) -> str:
  entries = [(name, results[name]['seeds'][0], results[name]['rows'][0])
             for name in ['ztt_c2', 'ztt_c4'] + [r.name for r in
                                                 STUDY.ablations]
             if 0 in results[name]['seeds']]
  return tables.dynamics_table(
      ('run', 'val loss after cycle 1, 2, ... (seed 0)',
       'gate per cycle at the end', 'zero-token mass per cycle at the end'),
      entries)


def early_exit_section(out: str) -> tuple[str, list[tuple[str, list]]]:
  from ztt_jax import evaluate  # pylint: disable=g-import-not-at-top
  parts, curves = [], []
  seed = STUDY.seeds[0]
  for name in STUDY.early_exit:
    rows = records.read_sweep(records.workdir(out, name, seed))
    if not rows:
      parts.append(f'`{name}`: no `eval/early_exit.json` yet.')
      continue
    curves.append((name, rows))
    parts.append(f'`{name}` (seed {seed}, {STUDY.eval_batches} '
                 f'validation batches of 12 x 64):\n\n'
                 + evaluate.format_table(rows))
  return '\n\n'.join(parts), curves


def speed_section(docs: str) -> str:
  """The ztt-bench table from docs/results/bench/*.json (experiments/bench.py)."""
  bench_dir = os.path.join(docs, 'results', 'bench')
  names = sorted(n[:-5] for n in os.listdir(bench_dir)
                 if n.endswith('.json')) if os.path.isdir(bench_dir) else []
  if not names:
    return 'No benchmark yet: run `python experiments/bench.py`.'
  lines = tables.header(
      'bench', 'step ms: ZTT / HTC / ZTT no exit heads', 'tokens/s (ZTT)',
      'MFU: ZTT / HTC / no exit heads', 'matmul peak GFLOP/s',
      'MLP-shape matmul GFLOP/s (of peak)', 'ZTT / HTC step',
      'no exit heads / HTC', 'compile s at C=2, 8', 'compile ratio',
      'temp memory MiB')
  profiles = []
  for name in names:
    with open(os.path.join(bench_dir, name + '.json'), encoding='utf-8') as f:
      r = json.load(f)
    base, bare = r['baseline'], r['ztt_without_exit_heads']
    comp = r['compile_s_by_cycles']
    lines.append(
        f'| `{name}` | {r["step_s_median"] * 1e3:.1f} / '
        f'{base["step_s_median"] * 1e3:.1f} / '
        f'{bare["step_s_median"] * 1e3:.1f} | {r["tokens_per_s"]:,.0f} | '
        f'{r["mfu"]:.3f} / {base["mfu"]:.3f} / {bare["mfu"]:.3f} | '
        f'{r["matmul_peak_flops_per_s"] / 1e9:.1f} | '
        + (f'{r["mlp_matmul_flops_per_s"] / 1e9:.1f} '
           f'({r["mlp_matmul_over_peak"]:.2f}) | '
           if 'mlp_matmul_flops_per_s' in r else 'n/a | ') +
        f'{r["step_ratio_vs_baseline"]:.3f} | '
        f'{r["step_ratio_without_exit_heads_vs_baseline"]:.3f} | '
        f'{comp["2"]:.1f}, {comp["8"]:.1f} | {r["compile_ratio"]:.2f} | '
        f'{r.get("temp_size_in_bytes", 0) / 2**20:.1f} |')
    prof = os.path.join(bench_dir, name + '.profile.txt')
    if os.path.exists(prof):
      with open(prof, encoding='utf-8') as f:
        profiles.append(f'`{name}`:\n\n```\n{f.read().strip()}\n```')
  targets = ['', 'Targets (`targets` in the JSON):', '',
             *tables.header('bench', 'target', 'value', 'met')]
  for name in names:
    with open(os.path.join(bench_dir, name + '.json'), encoding='utf-8') as f:
      r = json.load(f)
    for key, t in r['targets'].items():
      targets.append(f'| `{name}` | {key} {t["target"]} | {t["value"]:.3f} '
                     f'| {"yes" if t["met"] else "**no**"} |')
  text = '\n'.join(lines + targets)
  if profiles:
    text += ('\n\nWhere the time goes (`experiments/profile_step.py`, time '
             'per XLA op kind, one step):\n\n' + '\n\n'.join(profiles))
  return text


# ------------------------------------------------------------------ plots --


def _mean_curve(entry: dict, key: str):
  """Steps and per-step mean / min / max of `key` over the seeds."""
  per_seed = []
  for rows in entry['rows'].values():
    per_seed.append({r['step']: r[key] for r in rows if key in r})
  steps = sorted(set.intersection(*(set(d) for d in per_seed)))
  vals = [[d[s] for d in per_seed] for s in steps]
  return (steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals],
          [max(v) for v in vals])


def plot_curves(results: dict, path: str) -> None:
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  for run in STUDY.main:
    entry = results[run.name]
    if not entry['rows']:
      continue
    for ax, key in zip(axes, ('loss', 'val_loss')):
      steps, mean, lo, hi = _mean_curve(entry, key)
      style = '-' if run.name.startswith(('ztt', 'vanilla')) else '--'
      (line,) = ax.plot(steps, mean, style, label=run.name, lw=1.2)
      ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
  axes[0].set_title('training loss (logged every 50 steps)', fontsize=9)
  axes[1].set_title('validation loss (mean over seeds, band: min-max)',
                    fontsize=9)
  axes[0].set_ylim(1.5, 2.6)
  axes[1].set_ylim(1.7, 2.6)
  for ax in axes:
    ax.set_xlabel('step')
  axes[1].legend(fontsize=7, ncol=2)
  plots.save(fig, path)


def plot_dynamics(results: dict, path: str) -> None:
  """Zero-token mass and gate per cycle over training (paper Fig. 2b)."""
  plt = plots.pyplot()
  names = [n for n in ('ztt_c2', 'ztt_c4') if 0 in results[n]['rows']]
  if not names:
    return
  fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.2 * len(names)),
                           dpi=110, squeeze=False)
  for row, name in zip(axes, names):
    rows = [r for r in results[name]['rows'][0] if 'gate' in r]
    steps = [r['step'] for r in rows]
    for ax, key in zip(row, ('zero_attention', 'gate')):
      for c in range(len(rows[0][key])):
        ax.plot(steps, [r[key][c] for r in rows], label=f'cycle {c + 1}')
      ax.set_title(f'{name} seed 0: {key.replace("_", " ")} per cycle',
                   fontsize=9)
      ax.set_xlabel('step')
      ax.legend(fontsize=7)
  plots.save(fig, path)


def plot_early_exit(curves, path: str) -> None:
  plt = plots.pyplot()
  if not curves:
    return
  fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8),
                           dpi=110, squeeze=False)
  from ztt_jax import evaluate  # pylint: disable=g-import-not-at-top
  for ax, (name, rows) in zip(axes[0], curves):
    evaluate.draw(ax, rows, f'{name}: loss against mean cycles run')
  plots.save(fig, path)


# ----------------------------------------------------------------- report --


def write_report(out: str, steps: int, docs: str, command: str) -> str:
  results = collect(out, steps)
  fig_dir = os.path.join(docs, 'results')
  os.makedirs(fig_dir, exist_ok=True)
  plot_curves(results, os.path.join(fig_dir, 'curves.png'))
  plot_dynamics(results, os.path.join(fig_dir, 'zero_attention_gate.png'))
  exit_text, curves = early_exit_section(out)
  plot_early_exit(curves, os.path.join(fig_dir, 'early_exit.png'))
  n_done = sum(len(e['seeds']) for e in results.values())
  n_all = len(STUDY.schedule())
  notes = records.read_notes(NOTES)
  text = f"""# Results: ZTT against its baselines on tinyshakespeare

Regenerate with `python experiments/run_all.py --study=grid
--data=../shared/data/tinyshakespeare.txt` (trains whatever is missing,
runs `ztt-eval`, then writes this file with `experiments/report.py`; this
copy was written by `{command}`, {n_done} of {n_all} runs found). Every
number and plot below is read from the runs' own `metrics.jsonl`, saved
configs and `ztt-eval` output; the speed section from
`python experiments/bench.py`.

**Setup.** tinyshakespeare, character tokens (65), nanoGPT's 90/10 split.
Every run is `{STUDY.config}` (128 wide, 4 heads, SwiGLU, rotary, RMSNorm,
no dropout) trained for {steps} steps of 12 sequences x 64 tokens
({steps * 12 * 64 / 1e6:.2f}M tokens, half nanoGPT's CPU budget, so the grid
fits one sitting on 2 cores), AdamW, lr 1e-3, warmup 50, cosine to 1e-4.
Distinct layers: 1 head + 2 middle + 1 tail (BC cycles all 4). Validation
loss: 20 fixed batches of 12 x 64 from the validation split, after the last
step. Seeds {', '.join(map(str, STUDY.seeds))} change both the init and the
data order. Training FLOPs per token count every executed layer, exit
heads included (`params.flops_per_token`).

## Equal distinct-parameter budget, and equal compute

{main_table(results)}

Differences of the means (negative: A has the lower loss):

{comparisons(results)}

![training curves](curves.png)

## Exit heads, gates and zero-token mass

Validation loss of each exit head (the tail, final norm and LM head applied
after cycle k), and the last logged training-batch gate value and mass on
the zero token, per cycle:

{exit_head_table(results)}

![zero-token mass and gate per cycle](zero_attention_gate.png)

## Early exit (`ztt-eval`)

Per sequence: stop cycling once the mean zero-token mass of the last cycle
passes a threshold (thresholds at quantiles of the statistic), against
stopping every sequence after a fixed number of cycles. `ztt-eval` uses
{STUDY.eval_batches} validation batches, not the 20 of the training evals, so
its losses are not comparable with the tables above.

{exit_text}

![early exit against fixed depth](early_exit.png)

## Ablations of DESIGN.md's readings (ZTT, C=2)

{ablation_table(results)}

## Speed (`ztt-bench`)

`python experiments/bench.py` on the quiet machine (this 2-core CPU, nothing
else running) runs, for each row,
`ztt-bench --config=configs/shakespeare_char.py:ztt --baseline=head_tail_cycle
--compile_cycles=2,8 --steps=50` (plus the row's flags: `unrolled` adds
`--config.model.scan_layers=False`); the JSON lands in
`docs/results/bench/`; `wide_512` (not a target) is the same model 4x wider
(`d_model=512`, 8 heads) on 16 x 128 tokens, 5 timed steps. Step time:
median of 50 steps after warm-up, batch 12 x 64. MFU: model FLOPs (every executed layer, exit heads included) per
second over a 1024 x 1024 float32 matmul's FLOP/s measured in the same
process. Compile: the train step compiled at 2 and at 8 cycles.

{speed_section(docs)}
"""
  if notes:
    text += '\n' + notes + '\n'
  path = os.path.join(fig_dir, 'shakespeare.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  print(f'wrote {path} and {fig_dir}/*.png')
  return path
