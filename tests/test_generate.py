"""Cached decoding, early exit and sampling against the full forward pass."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ztt_jax import generate
from ztt_jax import layers
from ztt_jax import lru
from ztt_jax import model
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax import ztt
from ztt_jax.errors import ConfigError

B, T, V = 2, 10, 48
# Cached and uncached paths sum in different orders: float32 round-off only.
ATOL = 2e-5


@functools.lru_cache(maxsize=None)
def _abstract_params(cfg):
  return params_lib.abstract_params(model.build(cfg))


def make(variant='ztt', **overrides):
  m = tiny.get_config(variant).model
  m.update(vocab_size=V, **overrides)
  cfg = model_config.ModelConfig.from_config(m)
  rng = np.random.default_rng(0)
  abstract = _abstract_params(cfg)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(
          ('scale' in str(path)) + 0.3 * rng.standard_normal(a.shape),
          a.dtype), abstract)
  return model.build(cfg), params


def tokens(seed=1, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def positions(b=B, t=T):
  return jnp.broadcast_to(jnp.arange(t), (b, t))


@functools.partial(jax.jit, static_argnums=(0,))
def full_forward(cfg, params, tokens_BxT):
  return model.build(cfg).apply({'params': params}, tokens_BxT)


def decode_all(net, params, tokens_BxT, prefill, rule=generate.ExitRule(),
               threshold=0.0):
  """Prefill `prefill` tokens, then feed the rest one at a time."""
  step = jax.jit(functools.partial(generate.forward, net, rule=rule),
                 donate_argnums=())
  cache = generate.init_cache(net.cfg, B, T)
  logits, cycles, cache = step(params, tokens_BxT[:, :prefill],
                               positions(B, prefill), cache,
                               threshold=jnp.float32(threshold))
  all_logits, all_cycles = [logits], [cycles]
  for t in range(prefill, T):
    logits, cycles, cache = step(params, tokens_BxT[:, t:t + 1],
                                 jnp.full((B, 1), t), cache,
                                 threshold=jnp.float32(threshold))
    all_logits.append(logits)
    all_cycles.append(cycles)
  return jnp.concatenate(all_logits, 1), jnp.concatenate(all_cycles, 1)


# Architectures that imported checkpoints use (convert.py): GPT-2 style
# (learned positions, LayerNorm, biases, GELU) and Llama style (grouped-query
# attention with a 2-head KV cache, untied head, other RMSNorm epsilon).
GPT2_STYLE = dict(positions='learned', max_seq_len=T + 2, norm='layernorm',
                  norm_eps=1e-5, qkv_bias=True, out_bias=True, mlp_bias=True,
                  mlp='gelu')
LLAMA_STYLE = dict(n_kv_heads=2, tie_embeddings=False, norm_eps=1e-5,
                   rope_theta=500_000.0)
PROJECTED = dict(zero_key='projected', n_kv_heads=2)


@pytest.mark.parametrize('variant, overrides', [
    *[(v, {}) for v in model_config.VARIANTS],
    ('ztt', GPT2_STYLE), ('vanilla', GPT2_STYLE),
    ('ztt', LLAMA_STYLE), ('head_tail_cycle', LLAMA_STYLE),
    ('ztt', PROJECTED),
], ids=lambda x: x if isinstance(x, str) else (
    'gpt2_style' if x is GPT2_STYLE else 'llama_style' if x is LLAMA_STYLE
    else 'projected_zero_key' if x else 'native'))
def test_forward_and_cached_decoding_match_the_model(variant, overrides):
  net, params = make(variant, **overrides)
  if net.cfg.n_kv_heads:
    cache = generate.init_cache(net.cfg, B, T)
    assert cache.mid[0].shape[-2] == net.cfg.n_kv_heads
  x = tokens()
  ref = full_forward(net.cfg, params, x).logits
  logits, cycles, _ = jax.jit(functools.partial(generate.forward, net))(
      params, x, positions())
  np.testing.assert_allclose(logits, ref, atol=ATOL)
  assert np.all(cycles == net.cfg.cycles)
  decoded, cycles = decode_all(net, params, x, prefill=4)
  np.testing.assert_allclose(decoded, ref, atol=ATOL)
  assert np.all(cycles == net.cfg.cycles)


@pytest.mark.parametrize('variant', ['ztt', 'head_tail_cycle'])
def test_unrolled_params_decode_the_same(variant):
  net, params = make(variant)
  unrolled = model.build(dataclasses.replace(net.cfg, scan_layers=False))
  unrolled_params = params_lib.convert_params(params, scan_layers=False)
  x = tokens()
  ref = full_forward(net.cfg, params, x).logits
  logits, _ = decode_all(unrolled, unrolled_params, x, prefill=4)
  np.testing.assert_allclose(logits, ref, atol=ATOL)
  out = generate.generate(unrolled, unrolled_params, [x[0, :4]], 3,
                          jax.random.key(0))
  greedy = generate.generate(net, params, [x[0, :4]], 3, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens_BxN, greedy.tokens_BxN)


def test_thresholds_never_and_always_met():
  net, params = make('ztt')
  x = tokens()
  out = full_forward(net.cfg, params, x)
  run = jax.jit(functools.partial(generate.forward, net, rule=generate.ExitRule(
      'zero_attention', 1)))
  never, cycles, _ = run(params, x, positions(), threshold=jnp.float32(2.0))
  np.testing.assert_allclose(never, out.logits, atol=ATOL)
  assert np.all(cycles == net.cfg.cycles)
  for min_cycles in (1, 2):
    rule = generate.ExitRule('zero_attention', min_cycles)
    always, cycles, _ = generate.forward(net, params, x, positions(),
                                         rule=rule, threshold=-1.0)
    assert np.all(cycles == min_cycles)
    np.testing.assert_allclose(always, out.cycle_logits[min_cycles - 1],
                               atol=ATOL)
  # Token-by-token decoding (and the prefill here) follows the same rule.
  _, cycles = decode_all(net, params, x, 3, generate.ExitRule('gate', 2), 1.0)
  assert np.all(cycles == 2)


@pytest.mark.parametrize('criterion',
                         ['zero_attention', 'zero_weight', 'zero_margin'])
def test_per_sequence_exit_freezes_only_exited_sequences(criterion):
  net, params = make('ztt')
  x = tokens()
  out = full_forward(net.cfg, params, x)
  stat_CxB = np.asarray(getattr(out, criterion).mean(-1))
  tau = float(stat_CxB[0].mean())  # Between the two sequences' statistics.
  rule = generate.ExitRule(criterion, 1)
  logits, cycles, _ = generate.forward(net, params, x, positions(), rule=rule,
                                       threshold=tau)
  for b in range(B):
    passed = np.nonzero(stat_CxB[:, b] >= tau)[0]
    c = net.cfg.cycles
    expected = min(passed[0] + 1 if len(passed) else c, c)
    assert np.all(cycles[b] == expected)
    np.testing.assert_allclose(logits[b], out.cycle_logits[expected - 1, b],
                               atol=ATOL)
  assert len(set(np.asarray(cycles[:, 0]).tolist())) == 2, stat_CxB


@functools.partial(jax.jit, static_argnums=0)  # One compile, not op by op.
def forced_cycles_reference(net, params, tokens_BxT, cycles_BxT):
  """An independent reference for per-token exits: one whole-sequence pass,
  no cache and no while_loop, layer by layer, in which token t runs exactly
  `cycles_BxT[t]` cycles and afterwards feeds its exit state to every later
  layer (what state propagation caches)."""
  cfg = net.cfg
  pos = positions()
  call = lambda method, *a: net.apply({'params': params}, *a, method=method)
  h = call(model.Transformer.embed_tokens, tokens_BxT, pos)
  h, _ = call(model.Transformer.head_stack, h, pos)
  mid = params['mid']
  pool = ztt.expand_pool(cfg, mid['zero_keys'])
  block = layers.Block(cfg)
  for c in range(cfg.cycles):
    running = (cycles_BxT > c)[..., None]
    y = h
    for i in range(cfg.mid_layers):
      layer = jax.tree.map(lambda a, i=i: a[i],
                           mid['cycle']['stack']['layers'])
      y, _ = block.apply({'params': layer}, jnp.where(running, y, h),
                         pool[c, i], pos)
    y, _ = ztt.apply_gate(cfg, h, y, mid['gate_w'][c], mid['gate_b'][c])
    h = jnp.where(running, y, h)
  return call(model.Transformer.exit_head, h, pos)[0]


def test_per_token_exit_propagates_state_into_the_cache():
  """Mixed per-token exits while decoding equal a whole-sequence pass in
  which each token runs exactly the cycles it ran while decoding and feeds
  its exit state to every later layer (state propagation)."""
  net, params = make('ztt', n_cycles=4)
  x = tokens()
  out = full_forward(net.cfg, params, x)
  tau = float(np.median(out.zero_attention[1]))
  rule = generate.ExitRule('zero_attention', 1)
  decoded, cycles = decode_all(net, params, x, 2, rule, tau)
  assert len(np.unique(cycles[:, 2:])) > 1, cycles  # Really mixed.
  reference = forced_cycles_reference(net, params, x, cycles)
  np.testing.assert_allclose(decoded, reference, atol=ATOL)
  # The forced-cycles mode of the real loop agrees too.
  forced, forced_cycles, _ = generate.forward(
      net, params, x, positions(), forced_cycles_BxT=cycles)
  np.testing.assert_array_equal(forced_cycles, cycles)
  np.testing.assert_allclose(forced, reference, atol=ATOL)
  # And propagation matters: without it the result differs.
  assert not np.allclose(decoded, out.logits, atol=1e-3)


def test_greedy_is_argmax_and_prompts_of_different_lengths_batch():
  net, params = make('ztt')
  prompts = [np.array([3, 1, 4]), np.array([1, 5, 9, 2, 6, 5])]
  both = generate.generate(net, params, prompts, 5, jax.random.key(0))
  for row, prompt in enumerate(prompts):
    alone = generate.generate(net, params, [prompt], 5, jax.random.key(0))
    np.testing.assert_array_equal(alone.tokens_BxN[0], both.tokens_BxN[row])
    seq = list(prompt)
    for token in both.tokens_BxN[row]:
      # Causal: padding after the sequence does not change its last logits.
      padded = jnp.asarray([seq + [0] * (16 - len(seq))])
      logits = full_forward(net.cfg, params, padded).logits
      assert int(jnp.argmax(logits[0, len(seq) - 1])) == token
      seq.append(int(token))
  assert np.all(both.cycles_BxN == net.cfg.cycles)


def test_sampling_is_reproducible_and_seeded():
  net, params = make('ztt')
  run = lambda seed, **kw: generate.generate(
      net, params, [np.array([1, 2])], 8, jax.random.key(seed),
      temperature=1.0, **kw).tokens_BxN
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))
  greedy = generate.generate(net, params, [np.array([1, 2])], 8,
                             jax.random.key(0)).tokens_BxN
  np.testing.assert_array_equal(run(3, top_k=1), greedy)
  np.testing.assert_array_equal(run(4, top_p=1e-6), greedy)


def test_generate_compiles_once_per_shape_and_setting(monkeypatch):
  monkeypatch.setattr(generate, '_COMPILED', lru.LRU(16))
  net, params = make('ztt')
  run = lambda prompt, n=4, seed=0: generate.generate(
      net, params, [np.array(prompt)], n, jax.random.key(seed),
      temperature=1.0)
  first, again = run([1, 2]), run([1, 2])
  assert len(generate._COMPILED) == 1
  assert again.compile_s < first.compile_s / 10, (first, again)
  np.testing.assert_array_equal(first.tokens_BxN, again.tokens_BxN)
  # Another seed reuses the program; another prompt length, max_new_tokens
  # or model compiles its own.
  assert not np.array_equal(run([1, 2], seed=1).tokens_BxN, first.tokens_BxN)
  assert len(generate._COMPILED) == 1
  run([1, 2, 3])
  run([1, 2], n=5)
  assert len(generate._COMPILED) == 3
  other, other_params = make('head_tail_cycle')
  generate.generate(other, other_params, [np.array([1, 2])], 4,
                    jax.random.key(0), temperature=1.0)
  assert len(generate._COMPILED) == 4


def test_end_token_stops_a_row():
  net, params = make('ztt')
  first = generate.generate(net, params, [np.array([1, 2])], 6,
                            jax.random.key(0)).tokens_BxN[0]
  end = int(first[2])
  out = generate.generate(net, params, [np.array([1, 2])], 6,
                          jax.random.key(0), end_id=end)
  stop = list(first).index(end)
  assert out.lengths_B[0] == stop + 1
  assert np.all(out.tokens_BxN[0, stop + 1:] == -1)
  assert np.all(out.cycles_BxN[0, stop + 1:] == 0)


def test_pick_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  seen = {int(generate.pick(logits, jax.random.key(s), 1.0, top_p=0.7)[0])
          for s in range(200)}
  assert seen == {0, 1}


@pytest.mark.parametrize('rule, message', [
    (generate.ExitRule('deep'), 'exit.criterion'),
    (generate.ExitRule('zero_attention', 0), 'exit.min_cycles'),
    (generate.ExitRule('fixed', 9), 'exit.min_cycles'),
])
def test_bad_exit_rules(rule, message):
  net, _ = make('ztt')
  with pytest.raises(ConfigError, match=message):
    rule.validate(net.cfg)


def test_zero_attention_exit_needs_zero_tokens():
  net, _ = make('head_tail_cycle')
  with pytest.raises(ConfigError, match='zero tokens'):
    generate.ExitRule('zero_attention').validate(net.cfg)


# --------------------------------------- model.attention='dot_product' --


def fused(net):
  return model.build(dataclasses.replace(net.cfg, attention='dot_product'))


@pytest.mark.parametrize('variant, overrides', [
    *[(v, {}) for v in model_config.VARIANTS], ('ztt', dict(n_kv_heads=2))],
    ids=lambda x: x if isinstance(x, str) else ('gqa' if x else 'mha'))
def test_dot_product_decoding_matches_the_xla_model(variant, overrides):
  """Prefill and token-by-token decoding through the KV cache with the fused
  kernel give the xla model's logits."""
  net, params = make(variant, **overrides)
  x = tokens()
  ref = full_forward(net.cfg, params, x).logits
  decoded, cycles = decode_all(fused(net), params, x, prefill=4)
  np.testing.assert_allclose(decoded, ref, atol=ATOL)
  assert np.all(cycles == net.cfg.cycles)


