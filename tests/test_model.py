"""Behaviour of the four variants: shapes, causality, budgets, equivalences."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ztt_jax import attention
from ztt_jax import model
from ztt_jax.errors import ConfigError
from ztt_jax import ztt
from ztt_jax import params as params_lib
from ztt_jax import model_config
from ztt_jax import layers

B, T, V = 2, 12, 64


def make_cfg(variant='ztt', **overrides):
  m = tiny.get_config(variant).model
  m.vocab_size = V
  m.update(overrides)
  return model_config.ModelConfig.from_config(m)


def tokens(seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, kwargs):
  return jax.jit(functools.partial(model.build(cfg).apply, **dict(kwargs)))


def apply(cfg, params, tokens_BxT, **kwargs):
  """The model's apply under jit; one jitted function per (config, kwargs),
  so tests that apply one config again reuse its trace."""
  key = tuple(sorted(kwargs.items()))
  try:
    fn = _jitted_apply(cfg, key)
  except TypeError:  # An unhashable argument (a list): no reuse.
    fn = _jitted_apply.__wrapped__(cfg, key)
  return fn({'params': params}, tokens_BxT)


@functools.lru_cache(maxsize=None)
def abstract_params(cfg):
  return params_lib.abstract_params(model.build(cfg))


def random_params(cfg, seed=0):
  """Random params of the right tree (no init compile: fast, and unlike the
  init they have non-zero gate weights and non-unit norm scales)."""
  rng = np.random.default_rng(seed)
  abstract = abstract_params(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(
          ('scale' in str(path)) + 0.2 * rng.standard_normal(a.shape),
          a.dtype), abstract)


def init_apply(cfg, tokens_BxT=None, seed=0):
  module = model.build(cfg)
  params = random_params(cfg, seed)
  tokens_BxT = tokens() if tokens_BxT is None else tokens_BxT
  return module, params, apply(cfg, params, tokens_BxT)


def count(cfg):
  return params_lib.count_params(abstract_params(cfg))


ALL_SETTINGS = (
    [dict(variant=v) for v in model_config.VARIANTS]
    + [dict(variant='ztt', zero_pool=p, gate=g)
       for p in model_config.ZERO_POOLS for g in model_config.GATES]
    + [dict(variant='ztt', zero_pool=p, zero_key='projected')
       for p in ('cycle_layer', 'layer')]
    + [dict(variant='basic_cycle', exit_loss='uniform'),
       dict(variant='head_tail_cycle', exit_loss='last')])


@pytest.mark.parametrize('settings', ALL_SETTINGS, ids=str)
def test_output_shapes_and_dtypes(settings):
  cfg = make_cfg(**settings)
  c = cfg.cycles
  _, _, out = init_apply(cfg)
  chex.assert_shape(out.logits, (B, T, V))
  chex.assert_type(out.logits, jnp.float32)
  chex.assert_tree_all_finite(out)
  # One exit head per cycle, or just the last cycle's without exit heads.
  chex.assert_shape(out.cycle_logits, (c if cfg.exit_heads else 1, B, T, V))
  chex.assert_type(out.cycle_logits, jnp.float32)
  np.testing.assert_array_equal(out.cycle_logits[-1], out.logits)
  if cfg.zero_pool == 'none':
    assert out.zero_attention is None and out.zero_margin is None
  else:
    chex.assert_shape(out.zero_attention, (c, B, T))
    assert np.all((out.zero_attention > 0) & (out.zero_attention < 1))
    chex.assert_shape(out.zero_margin, (c, B, T))
  if cfg.gate == 'none':
    assert out.gate is None
  else:
    chex.assert_shape(out.gate, (c, B, T))
    assert np.all((out.gate > 0) & (out.gate < 1))


def test_init_opens_the_gate():
  cfg = make_cfg('ztt')
  params = params_lib.init_params(model.build(cfg), jax.random.key(0))
  out = apply(cfg, params, tokens())
  # The gate bias starts at +3 and its weights at 0: open at initialisation.
  np.testing.assert_allclose(out.gate, jax.nn.sigmoid(3.0), atol=1e-5)
  np.testing.assert_allclose(params['mid']['gate_b'], 3.0)


def test_ztt_defaults_resolve():
  cfg = make_cfg('ztt')
  assert (cfg.zero_pool, cfg.gate, cfg.exit_loss) == (
      'cycle_layer', 'token', 'linear')
  for v in ('vanilla', 'basic_cycle', 'head_tail_cycle'):
    cfg = make_cfg(v)
    assert (cfg.zero_pool, cfg.gate, cfg.exit_loss) == ('none',) * 3


def _relative_error(x, reference):
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(x - reference) / np.linalg.norm(reference)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = make_cfg('ztt', dtype='bfloat16')
  _, params, out = init_apply(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  chex.assert_type([out.logits, out.cycle_logits, out.zero_attention],
                   jnp.float32)
  # Against float32 with the same params: bfloat16 rounds each matmul input
  # to 8 significant bits (2^-9 relative), and the error adds up over the
  # 10 layers run (1 head, 3 cycles x 2, a tail per exit head) to about 2%
  # of the logits' norm; 5% bounds that, 0.1% shows bfloat16 really ran.
  ref = apply(make_cfg('ztt'), params, tokens())
  for field in ('logits', 'cycle_logits'):
    error = _relative_error(getattr(out, field), getattr(ref, field))
    assert 1e-3 < error < 0.05, (field, error)
  # Softmax masses and gates (in [0, 1]) to 1e-2.
  np.testing.assert_allclose(out.zero_attention, ref.zero_attention,
                             atol=1e-2)
  np.testing.assert_allclose(out.gate, ref.gate, atol=5e-2)


@pytest.fixture
def fused_calls(monkeypatch):
  """Counts the traces of attention.dot_product_attention (one list item),
  so a test knows the fused path ran and is not compared with itself."""
  calls = [0]
  real = attention.dot_product_attention

  def counted(*args, **kwargs):
    calls[0] += 1
    return real(*args, **kwargs)

  monkeypatch.setattr(attention, 'dot_product_attention', counted)
  return calls


@pytest.mark.parametrize('variant, n_kv_heads', [
    *[(v, 0) for v in model_config.VARIANTS], ('ztt', 2)])
def test_dot_product_attention_matches_xla(variant, n_kv_heads,
                                           fused_calls):
  """model.attention='dot_product' (the fused kernel) gives the same
  outputs, zero-token statistics and param gradients as 'xla' with the same
  params; only the margin is absent."""
  cfg = make_cfg(variant, n_kv_heads=n_kv_heads)
  params = random_params(cfg)
  x = tokens()

  def run(cfg):
    module = model.build(cfg)

    def loss(p):
      out = module.apply({'params': p}, x)
      ce = -jnp.mean(jax.nn.log_softmax(out.cycle_logits)[..., 3])
      if out.zero_attention is None:
        return ce, out
      return ce + jnp.mean(out.zero_attention), out  # a0 gets gradients too.

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss, out), grads = run(cfg)
  assert fused_calls[0] == 0
  (fused_loss, fused), fused_grads = run(
      dataclasses.replace(cfg, attention='dot_product'))
  assert fused.zero_margin is None
  assert (out.zero_margin is None) == (cfg.zero_pool == 'none')
  np.testing.assert_allclose(fused_loss, loss, rtol=1e-6)
  chex.assert_trees_all_close(fused.replace(zero_margin=None),
                              out.replace(zero_margin=None),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(fused_grads, grads, atol=1e-5, rtol=1e-5)
  assert fused_calls[0] > 0  # The fused path really ran.


def test_dot_product_attention_in_bfloat16(fused_calls):
  """In bfloat16 the fused path gives a0 with bfloat16 precision, as
  float32, like the xla path's."""
  cfg = make_cfg('ztt', dtype='bfloat16', n_kv_heads=2)
  _, params, ref = init_apply(cfg)
  out = apply(dataclasses.replace(cfg, attention='dot_product'), params,
              tokens())
  chex.assert_type([out.logits, out.zero_attention], jnp.float32)
  np.testing.assert_allclose(out.zero_attention, ref.zero_attention,
                             atol=1e-2)
  assert _relative_error(out.logits, ref.logits) < 0.05
  assert fused_calls[0] > 0


