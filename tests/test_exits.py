"""exits.py: the exit-head loss and the exit statistics, against plain NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ztt_jax import exits
from ztt_jax import model
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax import train
from ztt_jax.errors import ConfigError

C, B, T, V = 3, 2, 5, 7


def make_cfg(variant='ztt', **overrides):
  m = tiny.get_config(variant).model
  m.update(vocab_size=V, n_cycles=C, **overrides)
  return model_config.ModelConfig.from_config(m)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fake_output(seed=0, c=C):
  rng = np.random.default_rng(seed)
  return model.ModelOutput(
      logits=None, cycle_logits=jnp.asarray(rng.normal(size=(c, B, T, V)),
                                            jnp.float32),
      zero_attention=jnp.asarray(rng.uniform(size=(c, B, T)), jnp.float32),
      zero_weight=jnp.asarray(rng.normal(size=(c, B, T)), jnp.float32),
      gate=jnp.asarray(rng.uniform(size=(c, B, T)), jnp.float32),
      zero_margin=jnp.asarray(rng.normal(size=(c, B, T)), jnp.float32))


@pytest.mark.parametrize('exit_loss, weights', [
    ('linear', [1, 2, 3]), ('uniform', [1, 1, 1]), ('last', [0, 0, 1])])
def test_training_loss_weights_the_exit_heads(exit_loss, weights):
  cfg = make_cfg(exit_loss=exit_loss)
  out = fake_output()
  targets = jnp.asarray(np.arange(B * T).reshape(B, T) % V)
  ce_CxBxT = np.asarray(exits.head_losses(out, targets))
  logp = np_log_softmax(np.asarray(out.cycle_logits, np.float64))
  expected = -np.take_along_axis(logp, np.asarray(targets)[None, ..., None],
                                 -1)[..., 0]
  np.testing.assert_allclose(ce_CxBxT, expected, rtol=1e-5)
  w = np.asarray(weights, np.float64) / sum(weights)
  loss = exits.training_loss(cfg, jnp.asarray(ce_CxBxT.mean((1, 2))))
  assert float(loss) == pytest.approx(float(w @ expected.mean((1, 2))),
                                      rel=1e-5)


def test_without_exit_heads_the_loss_is_the_final_output():
  cfg = make_cfg('head_tail_cycle')
  assert not cfg.exit_heads
  assert float(exits.training_loss(cfg, jnp.asarray([2.5]))) == 2.5


def test_output_statistics_against_numpy():
  out = fake_output()
  stats = exits.output_statistics(out)
  assert set(stats) == {'zero_attention', 'zero_weight', 'zero_margin',
                        'gate', 'kl'}
  for k in ('zero_attention', 'zero_weight', 'zero_margin', 'gate'):
    np.testing.assert_array_equal(stats[k], getattr(out, k))
  logp = np_log_softmax(np.asarray(out.cycle_logits, np.float64))
  kl = (np.exp(logp[1:]) * (logp[1:] - logp[:-1])).sum(-1)
  assert np.all(np.isinf(stats['kl'][0]))
  np.testing.assert_allclose(stats['kl'][1:], kl, rtol=1e-4, atol=1e-6)
  # One exit head (no exit heads): no KL to take.
  assert 'kl' not in exits.output_statistics(fake_output(c=1))


def test_exit_rule_reads_row_means_and_respects_min_cycles():
  # Row means 0.2 and 0.3: each row exits as a whole, on its mean.
  stat_BxT = jnp.asarray([[0.1, 0.3, 0.2], [0.6, 0.1, 0.2]])
  high = exits.ExitRule('zero_attention', 1)
  low = exits.ExitRule('gate', 1)
  np.testing.assert_array_equal(high.stops(0, stat_BxT, 0.25, (2, 3)),
                                [[False] * 3, [True] * 3])
  np.testing.assert_array_equal(low.stops(0, stat_BxT, 0.25, (2, 3)),
                                [[True] * 3, [False] * 3])
  late = exits.ExitRule('zero_attention', 2)
  assert not np.any(late.stops(0, stat_BxT, -1.0, (2, 3)))
  assert np.all(late.stops(1, stat_BxT, -1.0, (2, 3)))
  assert np.all(exits.ExitRule('fixed', 1).stops(0, None, 0.0, (2, 3)))
  assert not np.any(exits.ExitRule('none', 1).stops(2, None, 0.0, (2, 3)))


# ------------------------------------------- cheaper exit heads (training) --


def loss_and_grads(variant, tokens_BxT, rng, **overrides):
  """train.loss_fn and its gradients for the tiny model with V = 61."""
  m = tiny.get_config(variant).model
  m.update(vocab_size=61, **overrides)
  cfg = model_config.ModelConfig.from_config(m)
  module = model.Transformer(cfg)
  params = params_lib.init_params(module, jax.random.key(0))
  batch = {'inputs': tokens_BxT[:, :-1], 'targets': tokens_BxT[:, 1:]}
  fn = jax.jit(jax.value_and_grad(
      lambda p: train.loss_fn(module, cfg, p, batch, rng, True), has_aux=True))
  (loss, aux), grads = fn(params)
  return cfg, module, params, batch, loss, aux, grads


def tokens(b=4, t=33, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 61, (b, t)),
                     jnp.int32)


@pytest.mark.parametrize('variant, overrides', [
    ('ztt', {}), ('vanilla', {'tie_embeddings': False})])
def test_chunked_ce_equals_the_full_logits_path(variant, overrides):
  rng = jax.random.key(1)
  # 32 positions in chunks of 7: the last chunk is padded.
  _, _, _, _, loss, aux, grads = loss_and_grads(variant, tokens(), rng,
                                                **overrides)
  cfg, *_, chunked_loss, chunked_aux, chunked_grads = loss_and_grads(
      variant, tokens(), rng, ce_chunk_len=7, **overrides)
  assert cfg.loss_from_features
  np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
  chex.assert_trees_all_close(chunked_aux, aux, rtol=1e-6)
  chex.assert_trees_all_close(chunked_grads, grads, rtol=2e-5, atol=1e-7)


def test_exit_loss_fraction_scores_a_subset_with_the_early_heads():
  rng = jax.random.key(1)
  cfg, module, params, batch, loss, aux, grads = loss_and_grads(
      'ztt', tokens(), rng, exit_loss_fraction=0.25, ce_chunk_len=5)
  # The same logits from the plain forward pass, the loss in NumPy.
  logits_CxBxTxV = np.asarray(jax.jit(module.apply)(
      {'params': params}, batch['inputs']).cycle_logits, np.float64)
  targets_BxT = np.asarray(batch['targets'])
  ce_CxBxT = -np.take_along_axis(np_log_softmax(logits_CxBxTxV),
                                 targets_BxT[None, ..., None], -1)[..., 0]
  where_P = np.asarray(exits.exit_positions(jax.random.fold_in(rng, 1), 32,
                                            0.25))
  assert len(where_P) == 8 and len(set(where_P.tolist())) == 8
  assert (np.diff(where_P) > 0).all()
  ce_C = np.concatenate([ce_CxBxT[:-1][:, :, where_P].mean((1, 2)),
                         ce_CxBxT[-1:].mean((1, 2))])
  w_C = np.arange(1, 4) / 6  # exit_loss linear, 3 cycles.
  np.testing.assert_allclose(aux['ce_cycle'], ce_C, rtol=1e-5)
  assert float(loss) == pytest.approx(float(w_C @ ce_C), rel=1e-5)
  # The subset differs from the full mean, and so do the early heads'.
  assert abs(ce_C[0] - ce_CxBxT[0].mean()) > 1e-6
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_exit_positions_are_a_fresh_subset_per_key():
  a = np.asarray(exits.exit_positions(jax.random.key(0), 100, 0.1))
  b = np.asarray(exits.exit_positions(jax.random.key(1), 100, 0.1))
  assert len(a) == len(b) == 10 and not np.array_equal(a, b)
  assert len(exits.exit_positions(jax.random.key(0), 7, 0.01)) == 1


@pytest.mark.parametrize('field, value', [
    ('exit_loss_fraction', 0.0), ('exit_loss_fraction', 1.5),
    ('ce_chunk_len', -1)])
def test_cheaper_exit_settings_are_checked(field, value):
  with pytest.raises(ConfigError, match=f'model.{field}'):
    make_cfg(**{field: value})
