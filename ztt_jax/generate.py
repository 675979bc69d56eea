"""Inference under jit: KV-cached decoding through the cycles, early exit.

`forward` runs the model's own modules (`Transformer.embed_tokens`,
`head_stack`, `one_cycle`, `middle_kv`, `exit_head`, through
`module.apply(..., method=...)`), with the cycle loop as a
`jax.lax.while_loop` that stops early; scanned and unrolled params alike:

* whole-sequence evaluation (no cache): each sequence of a batch exits on
  its own; an exited sequence is frozen; the loop stops once every sequence
  has exited or C cycles have run.
* token-by-token decoding (with a cache): each new token exits on its own.
  The cache must still hold keys/values for the cycles a token skipped,
  since later tokens attend to them. We fill them by *state propagation*
  (as CALM does): a token that exited after cycle e keeps its hidden state
  h_e, and every middle layer of every later cycle caches the keys/values it
  would compute from h_e as its input. With shared middle weights these are
  the same for every skipped cycle, so they cost one K/V projection per
  middle layer, not a cycle.

When a row exits is `exits.ExitRule` (criteria and statistics: exits.py).
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ztt_jax
from ztt_jax import attention
from ztt_jax import exits
from ztt_jax import lru
from ztt_jax import model as model_lib
from ztt_jax import model_config
from ztt_jax import tokenizers
from ztt_jax.errors import check
from ztt_jax.exits import ExitRule

Transformer = model_lib.Transformer


class Cache(NamedTuple):
  """Keys and values per stack: (k, v), each [layers, B, S, G, K] (G: the
  key/value heads, `n_kv_heads`); the middle stack has a leading cycle axis
  [C, layers, B, S, G, K]."""
  head: Any
  mid: Any
  tail: Any


def init_cache(cfg: model_config.ModelConfig, batch: int, length: int) -> Cache:
  check(cfg.positions != 'learned' or length <= cfg.max_seq_len,
        f'prompt plus new tokens ({length}) exceed the learned position table '
        f'(model.max_seq_len={cfg.max_seq_len}); ask for fewer tokens')
  shape = (batch, length, cfg.resolved_kv_heads, cfg.resolved_head_dim)
  dtype = model_config.DTYPES[cfg.dtype]

  def zeros(*lead):
    return (jnp.zeros(lead + shape, dtype), jnp.zeros(lead + shape, dtype))

  return Cache(
      head=zeros(cfg.head_layers) if cfg.head_layers else None,
      mid=zeros(cfg.cycles, cfg.mid_layers),
      tail=zeros(cfg.tail_layers) if cfg.tail_layers else None)


def forward(module: model_lib.Transformer, params, tokens_BxT, positions_BxT,
            cache: Cache | None = None, rule: ExitRule = ExitRule(),
            threshold=0.0, forced_cycles_BxT=None):
  """The forward pass with the cycle loop as a `while_loop`.

  Args:
    module: the model (`model.build(config.model)`).
    params: its params (scanned or unrolled, as `module.cfg.scan_layers`).
    tokens_BxT: token ids.
    positions_BxT: their positions (contiguous per row).
    cache: a `Cache` to read and update, or None (whole sequences).
    rule: when rows stop cycling (exits.py).
    threshold: the rule's threshold (a traced float: no recompiles).
    forced_cycles_BxT: the cycles each position runs, instead of the rule
      (where > 0; 0 leaves it to the rule).

  Returns:
    `(logits_BxTxV, cycles_BxT, cache)`: logits from the exit state, the
    cycles every position ran, and the updated cache (None without one).
  """
  cfg = module.cfg

  def call(method, *args):
    return module.apply({'params': params}, *args, method=method)

  head_cache = mid_cache = tail_cache = None
  if cache is not None:
    head_cache, mid_cache, tail_cache = cache
  x_BxTxD = call(Transformer.embed_tokens, tokens_BxT, positions_BxT)
  x_BxTxD, head_cache = call(Transformer.head_stack, x_BxTxD, positions_BxT,
                             head_cache)
  done_BxT = jnp.zeros(tokens_BxT.shape, bool)
  cycles_BxT = jnp.zeros(tokens_BxT.shape, jnp.int32)
  prev_logits = (jnp.zeros(tokens_BxT.shape + (cfg.vocab_size,))
                 if rule.criterion == 'kl' else None)

  def still_running(carry):
    c, _, done_BxT, *_ = carry
    return (c < cfg.cycles) & ~jnp.all(done_BxT)

  def one_cycle(carry):
    c, x_BxTxD, done_BxT, cycles_BxT, mid_cache, prev_logits = carry
    cycle_cache = (None if mid_cache is None else
                   jax.tree.map(lambda a: a[c], mid_cache))
    # Exited rows feed their exit state to every layer (propagation).
    y_BxTxD, out = call(Transformer.one_cycle, x_BxTxD, c, positions_BxT,
                        cycle_cache, (done_BxT, x_BxTxD))
    x_BxTxD = jnp.where(done_BxT[..., None], x_BxTxD, y_BxTxD)
    logits = None
    if rule.criterion == 'kl':
      logits, _ = call(Transformer.exit_head, x_BxTxD, positions_BxT,
                       tail_cache)
    stat_BxT = exits.statistic(rule.criterion, out, logits, prev_logits)
    if rule.criterion == 'kl':  # No previous exit head before cycle 1.
      stat_BxT = jnp.where(c > 0, stat_BxT, jnp.inf)
      prev_logits = logits
    stop_BxT = rule.stops(c, stat_BxT, threshold, done_BxT.shape)
    if forced_cycles_BxT is not None:
      stop_BxT = jnp.where(forced_cycles_BxT > 0, c + 1 >= forced_cycles_BxT,
                           stop_BxT)
    cycles_BxT = jnp.where(done_BxT, cycles_BxT, c + 1)
    done_BxT = done_BxT | stop_BxT
    if mid_cache is not None:
      mid_cache = jax.tree.map(lambda full, new: full.at[c].set(new),
                               mid_cache, out.cache)
    return c + 1, x_BxTxD, done_BxT, cycles_BxT, mid_cache, prev_logits

  c_end, x_BxTxD, done_BxT, cycles_BxT, mid_cache, _ = jax.lax.while_loop(
      still_running, one_cycle,
      (jnp.int32(0), x_BxTxD, done_BxT, cycles_BxT, mid_cache, prev_logits))

  if mid_cache is not None:
    # Cycles nobody ran: fill from the exit states (state propagation).
    kv = call(Transformer.middle_kv, x_BxTxD, positions_BxT)
    starts_B = positions_BxT[:, 0]
    write = jax.vmap(attention.write_cache, in_axes=(0, 0, None))  # Layers.

    def fill(c, mid_cache):
      written = write(tuple(full[c] for full in mid_cache), kv, starts_B)
      return tuple(full.at[c].set(new) for full, new in zip(mid_cache, written))

    mid_cache = jax.lax.fori_loop(c_end, cfg.cycles, fill, mid_cache)

  logits_BxTxV, tail_cache = call(Transformer.exit_head, x_BxTxD,
                                  positions_BxT, tail_cache)
  new_cache = None if cache is None else Cache(head_cache, mid_cache,
                                               tail_cache)
  return logits_BxTxV, cycles_BxT, new_cache


# --------------------------------------------------------------- sampling --


def pick(logits_BxV, rng, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0):
  """Greedy when `temperature <= 0`, else top-k / top-p sampling."""
  if temperature <= 0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, -1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, -1)
    # Keep the smallest prefix whose mass reaches top_p (at least one).
    keep_BxV = jnp.cumsum(probs_BxV, -1) - probs_BxV < top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), -1,
                         keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, -1).astype(jnp.int32)


class Generation(NamedTuple):
  tokens_BxN: np.ndarray  # Generated ids; -1 after an end token.
  cycles_BxN: np.ndarray  # Cycles each generated token ran; 0 after the end.
  lengths_B: np.ndarray  # Generated tokens per row (end token included).
  compile_s: float = 0.0  # Tracing + XLA compile of the whole loop.
  run_s: float = 0.0  # Prefill + decode, after compilation.


@functools.partial(jax.jit, static_argnames=(
    'module', 'max_new_tokens', 'rule', 'temperature', 'top_k', 'top_p'))
def _generate(module, params, prompt_BxP, lengths_B, rng, threshold, end_id,
              max_new_tokens, rule, temperature, top_k, top_p):
  b, p = prompt_BxP.shape
  cache = init_cache(module.cfg, b, p + max_new_tokens)
  positions_BxP = jnp.broadcast_to(jnp.arange(p), (b, p))
  logits_BxPxV, _, cache = forward(module, params, prompt_BxP, positions_BxP,
                                   cache)
  logits_BxV = logits_BxPxV[jnp.arange(b), lengths_B - 1]
  tokens_BxN = jnp.full((b, max_new_tokens), -1, jnp.int32)
  cycles_BxN = jnp.zeros((b, max_new_tokens), jnp.int32)
  finished_B = jnp.zeros((b,), bool)

  def cond(carry):
    i, *_, finished_B = carry
    return (i < max_new_tokens) & ~jnp.all(finished_B)

  def body(carry):
    i, tokens_BxN, cycles_BxN, logits_BxV, cache, rng, finished_B = carry
    rng, key = jax.random.split(rng)
    next_B = pick(logits_BxV, key, temperature, top_k, top_p)
    tokens_BxN = tokens_BxN.at[:, i].set(jnp.where(finished_B, -1, next_B))
    logits_Bx1xV, cycles_Bx1, cache = forward(
        module, params, next_B[:, None], (lengths_B + i)[:, None], cache, rule,
        threshold)
    cycles_BxN = cycles_BxN.at[:, i].set(
        jnp.where(finished_B, 0, cycles_Bx1[:, 0]))
    finished_B = finished_B | (next_B == end_id)
    return (i + 1, tokens_BxN, cycles_BxN, logits_Bx1xV[:, 0], cache, rng,
            finished_B)

  _, tokens_BxN, cycles_BxN, *_ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), tokens_BxN, cycles_BxN, logits_BxV, cache, rng,
                   finished_B))
  return tokens_BxN, cycles_BxN


_COMPILED = lru.LRU(16)


def _compiled_generate(module, args, statics):
  """`_generate` compiled for these static settings and argument shapes,
  dtypes and placements: compiled once, then reused (the last 16), so a
  second call with the same shapes compiles nothing and reports
  `compile_s` as the time of the lookup."""
  leaves, treedef = jax.tree.flatten(args)
  key = (module, tuple(sorted(statics.items())), treedef, tuple(
      (a.shape, a.dtype, getattr(a, 'sharding', None)) for a in leaves))
  return _COMPILED.get(
      key, lambda: _generate.lower(module, *args, **statics).compile())


def generate(module: model_lib.Transformer, params, prompts,
             max_new_tokens: int,
             rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rule: ExitRule = ExitRule(),
             threshold: float = 0.0, end_id: int = -1) -> Generation:
  """Continues a batch of prompts (lists of ids, lengths may differ).

  Prompts are right-padded; every row writes and reads the cache at its own
  positions. The prompt itself always runs all cycles; generated tokens
  follow `rule`. Stops at `max_new_tokens` or once every row produced
  `end_id`.
  """
  rule = rule.validate(module.cfg)
  prompts = [np.asarray(x, np.int32).reshape(-1) for x in prompts]
  check(all(len(x) > 0 for x in prompts), 'every prompt needs at least one '
        'token; pass a non-empty prompt')
  lengths_B = np.array([len(x) for x in prompts], np.int32)
  prompt_BxP = np.zeros((len(prompts), lengths_B.max()), np.int32)
  for row, ids in enumerate(prompts):
    prompt_BxP[row, :len(ids)] = ids
  args = (params, prompt_BxP, lengths_B, rng, jnp.float32(threshold),
          jnp.int32(end_id))
  statics = dict(max_new_tokens=int(max_new_tokens), rule=rule,
                 temperature=float(temperature), top_k=int(top_k),
                 top_p=float(top_p))
  t0 = time.perf_counter()
  compiled = _compiled_generate(module, args, statics)
  t1 = time.perf_counter()
  tokens_BxN, cycles_BxN = jax.device_get(compiled(*args))
  t2 = time.perf_counter()
  return Generation(tokens_BxN, cycles_BxN, (tokens_BxN >= 0).sum(-1),
                    t1 - t0, t2 - t1)


@functools.partial(jax.jit, static_argnames=(
    'module', 'max_new_tokens', 'window', 'temperature', 'top_k'))
def _sample_windowed(module, params, prompt_1xP, rng, max_new_tokens, window,
                     temperature, top_k):
  p = prompt_1xP.shape[1]
  total = p + max_new_tokens
  tokens_1xN = jnp.zeros((1, max(total, window)), jnp.int32)
  tokens_1xN = tokens_1xN.at[:, :p].set(prompt_1xP)

  def step(i, carry):
    tokens_1xN, rng = carry
    start = jnp.maximum(i - window, 0)  # Slide once the window is full.
    x_1xW = jax.lax.dynamic_slice_in_dim(tokens_1xN, start, window, axis=1)
    logits_1xWxV = module.apply({'params': params}, x_1xW).logits
    logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xWxV, i - 1 - start,
                                              axis=1, keepdims=False)
    rng, key = jax.random.split(rng)
    next_1 = pick(logits_1xV, key, temperature, top_k)
    return tokens_1xN.at[:, i].set(next_1), rng

  tokens_1xN, _ = jax.lax.fori_loop(p, total, step, (tokens_1xN, rng))
  return tokens_1xN[0, p:total]


def sample(module, params, prompt_ids, max_new_tokens: int, rng: jax.Array,
           window: int, temperature: float = 0.8, top_k: int = 0
           ) -> np.ndarray:
  """Continues one prompt within a sliding `window` (the training seq_len).

  The reference sampler: a full forward over the window for every token, no
  cache, all cycles, positions never beyond what training saw.
  """
  prompt_1xP = jnp.asarray(np.asarray(prompt_ids, np.int32)[None, -window:])
  return np.asarray(_sample_windowed(
      module, params, prompt_1xP, rng, int(max_new_tokens), int(window),
      float(temperature), int(top_k)))


# ----------------------------------------------------------- ztt-generate --


def run_generate(workdir: str, prompt: str, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, exit_threshold: float | None = None,
                 exit_criterion: str = 'zero_attention', min_cycles: int = 1,
                 step: int | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 stream=None) -> Generation:
  """ztt-generate: continues `prompt` with a trained workdir's checkpoint,
  prints the text and the cycles it took, and returns the generation.

  `overrides` are set on the saved config (see `ztt_jax.load`).
  """
  stream = stream or sys.stdout
  check(max_new_tokens > 0,
        f'--max_new_tokens={max_new_tokens} must be positive')
  module, params, _ = ztt_jax.load(workdir, step, overrides)
  tokenizer = tokenizers.load_tokenizer(workdir)
  check(len(prompt) > 0, 'the prompt is empty; pass --prompt="some text"')
  ids = tokenizer.encode(prompt)
  rule = (ExitRule() if exit_threshold is None
          else ExitRule(exit_criterion, min_cycles))
  out = generate(module, params, [ids], max_new_tokens,
                 jax.random.key(seed), temperature, top_k, top_p, rule,
                 exit_threshold or 0.0)
  n = int(out.lengths_B[0])
  stream.write(prompt + tokenizer.decode(out.tokens_BxN[0, :n]) + '\n')
  mean_cycles = float(out.cycles_BxN[0, :n].mean())
  stream.write(f'--- {n} tokens, mean cycles per generated token '
               f'{mean_cycles:.2f} of {module.cfg.cycles}, '
               f'{n / out.run_s:.1f} tokens/s (compile {out.compile_s:.1f}s '
               'not counted)\n')
  return out
