"""Exit heads: the loss over them and the statistics that stop cycling.

Everything that reads the exit heads goes through here: the training loss
(`train.loss_fn`; `feature_losses` for the cheaper variants,
`model.exit_loss_fraction` and `model.ce_chunk_len`), validation losses per head (`evaluate.eval_outputs`), the
exit statistic of a whole-sequence pass (`output_statistics`: ztt-eval's
thresholds, the training summary) and of one decoding step
(`generate.forward`), and the rule that turns a statistic into an exit
(`ExitRule.stops`).

Criteria, after cycle c, per token:
  zero_attention  mean zero-token mass of cycle c      exits when >= threshold
  zero_weight     mean log relative weight of the      exits when >= threshold
                  zero token in cycle c (position-free
                  under uniform attention,
                  attention.zero_log_weight)
  zero_margin     mean logit margin of the zero token  exits when >= threshold
                  over the strongest real key in cycle
                  c (position-free under uniform and
                  under concentrated attention; needs
                  model.attention='xla')
  gate            mean gate value of cycle c           exits when <= threshold
  kl              KL(p_c || p_{c-1}) of successive     exits when <= threshold
                  exit heads (+inf after cycle 1)
  fixed           always exits (a row runs exactly `min_cycles`)
  none            never exits (all C cycles)
A row (a sequence, or a token when decoding one at a time) exits on the mean
of its tokens' statistics (`row_mean`); never before `min_cycles`.

Axis names: C cycles, B batch, T time, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ztt_jax import model as model_lib
from ztt_jax import model_config
from ztt_jax import ztt
from ztt_jax.errors import check

CRITERIA = ('none', 'fixed', 'zero_attention', 'zero_weight', 'zero_margin',
            'gate', 'kl')
# Need zero tokens.
ZERO_CRITERIA = ('zero_attention', 'zero_weight', 'zero_margin')
# Criteria whose statistic exits a row when it is at or *below* a threshold.
LOW_EXITS = ('gate', 'kl')


def cross_entropy(logits_xV: jax.Array, targets_x: jax.Array) -> jax.Array:
  """Float32 token cross-entropy, same shape as `targets_x`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_xV.astype(jnp.float32), targets_x)


def head_losses(out: model_lib.ModelOutput, targets_BxT) -> jax.Array:
  """Token cross-entropy of every exit head, [C, B, T] (C = 1 without exit
  heads: the final output only)."""
  return cross_entropy(out.cycle_logits, targets_BxT[None])


def masked_mean(ce_CxBxT: jax.Array, mask_BxT: jax.Array | None
                ) -> jax.Array:
  """Mean over batch and positions [C]; with a mask, over the positions it
  marks (weights: 1 at a scored target, 0 elsewhere)."""
  c = ce_CxBxT.shape[0]
  if mask_BxT is None:
    return ce_CxBxT.reshape(c, -1).mean(1)
  return (ce_CxBxT * mask_BxT).reshape(c, -1).sum(1) / jnp.maximum(
      mask_BxT.sum(), 1)


def exit_positions(rng: jax.Array, t: int, fraction: float) -> jax.Array:
  """`round(fraction * t)` (at least 1) distinct positions of [0, t),
  ascending, drawn with `rng`: where the early exit heads score a step."""
  p = max(1, round(fraction * t))
  return jnp.sort(jax.random.permutation(rng, t)[:p])


