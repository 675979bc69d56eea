"""Generic decoder layers: projection, norms, attention, MLP, block, stack.

Nothing here is specific to the paper except that attention takes an
optional zero key (what `ztt.py` hands every middle layer) and reports the
zero token's statistics (`ZeroStats`). `LayerStack` runs `n` distinct
blocks as an `nn.scan` over layers (params stacked under `layers`) or
unrolled (`layers_0`, `layers_1`, ...; `params.convert_params`).

Axis names: B batch, T time, S cache slots, D model width, H heads, G key/
value heads, K head dim, F MLP width, L layers in a stack.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax import attention
from ztt_jax.model_config import DTYPES, ModelConfig


@flax.struct.dataclass
class ZeroStats:
  """What a layer's attention reports about its zero token, per head or
  meaned: the softmax mass on it, its log weight relative to the mean key
  and its logit margin over the strongest key."""
  mass: jax.Array
  log_weight: jax.Array
  margin: jax.Array


def dense_init(cfg: ModelConfig, axes: tuple[str, ...], scale: float = 1.0):
  return nn.with_logical_partitioning(
      nn.initializers.normal(cfg.init_std * scale), axes)


def norm_layer(cfg: ModelConfig, name: str | None = None) -> nn.Module:
  """`model.norm` over the model width, in float32: RMSNorm (param `scale`)
  or LayerNorm (`scale` and `bias`, exact two-pass variance)."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))
  if cfg.norm == 'layernorm':
    return nn.LayerNorm(
        epsilon=cfg.norm_eps, dtype=jnp.float32,
        param_dtype=DTYPES[cfg.param_dtype], scale_init=scale_init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ('embed',)),
        use_fast_variance=False, name=name)
  return nn.RMSNorm(
      epsilon=cfg.norm_eps, dtype=jnp.float32,
      param_dtype=DTYPES[cfg.param_dtype], scale_init=scale_init, name=name)


class Projection(nn.Module):
  """`einsum(equation, x, kernel)` with a logically-partitioned kernel.

  (`nn.DenseGeneral` initialises a flattened kernel and then reshapes it,
  which breaks its logical sharding constraint under a mesh.) With
  `bias_axes`, a zero-initialised `bias` over the last `len(bias_axes)`
  kernel dimensions (the output ones) is added.
  """
  cfg: ModelConfig
  equation: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  scale: float = 1.0
  bias_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', dense_init(self.cfg, self.axes, self.scale),
                        self.shape, DTYPES[self.cfg.param_dtype])
    dtype = DTYPES[self.cfg.dtype]
    y = jnp.einsum(self.equation, x.astype(dtype), kernel.astype(dtype))
    if self.bias_axes:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                               self.bias_axes),
          self.shape[-len(self.bias_axes):], DTYPES[self.cfg.param_dtype])
      y = y + bias.astype(dtype)
    return y


