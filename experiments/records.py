"""Reading what runs left behind: metrics rows, ztt-eval sweeps, wall times,
and the model numbers of a run's saved config.

Every report and the runner's notion of a finished run read through here.
"""

from __future__ import annotations

import json
import os


def workdir(out: str, name: str, seed: int) -> str:
  """Where run `name` trains at `seed`: OUT/NAME/seedS (NAME may hold a
  '/', as the regime search's SETTING/VARIANT)."""
  return os.path.join(out, name, f'seed{seed}')


def read_rows(path: str) -> list[dict]:
  """The rows of a workdir's metrics.jsonl ([] when none can be read)."""
  try:
    with open(os.path.join(path, 'metrics.jsonl'), encoding='utf-8') as f:
      return [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return []


def final_eval(rows: list[dict], steps: int) -> dict | None:
  """The eval row of the last step (the last one written, after resumes)."""
  evals = [r for r in rows if r.get('step') == steps and 'val_loss' in r]
  return evals[-1] if evals else None


def finished(path: str, steps: int) -> bool:
  """Whether the run's metrics hold the eval of its last step."""
  return final_eval(read_rows(path), steps) is not None


def last_value(rows: list[dict], key: str):
  """The last logged value of `key` (None when never logged)."""
  found = [r[key] for r in rows if key in r]
  return found[-1] if found else None


def eval_name(criterion: str) -> str:
  """The file stem under eval/ of a sweep by `criterion` ('' is ztt-eval's
  default)."""
  return f'early_exit_{criterion}' if criterion else 'early_exit'


def read_sweep(path: str, criterion: str = '') -> list[dict]:
  """The rows of one ztt-eval sweep of a workdir ([] when not there)."""
  try:
    with open(os.path.join(path, 'eval', eval_name(criterion) + '.json'),
              encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return []


def wall_seconds(path: str) -> float | None:
  """The seconds a run's attempts took, summed (the runner writes one line
  per attempt to WORKDIR.wall); None when it recorded none."""
  try:
    with open(path + '.wall', encoding='utf-8') as f:
      return sum(float(x) for x in f.read().split())
  except (OSError, ValueError):
    return None


def model_numbers(path: str) -> dict:
  """What the reports say of a run's model, from its saved config: its
  readings, distinct params, layers run per token and train FLOPs per
  token."""
  # pylint: disable=g-import-not-at-top
  from ztt_jax import checkpoint
  from ztt_jax import model
  from ztt_jax import model_config
  from ztt_jax import params as params_lib
  config, _ = checkpoint.read_config(path)
  cfg = model_config.ModelConfig.from_config(config.model)
  return dict(
      variant=cfg.variant, n_cycles=cfg.cycles, exit_loss=cfg.exit_loss,
      gate=cfg.gate, zero_key=cfg.zero_key,
      distinct_params=params_lib.count_params(
          params_lib.abstract_params(model.build(cfg))),
      executed_layers=cfg.executed_layers,
      flops_per_token=params_lib.flops_per_token(cfg, config.data.seq_len))


def read_notes(path: str) -> str:
  """A hand-written notes file, stripped ('' when there is none)."""
  if not os.path.exists(path):
    return ''
  with open(path, encoding='utf-8') as f:
    return f.read().strip()
