"""Optimiser: the weight-decay mask and the learning-rate schedule."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from ztt_jax import model
from ztt_jax import optim
from ztt_jax import params as params_lib
from ztt_jax.errors import ConfigError


def params():
  m = tiny.get_config('ztt').model
  m.vocab_size = 32
  return params_lib.abstract_params(model.build(m))


def test_decay_mask_spares_norms_zero_keys_and_gates():
  mask = optim.decay_mask(params())
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {k for k, v in flat.items() if v}
  spared = set(flat) - decayed
  assert any('zero_keys' in k for k in spared)
  assert any('gate_w' in k for k in spared) and any('gate_b' in k for k in
                                                    spared)
  assert all('scale' in k or 'zero_keys' in k or 'gate' in k for k in spared)
  assert any("'embedding'" in k for k in decayed)
  assert any("'query'" in k for k in decayed)
  assert any("'down'" in k for k in decayed)


def test_weight_decay_moves_only_masked_params():
  cfg = ml_collections.ConfigDict(tiny.get_config('ztt').train.to_dict())
  cfg.update(grad_clip=0.0, weight_decay=0.5, warmup_steps=0, lr=0.1)
  tx, _ = optim.make_optimizer(cfg)
  p = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params())
  zeros = jax.tree.map(np.zeros_like, p)
  updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(p), p)
  mask = optim.decay_mask(p)
  for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask)):
    assert bool(np.any(u != 0)) == m


def test_schedule_warms_up_then_decays_to_the_floor():
  cfg = tiny.get_config('ztt').train
  cfg.update(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
  schedule = optim.lr_schedule(cfg)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(100)) == pytest.approx(1e-4)
  values = [float(schedule(s)) for s in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_gate_lr_scale_scales_only_the_gate_updates():
  cfg = ml_collections.ConfigDict(tiny.get_config('ztt').train.to_dict())
  cfg.update(grad_clip=0.0, weight_decay=0.0, warmup_steps=0, lr=0.1)
  p = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params())
  grads = jax.tree.map(lambda a: np.full(a.shape, 0.3, a.dtype), p)

  def step(scale):
    cfg.gate_lr_scale = scale
    tx, _ = optim.make_optimizer(cfg)
    return jax.jit(tx.update)(grads, jax.jit(tx.init)(p), p)[0]

  full, slow = step(1.0), step(0.1)
  mask = optim.gate_mask(p)
  assert sum(jax.tree.leaves(mask)) == 2  # gate_w and gate_b.
  for f, s, m in zip(jax.tree.leaves(full), jax.tree.leaves(slow),
                     jax.tree.leaves(mask)):
    np.testing.assert_allclose(s, f * (0.1 if m else 1.0), rtol=1e-6)


@pytest.mark.parametrize('field, value', [('lr', 0.0), ('warmup_steps', -1),
                                          ('grad_clip', -1.0),
                                          ('weight_decay', -0.1),
                                          ('gate_lr_scale', 0.0)])
def test_bad_optimiser_settings(field, value):
  cfg = tiny.get_config('ztt').train
  cfg[field] = value
  with pytest.raises(ConfigError, match=f'train.{field}'):
    optim.make_optimizer(cfg)