class Attention(nn.Module):
  """Causal self-attention with rotary positions and an optional zero key.

  With `cache=(k_BxSxGxK, v_BxSxGxK)` the new keys and values are written at
  `positions_BxT` (contiguous per row) and the queries attend to every cache
  slot at or before their position; the updated cache is returned too.

  With `n_kv_heads` = G < H (grouped-query attention) the key and value
  projections have G heads (logical axis `kv_heads`), the cache stores G
  heads, and query head i reads key/value head `i // (H // G)`. With
  `positions='learned'` no rotary is applied (the positions were added to
  the embeddings). `model.attention` picks the softmax attention itself:
  `attention.zero_token_attention` (xla) or `attention.dot_product_attention`
  (the fused kernel, which has no zero-token margin).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, h, k = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
    g = cfg.resolved_kv_heads
    kv_axis = 'heads' if g == h else 'kv_heads'
    bias = lambda axis: (axis, 'kv') if cfg.qkv_bias else ()
    self.query = Projection(cfg, 'btd,dhk->bthk', (d, h, k),
                            ('embed', 'heads', 'kv'),
                            bias_axes=bias('heads'))
    kv_proj = functools.partial(Projection, cfg, 'btd,dhk->bthk', (d, g, k),
                                ('embed', kv_axis, 'kv'),
                                bias_axes=bias(kv_axis))
    self.key, self.value = kv_proj(), kv_proj()
    self.out = Projection(cfg, 'bthk,hkd->btd', (h, k, d),
                          ('heads', 'kv', 'embed'),
                          scale=1.0 / (2 * cfg.executed_layers) ** 0.5,
                          bias_axes=('embed',) if cfg.out_bias else ())

  def _rotary(self, x_BxTxHxK, positions_BxT):
    if self.cfg.positions != 'rope':
      return x_BxTxHxK
    return attention.rotary(x_BxTxHxK, positions_BxT, self.cfg.rope_theta)

  def queries(self, x_BxTxD, positions_BxT):
    """The queries of `x` as attention sees them (rotary applied)."""
    return self._rotary(self.query(x_BxTxD), positions_BxT)

  def kv(self, x_BxTxD, positions_BxT):
    """Rotary keys and the values of `x` (also what a KV cache stores),
    each [B, T, G, K]."""
    return (self._rotary(self.key(x_BxTxD), positions_BxT),
            self.value(x_BxTxD))

  def zero_key(self, zero_token):
    """The zero token's key per head [H, K]: the pool entry itself
    (`zero_key='key_space'`), or this layer's key projection of the pool's
    zero-token vector [D] (`projected`; no rotary: it has no position)."""
    if zero_token is None or self.cfg.zero_key == 'key_space':
      return zero_token
    key_GxK = self.key(zero_token[None, None].astype(
        DTYPES[self.cfg.dtype]))[0, 0]
    return jnp.repeat(key_GxK, self.cfg.n_heads // key_GxK.shape[0], axis=0)

  def __call__(self, x_BxTxD, zero_token, positions_BxT, cache=None):
    zero_key_HxK = self.zero_key(zero_token)
    q_BxTxHxK = self.queries(x_BxTxD, positions_BxT)
    k_BxTxGxK, v_BxTxGxK = self.kv(x_BxTxD, positions_BxT)
    if cache is None:
      key_positions_BxS = positions_BxT
    else:
      k_BxTxGxK, v_BxTxGxK = cache = attention.write_cache(
          cache, (k_BxTxGxK, v_BxTxGxK), positions_BxT[:, 0])
      key_positions_BxS = jnp.broadcast_to(
          jnp.arange(k_BxTxGxK.shape[1]), k_BxTxGxK.shape[:2])
    mask_BxTxS = attention.causal_mask(positions_BxT, key_positions_BxS)
    if self.is_mutable_collection('intermediates'):
      # What zero-key calibration reads (convert.py): the queries and the
      # log-sum-exp of their logits over the real keys.
      self.sow('intermediates', 'queries', q_BxTxHxK.astype(jnp.float32))
      self.sow('intermediates', 'key_lse', jax.nn.logsumexp(
          attention.logits(q_BxTxHxK, k_BxTxGxK, mask_BxTxS), -1
      ).transpose(0, 2, 1))
    if self.cfg.attention == 'dot_product':
      # The fused kernel; it masks by itself (no margin: None).
      out_BxTxHxK, a0_BxTxH, margin_BxTxH = attention.dot_product_attention(
          q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, zero_key_HxK,
          None if cache is None else positions_BxT,
          attention.fused_implementation(q_BxTxHxK.dtype))
    else:
      groups = self.cfg.n_heads // self.cfg.resolved_kv_heads
      if groups > 1:
        k_BxTxGxK, v_BxTxGxK = (jnp.repeat(a, groups, axis=2)
                                for a in (k_BxTxGxK, v_BxTxGxK))
      out_BxTxHxK, a0_BxTxH, margin_BxTxH = attention.zero_token_attention(
          q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxS, zero_key_HxK)
    zero = None if a0_BxTxH is None else ZeroStats(
        a0_BxTxH, attention.zero_log_weight(a0_BxTxH, mask_BxTxS),
        margin_BxTxH)
    return self.out(out_BxTxHxK), zero, cache


class Mlp(nn.Module):
  """SwiGLU (default) or GELU feed-forward block.

  GELU is the tanh approximation (GPT-2's `gelu_new`); `mlp_bias` adds
  biases to every projection (GPT-2).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg

    def dense(features, axes, scale=1.0, name=None):
      return nn.Dense(
          features, use_bias=cfg.mlp_bias, dtype=DTYPES[cfg.dtype],
          param_dtype=DTYPES[cfg.param_dtype],
          kernel_init=dense_init(cfg, axes, scale),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 axes[-1:]),
          name=name)

    f = cfg.resolved_d_ff
    up_BxTxF = dense(f, ('embed', 'mlp'), name='up')(x_BxTxD)
    if cfg.mlp == 'swiglu':
      gate_BxTxF = dense(f, ('embed', 'mlp'), name='gate')(x_BxTxD)
      h_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
    else:
      h_BxTxF = nn.gelu(up_BxTxF)
    h_BxTxF = nn.with_logical_constraint(
        h_BxTxF, ('activation_batch', 'activation_length', 'activation_mlp'))
    out_scale = 1.0 / (2 * cfg.executed_layers) ** 0.5
    return dense(cfg.d_model, ('mlp', 'embed'), out_scale,
                 name='down')(h_BxTxF)


