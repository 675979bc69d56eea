"""The Zero Token Transformer and its three baselines, in Flax Linen.

One code path serves every variant (`config.model.variant`):

  vanilla          head + mid + tail distinct layers, run once
  basic_cycle      all layers form one stack, run `n_cycles` times
  head_tail_cycle  head layers, middle stack run `n_cycles` times, tail layers
  ztt              as head_tail_cycle, plus a zero-token pool, a gate, and an
                   exit head after every cycle

`build(config.model)` returns the module; `module.apply({'params': p},
tokens_BxT)` returns a `ModelOutput`. See DESIGN.md for the readings of the
paper fixed here (pool indexing, gate form, exit-loss weights).

Axis names: B batch, T time, D model width, H heads, K head dim, F MLP width,
V vocab, C cycles, L layers in a stack.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ztt_jax import attention
from ztt_jax.errors import check

VARIANTS = ('vanilla', 'basic_cycle', 'head_tail_cycle', 'ztt')
ZERO_POOLS = ('none', 'cycle_layer', 'cycle', 'layer')
ZERO_KEYS = ('key_space', 'projected')
GATES = ('none', 'scalar', 'token')
EXIT_LOSSES = ('none', 'last', 'uniform', 'linear', 'final_heavy')
GATE_INPUTS = ('output', 'input')
EXIT_GRADS = ('full', 'detach')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
POSITIONS = ('rope', 'learned')
NORMS = ('rmsnorm', 'layernorm')
ATTENTIONS = ('xla', 'dot_product')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


# ----------------------------------------------------------------- config --


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Validated, hashable model settings (built from `config.model`).

  `zero_pool`, `gate` and `exit_loss` may be 'auto' in the ConfigDict: for
  `ztt` that means `cycle_layer`, `token`, `linear`; for the other variants
  `none`.

  The fields after `remat_policy` are the switches that importing a
  pretrained checkpoint needs (`convert.py`; GPT-2: learned positions,
  LayerNorm, biases, GELU; Llama: grouped-query attention, RMSNorm epsilon,
  untied head). Their defaults are the native architecture, with exactly the
  param tree it always had.
  """
  variant: str = 'ztt'
  vocab_size: int = 256
  d_model: int = 128
  n_heads: int = 4
  head_dim: int = 0  # 0: d_model // n_heads.
  d_ff: int = 0  # 0: a multiple of 32 near 8/3 * d_model (SwiGLU) or 4x.
  n_head_layers: int = 1
  n_mid_layers: int = 2
  n_tail_layers: int = 1
  n_cycles: int = 2
  zero_pool: str = 'cycle_layer'
  # key_space: the pool holds keys [.., H, K] used as they are (DESIGN.md).
  # projected: the pool holds zero-token vectors [.., D], keyed by each
  # layer's own key projection (an ablation of that reading).
  zero_key: str = 'key_space'
  gate: str = 'token'
  exit_loss: str = 'linear'
  mlp: str = 'swiglu'
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  rope_theta: float = 10_000.0
  init_std: float = 0.02
  zero_key_init_std: float = 0.02
  gate_bias_init: float = 3.0
  # What the token gate reads: the cycle's output y (`output`) or its input
  # h (`input`, DESIGN.md's prose).
  gate_input: str = 'output'
  # `detach`: exit heads before the last read the cycle state through
  # stop_gradient, so early exit losses train only the tail, final norm and
  # LM head, never the cycled stack, the pool or the gates.
  exit_grad: str = 'full'
  scan_layers: bool = True
  # How attention runs (same params, same outputs and zero-token mass):
  # xla: explicit float32 logits (attention.zero_token_attention), every
  # statistic; dot_product: jax.nn.dot_product_attention, cuDNN's fused
  # kernel on NVIDIA GPUs in bfloat16/float16 (attention.
  # dot_product_attention); no zero_margin (the kernel hides the max logit).
  attention: str = 'xla'
  remat_policy: str = 'none'
  # Training loss only (the model is the same): the exit heads before the
  # last score a random subset of this fraction of the positions, drawn per
  # step and shared by those heads; the last head scores every position.
  exit_loss_fraction: float = 1.0
  # Training loss only: > 0 computes the exit heads' cross-entropy over
  # chunks of this many positions, each chunk's float32 logits recomputed
  # in the backward pass, so no [B, T, V] logits are held; 0: whole.
  ce_chunk_len: int = 0
  n_kv_heads: int = 0  # 0: n_heads. Fewer: grouped-query attention.
  positions: str = 'rope'  # rope (rotary q/k) | learned (absolute table).
  max_seq_len: int = 0  # Rows of the learned position table.
  norm: str = 'rmsnorm'  # rmsnorm | layernorm (with bias).
  norm_eps: float = 1e-6  # Epsilon of every norm but the gate's.
  qkv_bias: bool = False  # Biases on the query, key and value projections.
  out_bias: bool = False  # Bias on the attention output projection.
  mlp_bias: bool = False  # Biases on the MLP projections.

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | dict | ModelConfig
                  ) -> ModelConfig:
    """Checks every field and resolves 'auto' settings; raises ConfigError."""
    if isinstance(cfg, ModelConfig):
      return cfg._validated()
    values = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    check(not unknown, f'config.model has unknown field(s) {unknown}; '
          f'valid fields are {sorted(known)}')
    variant = values.get('variant', cls.variant)
    check(variant in VARIANTS, f'model.variant={variant!r} is not one of '
          f'{VARIANTS}; pick one of them')
    is_ztt = variant == 'ztt'
    for name, auto in (('zero_pool', 'cycle_layer'), ('gate', 'token'),
                       ('exit_loss', 'linear')):
      if values.get(name, 'auto') == 'auto':
        values[name] = auto if is_ztt else 'none'
    return cls(**values)._validated()

  def _validated(self) -> ModelConfig:
    pos = lambda name: check(
        isinstance(getattr(self, name), int) and getattr(self, name) > 0,
        f'model.{name}={getattr(self, name)!r} must be a positive integer')
    nonneg = lambda name: check(
        isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
        f'model.{name}={getattr(self, name)!r} must be an integer >= 0')
    for name in ('vocab_size', 'd_model', 'n_heads', 'n_mid_layers',
                 'n_cycles'):
      pos(name)
    for name in ('n_head_layers', 'n_tail_layers', 'head_dim', 'd_ff',
                 'n_kv_heads', 'max_seq_len', 'ce_chunk_len'):
      nonneg(name)
    check(isinstance(self.exit_loss_fraction, (int, float))
          and 0 < self.exit_loss_fraction <= 1,
          f'model.exit_loss_fraction={self.exit_loss_fraction!r} must be in '
          '(0, 1]; 1 scores every position with every exit head')
    for name, allowed in (('zero_pool', ZERO_POOLS), ('gate', GATES),
                          ('zero_key', ZERO_KEYS),
                          ('exit_loss', EXIT_LOSSES),
                          ('gate_input', GATE_INPUTS),
                          ('exit_grad', EXIT_GRADS),
                          ('remat_policy', REMAT_POLICIES),
                          ('mlp', ('swiglu', 'gelu')),
                          ('dtype', tuple(DTYPES)),
                          ('param_dtype', tuple(DTYPES)),
                          ('positions', POSITIONS), ('norm', NORMS)):
      check(getattr(self, name) in allowed,
            f'model.{name}={getattr(self, name)!r} is not one of {allowed}')
    check(self.attention in ATTENTIONS,
          f'model.attention={self.attention!r} is not one of {ATTENTIONS}: '
          'xla (explicit logits, every statistic) or dot_product '
          '(jax.nn.dot_product_attention, cuDNN on NVIDIA GPUs)')
    if self.variant != 'ztt':
      for name in ('zero_pool', 'gate'):
        check(getattr(self, name) == 'none',
              f'model.{name}={getattr(self, name)!r} needs model.variant='
              f"'ztt' (got {self.variant!r}); set model.{name}=auto or none")
    if not self.head_dim:
      check(self.d_model % self.n_heads == 0,
            f'model.n_heads={self.n_heads} does not divide model.d_model='
            f'{self.d_model}; change one of them or set model.head_dim')
    check(self.positions != 'rope' or self.resolved_head_dim % 2 == 0,
          f'head dim {self.resolved_head_dim} must be even for rotary '
          'positions; change model.d_model, model.n_heads or model.head_dim')
    check(0.0 <= self.dropout < 1.0,
          f'model.dropout={self.dropout} must be in [0, 1)')
    check(self.n_heads % self.resolved_kv_heads == 0,
          f'model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads='
          f'{self.n_heads}; pick a divisor of n_heads (0: n_heads)')
    check(self.positions != 'learned' or self.max_seq_len > 0,
          "model.positions='learned' needs model.max_seq_len > 0 (the rows of "
          'the position table); set --config.model.max_seq_len')
    check(self.norm_eps > 0,
          f'model.norm_eps={self.norm_eps} must be positive')
    for name in ('qkv_bias', 'out_bias', 'mlp_bias'):
      check(isinstance(getattr(self, name), bool),
            f'model.{name}={getattr(self, name)!r} must be True or False')
    return self

  # Layer structure, after the variant is applied.
  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def resolved_d_ff(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.mlp == 'swiglu':
      return 32 * -(-int(8 * self.d_model / 3) // 32)
    return 4 * self.d_model

  @property
  def head_layers(self) -> int:
    return 0 if self.variant == 'basic_cycle' else self.n_head_layers

  @property
  def tail_layers(self) -> int:
    return 0 if self.variant == 'basic_cycle' else self.n_tail_layers

  @property
  def mid_layers(self) -> int:
    if self.variant == 'basic_cycle':
      return self.n_head_layers + self.n_mid_layers + self.n_tail_layers
    return self.n_mid_layers

  @property
  def cycles(self) -> int:
    return 1 if self.variant == 'vanilla' else self.n_cycles

  @property
  def exit_heads(self) -> bool:
    """Whether an exit head runs after every cycle."""
    return self.variant != 'vanilla' and self.exit_loss != 'none'

  @property
  def loss_from_features(self) -> bool:
    """Whether the training loss runs the LM head itself (on exit-head
    features; `exits.feature_losses`) instead of reading full logits."""
    return self.exit_loss_fraction < 1 or self.ce_chunk_len > 0

  @property
  def executed_layers(self) -> int:
    return self.head_layers + self.cycles * self.mid_layers + self.tail_layers


def exit_weights(cfg: ModelConfig) -> jax.Array:
  """Loss weights over cycles [C] for `config.model.exit_loss` (sum to 1):
  `last` (and `none`) the last head only, `uniform` all alike, `linear`
  cycle i gets i + 1, `final_heavy` the last head half, the others share
  the other half."""
  c = cfg.cycles
  if cfg.exit_loss in ('none', 'last') or not cfg.exit_heads:
    w_C = jnp.zeros((c,)).at[-1].set(1.0)
  elif cfg.exit_loss == 'uniform':
    w_C = jnp.ones((c,))
  elif cfg.exit_loss == 'final_heavy':
    w_C = jnp.ones((c,)).at[-1].set(c - 1)
  else:  # linear: cycle i gets weight i + 1.
    w_C = jnp.arange(1, c + 1, dtype=jnp.float32)
  return w_C / w_C.sum()


# ---------------------------------------------------------------- modules --


@flax.struct.dataclass
class ModelOutput:
  """What `apply` returns. Fields that a variant does not have are None;
  with `logits=False` the logits are None and `features` is set."""
  logits: jax.Array | None  # [B, T, V] float32, after the last cycle.
  # [C, B, T, V]: the exit head after every cycle; C = 1 (the last cycle
  # only) for a model without exit heads. cycle_logits[-1] == logits.
  cycle_logits: jax.Array | None
  zero_attention: jax.Array | None = None  # [C, B, T] mean over heads, layers.
  # [C, B, T]: log of the zero token's weight relative to the mean key
  # weight (attention.zero_log_weight), mean over heads and layers.
  zero_weight: jax.Array | None = None
  gate: jax.Array | None = None  # [C, B, T] gate value per cycle.
  # [C, B, T]: the zero token's logit minus the largest real-key logit
  # (attention.zero_token_attention), mean over heads and layers; None with
  # model.attention='dot_product' (the fused kernel hides that logit).
  zero_margin: jax.Array | None = None
  # [C, B, T, D]: what the LM head reads after every cycle (tail layers and
  # final norm applied); only with `logits=False`.
  features: jax.Array | None = None


@flax.struct.dataclass
class ZeroStats:
  """What a layer's attention reports about its zero token, per head or
  meaned: the softmax mass on it, its log weight relative to the mean key
  and its logit margin over the strongest key."""
  mass: jax.Array
  log_weight: jax.Array
  margin: jax.Array


def _dense_init(cfg: ModelConfig, axes: tuple[str, ...], scale: float = 1.0):
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
    kernel = self.param('kernel', _dense_init(self.cfg, self.axes, self.scale),
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
          kernel_init=_dense_init(cfg, axes, scale),
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
    return x_BxTxD, _stack(outs)

  def kv(self, x_BxTxD, positions_BxT):
    """Every layer's `(k, v)` [L, B, T, G, K] when each layer reads `x`."""
    if self.cfg.scan_layers:
      return self.layers.kv_carry(x_BxTxD, positions_BxT)[1]
    return _stack([layer.kv(x_BxTxD, positions_BxT) for layer in self.layers])


def _stack(trees):
  """Stacks a list of equal pytrees on a new leading axis (None stays)."""
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def apply_gate(cfg: ModelConfig, x_BxTxD, y_BxTxD, gate_w_D, gate_b):
  """`x + g * (y - x)` for this cycle's gate; returns `(state, g_BxT)`.

  `g = sigmoid(w . rmsnorm(y) + b)` per token (`token`; `rmsnorm(x)` with
  `gate_input='input'`), `sigmoid(b)` (`scalar`); with `gate='none'` the
  state is `y` and `g` is None.
  """
  if cfg.gate == 'none':
    return y_BxTxD, None
  if cfg.gate == 'scalar':
    logit_BxT = jnp.broadcast_to(gate_b, y_BxTxD.shape[:2])
  else:
    read = y_BxTxD if cfg.gate_input == 'output' else x_BxTxD
    r32 = read.astype(jnp.float32)
    r32 = r32 * jax.lax.rsqrt(jnp.mean(r32 * r32, -1, keepdims=True) + 1e-6)
    logit_BxT = r32 @ gate_w_D + gate_b
  g_BxT = jax.nn.sigmoid(logit_BxT)
  return x_BxTxD + (g_BxT[..., None] * (y_BxTxD - x_BxTxD)).astype(
      y_BxTxD.dtype), g_BxT


@flax.struct.dataclass
class CycleOutput:
  """What one cycle reports besides its output state."""
  zero_attention: jax.Array | None  # [B, T] mean over heads and layers.
  zero_weight: jax.Array | None  # [B, T] mean over heads and layers.
  gate: jax.Array | None  # [B, T].
  cache: Any = None  # This cycle's (k, v), each [L, B, S, G, K].
  zero_margin: jax.Array | None = None  # [B, T] mean over heads and layers.


class Cycle(nn.Module):
  """One pass of the shared middle stack, then the gate.

  `xs` holds this cycle's slice of the per-cycle inputs: `zero_keys` [L,H,K]
  (or None), `gate_w` [D] and `gate_b` [] (or None).
  """
  cfg: ModelConfig

  def setup(self):
    self.stack = LayerStack(self.cfg, self.cfg.mid_layers)

  def __call__(self, x_BxTxD, xs, positions_BxT, cache=None, hold=None,
               deterministic=True) -> tuple[jax.Array, CycleOutput]:
    y_BxTxD, (zero_L, cache) = self.stack(
        x_BxTxD, xs['zero_keys'], positions_BxT, cache, hold, deterministic)
    y_BxTxD, g_BxT = apply_gate(self.cfg, x_BxTxD, y_BxTxD, xs['gate_w'],
                                xs['gate_b'])
    zero = jax.tree.map(lambda a: a.mean(0), zero_L)
    return y_BxTxD, CycleOutput(
        zero_attention=None if zero is None else zero.mass,
        zero_weight=None if zero is None else zero.log_weight,
        gate=g_BxT, cache=cache,
        zero_margin=None if zero is None else zero.margin)


def expand_pool(cfg: ModelConfig, pool):
  """The stored Zero-Token Pool broadcast to [C, L, H, K] ([C, L, D] when
  projected; None stays None)."""
  if pool is None:
    return None
  if cfg.zero_pool == 'cycle':
    pool = pool[:, None]
  elif cfg.zero_pool == 'layer':
    pool = pool[None]
  return jnp.broadcast_to(pool, (cfg.cycles, cfg.mid_layers)
                          + zero_slot_shape(cfg))


def zero_slot_shape(cfg: ModelConfig) -> tuple[int, ...]:
  """One pool entry: a key [H, K], or a zero-token vector [D] when
  `zero_key='projected'`."""
  if cfg.zero_key == 'projected':
    return (cfg.d_model,)
  return (cfg.n_heads, cfg.resolved_head_dim)


class CycledMiddle(nn.Module):
  """The middle stack run `cycles` times with one shared set of weights.

  Owns the Zero-Token Pool and the per-cycle gate parameters; cycle c reads
  slice c of them (`cycle_inputs`). `__call__` runs every cycle (an
  `nn.scan` over cycles, or unrolled); `one_cycle` runs cycle c alone, c
  possibly traced (decoding's `while_loop`).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    c = cfg.cycles
    self.zero_keys = self.gate_b = self.gate_w = None
    if cfg.zero_pool != 'none':
      lead, lead_axes = {
          'cycle_layer': ((c, cfg.mid_layers), ('cycles', 'layers')),
          'cycle': ((c,), ('cycles',)),
          'layer': ((cfg.mid_layers,), ('layers',)),
      }[cfg.zero_pool]
      # A projected zero token starts at the scale of a normed hidden state.
      projected = cfg.zero_key == 'projected'
      slot_axes = ('embed',) if projected else ('heads', 'kv')
      std = 1.0 if projected else cfg.zero_key_init_std
      self.zero_keys = self.param(
          'zero_keys', nn.with_logical_partitioning(
              nn.initializers.normal(std), lead_axes + slot_axes),
          lead + zero_slot_shape(cfg), DTYPES[cfg.param_dtype])
    if cfg.gate != 'none':
      self.gate_b = self.param(
          'gate_b', nn.with_logical_partitioning(
              nn.initializers.constant(cfg.gate_bias_init), ('cycles',)),
          (c,), DTYPES[cfg.param_dtype])
    if cfg.gate == 'token':
      self.gate_w = self.param(
          'gate_w', nn.with_logical_partitioning(
              nn.initializers.zeros, ('cycles', 'embed')),
          (c, cfg.d_model), DTYPES[cfg.param_dtype])
    self.cycle = Cycle(cfg)

  def cycle_inputs(self) -> dict[str, jax.Array | None]:
    """Per-cycle inputs, each with a leading cycle axis C."""
    return {'zero_keys': expand_pool(self.cfg, self.zero_keys),
            'gate_w': self.gate_w, 'gate_b': self.gate_b}

  def one_cycle(self, x_BxTxD, c, positions_BxT, cache=None, hold=None,
                deterministic=True) -> tuple[jax.Array, CycleOutput]:
    """Cycle `c` (0-based) on state `x`; `cache` is that cycle's cache."""
    xs = jax.tree.map(lambda a: a[c], self.cycle_inputs())
    return self.cycle(x_BxTxD, xs, positions_BxT, cache, hold, deterministic)

  def kv(self, h_BxTxD, positions_BxT):
    """Each middle layer's `(k, v)` when it reads `h` (any cycle: the
    weights are shared, and zero keys do not enter keys or values)."""
    return self.cycle.stack.kv(h_BxTxD, positions_BxT)

  def __call__(self, x_BxTxD, positions_BxT, keep_states: bool,
               deterministic=True):
    """Every cycle. Returns `(x, states_CxBxTxD or None, CycleOutput with a
    leading C axis and no cache)`; the states (every cycle's output) only
    with `keep_states`."""
    cfg = self.cfg

    def body(cycle, x_BxTxD, xs):
      y_BxTxD, out = cycle(x_BxTxD, xs, positions_BxT, None, None,
                           deterministic)
      return y_BxTxD, (y_BxTxD if keep_states else None, out)

    xs = self.cycle_inputs()
    if cfg.scan_layers:
      # One set of weights for every cycle; slice c of xs is cycle c's.
      x_BxTxD, outs = nn.scan(
          body, variable_broadcast='params',
          variable_axes={'intermediates': 0},
          split_rngs={'params': False, 'dropout': True},
          length=cfg.cycles)(self.cycle, x_BxTxD, xs)
    else:
      # The same module instance called C times: Flax shares its params.
      outs = []
      for c in range(cfg.cycles):
        x_BxTxD, out = body(self.cycle, x_BxTxD,
                            jax.tree.map(lambda a, c=c: a[c], xs))
        outs.append(out)
      outs = _stack(outs)
    return (x_BxTxD, *outs)


def position_embed(cfg: ModelConfig) -> nn.Module:
  """The learned absolute position table [max_seq_len, D]."""
  return nn.Embed(
      cfg.max_seq_len, cfg.d_model, dtype=DTYPES[cfg.dtype],
      param_dtype=DTYPES[cfg.param_dtype],
      embedding_init=_dense_init(cfg, ('positions', 'embed')))


class Transformer(nn.Module):
  """Embedding, head layers, cycled middle, tail layers, exit heads.

  `__call__` is the whole-sequence pass (training, evaluation). The pieces
  it composes are methods too, for `apply(..., method=...)`: decoding with a
  KV cache and early exit (`generate.forward`) and zero-key calibration
  (`convert.py`) run exactly these modules.

    embed_tokens  token (+ position) embedding
    head_stack    the head layers
    one_cycle     cycle c of the middle stack, with its gate
    middle_kv     middle-layer keys/values for a given input (propagation)
    exit_head     tail layers, final norm and LM head: float32 logits

  A cache is `(k, v)`, each [L, B, S, G, K], per stack (`generate.Cache`).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        embedding_init=_dense_init(cfg, ('vocab', 'embed')))
    if cfg.positions == 'learned':
      self.pos_embed = position_embed(cfg)
    self.embed_drop = nn.Dropout(cfg.dropout)
    self.head = LayerStack(cfg, cfg.head_layers)
    self.mid = CycledMiddle(cfg)
    self.tail = LayerStack(cfg, cfg.tail_layers)
    self.final_norm = norm_layer(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=DTYPES[cfg.dtype],
          param_dtype=DTYPES[cfg.param_dtype],
          kernel_init=_dense_init(cfg, ('embed', 'vocab')))

  def embed_tokens(self, tokens_BxT, positions_BxT, deterministic=True):
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.positions == 'learned':
      x_BxTxD = x_BxTxD + self.pos_embed(positions_BxT)
    return self.embed_drop(x_BxTxD, deterministic=deterministic)

  def head_stack(self, x_BxTxD, positions_BxT, cache=None,
                 deterministic=True):
    """The head layers; returns `(x, cache)`."""
    x_BxTxD, (_, cache) = self.head(x_BxTxD, None, positions_BxT, cache,
                                    None, deterministic)
    return x_BxTxD, cache

  def one_cycle(self, x_BxTxD, c, positions_BxT, cache=None, hold=None):
    """Cycle `c` of the middle stack: `(state, CycleOutput)`."""
    return self.mid.one_cycle(x_BxTxD, c, positions_BxT, cache, hold)

  def middle_kv(self, h_BxTxD, positions_BxT):
    return self.mid.kv(h_BxTxD, positions_BxT)

  def exit_head(self, x_BxTxD, positions_BxT, cache=None,
                deterministic=True):
    """Tail layers, final norm and LM head: `(logits_BxTxV float32, cache)`.
    """
    h_BxTxD, cache = self.exit_features(x_BxTxD, positions_BxT, cache,
                                        deterministic)
    return self.lm_logits(h_BxTxD), cache

  def exit_features(self, x_BxTxD, positions_BxT, cache=None,
                    deterministic=True):
    """Tail layers and final norm: `(features_BxTxD, cache)`."""
    h_BxTxD, (_, cache) = self.tail(x_BxTxD, None, positions_BxT, cache,
                                    None, deterministic)
    return self.final_norm(h_BxTxD).astype(DTYPES[self.cfg.dtype]), cache

  def lm_logits(self, h_xD):
    """The LM head on exit features [..., D]: float32 logits [..., V]."""
    if self.cfg.tie_embeddings:
      logits_xV = self.embed.attend(h_xD)
    else:
      logits_xV = self.lm_head(h_xD)
    return logits_xV.astype(jnp.float32)

  def __call__(self, tokens_BxT, deterministic: bool = True,
               positions_BxT=None, logits: bool = True) -> ModelOutput:
    """The whole-sequence pass. `logits=False` stops before the LM head and
    returns every exit head's `features` instead (the training loss then
    runs `lm_logits` itself, `exits.feature_losses`)."""
    cfg = self.cfg
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      check(cfg.positions != 'learned' or t <= cfg.max_seq_len,
            f'a sequence of {t} tokens is longer than the learned position '
            f'table (model.max_seq_len={cfg.max_seq_len}); lower '
            'data.seq_len')
      positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    x_BxTxD = self.embed_tokens(tokens_BxT, positions_BxT, deterministic)
    x_BxTxD, _ = self.head_stack(x_BxTxD, positions_BxT, None, deterministic)
    x_BxTxD, ys_CxBxTxD, cycles_C = self.mid(
        x_BxTxD, positions_BxT, cfg.exit_heads, deterministic)

    # Exit heads: the tail, final norm and LM head after every cycle, run as
    # one batch of C*B sequences; without them only the last state is used.
    c = cfg.cycles if cfg.exit_heads else 1
    if cfg.exit_heads and cfg.exit_grad == 'detach':
      # Early heads only read the states; the last one trains everything.
      ys_CxBxTxD = jnp.concatenate([jax.lax.stop_gradient(ys_CxBxTxD[:-1]),
                                    ys_CxBxTxD[-1:]])
    h_NxTxD = (ys_CxBxTxD.reshape(c * b, t, -1) if cfg.exit_heads
               else x_BxTxD)
    f_NxTxD, _ = self.exit_features(
        h_NxTxD, jnp.tile(positions_BxT, (c, 1)), None, deterministic)
    out = ModelOutput(logits=None, cycle_logits=None,
                      zero_attention=cycles_C.zero_attention,
                      zero_weight=cycles_C.zero_weight, gate=cycles_C.gate,
                      zero_margin=cycles_C.zero_margin)
    if not logits:
      return out.replace(features=f_NxTxD.reshape(c, b, t, -1))
    logits_CxBxTxV = self.lm_logits(f_NxTxD).reshape(c, b, t, -1)
    chex.assert_shape(logits_CxBxTxV, (c, b, t, cfg.vocab_size))
    return out.replace(logits=logits_CxBxTxV[-1],
                       cycle_logits=logits_CxBxTxV)


def build(model_config: ml_collections.ConfigDict | ModelConfig) -> nn.Module:
  """The model for `config.model`; raises ConfigError on a bad setting."""
  return Transformer(ModelConfig.from_config(model_config))


# -------------------------------------------------------------- utilities --


def _init_fn(module: nn.Module, seq_len: int):
  tokens_1xT = jnp.zeros((1, seq_len), jnp.int32)
  return lambda rng: module.init(rng, tokens_1xT)['params']


def init_params(module: nn.Module, rng: jax.Array, seq_len: int = 8):
  """Unboxed params for `module`, initialised under jit (no sharding; the
  sharded path is `sharding.init_sharded`)."""
  return jax.jit(lambda r: nn.meta.unbox(_init_fn(module, seq_len)(r)))(rng)


def abstract_params(module: nn.Module, boxed: bool = False):
  """Param shapes and dtypes (`jax.ShapeDtypeStruct`), nothing allocated.

  With `boxed=True` the leaves stay `nn.Partitioned`, carrying logical axes.
  """
  tree = jax.eval_shape(_init_fn(module, 8), jax.random.key(0))
  return tree if boxed else nn.meta.unbox(tree)


def count_params(params: Any) -> int:
  """Distinct parameters: shared (cycled) weights are counted once."""
  return int(sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params))))


def flops_per_token(model_config, seq_len: int, training: bool = True
                    ) -> float:
  """Model FLOPs per token, counting every executed layer (cycles included).

  Matmuls cost 2 FLOPs per weight per token forward; attention adds
  `4 * T * H * K` per layer (scores and weighted sum over T keys, the
  causal half not discounted, as in PaLM's MFU formula); the LM head (and
  the tail) run once per exit head (in training, the LM heads before the
  last on `exit_loss_fraction` of the positions). `training=True` multiplies by 3
  (forward + backward).
  """
  cfg = ModelConfig.from_config(model_config)
  d, hk, f = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim, cfg.resolved_d_ff
  gk = cfg.resolved_kv_heads * cfg.resolved_head_dim
  layer = 2 * d * hk + 2 * d * gk + (3 if cfg.mlp == 'swiglu' else 2) * d * f
  heads = cfg.cycles if cfg.exit_heads else 1
  layers = (cfg.head_layers + cfg.cycles * cfg.mid_layers
            + heads * cfg.tail_layers)
  # The exit heads before the last score `exit_loss_fraction` of the
  # positions in training.
  lm_heads = 1 + (heads - 1) * (cfg.exit_loss_fraction if training else 1)
  zero = 1 if cfg.zero_pool != 'none' else 0
  # The zero key's logit and (projected) its key: per layer and cycle.
  zero_cost = 4 * hk + (2 * d * gk / seq_len
                        if cfg.zero_key == 'projected' else 0)
  fwd = (2 * layer * layers + 2 * d * cfg.vocab_size * lm_heads
         + 4 * hk * seq_len * layers
         + zero * zero_cost * cfg.cycles * cfg.mid_layers)
  return float(3 * fwd if training else fwd)


def convert_params(params: Any, scan_layers: bool) -> Any:
  """Converts params between scanned (`layers`, stacked) and unrolled
  (`layers_0`, `layers_1`, ...) layouts; the maths is the same."""
  if not isinstance(params, dict):
    return params
  out = {}
  unrolled = {}
  for name, value in params.items():
    match = re.fullmatch(r'layers_(\d+)', name)
    if match and scan_layers:
      unrolled[int(match.group(1))] = value
    elif name == 'layers' and not scan_layers:
      n = jax.tree.leaves(value)[0].shape[0]
      for i in range(n):
        out[f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[name] = convert_params(value, scan_layers)
  if unrolled:
    out['layers'] = jax.tree.map(
        lambda *a: jnp.stack(a), *[unrolled[i] for i in sorted(unrolled)])
  return out
