"""The Transformer: embedding, head layers, cycled middle, tail, exit heads.

One code path serves every variant (`config.model.variant`):

  vanilla          head + mid + tail distinct layers, run once
  basic_cycle      all layers form one stack, run `n_cycles` times
  head_tail_cycle  head layers, middle stack run `n_cycles` times, tail layers
  ztt              as head_tail_cycle, plus a zero-token pool, a gate, and an
                   exit head after every cycle

`build(config.model)` returns the module; `module.apply({'params': p},
tokens_BxT)` returns a `ModelOutput`. The generic layers are `layers.py`,
the paper's own parts `ztt.py`, the settings `model_config.py`, param
utilities (init, count, FLOPs, layout) `params.py`; docs/DESIGN.md has the
readings of the paper fixed here.

Axis names: B batch, T time, D model width, H heads, K head dim, F MLP width,
V vocab, C cycles, L layers in a stack.
"""

from __future__ import annotations

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ztt_jax import layers
from ztt_jax import ztt
from ztt_jax.errors import check
from ztt_jax.model_config import DTYPES, ModelConfig


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



def position_embed(cfg: ModelConfig) -> nn.Module:
  """The learned absolute position table [max_seq_len, D]."""
  return nn.Embed(
      cfg.max_seq_len, cfg.d_model, dtype=DTYPES[cfg.dtype],
      param_dtype=DTYPES[cfg.param_dtype],
      embedding_init=layers.dense_init(cfg, ('positions', 'embed')))


class Transformer(nn.Module):
  """Embedding, head layers, cycled middle, tail layers, exit heads.

  `__call__` is the whole-sequence pass (training, evaluation). The pieces
  it composes are methods too, for `apply(..., method=...)`: decoding with a
  KV cache and early exit (`generate.forward`) and zero-key calibration
  (`ztt_jax.hf.calibrate`) run exactly these modules.

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
        embedding_init=layers.dense_init(cfg, ('vocab', 'embed')))
    if cfg.positions == 'learned':
      self.pos_embed = position_embed(cfg)
    self.embed_drop = nn.Dropout(cfg.dropout)
    self.head = layers.LayerStack(cfg, cfg.head_layers)
    self.mid = ztt.CycledMiddle(cfg)
    self.tail = layers.LayerStack(cfg, cfg.tail_layers)
    self.final_norm = layers.norm_layer(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=DTYPES[cfg.dtype],
          param_dtype=DTYPES[cfg.param_dtype],
          kernel_init=layers.dense_init(cfg, ('embed', 'vocab')))

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