class Block(nn.Module):
  """Pre-norm decoder layer.

  `__call__` returns `(x, (zero, cache))` whatever the config: `zero` the
  `ZeroStats` meaned over heads, [B, T] each (None without a zero key),
  `cache` the updated `(k, v)` (None without one). `hold = (done_BxT, h_BxTxD)` makes
  the done positions read `h` instead of `x` (the state propagation of
  tokens that exited, see `generate.forward`).
  """
  cfg: ModelConfig

  def setup(self):
    self.attn_norm = norm_layer(self.cfg)
    self.attn = Attention(self.cfg)
    self.mlp_norm = norm_layer(self.cfg)
    self.mlp = Mlp(self.cfg)
    self.drop = nn.Dropout(self.cfg.dropout)

  def kv(self, x_BxTxD, positions_BxT):
    """The keys and values this layer would cache for input `x`."""
    return self.attn.kv(self._normed(self.attn_norm, x_BxTxD), positions_BxT)

  def kv_carry(self, x_BxTxD, positions_BxT):
    """`(x, kv(x))`: the form a layer scan takes (every layer reads `x`)."""
    return x_BxTxD, self.kv(x_BxTxD, positions_BxT)

  def _normed(self, norm, x_BxTxD):
    return norm(x_BxTxD).astype(DTYPES[self.cfg.dtype])

  def __call__(self, x_BxTxD, zero_key_HxK, positions_BxT, cache=None,
               hold=None, deterministic=True):
    if hold is not None:
      done_BxT, h_BxTxD = hold
      x_BxTxD = jnp.where(done_BxT[..., None], h_BxTxD, x_BxTxD)
    h_BxTxD, zero, cache = self.attn(
        self._normed(self.attn_norm, x_BxTxD), zero_key_HxK, positions_BxT,
        cache)
    x_BxTxD = x_BxTxD + self.drop(h_BxTxD, deterministic=deterministic)
    h_BxTxD = self.mlp(self._normed(self.mlp_norm, x_BxTxD))
    x_BxTxD = x_BxTxD + self.drop(h_BxTxD, deterministic=deterministic)
    x_BxTxD = nn.with_logical_constraint(
        x_BxTxD, ('activation_batch', 'activation_length', 'activation_embed'))
    zero = jax.tree.map(lambda a: a.mean(-1), zero)
    return x_BxTxD, (zero, cache)


def remat_policy(name: str):
  """The `jax.checkpoint` policy for `config.model.remat_policy`."""
  return {
      'full': jax.checkpoint_policies.nothing_saveable,
      'dots': jax.checkpoint_policies.dots_saveable,
      'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class LayerStack(nn.Module):
  """`n_layers` distinct Blocks: an `nn.scan` over layers, or unrolled.

  Scanned params are stacked on a leading 'layers' axis under `layers`;
  unrolled ones are `layers_0`, `layers_1`, ... (see `convert_params`).
  Per-layer inputs and outputs (zero keys, KV cache, ZeroStats) carry a leading
  layer axis L either way.
  """
  cfg: ModelConfig
  n_layers: int

  def setup(self):
    cfg = self.cfg
    if self.n_layers == 0:
      return
    block = Block
    if cfg.remat_policy != 'none':
      # `deterministic` (argument 6, counting self) is a Python bool.
      block = nn.remat(Block, policy=remat_policy(cfg.remat_policy),
                       prevent_cse=not cfg.scan_layers, static_argnums=(6,))
    if cfg.scan_layers:
      common = dict(variable_axes={'params': 0, 'intermediates': 0},
                    split_rngs={'params': True, 'dropout': True},
                    length=self.n_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
      self.layers = nn.scan(block, methods={
          '__call__': dict(in_axes=(0, nn.broadcast, 0, nn.broadcast,
                                    nn.broadcast), **common),
          'kv_carry': dict(in_axes=(nn.broadcast,), **common)})(cfg)
    else:
      self.layers = [block(cfg) for _ in range(self.n_layers)]

  def __call__(self, x_BxTxD, zero_keys_LxHxK, positions_BxT, cache=None,
               hold=None, deterministic=True):
    """Returns `(x, (ZeroStats [L, B, T] or None, cache or None))`."""
    if self.n_layers == 0:
      return x_BxTxD, (None, cache)
    if self.cfg.scan_layers:
      return self.layers(x_BxTxD, zero_keys_LxHxK, positions_BxT, cache,
                         hold, deterministic)
    outs = []
    for i, layer in enumerate(self.layers):
      pick = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)
      x_BxTxD, out = layer(x_BxTxD, pick(zero_keys_LxHxK), positions_BxT,
                           pick(cache), hold, deterministic)
      outs.append(out)
    return x_BxTxD, stack_trees(outs)

  def kv(self, x_BxTxD, positions_BxT):
    """Every layer's `(k, v)` [L, B, T, G, K] when each layer reads `x`."""
    if self.cfg.scan_layers:
      return self.layers.kv_carry(x_BxTxD, positions_BxT)[1]
    return stack_trees([layer.kv(x_BxTxD, positions_BxT) for layer in self.layers])


def stack_trees(trees):
  """Stacks a list of equal pytrees on a new leading axis (None stays)."""
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)

