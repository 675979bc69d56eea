"""The paper's own parts, in the order it describes them.

ZTT (Li et al., arXiv 2502.12214) keeps distinct head and tail layers and
cycles only the middle stack. What it adds, each part below:

  1. the Zero-Token Pool: one trainable key per (cycle, middle layer), with
     a zero value, prepended to every attention in the cycled stack
     (`pool_spec`, `expand_pool`; `layers.Attention` reads it and reports
     its softmax mass a0, and `attention.zero_token_attention` is the maths);
  2. the gate after each cycle, `h <- h + g * (mid(h) - h)` (`apply_gate`);
  3. one cycle: the shared middle stack with cycle c's pool slice, then the
     gate (`Cycle`);
  4. the cycled middle: that cycle run C times with one set of weights, an
     `nn.scan` over cycles (`CycledMiddle`);
  5. the exit heads' loss weights over cycles (`exit_weights`); the heads
     themselves are the shared tail, final norm and LM head
     (`model.Transformer.exit_head`), and the early-exit rules that read a0
     are `exits.py`.

docs/DESIGN.md says how we read each part where the paper is silent.
Axis names: B batch, T time, D model width, H heads, K head dim, C cycles,
L layers in the middle stack.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax import layers
from ztt_jax.model_config import DTYPES, ModelConfig

# ------------------------------------------------- 1. the Zero-Token Pool --


def zero_slot_shape(cfg: ModelConfig) -> tuple[int, ...]:
  """One pool entry: a key [H, K], or a zero-token vector [D] when
  `zero_key='projected'` (each layer's key projection makes it a key)."""
  if cfg.zero_key == 'projected':
    return (cfg.d_model,)
  return (cfg.n_heads, cfg.resolved_head_dim)


def pool_spec(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """The stored pool's `(shape, logical axes)` for `model.zero_pool`:
  indexed by (cycle, layer), by cycle or by layer, then one slot."""
  lead, lead_axes = {
      'cycle_layer': ((cfg.cycles, cfg.mid_layers), ('cycles', 'layers')),
      'cycle': ((cfg.cycles,), ('cycles',)),
      'layer': ((cfg.mid_layers,), ('layers',)),
  }[cfg.zero_pool]
  slot_axes = ('embed',) if cfg.zero_key == 'projected' else ('heads', 'kv')
  return lead + zero_slot_shape(cfg), lead_axes + slot_axes


def expand_pool(cfg: ModelConfig, pool):
  """The stored pool broadcast to [C, L, H, K] ([C, L, D] when projected;
  None stays None): cycle c, layer l reads entry [c, l]."""
  if pool is None:
    return None
  if cfg.zero_pool == 'cycle':
    pool = pool[:, None]
  elif cfg.zero_pool == 'layer':
    pool = pool[None]
  return jnp.broadcast_to(pool, (cfg.cycles, cfg.mid_layers)
                          + zero_slot_shape(cfg))


# ------------------------------------------------------------- 2. the gate --


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


# ------------------------------------------------------------ 3. one cycle --


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
    self.stack = layers.LayerStack(self.cfg, self.cfg.mid_layers)

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


# --------------------------------------------------- 4. the cycled middle --


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
    dtype = DTYPES[cfg.param_dtype]
    self.zero_keys = self.gate_b = self.gate_w = None
    if cfg.zero_pool != 'none':
      shape, axes = pool_spec(cfg)
      # A projected zero token starts at the scale of a normed hidden state.
      std = 1.0 if cfg.zero_key == 'projected' else cfg.zero_key_init_std
      self.zero_keys = self.param(
          'zero_keys', nn.with_logical_partitioning(
              nn.initializers.normal(std), axes), shape, dtype)
    if cfg.gate != 'none':
      self.gate_b = self.param(
          'gate_b', nn.with_logical_partitioning(
              nn.initializers.constant(cfg.gate_bias_init), ('cycles',)),
          (c,), dtype)
    if cfg.gate == 'token':
      self.gate_w = self.param(
          'gate_w', nn.with_logical_partitioning(
              nn.initializers.zeros, ('cycles', 'embed')),
          (c, cfg.d_model), dtype)
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
      outs = layers.stack_trees(outs)
    return (x_BxTxD, *outs)


# ----------------------------------------------------- 5. the exit heads --


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
