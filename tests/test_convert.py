"""ztt-convert: exact import of Hugging Face GPT-2 / Llama-family checkpoints,
conversion into ZTT, fine-tuning with ztt-train, and one-line errors.

The checkpoints are tiny random models built here with `transformers` (no
download) and saved with `save_pretrained` (safetensors). Skipped when torch
or transformers are not installed (`pip install -e ".[dev]"` brings them).
"""

import io
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='torch is needed to build reference checkpoints; '
    'pip install -e ".[dev]"')
transformers = pytest.importorskip(
    'transformers', reason='transformers is needed to build reference '
    'checkpoints; pip install -e ".[dev]"')

import ztt_jax  # pylint: disable=wrong-import-position
from configs import finetune  # pylint: disable=wrong-import-position
from safetensors import torch as st_torch  # pylint: disable=wrong-import-position
from ztt_jax import convert  # pylint: disable=wrong-import-position
from ztt_jax import generate  # pylint: disable=wrong-import-position
from ztt_jax import model  # pylint: disable=wrong-import-position
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax import tokenizers  # pylint: disable=wrong-import-position
from ztt_jax import train  # pylint: disable=wrong-import-position
from ztt_jax.errors import ConfigError  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt')
# Float32 on both sides; differences are summation order only.
ATOL = 1e-4
V = 256  # Byte tokens index the tiny models directly.

# Tiny models, 4 layers of width 64, covering every import switch: GPT-2
# (learned positions, LayerNorm, biases, GELU, tied head), Llama (GQA with 2
# KV heads, untied head), Mistral (multi-query, head_dim != d/h, rope theta
# 1e6), Qwen2 (q/k/v biases only).
HF_CONFIGS = {
    'gpt2': lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=64, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0),
    'llama': lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    'mistral': lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, max_position_embeddings=64, sliding_window=None,
        rope_theta=1e6, tie_word_embeddings=True),
    'qwen2': lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False),
}
MODEL_CLASSES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}