def cached_cycle_outputs(net, params, tokens_BxT, spans):
  """Every cycle's (state, zero_attention, zero_weight, zero_margin) for
  each span of positions fed through the cache in turn (a prefill, then
  single tokens), all cycles run; under jit."""
  call = lambda method, *a: net.apply({'params': params}, *a, method=method)
  cache = generate.init_cache(net.cfg, B, T)
  head, mid = cache.head, cache.mid
  outs = []
  for start, stop in spans:
    pos = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
    h = call(model.Transformer.embed_tokens, tokens_BxT[:, start:stop], pos)
    h, head = call(model.Transformer.head_stack, h, pos, head)
    for c in range(net.cfg.cycles):
      h, out = call(model.Transformer.one_cycle, h, c, pos,
                    jax.tree.map(lambda a, c=c: a[c], mid))
      mid = jax.tree.map(lambda full, new, c=c: full.at[c].set(new), mid,
                         out.cache)
      outs.append((h, out.zero_attention, out.zero_weight, out.zero_margin))
  return outs


def test_dot_product_decoding_gives_the_zero_statistics():
  """Through the cache (a prefill of 4, then two single tokens), every
  cycle's state, zero-token mass and log weight agree between the xla and
  the fused path (grouped-query); the fused path has no margin."""
  net, params = make('ztt', n_kv_heads=2)
  x = tokens()
  spans = ((0, 4), (4, 5), (5, 6))
  run = lambda net: jax.jit(functools.partial(
      cached_cycle_outputs, net, spans=spans))(params, x)
  ref, out = run(net), run(fused(net))
  assert len(out) == 3 * net.cfg.cycles
  for (h, mass, weight, margin), (h_ref, mass_ref, weight_ref, margin_ref) in (
      zip(out, ref)):
    assert margin is None and margin_ref is not None
    # States of norm 40-80 per token: float32 round-off relative to that.
    assert np.linalg.norm(h - h_ref) < 1e-5 * np.linalg.norm(h_ref)
    np.testing.assert_allclose(mass, mass_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weight, weight_ref, rtol=1e-5, atol=ATOL)


def test_zero_margin_exit_refuses_the_dot_product_path():
  net, _ = make('ztt', attention='dot_product')
  with pytest.raises(ConfigError, match="model.attention='dot_product'") as e:
    generate.ExitRule('zero_margin').validate(net.cfg)
  assert '\n' not in str(e.value) and 'attention=xla' in str(e.value)
  for criterion in ('zero_attention', 'zero_weight'):
    generate.ExitRule(criterion).validate(net.cfg)
