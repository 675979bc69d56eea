"""Param utilities: init, abstract shapes, counts, FLOPs, layer layouts.

Axis names: B batch, T time, D model width, H heads, K head dim, V vocab.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ztt_jax.model_config import ModelConfig


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