def _randomize(hf_model, seed=0):
  """Weights far from the HF init (which has unit norms, zero biases and
  near-uniform logits), so that a wrong mapping cannot pass unnoticed."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and ('norm' in name or 'ln_' in name) and (
          name.endswith('weight')):
        p.copy_(1.0 + 0.3 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      else:
        p.copy_(0.15 * noise)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """`kind -> directory` of a saved tiny random model, built on demand."""
  root = tmp_path_factory.mktemp('hf')
  built = {}

  def get(kind):
    if kind not in built:
      torch.manual_seed(0)
      hf_model = getattr(transformers, MODEL_CLASSES[kind])(
          HF_CONFIGS[kind]())
      _randomize(hf_model)
      built[kind] = str(root / kind)
      hf_model.save_pretrained(built[kind])
    return built[kind]

  return get


def hf_logits(hf_dir, tokens_BxT):
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(tokens_BxT))).logits.numpy()


def tokens(b=2, t=48, seed=1):
  return np.random.default_rng(seed).integers(0, V, (b, t)).astype(np.int32)


@pytest.mark.parametrize('kind', list(HF_CONFIGS))
def test_vanilla_conversion_reproduces_transformers_logits(kind, hf_dirs,
                                                           tmp_path):
  report = convert.convert(hf_dirs(kind), tmp_path / 'out', variant='vanilla',
                           stream=io.StringIO())
  assert report['layer_map'] == {'head': [0], 'mid': [[1], [2]],
                                 'tail': [3], 'dropped': []}
  module, params, _ = ztt_jax.load(tmp_path / 'out')
  x = tokens()
  ref = hf_logits(hf_dirs(kind), x)
  assert ref.std() > 1.0, 'reference logits too flat to test anything'
  ours = np.asarray(jax.jit(module.apply)({'params': params}, x).logits)
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
  # The cached path (generate.forward): two chunks of 24 tokens.
  cfg = module.cfg
  cache = generate.init_cache(cfg, 2, x.shape[1])
  step = jax.jit(lambda p, t, pos, c: generate.forward(module, p, t, pos, c))
  pos = np.broadcast_to(np.arange(x.shape[1]), x.shape)
  first, _, cache = step(params, x[:, :24], pos[:, :24], cache)
  second, _, _ = step(params, x[:, 24:], pos[:, 24:], cache)
  decoded = np.concatenate([first, second], 1)
  np.testing.assert_allclose(decoded, ref, atol=ATOL, rtol=0)


def test_pytorch_bin_and_half_precision_files_read_the_same(hf_dirs,
                                                           tmp_path):
  src = hf_dirs('llama')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), bin_dir)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(src)
  torch.save(hf_model.state_dict(), bin_dir / 'pytorch_model.bin')
  for name, hf_dir in (('st', src), ('bin', bin_dir)):
    convert.convert(str(hf_dir), tmp_path / name, variant='vanilla',
                    stream=io.StringIO())
  chex.assert_trees_all_equal(ztt_jax.load(tmp_path / 'st')[1],
                              ztt_jax.load(tmp_path / 'bin')[1])
  # bfloat16 and float16 safetensors come back as their float32 values.
  tensors = {'bf16': torch.randn(3, 5).to(torch.bfloat16),
             'f16': torch.randn(7).to(torch.float16),
             'f32': torch.randn(2, 2, 2)}
  st_torch.save_file(tensors, str(tmp_path / 'half.safetensors'))
  read = convert.read_safetensors(str(tmp_path / 'half.safetensors'))
  for key, value in tensors.items():
    np.testing.assert_array_equal(np.asarray(read[key], np.float32),
                                  value.float().numpy())


def test_mid_init_block_and_average():
  cfg = model_config.ModelConfig.from_config(dict(
      variant='ztt', vocab_size=8, d_model=8, n_heads=2, n_head_layers=1,
      n_mid_layers=2, n_tail_layers=1, n_cycles=2))
  layers = [{'w': np.full((3,), float(i))} for i in range(7)]
  top = {}
  params, layer_map = convert.build_params(cfg, top, layers, 'block')
  assert layer_map == {'head': [0], 'mid': [[1], [2]], 'tail': [6],
                       'dropped': [3, 4, 5]}
  np.testing.assert_array_equal(
      params['mid']['cycle']['stack']['layers']['w'][:, 0], [1, 2])
  params, layer_map = convert.build_params(cfg, top, layers, 'average')
  assert layer_map['mid'] == [[1, 3, 5], [2, 4]]
  np.testing.assert_array_equal(
      params['mid']['cycle']['stack']['layers']['w'][:, 0], [3, 3])
  np.testing.assert_array_equal(params['tail']['layers']['w'][:, 0], [6])


def test_zero_keys_point_against_the_mean_query():
  cfg = model_config.ModelConfig.from_config(dict(
      variant='ztt', vocab_size=8, d_model=8, n_heads=2, n_mid_layers=1,
      n_cycles=2))
  rng = np.random.default_rng(0)
  # Queries sharing a direction: the key must point the other way and
  # reach the mass target.
  q = rng.standard_normal((2, 1, 4, 16, 2, 4)) + np.array([3.0, 0, 0, 0])
  lse = np.zeros((2, 1, 4, 16, 2))
  keys, mass = convert.suppressing_keys(cfg, q, lse, zero_mass=0.01)
  assert keys.shape == (2, 1, 2, 4)
  assert np.all(keys[..., 0] < 0) and np.all(mass <= 0.01), (keys, mass)


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
@pytest.mark.slow(35)
def test_convert_to_ztt_and_fine_tune(kind, hf_dirs, tmp_path):
  out = tmp_path / 'ztt'
  report = convert.convert(hf_dirs(kind), out, variant='ztt', n_mid_layers=2,
                           n_cycles=3, stream=io.StringIO())
  assert report['layer_map']['mid'] == [[1], [2]]
  assert len(report['zero_attention']) == 3
  assert all(0 < a < 0.5 for a in report['zero_attention'])
  assert report['gate'] == pytest.approx([1 / (1 + np.exp(-6.0))] * 3,
                                         abs=1e-4)
  assert json.load(open(out / 'convert.json'))['variant'] == 'ztt'

  config = finetune.get_config(str(out))
  assert config.model.n_cycles == 3 and config.init_from == str(out)
  data_path = SHAKESPEARE if os.path.exists(SHAKESPEARE) else os.path.join(
      os.path.dirname(json.__file__), 'decoder.py')
  config.data.update(path=data_path, seq_len=32, cache_dir=str(tmp_path))
  config.train.update(steps=20, batch_size=8, lr=3e-3, warmup_steps=2,
                      log_every_steps=1, eval_every_steps=0, eval_batches=1,
                      peak_flops=1e12)
  config.checkpoint.async_save = False
  config.sample.max_new_tokens = 0
  # The train state starts from exactly the converted params.
  setup = train.Setup(config, str(tmp_path / 'ft'))
  abstract, shardings = setup.state_shardings()
  with setup.context():
    state = convert.init_state_from(str(out), setup, abstract, shardings)
  chex.assert_trees_all_equal(state.params, ztt_jax.load(out)[1])
  assert int(state.step) == 0

  stream = io.StringIO()
  train.train(config, str(tmp_path / 'ft'), stream=stream)
  assert 'initialised params from' in stream.getvalue()
  rows = [json.loads(line) for line in open(tmp_path / 'ft' / 'metrics.jsonl')]
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert len(losses) == 20
  assert np.mean(losses[-3:]) < losses[0] - 0.5, losses

  if kind != 'llama':
    return
  # The converted directory itself is no fine-tune workdir.
  with pytest.raises(ConfigError, match='is the init_from directory'):
    train.train(config, str(out), stream=stream)
  assert os.listdir(out / 'checkpoints') == ['0']
  # A config whose model differs from the converted one is refused.
  config.model.n_cycles = 2
  with pytest.raises(ConfigError, match='n_cycles: 3 -> 2') as e:
    train.train(config, str(tmp_path / 'ft2'), stream=stream)
  assert '\n' not in str(e.value)


def _edited_copy(src, dst, **changes):
  shutil.copytree(src, dst)
  with open(os.path.join(dst, 'config.json')) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return str(dst)


@pytest.mark.parametrize('kind, changes, message', [
    ('gpt2', dict(model_type='bert'), "model_type='bert'"),
    ('gpt2', dict(n_inner=96), 'has shape'),  # Shape mismatch.
    ('gpt2', dict(n_layer=5), 'h.4.attn.c_attn.weight.* is missing'),
    ('gpt2', dict(n_layer=3), 'does not use'),  # Left-over tensors.
    ('gpt2', dict(activation_function='relu'), 'activation_function'),
    ('llama', dict(hidden_act='gelu'), 'hidden_act'),
    ('llama', dict(rope_parameters={'rope_type': 'llama3', 'factor': 8.0,
                                    'rope_theta': 5e5}), 'rope scaling'),
    ('mistral', dict(sliding_window=16), 'sliding-window'),
])
def test_bad_checkpoints_give_one_line_errors(kind, changes, message, hf_dirs,
                                              tmp_path):
  src = _edited_copy(hf_dirs(kind), tmp_path / 'hf', **changes)
  with pytest.raises(ConfigError, match=message) as e:
    convert.convert(src, tmp_path / 'out', variant='vanilla')
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'out')


def test_missing_files_give_one_line_errors(hf_dirs, tmp_path):
  src = hf_dirs('llama')
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), no_weights)
  cases = [(tmp_path / 'nowhere', 'no such directory'),
           (tmp_path, 'config.json: no such file'),
           (no_weights, 'holds no weights')]
  for hf_dir, message in cases:
    with pytest.raises(ConfigError, match=message) as e:
      convert.convert(str(hf_dir), tmp_path / 'out')
    assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match='needs the converted directory'):
    finetune.get_config()


def test_cli_prints_one_line_and_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.convert',
       f'--hf_dir={tmp_path}/none',
       f'--workdir={tmp_path}/out'], capture_output=True, text=True,
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith('ztt-convert: error: --hf_dir=')
  assert proc.stderr.count('\n') == 1


def test_new_params_have_logical_axes():
  for overrides in (dict(positions='learned', max_seq_len=16,
                         norm='layernorm', qkv_bias=True, out_bias=True,
                         mlp_bias=True, mlp='gelu'),
                    dict(n_kv_heads=2, tie_embeddings=False)):
    cfg = model_config.ModelConfig.from_config(dict(
        variant='ztt', vocab_size=V, d_model=32, n_heads=4, **overrides))
    boxed = params_lib.abstract_params(model.build(cfg), boxed=True)
    leaves = jax.tree.leaves(
        boxed, is_leaf=lambda x: isinstance(x, model.nn.Partitioned))
    assert all(isinstance(x, model.nn.Partitioned) for x in leaves)
    for box in leaves:
      assert len(box.names) == box.value.ndim, box
    attn = boxed['mid']['cycle']['stack']['layers']['attn']
    if cfg.n_kv_heads:
      assert attn['key']['kernel'].names == ('layers', 'embed', 'kv_heads',
                                             'kv')
      assert attn['key']['kernel'].value.shape[2] == 2
    else:
      assert boxed['pos_embed']['embedding'].names == ('positions', 'embed')
      assert attn['query']['bias'].names == ('layers', 'heads', 'kv')
      assert boxed['final_norm']['bias'].names == ('embed',)


def test_convert_records_the_source_tokenizer(hf_dirs, tmp_path,
                                              sp_model_file):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'gpt2_with_tokenizer'
  shutil.copytree(hf_dirs('gpt2'), hf_dir)
  tok = Tokenizer(models.BPE(unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
      [open(json.__file__, encoding='utf-8').read()],
      trainers.BpeTrainer(vocab_size=200, special_tokens=['[UNK]'],
                          show_progress=False))
  assert tok.get_vocab_size() <= V  # Fits the tiny model's 256 ids.
  tok.save(str(hf_dir / 'tokenizer.json'))
  out = tmp_path / 'ztt'
  report = convert.convert(str(hf_dir), out, variant='vanilla',
                           stream=io.StringIO())
  assert report['tokenizer'].startswith('hf (tokenizer.json')
  recorded = tokenizers.load_tokenizer(out)
  assert recorded.name == 'hf'
  np.testing.assert_array_equal(recorded.encode('import json'),
                                tok.encode('import json').ids)
  config = finetune.get_config(str(out))
  assert (config.data.tokenizer, config.data.tokenizer_path) == (
      'hf', str(out / 'hf_tokenizer.json'))
  # Too many ids for the model: bytes, said so.
  (hf_dir / 'tokenizer.json').unlink()
  shutil.copy(sp_model_file, hf_dir / 'tokenizer.model')  # 400 ids.
  report = convert.convert(str(hf_dir), tmp_path / 'ztt2', variant='vanilla',
                           stream=io.StringIO())
  assert 'not recorded: 400 ids' in report['tokenizer']
  assert finetune.get_config(str(tmp_path / 'ztt2')).data.tokenizer == 'byte'
