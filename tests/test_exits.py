"""exits.py: the exit-head loss and the exit statistics, against plain NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ztt_jax import exits
from ztt_jax import model

C, B, T, V = 3, 2, 5, 7


def make_cfg(variant='ztt', **overrides):
  m = tiny.get_config(variant).model
  m.update(vocab_size=V, n_cycles=C, **overrides)
  return model.ModelConfig.from_config(m)


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
