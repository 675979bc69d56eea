"""Import a pretrained Hugging Face checkpoint (GPT-2 or Llama family) as ZTT.

    ztt-convert --hf_dir=DIR --workdir=OUT --variant=ztt \
        --n_head_layers=1 --n_mid_layers=2 --n_tail_layers=1 --n_cycles=3
    ztt-train --config=configs/finetune.py:OUT --workdir=runs/ft

Reads a local directory as `save_pretrained` writes it (`config.json` plus
`*.safetensors`, sharded or not; `pytorch_model.bin` too when torch is
installed), never the network. Supported `model_type`s: `gpt2` and the Llama
family `llama`, `mistral` (without sliding window), `qwen2`.

What goes where (L pretrained layers, head a, tail b, middle stack K):

  embeddings, positions, final norm, LM head -> the same ZTT params
  layers 0 .. a-1                            -> head layers
  layers L-b .. L-1                          -> tail layers
  the R = L-a-b layers in between are *replaced* by the shared middle
  stack of K <= R layers (`--mid_init`):
    block    stack layer k = replaced layer k (the first K of them)
    average  stack layer k = mean of replaced layers k, k+K, k+2K, ...

`--variant=vanilla` with every layer kept (the default split for vanilla)
is the pretrained model itself; tests check its logits equal the
`transformers` ones. For `basic_cycle` every layer is replaced (no head or
tail). For `ztt`, the new parameters start so that the zero tokens and the
gate barely change the head_tail_cycle function the weights define:

  zero keys (`--zero_init=suppress`, default): for each pool slot and head,
    k0 = -r * (mean query direction), the queries taken from a forward pass
    of the head_tail_cycle equivalent on `--calib_data` (default: byte
    windows of the Python standard library's sources); r is the smallest
    norm on a grid whose mean zero-token mass on those tokens is at most
    `--zero_mass` (else the norm with the least mass; r = 0 is on the grid).
    `zero` gives k0 = 0 (mass 1 / (1 + sum_s exp(logit_s)): about 1/(t+2) at
    position t when logits are small); `random` the model's usual init.
  gate: bias `--gate_bias` (default 6: g = 0.9975) and zero weights.

The result is `OUT/checkpoints/0/` (Orbax `params` and `config`, readable by
`ztt_jax.load(OUT)`) and `OUT/convert.json`, which records the layer map and
the measured zero-token mass, gate and logit change. `ztt-train` starts from
it through `config.init_from` (see `configs/finetune.py`): params from OUT,
fresh optimizer state, a new workdir.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ztt_jax import checkpoint
from ztt_jax import configlib
from ztt_jax import data
from ztt_jax import model as model_lib
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError, check

MODEL_TYPES = ('gpt2', 'llama', 'mistral', 'qwen2')
MID_INITS = ('block', 'average')
ZERO_INITS = ('suppress', 'zero', 'random')
# Calibration batch for the zero keys and the report (--calib_data).
CALIB_BATCH, CALIB_LEN = 8, 64
# Candidate zero-key norms for --zero_init=suppress.
_RADII = np.concatenate([[0.0], 2.0 ** np.arange(-2, 11)])
# Model fields that may differ between the converted model and a fine-tune
# config: they do not change the params (how the maths runs, or init only).
_FREE_FIELDS = ('scan_layers', 'remat_policy', 'dropout', 'dtype', 'init_std',
                'zero_key_init_std', 'gate_bias_init')


# ------------------------------------------------------------ HF reading --


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """`config.json` of a Hugging Face model directory."""
  check(os.path.isdir(hf_dir), f'--hf_dir={hf_dir!r}: no such directory; '
        'pass a local directory written by save_pretrained')
  path = os.path.join(hf_dir, 'config.json')
  check(os.path.isfile(path), f'{path}: no such file; --hf_dir must hold a '
        'Hugging Face config.json (save_pretrained writes one)')
  try:
    with open(path, encoding='utf-8') as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise ConfigError(f'{path} is not valid JSON; restore the file from the '
                      'original checkpoint') from None
  check(isinstance(hf, dict), f'{path} must hold a JSON object')
  return hf


def architecture(hf: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
  """`(family, n_layers, model fields)` for a HF config; ConfigError when
  the architecture has something the ZTT model cannot express."""
  kind = hf.get('model_type')
  check(kind in MODEL_TYPES, f'model_type={kind!r} in config.json is not '
        f'supported; ztt-convert reads {", ".join(MODEL_TYPES)}')
  if kind == 'gpt2':
    return 'gpt2', int(hf['n_layer']), _gpt2_fields(hf)
  return 'llama', int(hf['num_hidden_layers']), _llama_fields(hf, kind)


def _unsupported(kind, what, fix='use a checkpoint without it'):
  raise ConfigError(f'this {kind} checkpoint uses {what}, which ZTT cannot '
                    f'express; {fix}')


def _gpt2_fields(hf):
  d, h = int(hf['n_embd']), int(hf['n_head'])
  act = hf.get('activation_function', 'gelu_new')
  if act not in ('gelu_new', 'gelu_pytorch_tanh'):
    _unsupported('gpt2', f'activation_function={act!r} (ZTT has the tanh '
                 'GELU, gelu_new)')
  if not hf.get('scale_attn_weights', True):
    _unsupported('gpt2', 'scale_attn_weights=false')
  if hf.get('scale_attn_by_inverse_layer_idx', False):
    _unsupported('gpt2', 'scale_attn_by_inverse_layer_idx=true')
  if hf.get('add_cross_attention', False):
    _unsupported('gpt2', 'cross-attention')
  check(d % h == 0, f'gpt2 config: n_head={h} does not divide n_embd={d}; '
        'fix config.json')
  return dict(
      vocab_size=int(hf['vocab_size']), d_model=d, n_heads=h, head_dim=d // h,
      d_ff=int(hf.get('n_inner') or 4 * d), mlp='gelu', positions='learned',
      max_seq_len=int(hf['n_positions']), norm='layernorm',
      norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), qkv_bias=True,
      out_bias=True, mlp_bias=True,
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def _llama_fields(hf, kind):
  d, h = int(hf['hidden_size']), int(hf['num_attention_heads'])
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    _unsupported(kind, f'hidden_act={act!r} (ZTT has SwiGLU with silu)')
  rope = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling')
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if scaling or rope_type != 'default':
    _unsupported(kind, f'rope scaling ({scaling or rope_type!r})',
                 'only plain rotary positions (rope_type default) convert')
  theta = float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  if kind == 'mistral' and hf.get('sliding_window') is not None:
    _unsupported(kind, f'sliding-window attention (sliding_window='
                 f'{hf["sliding_window"]})')
  if kind == 'qwen2' and (hf.get('use_sliding_window') or any(
      t != 'full_attention' for t in hf.get('layer_types') or ())):
    _unsupported(kind, 'sliding-window attention (use_sliding_window)')
  attn_bias = bool(hf.get('attention_bias', False))
  return dict(
      vocab_size=int(hf['vocab_size']), d_model=d, n_heads=h,
      n_kv_heads=int(hf.get('num_key_value_heads') or h),
      head_dim=int(hf.get('head_dim') or d // h),
      d_ff=int(hf['intermediate_size']), mlp='swiglu', positions='rope',
      rope_theta=theta, norm='rmsnorm',
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      qkv_bias=True if kind == 'qwen2' else attn_bias,
      out_bias=False if kind == 'qwen2' else attn_bias,
      mlp_bias=bool(hf.get('mlp_bias', False)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': jnp.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
    'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of one `.safetensors` file (memory-mapped, zero-copy).

  The format: an 8-byte little-endian header length, a JSON header
  `{name: {dtype, shape, data_offsets: [begin, end]}}`, then the raw
  little-endian data (offsets relative to the end of the header).
  """
  data = np.memmap(path, dtype=np.uint8, mode='r')
  bad = f'{path} is not a valid safetensors file; re-save the model'
  check(len(data) >= 8, bad)
  n = int(np.frombuffer(data[:8].tobytes(), '<u8')[0])
  check(8 + n <= len(data), bad)
  try:
    header = json.loads(data[8:8 + n].tobytes())
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise ConfigError(bad) from None
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(info['dtype'])
    check(dtype is not None, f'{path}: tensor {name!r} has dtype '
          f'{info["dtype"]}, which ztt-convert cannot read; save it as float')
    begin, end = info['data_offsets']
    shape = tuple(info['shape'])
    check(end - begin == int(np.prod(shape)) * np.dtype(dtype).itemsize
          and 8 + n + end <= len(data), bad)
    out[name] = data[8 + n + begin:8 + n + end].view(dtype).reshape(shape)
  return out


