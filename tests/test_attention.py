"""Zero-token attention against a float64 NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ztt_jax import attention

T, H, K = 7, 3, 8


def reference_attention_np(q_TxHxK, k_SxHxK, v_SxHxK, zero_key_HxK):
  """Float64 NumPy reference for one sequence with causal masking (T == S).

  Returns `(out_TxHxK, a0_TxH, plain_TxHxK)` where `plain` is ordinary causal
  attention without the zero token, so tests can check
  `out == (1 - a0) * plain`.
  """
  q, k, v, z = (np.asarray(a, np.float64)
                for a in (q_TxHxK, k_SxHxK, v_SxHxK, zero_key_HxK))
  t_len, n_heads, dim = q.shape
  out = np.zeros_like(q)
  plain = np.zeros_like(q)
  a0 = np.zeros((t_len, n_heads))
  for t in range(t_len):
    for h in range(n_heads):
      logits = np.concatenate([[q[t, h] @ z[h]], k[:t + 1, h] @ q[t, h]])
      logits /= np.sqrt(dim)
      w = np.exp(logits - logits.max())
      w /= w.sum()
      a0[t, h] = w[0]
      out[t, h] = w[1:] @ v[:t + 1, h]
      w_plain = np.exp(logits[1:] - logits[1:].max())
      plain[t, h] = (w_plain / w_plain.sum()) @ v[:t + 1, h]
  return out, a0, plain


def random_qkvz(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  q, k, v = (scale * rng.standard_normal((T, H, K)) for _ in range(3))
  z = scale * rng.standard_normal((H, K))
  return q, k, v, z


def run(q, k, v, z):
  positions_1xT = jnp.arange(T)[None]
  mask = attention.causal_mask(positions_1xT, positions_1xT)
  out, a0, margin = jax.jit(attention.zero_token_attention)(
      *(jnp.asarray(x, jnp.float32)[None] for x in (q, k, v)), mask,
      None if z is None else jnp.asarray(z, jnp.float32))
  if a0 is None:
    assert margin is None
    return np.asarray(out[0]), None
  return np.asarray(out[0]), np.asarray(a0[0]), np.asarray(margin[0])


@pytest.mark.parametrize('seed, scale', [(0, 1.0), (1, 3.0), (2, 10.0)])
def test_matches_float64_reference(seed, scale):
  q, k, v, z = random_qkvz(seed, scale)
  out, a0, _ = run(q, k, v, z)
  ref_out, ref_a0, ref_plain = reference_attention_np(q, k, v, z)
  np.testing.assert_allclose(a0, ref_a0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5 * scale)
  # The zero token only scales ordinary attention down by (1 - a0).
  np.testing.assert_allclose(out, (1 - a0)[..., None] * ref_plain,
                             rtol=1e-4, atol=1e-5 * scale)
  plain, none = run(q, k, v, None)
  assert none is None
  np.testing.assert_allclose(plain, ref_plain, rtol=1e-4, atol=1e-5 * scale)


def test_large_logits_match_float64_reference():
  """Logits in the tens of thousands: float32 keeps the max-subtracted
  softmax finite and as one-hot as the float64 one."""
  q, k, v, z = random_qkvz(3, 300.0)
  out, a0, margin = run(q, k, v, z)
  ref_out, ref_a0, _ = reference_attention_np(q, k, v, z)
  s0 = np.einsum('thk,hk->th', q, z) / np.sqrt(K)
  s = np.einsum('thk,shk->tsh', q, k) / np.sqrt(K)
  ref_margin = np.stack([s0[t] - s[t, :t + 1].max(0) for t in range(T)])
  assert np.abs(ref_margin).max() > 1e4  # Really large logits.
  np.testing.assert_allclose(a0, ref_a0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5 * 300.0)
  # Float32 logits of this size carry a relative round-off of about 1e-7.
  np.testing.assert_allclose(margin, ref_margin, rtol=1e-5, atol=1e-2)


def test_zero_key_dominates_when_aligned_with_queries():
  q, k, v, _ = random_qkvz(4)
  z = 50.0 * q.mean(0)  # Large key in the queries' mean direction.
  _, a0, _ = run(np.abs(q), k, v, np.abs(z))
  assert a0.mean() > 0.9


def test_first_token_sees_itself_and_the_zero_token_only():
  q, k, v, z = random_qkvz(5)
  out, a0, _ = run(q, k, v, z)
  np.testing.assert_allclose(out[0], (1 - a0[0])[:, None] * v[0], rtol=1e-5,
                             atol=1e-6)


def test_rotary_preserves_norm_and_is_relative():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 5, H, K)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((1, 5, H, K)), jnp.float32)
  pos = jnp.arange(5)[None]
  rx, ry = attention.rotary(x, pos), attention.rotary(y, pos)
  np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  # <rot(x, p), rot(y, p)> depends only on p - p': shift both by 3.
  rx3, ry3 = attention.rotary(x, pos + 3), attention.rotary(y, pos + 3)
  dots = jnp.einsum('bthk,bshk->bhts', rx, ry)
  dots3 = jnp.einsum('bthk,bshk->bhts', rx3, ry3)
  np.testing.assert_allclose(dots, dots3, rtol=1e-4, atol=1e-4)


def test_zero_log_weight_is_position_free_under_uniform_attention():
  """With every logit equal the zero-token mass is 1/(t+2) at position t,
  while its weight relative to the mean key weight is 1 (log 0)."""
  q, k, v, z = random_qkvz(0)
  positions_1xT = jnp.arange(T)[None]
  mask = attention.causal_mask(positions_1xT, positions_1xT)
  _, a0, margin = run(np.zeros_like(q), k, v, z)
  np.testing.assert_allclose(a0, np.broadcast_to(
      1 / (np.arange(T) + 2)[:, None], (T, H)), rtol=1e-6)
  log_w = attention.zero_log_weight(jnp.asarray(a0)[None], mask)[0]
  np.testing.assert_allclose(log_w, 0.0, atol=1e-5)
  np.testing.assert_allclose(margin, 0.0, atol=1e-6)


@pytest.mark.parametrize('seed, scale', [(0, 1.0), (1, 3.0)])
def test_zero_log_weight_is_zero_logit_minus_log_mean_exp(seed, scale):
  q, k, v, z = random_qkvz(seed, scale)
  positions_1xT = jnp.arange(T)[None]
  mask = attention.causal_mask(positions_1xT, positions_1xT)
  _, a0, margin = run(q, k, v, z)
  log_w = np.asarray(attention.zero_log_weight(jnp.asarray(a0)[None],
                                               mask)[0])
  s0 = np.einsum('thk,hk->th', q, z) / np.sqrt(K)
  s = np.einsum('thk,shk->tsh', q, k) / np.sqrt(K)
  for t in range(T):
    keys = s[t, :t + 1]  # [t+1, H]
    ref = s0[t] - np.log(np.mean(np.exp(keys), 0))
    np.testing.assert_allclose(log_w[t], ref, rtol=1e-4, atol=1e-4)
    # The margin: the zero logit over the strongest key the query sees.
    np.testing.assert_allclose(margin[t], s0[t] - keys.max(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(margin[t], np.log(a0[t] / np.max(
        np.exp(keys - keys.max(0)) * (1 - a0[t]) / np.sum(
            np.exp(keys - keys.max(0)), 0), 0)), rtol=1e-3, atol=1e-3)


def test_zero_margin_is_position_free_when_attention_concentrates():
  """One strong key (logit 5) and weak ones (logit 0), as trained heads
  often look: the relative weight rises with the number of weak keys, the
  margin does not move."""
  e1 = np.eye(K)[0]
  q = np.broadcast_to(e1, (T, H, K)).copy()
  k = np.zeros((T, H, K))
  k[0] = 5.0 * np.sqrt(K) * e1  # The first key: logit 5 for every query.
  z = np.broadcast_to(1.0 * np.sqrt(K) * e1, (H, K)).copy()  # Logit 1.
  _, a0, margin = run(q, k, np.ones((T, H, K)), z)
  positions_1xT = jnp.arange(T)[None]
  mask = attention.causal_mask(positions_1xT, positions_1xT)
  log_w = np.asarray(attention.zero_log_weight(jnp.asarray(a0)[None],
                                               mask)[0])
  np.testing.assert_allclose(margin, 1.0 - 5.0, atol=1e-5)
  n = np.arange(T) + 1  # Keys seen at position t.
  np.testing.assert_allclose(
      log_w[:, 0], 1.0 - np.log((np.exp(5.0) + n - 1) / n), atol=1e-4)
  assert log_w[-1, 0] - log_w[0, 0] > 1.5  # Rises with position.


# --------------------------------------- model.attention='dot_product' --

B2, S2, H2 = 2, 9, 4


def fused_case(seed, n_kv_heads, zero, where):
  """Random q, k, v (G = n_kv_heads), a zero key or None, and how the
  keys are seen: `self` (the T queries' own keys, causal), `prefill` (T
  queries at per-row offsets into a cache of S slots) or `decode` (one
  query per row at its own position). Cache slots past a query's position
  hold random keys and values, which a wrong mask would pick up."""
  rng = np.random.default_rng(seed)
  t = {'self': S2, 'prefill': 4, 'decode': 1}[where]
  s = t if where == 'self' else S2
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q = normal(B2, t, H2, K)
  k, v = normal(B2, s, n_kv_heads, K), normal(B2, s, n_kv_heads, K)
  z = normal(H2, K) if zero else None
  slots = jnp.broadcast_to(jnp.arange(s), (B2, s))
  if where == 'self':
    positions, mask = None, attention.causal_mask(slots, slots)
  else:
    starts = np.array([[2], [S2 - t]])  # Rows at different offsets.
    positions = jnp.asarray(starts + np.arange(t), jnp.int32)
    mask = attention.causal_mask(positions, slots)
  return (q, k, v, z), positions, mask


def xla_path(q, k, v, z, mask):
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
  return attention.zero_token_attention(q, k, v, mask, z)


@pytest.mark.parametrize('where', ['self', 'prefill', 'decode'])
@pytest.mark.parametrize('n_kv_heads', [H2, 2])
@pytest.mark.parametrize('zero', [True, False], ids=['zero_token', 'plain'])
def test_dot_product_path_matches_xla_path(zero, n_kv_heads, where):
  """Outputs, a0 and the gradients of both (w.r.t. q, k, v and the zero
  key) agree; the fused path has no margin."""
  args, positions, mask = fused_case(0, n_kv_heads, zero, where)
  fused = lambda q, k, v, z: attention.dot_product_attention(
      q, k, v, z, positions)
  xla = lambda q, k, v, z: xla_path(q, k, v, z, mask)
  out, a0, margin = jax.jit(fused)(*args)
  ref_out, ref_a0, ref_margin = jax.jit(xla)(*args)
  assert margin is None and (ref_margin is None) == (not zero)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  if zero:
    assert np.ptp(np.asarray(ref_a0)) > 0.1  # Varies: not a trivial a0.
    np.testing.assert_allclose(a0, ref_a0, rtol=1e-5, atol=1e-6)
  else:
    assert a0 is None and ref_a0 is None
  # A loss that reads the output and a0 with random weights.
  rng = np.random.default_rng(1)
  w_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  w_a0 = jnp.asarray(rng.standard_normal(out.shape[:3]), jnp.float32)

  def loss(fn, q, k, v, z):
    out, a0, _ = fn(q, k, v, z)
    return jnp.sum(out * w_out) + (0.0 if a0 is None else jnp.sum(a0 * w_a0))

  argnums = (0, 1, 2, 3) if zero else (0, 1, 2)
  grads = jax.jit(jax.grad(functools.partial(loss, fused), argnums))(*args)
  ref_grads = jax.jit(jax.grad(functools.partial(loss, xla), argnums))(*args)
  for name, g, ref in zip('qkvz', grads, ref_grads):
    assert float(jnp.abs(ref).max()) > 1e-2, name  # Gradients do flow.
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_dot_product_matches_float64_reference():
  q, k, v, z = random_qkvz(1, 3.0)
  out, a0, _ = jax.jit(attention.dot_product_attention)(
      *(jnp.asarray(x, jnp.float32)[None] for x in (q, k, v)),
      jnp.asarray(z, jnp.float32))
  ref_out, ref_a0, _ = reference_attention_np(q, k, v, z)
  np.testing.assert_allclose(a0[0], ref_a0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out[0], ref_out, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize('where', ['self', 'prefill', 'decode'])
@pytest.mark.parametrize('zero', [True, False], ids=['zero_token', 'plain'])
def test_dot_product_hands_the_kernel_what_cudnn_takes(monkeypatch, zero,
                                                       where):
  """What reaches jax.nn.dot_product_attention would run on cuDNN: one
  16-bit dtype, one head dim (a multiple of 8, one channel more than K
  with a zero token), G key/value heads, no bias, and for training (self)
  the causal flag rather than a mask array."""
  seen = {}
  real = jax.nn.dot_product_attention

  def spy(q, k, v, bias=None, mask=None, **kwargs):
    seen.update(q=q, k=k, v=v, bias=bias, mask=mask, **kwargs)
    return real(q, k, v, bias, mask, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  (q, k, v, z), positions, _ = fused_case(2, 2, zero, where)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  out, _, _ = attention.dot_product_attention(
      bf16(q), bf16(k), bf16(v), z, positions, implementation='xla')
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  width = attention.fused_head_dim(K, zero)
  assert width % 8 == 0 and width == (16 if zero else K)
  assert {seen[n].dtype for n in 'qkv'} == {jnp.dtype(jnp.bfloat16)}
  assert {seen[n].shape[-1] for n in 'qkv'} == {width}
  assert seen['k'].shape == seen['v'].shape and seen['k'].shape[2] == 2
  assert seen['bias'] is None and seen['implementation'] == 'xla'
  if where == 'self':
    assert seen['is_causal'] and seen['mask'] is None
  elif where == 'decode':
    assert seen['mask'] is None
    assert seen['key_value_seq_lengths'].dtype == jnp.int32
  # On this CPU jax runs XLA's implementation whatever the dtype.
  assert attention.fused_implementation(jnp.bfloat16) == 'xla'
