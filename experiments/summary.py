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

import report  # pylint: disable=g-import-not-at-top
import run_all  # pylint: disable=g-import-not-at-top


def finished_losses(out: str, name: str, seeds, steps: int
                    ) -> tuple[list[int], list[float]]:
  """The seeds of run `name` that finished `steps`, and their final
  validation losses."""
  done, losses = [], []
  for seed in seeds:
    last = report.final_eval(
        report.read_rows(os.path.join(out, name, f'seed{seed}')), steps)
    if last is not None:
      done.append(seed)
      losses.append(float(last['val_loss']))
  return done, losses


def model_fields(path: str) -> dict:
  """What the summary says of a run's model, from its saved config."""
  from ztt_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from ztt_jax import model  # pylint: disable=g-import-not-at-top
  from ztt_jax import model_config  # pylint: disable=g-import-not-at-top
  from ztt_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  config, _ = checkpoint.read_config(path)
  cfg = model_config.ModelConfig.from_config(config.model)
  return dict(
      variant=cfg.variant, n_cycles=cfg.cycles, exit_loss=cfg.exit_loss,
      gate=cfg.gate, zero_key=cfg.zero_key,
      distinct_params=params_lib.count_params(params_lib.abstract_params(
          model.build(cfg))),
      flops_per_token=params_lib.flops_per_token(cfg, config.data.seq_len))


def run_entry(out: str, run, seeds, steps: int) -> dict | None:
  """One run's summary row, or None when no seed has finished."""
  done, losses = finished_losses(out, run.name, seeds, steps)
  if not done:
    return None
  path = os.path.join(out, run.name, f'seed{done[0]}')
  return dict(name=run.name, **model_fields(path), steps=steps, seeds=done,
              val_loss=losses)


def read_sweep(out: str, name: str, seed: int, criterion: str
               ) -> list[dict]:
  """The rows of one ztt-eval sweep of run `name` ([] when not there)."""
  path = os.path.join(out, name, f'seed{seed}', 'eval',
                      run_all.eval_name(criterion) + '.json')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return []


def early_exit_rows(out: str, name: str, seed: int, criteria=('',)
                    ) -> list[dict]:
  """Summary rows of run `name`'s sweeps, one per criterion; the fixed
  depths, the same in every sweep, once."""
  rows, fixed = [], set()
  for criterion in criteria:
    sweep = read_sweep(out, name, seed, criterion)
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


def write_summary(study, out: str, steps: int, seeds, ablation_seeds,
                  path: str) -> dict:
  runs = [e for e in (
      [run_entry(out, r, seeds, steps) for r in study.MAIN]
      + [run_entry(out, r, ablation_seeds, steps) for r in study.ABLATIONS])
          if e is not None]
  per_run = {}
  for name, criterion in run_all.early_exit_sweeps(study):
    per_run.setdefault(name, []).append(criterion)
  early = [row for name, criteria in per_run.items()
           for row in early_exit_rows(out, name, seeds[0], criteria)]
  summary = {'runs': runs, 'early_exit': early}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  return summary