def chunked_cross_entropy(logits_fn, h_BxTxD: jax.Array, targets_BxT,
                          chunk_len: int) -> jax.Array:
  """`cross_entropy(logits_fn(h), targets)` [B, T], `chunk_len` positions
  at a time (0: all at once).

  Each chunk's float32 logits [B, chunk_len, V] exist only inside its step
  of a scan, and the backward pass recomputes them (`jax.checkpoint`), so
  the full [B, T, V] logits are never held. The last chunk is padded.
  """
  b, t, d = h_BxTxD.shape
  if not chunk_len or chunk_len >= t:
    return cross_entropy(logits_fn(h_BxTxD), targets_BxT)
  n = -(-t // chunk_len)
  pad = n * chunk_len - t
  h_NxBxKxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(
      b, n, chunk_len, d).swapaxes(0, 1)
  targets_NxBxK = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(
      b, n, chunk_len).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(h_and_targets):
    h_BxKxD, targets_BxK = h_and_targets
    return cross_entropy(logits_fn(h_BxKxD), targets_BxK)

  ce_NxBxK = jax.lax.map(chunk, (h_NxBxKxD, targets_NxBxK))
  return ce_NxBxK.swapaxes(0, 1).reshape(b, n * chunk_len)[:, :t]


def feature_losses(cfg: model_config.ModelConfig, logits_fn,
                   features_CxBxTxD: jax.Array, targets_BxT: jax.Array,
                   rng: jax.Array, mask_BxT: jax.Array | None = None
                   ) -> jax.Array:
  """Mean token cross-entropy of every exit head [C], running the LM head
  (`logits_fn`) on the exit features (`model(..., logits=False)`).

  The last head scores every position; the heads before it score the
  positions `exit_positions(rng, T, model.exit_loss_fraction)` (one subset
  per call, shared by those heads). With `model.ce_chunk_len` the logits
  come `chunked_cross_entropy`'s way. `mask_BxT` weights the positions
  (`masked_mean`).
  """
  c, b, t, _ = features_CxBxTxD.shape
  ce = lambda h, y: chunked_cross_entropy(logits_fn, h, y, cfg.ce_chunk_len)
  ce_BxT = ce(features_CxBxTxD[-1], targets_BxT)
  last = (ce_BxT.mean()[None] if mask_BxT is None
          else masked_mean(ce_BxT[None], mask_BxT))
  if c == 1:
    return last
  early_KxBxTxD, early_targets_BxT = features_CxBxTxD[:-1], targets_BxT
  early_mask_BxT = mask_BxT
  if cfg.exit_loss_fraction < 1:
    where_P = exit_positions(rng, t, cfg.exit_loss_fraction)
    early_KxBxTxD = jnp.take(early_KxBxTxD, where_P, axis=2)
    early_targets_BxT = jnp.take(targets_BxT, where_P, axis=1)
    if mask_BxT is not None:
      early_mask_BxT = jnp.take(mask_BxT, where_P, axis=1)
  p = early_targets_BxT.shape[1]
  early_ce = ce(early_KxBxTxD.reshape((c - 1) * b, p, -1),
                jnp.tile(early_targets_BxT, (c - 1, 1)))
  early_C = masked_mean(early_ce.reshape(c - 1, b, p), early_mask_BxT)
  return jnp.concatenate([early_C, last])


def training_loss(cfg: model_config.ModelConfig, ce_C: jax.Array) -> jax.Array:
  """The objective: exit-head losses weighted per `model.exit_loss`."""
  if not cfg.exit_heads:
    return ce_C[-1]
  return jnp.sum(ztt.exit_weights(cfg) * ce_C)


def kl_divergence(logits_xV, prev_logits_xV) -> jax.Array:
  """KL(p || p_prev) per position, in nats."""
  logp = jax.nn.log_softmax(logits_xV.astype(jnp.float32))
  prev = jax.nn.log_softmax(prev_logits_xV.astype(jnp.float32))
  return jnp.sum(jnp.exp(logp) * (logp - prev), -1)


def statistic(criterion: str, source, logits=None, prev_logits=None
              ) -> jax.Array | None:
  """The exit statistic per token after a cycle, from `source` (a
  `ztt.CycleOutput` of a decoding step, or a `model.ModelOutput`, whose
  fields carry a leading C axis: every cycle at once) and, for KL, this and
  the previous exit head's logits (`prev_logits=None`: the first cycle,
  where KL is +inf). None when the model lacks what the criterion reads;
  `fixed` and `none` have no statistic."""
  if criterion in ZERO_CRITERIA or criterion == 'gate':
    return getattr(source, criterion)
  if criterion == 'kl' and logits is not None:
    if prev_logits is None:
      return jnp.full(logits.shape[:-1], jnp.inf)
    return kl_divergence(logits, prev_logits)
  return None


def output_statistics(out: model_lib.ModelOutput) -> dict[str, jax.Array]:
  """Every criterion's per-token statistic [C, B, T] from a whole-sequence
  pass (those the model has; KL needs exit heads)."""
  stats = {k: statistic(k, out) for k in (*ZERO_CRITERIA, 'gate')}
  if out.cycle_logits.shape[0] > 1:
    logits = out.cycle_logits
    stats['kl'] = jnp.concatenate([
        statistic('kl', out, logits[:1]),
        statistic('kl', out, logits[1:], logits[:-1])])
  return {k: v for k, v in stats.items() if v is not None}


def row_mean(stat_xBxT: jax.Array) -> jax.Array:
  """A row's statistic (the mean over its tokens), broadcast back to T."""
  return jnp.broadcast_to(stat_xBxT.mean(-1, keepdims=True), stat_xBxT.shape)


@dataclasses.dataclass(frozen=True)
class ExitRule:
  """When a row stops cycling: `criterion` against a threshold, never
  before `min_cycles` (see the module docstring)."""
  criterion: str = 'none'
  min_cycles: int = 1

  def validate(self, cfg: model_config.ModelConfig) -> ExitRule:
    check(self.criterion in CRITERIA,
          f'exit.criterion={self.criterion!r} is not one of {CRITERIA}')
    check(1 <= self.min_cycles <= cfg.cycles,
          f'exit.min_cycles={self.min_cycles} must be in [1, {cfg.cycles}] '
          '(the model\'s cycles)')
    check(self.criterion not in ZERO_CRITERIA or cfg.zero_pool != 'none',
          f'exit.criterion={self.criterion} needs zero tokens but this '
          f'{cfg.variant} model has none; use exit.criterion=kl or fixed')
    check(self.criterion != 'zero_margin' or cfg.attention != 'dot_product',
          "exit.criterion=zero_margin needs the largest key logit, which "
          "model.attention='dot_product' does not compute; pass "
          '--config.model.attention=xla (same params) or use zero_weight')
    check(self.criterion != 'gate' or cfg.gate != 'none',
          f'exit.criterion=gate needs a gate but this {cfg.variant} model '
          'has none; use exit.criterion=kl or fixed')
    return self

  def stops(self, c, stat_BxT: jax.Array | None, threshold,
            shape_BxT: tuple[int, int]) -> jax.Array:
    """Whether each row stops after cycle `c` (0-based, maybe traced), from
    its tokens' statistics [B, T] (None for fixed and none); [B, T]."""
    if self.criterion in ('fixed', 'none'):
      passed_BxT = jnp.full(shape_BxT, self.criterion == 'fixed')
    elif self.criterion in LOW_EXITS:
      passed_BxT = row_mean(stat_BxT) <= threshold
    else:
      passed_BxT = row_mean(stat_BxT) >= threshold
    return passed_BxT & (c + 1 >= self.min_cycles)
