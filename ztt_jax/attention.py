"""Causal attention with an optional zero token, plus rotary positions.

The zero token (ZTT, Li et al. 2025, Fig. 1) is a virtual key prepended to
the keys of an attention block: its key is a trainable vector that lives
directly in key space (no projection, no rotary), it is visible to every
query, and its value is all zeros. With `a0` the softmax mass a query puts on
it, the block's output is `(1 - a0) * ordinary_causal_attention`, and `a0` is
the statistic ZTT uses to decide how much a layer (and a cycle) still wants
to change the hidden state.

Two implementations of the same maths (`model.attention`):
`zero_token_attention` (xla: explicit float32 logits, every statistic) and
`dot_product_attention` (`jax.nn.dot_product_attention`, cuDNN's fused
kernel on NVIDIA GPUs; the zero token rides along as an extra key, and `a0`
comes out of an extra value channel, exactly; no logit margin).

Axis names: B batch, T query time, S key time, H heads, G key/value heads,
K head dim, W padded head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MASK_VALUE = -1e30


def rotary(x_BxTxHxK: jax.Array, positions_BxT: jax.Array,
           theta: float = 10_000.0) -> jax.Array:
  """Applies rotary position embeddings (split-half form) in float32."""
  k = x_BxTxHxK.shape[-1]
  freq_K2 = 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angle_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * freq_K2
  sin_BxTx1xK2 = jnp.sin(angle_BxTxK2)[:, :, None, :]
  cos_BxTx1xK2 = jnp.cos(angle_BxTxK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BxTx1xK2 - x2 * sin_BxTx1xK2,
                         x2 * cos_BxTx1xK2 + x1 * sin_BxTx1xK2], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def logits(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array,
           mask_BxTxS: jax.Array) -> jax.Array:
  """Scaled float32 attention logits [B, H, T, S] over the real keys; masked
  entries hold a large negative number (their softmax weight is 0). Keys
  with fewer heads G than the queries (grouped-query) are repeated."""
  groups = q_BxTxHxK.shape[2] // k_BxSxHxK.shape[2]
  if groups > 1:
    k_BxSxHxK = jnp.repeat(k_BxSxHxK, groups, axis=2)
  scale = 1.0 / np.sqrt(q_BxTxHxK.shape[-1])
  s_BxHxTxS = jnp.einsum('bthk,bshk->bhts', q_BxTxHxK, k_BxSxHxK,
                         preferred_element_type=jnp.float32) * scale
  return jnp.where(mask_BxTxS[:, None], s_BxHxTxS, _MASK_VALUE)


def zero_token_attention(
    q_BxTxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    mask_BxTxS: jax.Array,
    zero_key_HxK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Masked softmax attention over `[zero token, keys]`.

  Args:
    q_BxTxHxK: queries (rotary already applied).
    k_BxSxHxK: keys (rotary already applied).
    v_BxSxHxK: values.
    mask_BxTxS: True where query t may attend to key s.
    zero_key_HxK: the zero token's key per head, or None for plain attention.

  Returns:
    `(out_BxTxHxK, a0_BxTxH, margin_BxTxH)`; `a0` is the softmax mass on the
    zero token and `margin` the zero token's logit minus the largest logit of
    a real key, `log(a0 / max_s p_s)` (both None without a zero token). The
    softmax runs in float32 with its max subtracted; `out` is in the dtype
    of `v`.
  """
  scale = 1.0 / np.sqrt(q_BxTxHxK.shape[-1])
  s_BxHxTxS = logits(q_BxTxHxK, k_BxSxHxK, mask_BxTxS)
  if zero_key_HxK is None:
    p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1)
    a0_BxTxH = margin_BxTxH = None
  else:
    s0_BxHxTx1 = jnp.einsum('bthk,hk->bht', q_BxTxHxK.astype(jnp.float32),
                            zero_key_HxK.astype(jnp.float32))[..., None] * scale
    full_BxHxTx1S = jax.nn.softmax(
        jnp.concatenate([s0_BxHxTx1, s_BxHxTxS], axis=-1), axis=-1)
    # The zero token's value is zero: it only takes mass away from the keys.
    p_BxHxTxS = full_BxHxTx1S[..., 1:]
    a0_BxTxH = jnp.transpose(full_BxHxTx1S[..., 0], (0, 2, 1))
    margin_BxTxH = jnp.transpose(s0_BxHxTx1[..., 0] - s_BxHxTxS.max(-1),
                                 (0, 2, 1))
  out_BxTxHxK = jnp.einsum('bhts,bshk->bthk', p_BxHxTxS.astype(v_BxSxHxK.dtype),
                           v_BxSxHxK)
  return out_BxTxHxK, a0_BxTxH, margin_BxTxH