def load_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor in `hf_dir`'s weight files, by its Hugging Face name."""
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
    files = [os.path.join(hf_dir, name) for name in names]
    missing = [p for p in files if not os.path.isfile(p)]
    check(not missing, f'{missing[0]} (listed in {index}) does not exist; '
          'copy every shard of the checkpoint into --hf_dir')
  else:
    files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if files:
    weights = {}
    for path in files:
      weights.update(read_safetensors(path))
    return weights
  bin_path = os.path.join(hf_dir, 'pytorch_model.bin')
  check(os.path.isfile(bin_path), f'{hf_dir} holds no weights (no '
        '*.safetensors, no pytorch_model.bin); copy the model files there')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f'{bin_path} needs torch to read; pip install torch, or '
                      're-save the model as safetensors') from None
  state = torch.load(bin_path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


class _Weights:
  """Takes tensors by name with shape checks; reports what is left over."""

  def __init__(self, hf_dir: str, kind: str, weights: dict[str, np.ndarray]):
    self.hf_dir, self.kind, self.weights = hf_dir, kind, dict(weights)

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    check(name in self.weights, f'{self.hf_dir}: tensor {name!r} is missing; '
          f'the weight files do not hold the {self.kind} model config.json '
          'describes (copy every weight file, or fix config.json)')
    value = self.weights.pop(name)
    check(tuple(value.shape) == tuple(shape), f'{self.hf_dir}: tensor '
          f'{name!r} has shape {tuple(value.shape)} but config.json implies '
          f'{tuple(shape)}; the weights and config.json do not belong together')
    return np.asarray(value, np.float32)

  def drop(self, predicate) -> None:
    for name in [n for n in self.weights if predicate(n)]:
      del self.weights[name]

  def check_consumed(self) -> None:
    left = sorted(self.weights)
    check(not left, f'{self.hf_dir}: {len(left)} tensor(s) that the '
          f'{self.kind} model config.json describes does not use, e.g. '
          f'{left[:3]}; pass a *ForCausalLM / *LMHeadModel checkpoint whose '
          'config.json matches its weights')


def _with_lm_head(w: _Weights, cfg, top):
  """`top` plus the untied LM head [D, V]; a tied model drops any copy."""
  if cfg.tie_embeddings:
    w.drop(lambda n: n == 'lm_head.weight')
  else:
    top['lm_head'] = {'kernel': w.take('lm_head.weight',
                                       (cfg.vocab_size, cfg.d_model)).T}
  return top


def _gpt2_layers(w: _Weights, cfg, n_layers):
  d, h, k = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
  f = cfg.resolved_d_ff
  pre = 'transformer.' if any(n.startswith('transformer.')
                              for n in w.weights) else ''
  # Causal-mask buffers of older checkpoints; tied head copies.
  w.drop(lambda n: n.endswith(('.attn.bias', '.attn.masked_bias'))
         and w.weights[n].ndim == 4)
  norm = lambda p: {'scale': w.take(p + '.weight', (d,)),
                    'bias': w.take(p + '.bias', (d,))}
  layers = []
  for i in range(n_layers):
    p = f'{pre}h.{i}.'
    qkv = w.take(p + 'attn.c_attn.weight', (d, 3 * d))  # Conv1D: [in, out].
    qkv_b = w.take(p + 'attn.c_attn.bias', (3 * d,))
    attn = {name: {'kernel': qkv[:, j * d:(j + 1) * d].reshape(d, h, k),
                   'bias': qkv_b[j * d:(j + 1) * d].reshape(h, k)}
            for j, name in enumerate(('query', 'key', 'value'))}
    attn['out'] = {
        'kernel': w.take(p + 'attn.c_proj.weight', (d, d)).reshape(h, k, d),
        'bias': w.take(p + 'attn.c_proj.bias', (d,))}
    layers.append({
        'attn_norm': norm(p + 'ln_1'), 'attn': attn,
        'mlp_norm': norm(p + 'ln_2'),
        'mlp': {'up': {'kernel': w.take(p + 'mlp.c_fc.weight', (d, f)),
                       'bias': w.take(p + 'mlp.c_fc.bias', (f,))},
                'down': {'kernel': w.take(p + 'mlp.c_proj.weight', (f, d)),
                         'bias': w.take(p + 'mlp.c_proj.bias', (d,))}}})
  top = {'embed': {'embedding': w.take(pre + 'wte.weight',
                                       (cfg.vocab_size, d))},
         'pos_embed': {'embedding': w.take(pre + 'wpe.weight',
                                           (cfg.max_seq_len, d))},
         'final_norm': norm(pre + 'ln_f')}
  return _with_lm_head(w, cfg, top), layers


def _llama_layers(w: _Weights, cfg, n_layers):
  d, h, k = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
  f = cfg.resolved_d_ff
  g = cfg.resolved_kv_heads
  w.drop(lambda n: n.endswith('rotary_emb.inv_freq'))

  def linear(name, heads, bias):
    # torch Linear stores [out, in]; q/k/v outputs are laid out per head.
    out = {'kernel': w.take(name + '.weight', (heads * k, d)).T.reshape(
        d, heads, k)}
    if bias:
      out['bias'] = w.take(name + '.bias', (heads * k,)).reshape(heads, k)
    return out

  def dense(name, n_in, n_out):
    out = {'kernel': w.take(name + '.weight', (n_out, n_in)).T}
    if cfg.mlp_bias:
      out['bias'] = w.take(name + '.bias', (n_out,))
    return out

  layers = []
  for i in range(n_layers):
    p = f'model.layers.{i}.'
    attn = {'query': linear(p + 'self_attn.q_proj', h, cfg.qkv_bias),
            'key': linear(p + 'self_attn.k_proj', g, cfg.qkv_bias),
            'value': linear(p + 'self_attn.v_proj', g, cfg.qkv_bias),
            'out': {'kernel': w.take(p + 'self_attn.o_proj.weight',
                                     (d, h * k)).T.reshape(h, k, d)}}
    if cfg.out_bias:
      attn['out']['bias'] = w.take(p + 'self_attn.o_proj.bias', (d,))
    layers.append({
        'attn_norm': {'scale': w.take(p + 'input_layernorm.weight', (d,))},
        'attn': attn,
        'mlp_norm': {'scale': w.take(p + 'post_attention_layernorm.weight',
                                     (d,))},
        'mlp': {'gate': dense(p + 'mlp.gate_proj', d, f),
                'up': dense(p + 'mlp.up_proj', d, f),
                'down': dense(p + 'mlp.down_proj', f, d)}})
  top = {'embed': {'embedding': w.take('model.embed_tokens.weight',
                                       (cfg.vocab_size, d))},
         'final_norm': {'scale': w.take('model.norm.weight', (d,))}}
  return _with_lm_head(w, cfg, top), layers


# ------------------------------------------------------------ conversion --


def _stack(layers):
  return jax.tree.map(lambda *a: np.stack(a), *layers)


def layer_split(variant: str, n_layers: int, n_head_layers=None,
                n_mid_layers=None, n_tail_layers=None, n_cycles=None
                ) -> dict[str, int]:
  """The head/mid/tail/cycles fields, defaults filled in.

  vanilla keeps every layer (1 head, L-2 middle, 1 tail); basic_cycle cycles
  one stack (no head or tail); head_tail_cycle and ztt take 1 head and 1
  tail layer and 2 cycles of (L-2)//2 middle layers unless told otherwise.
  """
  cycled_all = variant == 'basic_cycle'
  ends = 0 if cycled_all or n_layers < 3 else 1
  a = ends if n_head_layers is None else n_head_layers
  b = ends if n_tail_layers is None else n_tail_layers
  c = 1 if variant == 'vanilla' else (2 if n_cycles is None else n_cycles)
  check(a >= 0 and b >= 0, f'--n_head_layers={a} and --n_tail_layers={b} '
        'must be >= 0')
  check(c >= 1, f'--n_cycles={c} must be >= 1')
  # basic_cycle folds head and tail into the one cycled stack.
  extra = a + b if cycled_all else 0
  replaced = n_layers if cycled_all else n_layers - a - b
  check(replaced >= 1, f'--n_head_layers={a} and --n_tail_layers={b} leave no '
        f'layer of the {n_layers} for the middle stack; use fewer')
  if n_mid_layers is None:
    n_mid_layers = (replaced if variant == 'vanilla'
                    else max(1, replaced // c)) - extra
  check(n_mid_layers >= 1 and n_mid_layers + extra <= replaced,
        f'--n_mid_layers={n_mid_layers} must be between 1 and '
        f'{replaced - extra}: the stack starts from the {replaced} replaced '
        f'layers (the model has {n_layers}, head {a}, tail {b}); change it')
  return dict(n_head_layers=a, n_mid_layers=n_mid_layers, n_tail_layers=b,
              n_cycles=c)


def build_params(cfg: model_config.ModelConfig, top, layers, mid_init: str):
  """ZTT params (scanned layout, no zero keys or gate yet) and the layer map."""
  check(mid_init in MID_INITS, f'--mid_init={mid_init!r} is not one of '
        f'{MID_INITS}')
  n = len(layers)
  a, k, b = cfg.head_layers, cfg.mid_layers, cfg.tail_layers
  replaced = list(range(a, n - b))
  if mid_init == 'block':
    groups = [[i] for i in replaced[:k]]
  else:
    groups = [replaced[j::k] for j in range(k)]
  mid = [jax.tree.map(lambda *x: np.mean(np.stack(x), 0),
                      *[layers[i] for i in group]) for group in groups]
  params = dict(top)
  if a:
    params['head'] = {'layers': _stack(layers[:a])}
  params['mid'] = {'cycle': {'stack': {'layers': _stack(mid)}}}
  if b:
    params['tail'] = {'layers': _stack(layers[n - b:])}
  layer_map = {'head': list(range(a)), 'mid': groups,
               'tail': list(range(n - b, n)), 'dropped': sorted(
                   set(replaced) - {i for g in groups for i in g})}
  return params, layer_map


def _middle_statistics(cfg: model_config.ModelConfig, params, tokens_BxT):
  """Queries and key log-sum-exps of every middle layer in every cycle of
  the head_tail_cycle pass (no zero token, no gate) of these params:
  `q` [C, L, B, T, H, K] (rotary applied) and `lse` [C, L, B, T, H], as the
  model's attention sows them (`intermediates`)."""
  htc = model_lib.build(dataclasses.replace(
      cfg, variant='head_tail_cycle', zero_pool='none', gate='none',
      exit_loss='none', scan_layers=True))

  @jax.jit
  def run(params, tokens_BxT):
    _, state = htc.apply({'params': params}, tokens_BxT,
                         mutable=['intermediates'])
    attn = state['intermediates']['mid']['cycle']['stack']['layers']['attn']
    return attn['queries'][0], attn['key_lse'][0]

  q, lse = run(params_lib.convert_params(params, scan_layers=True), tokens_BxT)
  return np.asarray(q), np.asarray(lse)


def suppressing_keys(cfg: model_config.ModelConfig, q_CxLxBxTxHxK, lse_CxLxBxTxH,
                     zero_mass: float) -> tuple[np.ndarray, np.ndarray]:
  """Zero keys in the stored pool shape, each `-r * mean query direction`,
  and the mass each reaches on the calibration queries [pool..., H]."""
  c, l = cfg.cycles, cfg.mid_layers
  h, k = cfg.n_heads, cfg.resolved_head_dim
  # Queries per pool slot: merge the axes the pool does not index.
  q = np.moveaxis(q_CxLxBxTxHxK, -2, 2).reshape(c, l, h, -1, k)
  lse = np.moveaxis(lse_CxLxBxTxH, -1, 2).reshape(c, l, h, -1)
  if cfg.zero_pool == 'cycle':
    q = q.transpose(0, 2, 1, 3, 4).reshape(c, h, -1, k)
    lse = lse.transpose(0, 2, 1, 3).reshape(c, h, -1)
  elif cfg.zero_pool == 'layer':
    q = q.transpose(1, 2, 0, 3, 4).reshape(l, h, -1, k)
    lse = lse.transpose(1, 2, 0, 3).reshape(l, h, -1)
  mean = q.mean(-2)
  direction = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True),
                                1e-12)
  proj = np.einsum('...nk,...k->...n', q, direction) / np.sqrt(k)
  # Mass for each radius r: sigmoid(s0 - lse) with s0 = -r * proj.
  logits = -_RADII[:, None] * proj[..., None, :] - lse[..., None, :]
  mass = np.mean(1.0 / (1.0 + np.exp(-np.clip(logits, -80, 80))), -1)
  reached = mass <= zero_mass
  best = np.where(reached.any(-1), reached.argmax(-1), mass.argmin(-1))
  radius = _RADII[best]
  keys = -radius[..., None] * direction
  return keys.astype(np.float32), np.take_along_axis(
      mass, best[..., None], -1)[..., 0]


def calibration_tokens(cfg: model_config.ModelConfig, calib_data: str,
                       seed: int = 0) -> np.ndarray:
  """[CALIB_BATCH, <= CALIB_LEN] token ids: byte windows of `calib_data`
  (a `data.path`: file, directory, glob or builtin:stdlib; byte b is id b,
  as the byte tokenizer feeds the model when fine-tuning), or uniformly
  random ids for 'random'."""
  t = CALIB_LEN if cfg.positions != 'learned' else min(CALIB_LEN,
                                                       cfg.max_seq_len)
  rng = np.random.default_rng(seed)
  if calib_data == 'random':
    return rng.integers(0, cfg.vocab_size, (CALIB_BATCH, t)).astype(np.int32)
  check(cfg.vocab_size >= 256, f'--calib_data={calib_data!r} feeds bytes '
        f'but the model has {cfg.vocab_size} tokens; pass --calib_data=random')
  files = data.resolve_sources(calib_data)
  chunks, size = [], 0
  for i in rng.permutation(len(files)):
    if size >= 64 * CALIB_BATCH * t:
      break
    chunks.append(files[i].read_bytes())
    size += len(chunks[-1])
  text = np.frombuffer(b''.join(chunks), np.uint8)
  check(len(text) > t, f'--calib_data={calib_data!r} has {len(text)} bytes; '
        f'pass more than {t} bytes of text, or random')
  starts = rng.integers(0, len(text) - t, CALIB_BATCH)
  return np.stack([text[i:i + t] for i in starts]).astype(np.int32)


def _pool_shape(cfg):
  c, l, h, k = (cfg.cycles, cfg.mid_layers, cfg.n_heads,
                cfg.resolved_head_dim)
  return {'cycle_layer': (c, l, h, k), 'cycle': (c, h, k),
          'layer': (l, h, k)}[cfg.zero_pool]


def convert(hf_dir: str, workdir: str, variant: str = 'ztt',
            n_head_layers: int | None = None, n_mid_layers: int | None = None,
            n_tail_layers: int | None = None, n_cycles: int | None = None,
            mid_init: str = 'block', zero_init: str = 'suppress',
            zero_mass: float = 0.01, gate_bias: float = 6.0,
            zero_pool: str = 'auto', gate: str = 'auto',
            exit_loss: str = 'auto', calib_data: str = 'builtin:stdlib',
            seed: int = 0, stream=None
            ) -> dict[str, Any]:
  """Converts `hf_dir` into a ZTT checkpoint in `workdir`; returns the
  report also written to `workdir/convert.json`."""
  stream = stream or sys.stdout
  check(zero_init in ZERO_INITS, f'--zero_init={zero_init!r} is not one of '
        f'{ZERO_INITS}')
  check(mid_init in MID_INITS, f'--mid_init={mid_init!r} is not one of '
        f'{MID_INITS}')
  check(0.0 < zero_mass < 1.0, f'--zero_mass={zero_mass} must be in (0, 1)')
  check(variant in model_config.VARIANTS, f'--variant={variant!r} is not one '
        f'of {model_config.VARIANTS}')
  workdir = os.path.abspath(workdir)
  check(not os.path.exists(checkpoint.checkpoint_dir(workdir)),
        f'{workdir} already holds checkpoints; pass a new --workdir')
  hf = read_hf_config(hf_dir)
  family, n_layers, fields = architecture(hf)
  split = layer_split(variant, n_layers, n_head_layers, n_mid_layers,
                      n_tail_layers, n_cycles)
  config = configlib.base_config(variant)
  config.model.update(fields)
  config.model.update(split)
  config.model.update(zero_pool=zero_pool, gate=gate, exit_loss=exit_loss,
                      gate_bias_init=float(gate_bias))
  cfg = model_config.ModelConfig.from_config(config.model)
  # Save resolved values ('auto' filled in): the config is the model's record.
  config.model.update({f.name: getattr(cfg, f.name)
                       for f in dataclasses.fields(cfg)})
  if cfg.positions == 'learned':
    config.data.seq_len = min(config.data.seq_len, cfg.max_seq_len)

  w = _Weights(hf_dir, hf['model_type'], load_hf_weights(hf_dir))
  top, layers = (_gpt2_layers if family == 'gpt2' else _llama_layers)(
      w, cfg, n_layers)
  w.check_consumed()
  params, layer_map = build_params(cfg, top, layers, mid_init)
  report = {'hf_dir': os.path.abspath(hf_dir), 'model_type': hf['model_type'],
            'hf_layers': n_layers, 'variant': variant, 'mid_init': mid_init,
            'layer_map': layer_map}

  module = model_lib.build(cfg)
  if variant == 'ztt':
    tokens_BxT = calibration_tokens(cfg, calib_data, seed)
    htc_cfg = dataclasses.replace(cfg, variant='head_tail_cycle',
                                  zero_pool='none', gate='none',
                                  exit_loss='none')
    htc_logits = np.asarray(jax.jit(model_lib.build(htc_cfg).apply)(
        {'params': params}, tokens_BxT).logits)
  if cfg.zero_pool != 'none':
    check(cfg.zero_key == 'key_space', "ztt-convert builds the zero keys in "
          f"key space; got model.zero_key={cfg.zero_key!r}: set "
          "--config.model.zero_key=key_space")
    shape = _pool_shape(cfg)
    if zero_init == 'suppress':
      q, lse = _middle_statistics(cfg, params, tokens_BxT)
      keys, _ = suppressing_keys(cfg, q, lse, zero_mass)
      report['zero_key_norms'] = _rounded(np.linalg.norm(keys, axis=-1))
    elif zero_init == 'zero':
      keys = np.zeros(shape, np.float32)
    else:
      keys = (cfg.zero_key_init_std * np.random.default_rng(seed)
              .standard_normal(shape)).astype(np.float32)
    params['mid']['zero_keys'] = keys
    report['zero_init'] = zero_init
  if cfg.gate != 'none':
    params['mid']['gate_b'] = np.full((cfg.cycles,), gate_bias, np.float32)
    if cfg.gate == 'token':
      params['mid']['gate_w'] = np.zeros((cfg.cycles, cfg.d_model),
                                         np.float32)
    report['gate_bias'] = gate_bias

  params = jax.tree.map(jnp.asarray, params)
  abstract = params_lib.abstract_params(module)
  if (jax.tree.structure(abstract) != jax.tree.structure(params) or any(
      a.shape != p.shape for a, p in zip(jax.tree.leaves(abstract),
                                         jax.tree.leaves(params)))):
    raise AssertionError('converted params do not match the model tree')

  if variant == 'ztt':
    # What the new parts do at the start, on the calibration tokens.
    out = jax.jit(module.apply)({'params': params}, tokens_BxT)
    report['calibration'] = (f'{CALIB_BATCH} x {tokens_BxT.shape[1]} tokens '
                             f'of {calib_data}')
    if out.zero_attention is not None:
      report['zero_attention'] = _rounded(out.zero_attention.mean((1, 2)))
    if out.gate is not None:
      report['gate'] = _rounded(out.gate.mean((1, 2)))
    report['max_abs_logit_change_vs_head_tail_cycle'] = float(
        np.abs(np.asarray(out.logits) - htc_logits).max())

  tokenizer, report['tokenizer'] = source_tokenizer(hf_dir, cfg.vocab_size)
  if tokenizer is not None:  # Fine-tune and generate in its own vocabulary.
    saved_as = (tokenizers.HF_JSON_NAME if tokenizer.name == 'hf'
                else tokenizers.SP_MODEL_NAME)  # Where `save` puts it.
    config.data.update(tokenizer=tokenizer.name,
                       tokenizer_path=os.path.join(workdir, saved_as))
  _save(workdir, config, params)
  if tokenizer is not None:
    tokenizer.save(workdir)
  report['params'] = params_lib.count_params(params)
  report['checkpoint'] = checkpoint.checkpoint_dir(workdir) + '/0'
  with open(os.path.join(workdir, 'convert.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  stream.write(_summary(cfg, report) + '\n')
  return report


# The source model's tokenizer files, and the kinds that load them.
SOURCE_TOKENIZERS = (('tokenizer.json', 'hf'),
                     ('tokenizer.model', 'sentencepiece'))


def source_tokenizer(hf_dir: str, vocab_size: int
                     ) -> tuple[tokenizers.Tokenizer | None, str]:
  """The Hugging Face directory's own tokenizer (tokenizer.json, else a
  SentencePiece tokenizer.model) and a note for the report; None when it
  has none, or one with more ids than the model's vocabulary."""
  for name, kind in SOURCE_TOKENIZERS:
    path = os.path.join(hf_dir, name)
    if not os.path.isfile(path):
      continue
    tokenizer = tokenizers.build_tokenizer(kind, b'', path=path)
    if tokenizer.vocab_size > vocab_size:
      return None, (f'{name} not recorded: {tokenizer.vocab_size} ids, more '
                    f'than the model\'s {vocab_size}')
    return tokenizer, f'{kind} ({name}, {tokenizer.vocab_size} ids)'
  return None, 'none in the Hugging Face directory (bytes)'


def converted_tokenizer(init_from: str) -> tuple[str, str] | None:
  """(data.tokenizer, data.tokenizer_path) that ztt-convert recorded in
  `init_from`, or None (no source tokenizer: bytes)."""
  saved, _ = checkpoint.read_config(init_from)
  data_config = saved.get('data') or {}
  path = data_config.get('tokenizer_path', '')
  if not path:
    return None
  check(os.path.isfile(path), f'{init_from}: its recorded tokenizer {path!r} '
        'is missing; copy the converted directory whole, or convert again')
  return data_config['tokenizer'], path


def _rounded(x, digits: int = 5):
  return np.round(np.asarray(x, np.float64), digits).tolist()


def _summary(cfg, report) -> str:
  m = report['layer_map']
  lines = [f"ztt-convert: {report['model_type']} ({report['hf_layers']} "
           f"layers) -> {cfg.variant}, {report['params']:,} params, "
           f'{cfg.executed_layers} layers executed per token',
           f"  head {m['head']}, middle stack {m['mid']} ({report['mid_init']})"
           f" x {cfg.cycles} cycles, tail {m['tail']}"
           + (f", dropped {m['dropped']}" if m['dropped'] else '')]
  if 'zero_attention' in report:
    lines.append(f"  zero-token mass per cycle {report['zero_attention']} "
                 f"({report['zero_init']} keys), gate {report.get('gate')}, "
                 f"on {report['calibration']}")
  lines.append(f"  tokenizer: {report['tokenizer']}")
  if 'max_abs_logit_change_vs_head_tail_cycle' in report:
    lines.append('  max |logit change| vs the same weights without zero '
                 'tokens and gate: '
                 f"{report['max_abs_logit_change_vs_head_tail_cycle']:.3g}")
  lines.append(f"checkpoint: {report['checkpoint']}")
  return '\n'.join(lines)


def _save(workdir: str, config, params) -> None:
  os.makedirs(workdir, exist_ok=True)
  options = ocp.CheckpointManagerOptions(create=True,
                                         enable_async_checkpointing=False)
  with ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                             options=options) as manager:
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()


# ------------------------------------------------------ fine-tune start --


def converted_model_config(init_from: str) -> ml_collections.ConfigDict:
  """The `config.model` saved with a converted (or trained) checkpoint."""
  check(os.path.isdir(init_from), f'init_from={init_from!r}: no such '
        'directory; pass the --workdir of ztt-convert')
  saved, _ = checkpoint.read_config(init_from)
  return saved.model


def init_state_from(init_from: str, setup, abstract, shardings):
  """A train state with params from `init_from`'s latest checkpoint (placed
  per `shardings`) and a fresh optimizer state at step 0.

  `setup` is `train.Setup`; `abstract`/`shardings` its `state_shardings()`.
  The model settings must match the saved ones (see `_FREE_FIELDS`).
  """
  saved, step = checkpoint.read_config(init_from)
  saved_cfg = model_config.ModelConfig.from_config(saved.model)
  cfg = setup.model_cfg
  differ = [f.name for f in dataclasses.fields(cfg)
            if f.name not in _FREE_FIELDS
            and getattr(cfg, f.name) != getattr(saved_cfg, f.name)]
  check(not differ, f'config.model differs from the model in {init_from} ('
        + ', '.join(f'{k}: {getattr(saved_cfg, k)!r} -> {getattr(cfg, k)!r}'
                    for k in differ)
        + f'); use --config=configs/finetune.py:{init_from}, which copies it')
  if saved_cfg.scan_layers == cfg.scan_layers:
    params = checkpoint.restore_params(
        init_from, step, checkpoint.with_sharding(abstract.params,
                                                  shardings.params))
  else:
    scanned = params_lib.abstract_params(model_lib.Transformer(saved_cfg))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = checkpoint.restore_params(init_from, step, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        scanned))
    params = jax.device_put(
        params_lib.convert_params(params, cfg.scan_layers), shardings.params)
  opt_state = jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(
      params)
  step0 = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return abstract.replace(step=step0, params=params, opt_state=opt_state)
