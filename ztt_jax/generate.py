"""Sampling under jit (reference path: the full forward at every step).

`sample` recomputes the window for every new token, so its cost grows with
the window; it is the simple, obviously-correct sampler used at the end of
training. Cached decoding with early exit is the inference issue's job.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _pick(logits_BxV, rng, temperature: float, top_k: int):
  if temperature <= 0:
    return jnp.argmax(logits_BxV, -1)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, -1)


@functools.partial(jax.jit, static_argnames=(
    'module', 'max_new_tokens', 'window', 'temperature', 'top_k'))
def _sample(module, params, prompt_BxP, rng, max_new_tokens, window,
            temperature, top_k):
  b, p = prompt_BxP.shape
  total = p + max_new_tokens
  tokens_BxN = jnp.zeros((b, max(total, window)), jnp.int32)
  tokens_BxN = tokens_BxN.at[:, :p].set(prompt_BxP)

  def step(i, carry):
    tokens_BxN, rng = carry
    start = jnp.maximum(i - window, 0)  # Slide once the window is full.
    x_BxW = jax.lax.dynamic_slice_in_dim(tokens_BxN, start, window, axis=1)
    logits_BxWxV = module.apply({'params': params}, x_BxW).logits
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, i - 1 - start,
                                              axis=1, keepdims=False)
    rng, key = jax.random.split(rng)
    next_B = _pick(logits_BxV, key, temperature, top_k).astype(jnp.int32)
    return tokens_BxN.at[:, i].set(next_B), rng

  tokens_BxN, _ = jax.lax.fori_loop(p, total, step, (tokens_BxN, rng))
  return tokens_BxN[:, p:total]


def sample(module, params, prompt_ids, max_new_tokens: int, rng: jax.Array,
           window: int, temperature: float = 0.8, top_k: int = 0
           ) -> np.ndarray:
  """Continues one prompt (a 1-D id array, at least one id); returns new ids.

  `window` is the context the model sees (its training `seq_len`).
  """
  prompt_1xP = jnp.asarray(np.asarray(prompt_ids, np.int32)[None, -window:])
  out = _sample(module, params, prompt_1xP, rng, int(max_new_tokens),
                int(window), float(temperature), int(top_k))
  return np.asarray(out[0])