# cuDNN's flash attention takes head dims that are multiples of 8 (at most
# 128 before Hopper, 256 from Hopper on) and 16-bit inputs only.
_CUDNN_HEAD_DIM_MULTIPLE = 8
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def fused_implementation(dtype) -> str:
  """The `implementation` `dot_product_attention` asks jax for: 'cudnn' on
  an NVIDIA GPU with bfloat16 or float16 inputs (`model.dtype`), 'xla'
  otherwise (CPU, TPU, float32: cuDNN's kernel takes 16-bit inputs only;
  `implementation=None` would also pick XLA's in jax 0.10)."""
  device = jax.devices()[0]
  cuda = (device.platform == 'gpu'
          and 'cuda' in str(device.client.platform_version).lower())
  return 'cudnn' if cuda and jnp.dtype(dtype) in _CUDNN_DTYPES else 'xla'


def fused_head_dim(head_dim: int, zero_token: bool) -> int:
  """W, the head dim `dot_product_attention` hands the kernel: K (plus one
  channel for the zero token) rounded up to a multiple of 8."""
  m = _CUDNN_HEAD_DIM_MULTIPLE
  return -(-(head_dim + int(zero_token)) // m) * m


def dot_product_attention(
    q_BxTxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    zero_key_HxK: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    implementation: str = 'xla',
) -> tuple[jax.Array, jax.Array | None, None]:
  """`zero_token_attention` through `jax.nn.dot_product_attention`.

  The zero token is key 0 of the kernel, with a value of zero, and `a0`
  comes out exactly, as an output channel, without the kernel exposing its
  softmax: head dims are padded from K to W (`fused_head_dim`, which
  cuDNN's kernel needs anyway: a multiple of 8, and q, k and v alike) and
  channel K carries the zero token:

    query  [q, q . z_h, 0..]   key 0 is the unit vector e_K, so its logit
    keys   [0, e_K], [k_s, 0]  is q . z_h (times the scale 1/sqrt(K), given
    values [0, e_K], [v_s, 0]  explicitly), and output channel K is a0.

  The zero key (one per query head) thus enters through the queries, and
  every key/value head gets the same key 0: grouped-query attention stays
  grouped (G heads go to the kernel). Outputs and `a0` are exact up to
  float round-off, gradients too (w.r.t. q, k, v and the zero key, all
  through the kernel's own backward pass). Not chosen: `a0` from the
  kernel's log-sum-exp (`return_residual`), whose gradient is lost (XLA's
  implementation stop-gradients it, cuDNN's backward drops it).

  In bfloat16 or float16 the kernel runs in that dtype: the zero logit
  enters rounded to it and `a0` comes out with its precision (returned as
  float32), like the output. cuDNN takes W <= 256 from Hopper on, W <= 128
  before: K = 128 with a zero token (W = 136) needs Hopper, and jax says so
  in one error otherwise.

  Masks, as `layers.Attention` uses them:
    positions_BxT None: self-attention over the T keys of the same tokens
      (S == T, positions ascending): causal (`is_causal`). With a zero
      token a throwaway query row is put first, so that on the square
      [T+1, T+1] grid the causal mask lets query t (row t + 1) see the
      zero token (key 0) and real keys 0..t (keys 1..t+1).
    positions_BxT given: the keys are cache slots 0..S-1 and query (b, t)
      sees the slots at or before `positions_BxT[b, t]`: for one new token
      (T == 1) as `key_value_seq_lengths`, else as a boolean mask.

  The largest real-key logit is not available from the kernel, so there is
  no margin: the third result is always None (`model.attention='xla'` has
  it; the exit criterion zero_margin refuses this path).

  Args:
    q_BxTxHxK: queries (rotary applied).
    k_BxSxGxK: keys (rotary applied), G dividing H.
    v_BxSxGxK: values.
    zero_key_HxK: the zero token's key per head, or None (plain attention).
    positions_BxT: the queries' positions when the keys are a KV cache.
    implementation: 'xla' or 'cudnn' (`fused_implementation`).

  Returns:
    `(out_BxTxHxK, a0_BxTxH float32 or None, None)`; `out` in the dtype of
    `q`.
  """
  b, t, _, dim = q_BxTxHxK.shape
  s, g = k_BxSxGxK.shape[1:3]
  dtype = q_BxTxHxK.dtype
  zero = zero_key_HxK is not None
  width = fused_head_dim(dim, zero)
  pad = lambda x: jnp.pad(x.astype(dtype), ((0, 0),) * 3 + ((0, width - dim),))
  q_BxTxHxW, k_BxSxGxW, v_BxSxGxW = (
      pad(x) for x in (q_BxTxHxK, k_BxSxGxK, v_BxSxGxK))
  if zero:
    zero_logit_BxTxH = jnp.einsum('bthk,hk->bth', q_BxTxHxK.astype(jnp.float32),
                                  zero_key_HxK.astype(jnp.float32))
    q_BxTxHxW = q_BxTxHxW.at[..., dim].set(zero_logit_BxTxH.astype(dtype))
    unit_Bx1xGxW = jnp.zeros((b, 1, g, width), dtype).at[..., dim].set(1)
    k_BxSxGxW, v_BxSxGxW = (jnp.concatenate([unit_Bx1xGxW, x], axis=1)
                            for x in (k_BxSxGxW, v_BxSxGxW))
  kwargs = dict(scale=1.0 / np.sqrt(dim), implementation=implementation)
  lead = 0
  if positions_BxT is None:
    kwargs['is_causal'] = True
    if zero:  # The throwaway query: query t is row t + 1, sees keys 0..t+1.
      lead = 1
      q_BxTxHxW = jnp.pad(q_BxTxHxW, ((0, 0), (1, 0), (0, 0), (0, 0)))
  elif t == 1:
    kwargs['key_value_seq_lengths'] = (
        positions_BxT[:, 0] + 1 + int(zero)).astype(jnp.int32)
  else:
    mask_BxTxS = causal_mask(positions_BxT,
                             jnp.broadcast_to(jnp.arange(s), (b, s)))
    if zero:
      mask_BxTxS = jnp.pad(mask_BxTxS, ((0, 0), (0, 0), (1, 0)),
                           constant_values=True)
    kwargs['mask'] = mask_BxTxS[:, None]
  out_BxTxHxW = jax.nn.dot_product_attention(q_BxTxHxW, k_BxSxGxW, v_BxSxGxW,
                                             **kwargs)[:, lead:]
  a0_BxTxH = out_BxTxHxW[..., dim].astype(jnp.float32) if zero else None
  return out_BxTxHxW[..., :dim], a0_BxTxH, None


def zero_log_weight(a0_BxTxH: jax.Array, mask_BxTxS: jax.Array) -> jax.Array:
  """The zero token's weight relative to the mean weight of the keys its
  query sees, in log space: `log(n * a0 / (1 - a0))` with n visible keys,
  i.e. the zero logit minus the log-mean-exp of the key logits.

  The zero-token mass `a0` is `1 / (n + 1)` under uniform attention, so it
  falls with position; this statistic is 0 at every position then. When
  attention concentrates on a few keys it rises with log n instead (the
  mean key weight falls while the zero token competes with the few); the
  margin (`zero_token_attention`) is position-free in both cases.
  """
  n_BxTx1 = mask_BxTxS.sum(-1, dtype=jnp.float32)[..., None]
  a0 = jnp.clip(a0_BxTxH.astype(jnp.float32), 1e-30, 1 - 1e-7)
  return jnp.log(a0) - jnp.log1p(-a0) + jnp.log(n_BxTx1)


def write_cache(cache, new, starts_B: jax.Array):
  """Writes `new = (k_BxTxHxK, v_BxTxHxK)` into `cache = (k_BxSxHxK, ...)` at
  slots `starts_B[b] .. starts_B[b] + T - 1` of each row."""
  def write_row(c_SxHxK, n_TxHxK, start):
    return jax.lax.dynamic_update_slice_in_dim(c_SxHxK,
                                               n_TxHxK.astype(c_SxHxK.dtype),
                                               start, axis=0)
  return tuple(jax.vmap(write_row)(c, n, starts_B) for c, n in zip(cache, new))


def causal_mask(q_positions_BxT: jax.Array,
                k_positions_BxS: jax.Array) -> jax.Array:
  """True where the key position is at or before the query position."""
  return k_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
