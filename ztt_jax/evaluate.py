"""Validation loss per exit head, and the early-exit summary.

The summary replays sequence-level early exit from one full forward pass:
cycle c's output never depends on later cycles, so stopping a sequence after
cycle c gives exactly exit head c's loss. The exit statistic is the mean
zero-token attention of the cycle just finished (DESIGN.md), averaged over
the sequence's tokens; a sequence stops at the first cycle >= `min_cycles`
whose statistic reaches the threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits_xV: jax.Array, targets_x: jax.Array) -> jax.Array:
  """Float32 token cross-entropy, same shape as `targets_x`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_xV.astype(jnp.float32), targets_x)


def eval_outputs(module, params, batch) -> dict[str, jax.Array]:
  """Per-sequence losses per exit head and the exit statistic.

  Returns `ce_CxB` (the final head only, C=1, without exit heads) and
  `zero_attention_CxB` (absent without zero tokens).
  """
  out = module.apply({'params': params}, batch['inputs'])
  logits = out.cycle_logits if out.cycle_logits is not None else (
      out.logits[None])
  result = {'ce_CxB': cross_entropy(logits, batch['targets'][None]).mean(-1)}
  if out.zero_attention is not None:
    result['zero_attention_CxB'] = out.zero_attention.mean(-1)
  return result


def early_exit_table(ce_CxB: np.ndarray, stat_CxB: np.ndarray | None,
                     thresholds=(), min_cycles: int = 1) -> list[dict]:
  """Rows of (fixed depth or threshold) -> val loss, mean cycles, saving."""
  ce_CxB = np.asarray(ce_CxB)
  c = ce_CxB.shape[0]
  rows = [dict(criterion='fixed', fixed_cycles=k + 1,
               val_loss=float(ce_CxB[k].mean()), mean_cycles=float(k + 1),
               compute_saved=1 - (k + 1) / c) for k in range(c)]
  if stat_CxB is None:
    return rows
  stat_CxB = np.asarray(stat_CxB)
  for tau in thresholds:
    passed_CxB = stat_CxB >= tau
    passed_CxB[:min_cycles - 1] = False
    passed_CxB[-1] = True
    exit_B = passed_CxB.argmax(0)  # First cycle that passes.
    loss = ce_CxB[exit_B, np.arange(ce_CxB.shape[1])].mean()
    mean_cycles = float((exit_B + 1).mean())
    rows.append(dict(criterion='zero_attention', threshold=float(tau),
                     val_loss=float(loss), mean_cycles=mean_cycles,
                     compute_saved=1 - mean_cycles / c))
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ['| exit rule | val loss | mean cycles | middle compute saved |',
           '|---|---|---|---|']
  for r in rows:
    rule = (f"fixed {r['fixed_cycles']} cycles" if r['criterion'] == 'fixed'
            else f"zero attention >= {r['threshold']:.3f}")
    lines.append(f"| {rule} | {r['val_loss']:.4f} | {r['mean_cycles']:.2f} "
                 f"| {100 * r['compute_saved']:.0f}% |")
  return '\n'.join(lines)