@pytest.mark.parametrize('variant', model_config.VARIANTS)
def test_causality(variant):
  cfg = make_cfg(variant)
  x_BxT = tokens()
  t = 5
  changed_BxT = x_BxT.at[:, t + 1:].set((x_BxT[:, t + 1:] + 7) % V)
  _, params, a = init_apply(cfg, x_BxT)
  b = apply(cfg, params, changed_BxT)
  time_axis = dict(logits=-2, cycle_logits=-2, zero_attention=-1, gate=-1)
  for field, axis in time_axis.items():
    x, y = getattr(a, field), getattr(b, field)
    if x is not None:
      past = lambda z, axis=axis: np.take(np.asarray(z), np.arange(t + 1),
                                          axis=axis)
      np.testing.assert_array_equal(past(x), past(y), err_msg=field)
  # And the future does change: the check above is not vacuous.
  assert not np.allclose(a.logits[:, t + 1:], b.logits[:, t + 1:])


def test_parameter_budget():
  htc = {c: count(make_cfg('head_tail_cycle', n_cycles=c)) for c in (1, 2, 5)}
  assert len(set(htc.values())) == 1, htc
  n_htc = htc[2]
  assert count(make_cfg('vanilla')) == n_htc
  assert count(make_cfg('basic_cycle')) == n_htc
  cfg = make_cfg('ztt', n_cycles=4)
  c, k, h, d = 4, cfg.mid_layers, cfg.n_heads, cfg.resolved_head_dim
  gate_params = c * cfg.d_model + c  # token gate: w [C, D] and b [C].
  assert count(cfg) == n_htc + c * k * h * d + gate_params
  assert count(make_cfg('ztt', n_cycles=4, gate='none')) == n_htc + c * k * h * d
  assert count(make_cfg('ztt', zero_pool='cycle', gate='scalar',
                        n_cycles=4)) == n_htc + c * h * d + c
  assert count(make_cfg('ztt', zero_pool='layer', gate='none',
                        n_cycles=4)) == n_htc + k * h * d
  assert count(make_cfg('ztt', zero_pool='none', gate='none')) == n_htc


