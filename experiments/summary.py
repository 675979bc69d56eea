"""docs/results/summary.json: a study's runs and early-exit rows, read from
the runs' own files (metrics.jsonl, the saved config, eval/early_exit*.json).

    python experiments/run_all.py --study=fair --report_only

Format (checked by our own scripts):
  {"runs": [{"name", "variant", "n_cycles", "exit_loss", "gate", "zero_key",
             "distinct_params", "flops_per_token", "steps", "seeds": [...],
             "val_loss": [...]}],
   "early_exit": [{"run", "criterion", "threshold", "mean_cycles",
                   "cycles_run", "val_loss"}]}
A run with no finished seed is left out; `val_loss[i]` is seed `seeds[i]`'s
final validation loss. Early-exit rows: fixed depths have `threshold`
null and criterion 'fixed' (mean cycles = the depth), once per run;
random-exit rows carry the threshold and, in `matches`, the criterion of the
rule whose cycles they deal out.
"""

from __future__ import annotations

import json
import os

from experiments import records
from experiments.study import Run, Study

# What summary.json keeps of records.model_numbers, in this order.
MODEL_FIELDS = ('variant', 'n_cycles', 'exit_loss', 'gate', 'zero_key',
                'distinct_params', 'flops_per_token')


def finished_losses(out: str, name: str, seeds, steps: int
                    ) -> tuple[list[int], list[float]]:
  """The seeds of run `name` that finished `steps`, and their final
  validation losses."""
  done, losses = [], []
  for seed in seeds:
    last = records.final_eval(
        records.read_rows(records.workdir(out, name, seed)), steps)
    if last is not None:
      done.append(seed)
      losses.append(float(last['val_loss']))
  return done, losses


def model_fields(path: str) -> dict:
  """What the summary says of a run's model, from its saved config."""
  numbers = records.model_numbers(path)
  return {k: numbers[k] for k in MODEL_FIELDS}


def run_entry(out: str, run: Run, seeds, steps: int) -> dict | None:
  """One run's summary row, or None when no seed has finished."""
  done, losses = finished_losses(out, run.name, seeds, steps)
  if not done:
    return None
  path = records.workdir(out, run.name, done[0])
  return dict(name=run.name, **model_fields(path), steps=steps, seeds=done,
              val_loss=losses)


def early_exit_rows(out: str, name: str, seed: int, criteria=('',)
                    ) -> list[dict]:
  """Summary rows of run `name`'s sweeps, one per criterion; the fixed
  depths, the same in every sweep, once."""
  rows, fixed = [], set()
  for criterion in criteria:
    sweep = records.read_sweep(records.workdir(out, name, seed), criterion)
    rule = [r['criterion'] for r in sweep
            if r['criterion'] not in ('fixed', 'random')][:1]
    for r in sweep:
      if r['criterion'] == 'fixed':
        if r['fixed_cycles'] in fixed:
          continue
        fixed.add(r['fixed_cycles'])
      rows.append(dict(
          run=name, criterion=r['criterion'],
          threshold=r.get('threshold', r.get('matches')),
          mean_cycles=r['mean_cycles'], cycles_run=r['cycles_run'],
          val_loss=r['val_loss'],
          **({'matches': rule[0]} if r['criterion'] == 'random' and rule
             else {})))
  return rows


def summarize(study: Study, out: str, steps: int, seeds,
              ablation_seeds) -> dict:
  """The summary of `study`'s runs under `out` (the format above)."""
  runs = [e for e in (
      [run_entry(out, r, seeds, steps) for r in study.main]
      + [run_entry(out, r, ablation_seeds, steps) for r in study.ablations])
          if e is not None]
  early = [row for name, criteria in study.early_exit.items()
           for row in early_exit_rows(out, name, seeds[0], criteria)]
  return {'runs': runs, 'early_exit': early}


def write_summary(study: Study, out: str, steps: int, seeds, ablation_seeds,
                  path: str) -> dict:
  """Writes the summary to `path` and returns it."""
  summary = summarize(study, out, steps, seeds, ablation_seeds)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  return summary
