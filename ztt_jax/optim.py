"""Optimiser: global-norm clipping, AdamW with warmup + cosine, decay mask."""

from __future__ import annotations

import jax
import optax

from ztt_jax.errors import check

# Params that never get weight decay: norms, biases, zero keys, gates.
_NO_DECAY = ('scale', 'bias', 'zero_keys', 'gate_w', 'gate_b')


def lr_schedule(train_config) -> optax.Schedule:
  t = train_config
  check(t.lr > 0, f'train.lr={t.lr} must be > 0')
  check(t.warmup_steps >= 0,
        f'train.warmup_steps={t.warmup_steps} must be >= 0')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.lr * t.min_lr_ratio)


def decay_mask(params):
  """True for params that get weight decay (matrices and embeddings)."""
  def wants_decay(path, leaf):
    names = [getattr(k, 'key', str(k)) for k in path]
    return leaf.ndim >= 2 and not any(n in _NO_DECAY for n in names)
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(train_config) -> tuple[optax.GradientTransformation,
                                          optax.Schedule]:
  t = train_config
  check(t.grad_clip >= 0, f'train.grad_clip={t.grad_clip} must be >= 0')
  check(t.weight_decay >= 0,
        f'train.weight_decay={t.weight_decay} must be >= 0')
  schedule = lr_schedule(t)
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
  parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2,
                           weight_decay=t.weight_decay, mask=decay_mask))
  check(t.gate_lr_scale > 0,
        f'train.gate_lr_scale={t.gate_lr_scale} must be > 0')
  if t.gate_lr_scale != 1:
    # Only then: the optimizer state of earlier runs keeps its structure.
    parts.append(optax.masked(optax.scale(t.gate_lr_scale), gate_mask))
  return optax.chain(*parts), schedule


def gate_mask(params):
  """True for the gate's params (`gate_w`, `gate_b`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, 'key', None) in ('gate_w', 'gate_b')
                          for k in path), params)