@pytest.mark.parametrize('variant', model_config.VARIANTS)
def test_scan_and_unrolled_give_same_logits(variant):
  cfg = make_cfg(variant, remat_policy='full')
  _, params, out = init_apply(cfg)
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled_params = params_lib.convert_params(params, scan_layers=False)
  assert 'layers_1' in unrolled_params['mid']['cycle']['stack']
  out2 = apply(unrolled_cfg, unrolled_params, tokens())
  chex.assert_trees_all_close(out, out2, atol=1e-5, rtol=1e-5)
  back = params_lib.convert_params(unrolled_params, scan_layers=True)
  chex.assert_trees_all_equal(back, params)


def test_unrolled_init_has_same_tree_as_converted_scan_init():
  cfg = make_cfg('ztt')
  scanned = params_lib.abstract_params(model.build(cfg))
  unrolled = params_lib.abstract_params(
      model.build(dataclasses.replace(cfg, scan_layers=False)))
  converted = jax.eval_shape(
      lambda p: params_lib.convert_params(p, scan_layers=False), scanned)
  chex.assert_trees_all_equal_shapes_and_dtypes(converted, unrolled)


def test_ztt_without_pool_and_gate_is_head_tail_cycle():
  _, params, htc = init_apply(make_cfg('head_tail_cycle'))
  cfg = make_cfg('ztt', zero_pool='none', gate='none', exit_loss='none')
  out = apply(cfg, params, tokens())
  np.testing.assert_array_equal(out.logits, htc.logits)


def test_vanilla_is_one_cycle_of_head_tail_cycle():
  _, params, van = init_apply(make_cfg('vanilla'))
  out = apply(make_cfg('head_tail_cycle', n_cycles=1), params, tokens())
  np.testing.assert_array_equal(out.logits, van.logits)


def test_cycles_change_the_output():
  _, params, two = init_apply(make_cfg('head_tail_cycle', n_cycles=2))
  three = apply(make_cfg('head_tail_cycle', n_cycles=3), params, tokens())
  assert not np.allclose(two.logits, three.logits)


def test_last_exit_head_is_the_output_and_first_is_one_cycle():
  cfg = make_cfg('ztt', gate='none', zero_pool='none', exit_loss='uniform')
  _, params, out = init_apply(cfg)
  np.testing.assert_array_equal(out.cycle_logits[-1], out.logits)
  # Exit head 0 sees the state after one cycle: same as a 1-cycle model.
  one = apply(make_cfg('head_tail_cycle', n_cycles=1), params, tokens())
  np.testing.assert_allclose(out.cycle_logits[0], one.logits, atol=1e-5)


