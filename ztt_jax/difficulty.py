"""Scores by known difficulty (synthetic tasks: `data.path=synthetic:*`).

`scored` turns one exit rule's pass over masked batches (evaluate.sweep)
into the answers' loss, accuracy and cycles, overall and per difficulty,
and the rank correlation of a target's exit cycle with its difficulty: does
the rule give harder targets more cycles? `format_table` and `plot` show a
sweep's rows that way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def rank(x_N: np.ndarray) -> np.ndarray:
  """Ranks 1..N, ties sharing their mean rank."""
  x_N = np.asarray(x_N, np.float64)
  order = np.argsort(x_N, kind='stable')
  ranks_N = np.empty(len(x_N))
  ranks_N[order] = np.arange(1, len(x_N) + 1)
  values, inverse = np.unique(x_N, return_inverse=True)
  sums = np.bincount(inverse, ranks_N, len(values))
  counts = np.bincount(inverse, minlength=len(values))
  return (sums / counts)[inverse]


def spearman(x_N, y_N) -> float | None:
  """Spearman's rank correlation (ties averaged); None when either side is
  constant (a fixed depth: no correlation to speak of)."""
  rx, ry = rank(x_N), rank(y_N)
  if rx.std() == 0 or ry.std() == 0:
    return None
  return float(np.corrcoef(rx, ry)[0, 1])


def scored(outs: Sequence[tuple], batches: Sequence[dict]) -> dict[str, Any]:
  """One rule's numbers over the answers (the mask's targets).

  Args:
    outs: per batch `(ce_BxT, cycles_BxT, cycles_run, correct_BxT)`, as
      evaluate's pass returns them.
    batches: the batches, with `mask` and `difficulty` [B, T].

  Returns:
    `val_loss`, `val_accuracy`, `mean_cycles` over every answer,
    `cycles_difficulty_spearman`, and `by_difficulty`: one dict per
    difficulty (`difficulty`, `n`, `val_loss`, `accuracy`, `mean_cycles`).
  """
  pick = lambda i: np.concatenate([
      np.asarray(o[i])[np.asarray(b['mask']) > 0]
      for o, b in zip(outs, batches)])
  ce_N, cycles_N, correct_N = pick(0), pick(1), pick(3)
  difficulty_N = np.concatenate([
      np.asarray(b['difficulty'])[np.asarray(b['mask']) > 0]
      for b in batches])
  by = []
  for d in np.unique(difficulty_N):
    at = difficulty_N == d
    by.append(dict(difficulty=int(d), n=int(at.sum()),
                   val_loss=float(ce_N[at].mean()),
                   accuracy=float(correct_N[at].mean()),
                   mean_cycles=float(cycles_N[at].mean())))
  return dict(val_loss=float(ce_N.mean()),
              val_accuracy=float(correct_N.mean()),
              mean_cycles=float(cycles_N.mean()),
              cycles_difficulty_spearman=spearman(cycles_N, difficulty_N),
              by_difficulty=by)


def _rule_name(row: dict) -> str:
  if row['criterion'] == 'fixed':
    return f"fixed {row['fixed_cycles']}"
  if row['criterion'] == 'random':
    return f"random (as {row['matches']:.4g})"
  return f"{row['criterion']} {row['threshold']:.4g}"


def format_table(rows: list[dict]) -> str:
  """Accuracy and mean cycles per difficulty, a row per exit rule."""
  ds = [b['difficulty'] for b in rows[0]['by_difficulty']]
  head = ('| exit rule | accuracy | mean cycles | rank corr. (cycles, '
          'difficulty) | ' + ' | '.join(f'acc. / cycles at {d}' for d in ds)
          + ' |')
  lines = [head, '|' + '---|' * (4 + len(ds))]
  for r in rows:
    corr = r['cycles_difficulty_spearman']
    cells = [_rule_name(r), f"{r['val_accuracy']:.3f}",
             f"{r['mean_cycles']:.2f}", '-' if corr is None else f'{corr:.3f}']
    cells += [f"{b['accuracy']:.3f} / {b['mean_cycles']:.2f}"
              for b in r['by_difficulty']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  """Accuracy and mean cycles against difficulty, a line per exit rule."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (acc, cyc) = plt.subplots(1, 2, figsize=(10, 4))
  for r in rows:
    ds = [b['difficulty'] for b in r['by_difficulty']]
    style = '--' if r['criterion'] in ('fixed', 'random') else '-'
    acc.plot(ds, [b['accuracy'] for b in r['by_difficulty']], style,
             marker='o', label=_rule_name(r))
    cyc.plot(ds, [b['mean_cycles'] for b in r['by_difficulty']], style,
             marker='o')
  acc.set(xlabel='difficulty (hops / chain length)', ylabel='accuracy')
  cyc.set(xlabel='difficulty (hops / chain length)', ylabel='mean cycles')
  acc.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