@pytest.mark.parametrize('pool', ['cycle_layer', 'cycle', 'layer'])
@pytest.mark.parametrize('exit_loss', ['none', 'linear'])
def test_every_zero_key_gets_a_gradient(pool, exit_loss):
  cfg = make_cfg('ztt', zero_pool=pool, exit_loss=exit_loss)
  module = model.build(cfg)
  params = random_params(cfg)
  x_BxT = tokens()

  def loss(p):
    out = module.apply({'params': p}, x_BxT)
    return jnp.mean(jax.nn.log_softmax(out.cycle_logits)[..., 3])

  grads = jax.jit(jax.grad(loss))(params)
  g = grads['mid']['zero_keys']
  assert g.shape == params['mid']['zero_keys'].shape
  per_key = np.abs(np.asarray(g)).reshape(-1, cfg.resolved_head_dim).sum(-1)
  assert np.all(per_key > 0), per_key


@pytest.mark.parametrize('n_kv_heads', [0, 2])
def test_projected_zero_key_is_key_space_key_of_projected_token(n_kv_heads):
  """zero_key='projected' equals a key-space pool holding W_k e0 per layer."""
  proj = make_cfg('ztt', zero_key='projected', n_kv_heads=n_kv_heads)
  _, params, out = init_apply(proj)
  e0_CxLxD = params['mid']['zero_keys']
  chex.assert_shape(e0_CxLxD, (proj.cycles, proj.mid_layers, proj.d_model))
  key = params['mid']['cycle']['stack']['layers']['attn']['key']['kernel']
  k0_CxLxGxK = jnp.einsum('cld,ldgk->clgk', e0_CxLxD, key)
  groups = proj.n_heads // proj.resolved_kv_heads
  keyed = dict(params, mid=dict(params['mid'], zero_keys=jnp.repeat(
      k0_CxLxGxK, groups, axis=2)))
  ref = apply(dataclasses.replace(proj, zero_key='key_space'), keyed,
              tokens())
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5)
  np.testing.assert_allclose(out.zero_attention, ref.zero_attention,
                             atol=1e-6)
  # The projected token's key moves with W_k: a gradient reaches both.
  module = model.build(proj)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(
      module.apply({'params': p}, tokens()).zero_attention)))(params)
  assert np.all(np.abs(np.asarray(grads['mid']['zero_keys'])).sum(-1) > 0)


def test_dropout_is_random_only_when_not_deterministic():
  cfg = make_cfg('ztt', dropout=0.5)
  module = model.build(cfg)
  params = random_params(cfg)
  run = jax.jit(lambda key: module.apply(
      {'params': params}, tokens(), deterministic=False,
      rngs={'dropout': jax.random.key(key)}).logits)
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
  det = apply(cfg, params, tokens()).logits
  assert not np.allclose(det, run(0))


def test_untied_embeddings_add_a_head():
  cfg = make_cfg('ztt', tie_embeddings=False)
  assert count(cfg) == count(make_cfg('ztt')) + V * cfg.d_model


def test_every_param_has_logical_axes():
  cfg = make_cfg('ztt')
  boxed = params_lib.abstract_params(model.build(cfg), boxed=True)
  leaves = jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, model.nn.Partitioned))
  assert all(isinstance(x, model.nn.Partitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim, box
  stacked = boxed['mid']['cycle']['stack']['layers']['attn']['query']['kernel']
  assert stacked.names == ('layers', 'embed', 'heads', 'kv')


def test_flops_per_token_counts_cycles():
  base = dict(exit_loss='none')
  f = {c: params_lib.flops_per_token(make_cfg('head_tail_cycle', n_cycles=c,
                                         **base), 64) for c in (1, 2, 4)}
  assert f[4] - f[2] == pytest.approx(2 * (f[2] - f[1]))
  # Vanilla with head + C*K + tail distinct layers costs as much as HTC.
  cfg = make_cfg('head_tail_cycle', n_cycles=3, **base)
  van = make_cfg('vanilla', n_mid_layers=3 * cfg.n_mid_layers)
  assert params_lib.flops_per_token(van, 64) == params_lib.flops_per_token(cfg, 64)
  # 6N rule of thumb for the matmul part when attention is negligible.
  n_matmul = count(make_cfg('vanilla'))
  assert params_lib.flops_per_token(make_cfg('vanilla'), 1) == pytest.approx(
      6 * n_matmul, rel=0.05)


def test_flops_per_token_counts_the_early_heads_scored_positions():
  # The LM heads before the last score a quarter of the positions in
  # training: 2 of 3 heads' 2 * D * V per token shrink to a quarter.
  full, quarter = (make_cfg('ztt', n_cycles=3, exit_loss_fraction=f)
                   for f in (1.0, 0.25))
  lm_head = 2 * full.d_model * full.vocab_size
  assert params_lib.flops_per_token(full, 64) - params_lib.flops_per_token(
      quarter, 64) == pytest.approx(3 * 2 * 0.75 * lm_head)
  assert params_lib.flops_per_token(full, 64, training=False) == (
      params_lib.flops_per_token(quarter, 64, training=False))


@pytest.mark.parametrize('overrides, field', [
    (dict(variant='deep'), 'model.variant'),
    (dict(zero_pool='everywhere'), 'model.zero_pool'),
    (dict(gate='always'), 'model.gate'),
    (dict(zero_key='value_space'), 'model.zero_key'),
    (dict(n_cycles=0), 'model.n_cycles'),
    (dict(n_heads=3), 'model.n_heads'),
    (dict(variant='head_tail_cycle', zero_pool='cycle'), 'model.zero_pool'),
    (dict(dropout=1.5), 'model.dropout'),
    (dict(remat_policy='most'), 'model.remat_policy'),
    (dict(attention='flash'), 'model.attention'),
])
def test_bad_model_config_names_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')) as e:
    make_cfg(**overrides)
  assert '\n' not in str(e.value)


def test_exit_weights():
  weights = lambda loss: np.asarray(ztt.exit_weights(make_cfg(
      'ztt', n_cycles=4, exit_loss=loss)))
  np.testing.assert_allclose(weights('linear'), np.array([1, 2, 3, 4]) / 10)
  np.testing.assert_allclose(weights('uniform'), [0.25] * 4)
  np.testing.assert_allclose(weights('final_heavy'), [1 / 6] * 3 + [0.5])
  np.testing.assert_allclose(weights('last'), [0, 0, 0, 1])


def test_gate_reads_the_cycle_input_or_output():
  x = jax.random.normal(jax.random.key(0), (B, T, 8))
  y = jax.random.normal(jax.random.key(1), (B, T, 8))
  w, b = jax.random.normal(jax.random.key(2), (8,)), 0.5
  rms = lambda a: a / np.sqrt(np.mean(np.square(a), -1, keepdims=True) + 1e-6)
  for reads, source in (('output', y), ('input', x)):
    cfg = make_cfg('ztt', gate_input=reads)
    state, g = ztt.apply_gate(cfg, x, y, w, b)
    expected = 1 / (1 + np.exp(-(rms(np.asarray(source)) @ np.asarray(w) + b)))
    np.testing.assert_allclose(g, expected, rtol=1e-5)
    np.testing.assert_allclose(state, x + expected[..., None] * (y - x),
                               rtol=1e-5, atol=1e-6)


def test_detached_exit_heads_train_only_the_tail_and_lm_head():
  """exit_grad='detach': the same outputs, but an early head's loss sends no
  gradient into the cycled stack, the pool or the gates."""
  full = make_cfg('ztt', exit_loss='uniform')
  detach = make_cfg('ztt', exit_loss='uniform', exit_grad='detach')
  params = random_params(full)
  x = tokens()
  np.testing.assert_array_equal(apply(full, params, x).cycle_logits,
                                apply(detach, params, x).cycle_logits)

  def grads(cfg, head):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model.build(cfg).apply(
        {'params': p}, x).cycle_logits[head])[..., 3])
    return jax.jit(jax.grad(loss))(params)

  norm = lambda tree: float(sum(jnp.sum(jnp.abs(a))
                                for a in jax.tree.leaves(tree)))
  early_full, early_detach = grads(full, 0), grads(detach, 0)
  assert norm(early_full['mid']) > 0
  assert norm(early_detach['mid']) == 0 and norm(early_detach['head']) == 0
  assert norm(early_detach['tail']) > 0
  last_full, last_detach = grads(full, -1), grads(detach, -1)
  for a, b in zip(jax.tree.leaves(last_full), jax.tree.leaves(last_detach)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32 rounding.
