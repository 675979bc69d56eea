"""Every config field with its default; loading, overriding and checking.

Files in `configs/` start from `base_config(variant)` and override what they
need; every field the code reads is declared here once, with its default.

* `from_file('PATH[:ARG]')` loads a config file as the commands' `--config`
  flag does: `get_config(ARG)` (or `get_config()`) of that Python file.
* `override(config, {'train.steps': '50'})` sets fields as
  `--config.train.steps=50` does, parsing text as the field's type.
* `with_defaults(saved)` fills in the fields a config saved with an older
  checkpoint lacks.
* `validate(config)` does every check that needs neither data nor devices
  (the model's in `ModelConfig.from_config`, the optimiser's in
  `optim.make_optimizer`); data checks are `validate_data`.
Each raises `ConfigError` with a one-line message.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, Mapping

import ml_collections

from ztt_jax import optim
from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError, check
from ztt_jax.model_config import ModelConfig

NAN_POLICIES = ('stop', 'skip')


def model_config(variant: str = 'ztt') -> ml_collections.ConfigDict:
  """`config.model`: every `ModelConfig` field, 'auto' where derived."""
  m = ml_collections.ConfigDict(
      {f: getattr(ModelConfig, f) for f in ModelConfig.__dataclass_fields__})
  m.variant = variant
  m.vocab_size = 0  # 0: the tokenizer's vocabulary size.
  # 'auto': cycle_layer / token / linear for ztt, none for the baselines.
  m.zero_pool = 'auto'
  m.gate = 'auto'
  m.exit_loss = 'auto'
  return m


def base_config(variant: str = 'ztt') -> ml_collections.ConfigDict:
  """Defaults for every field; configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Params init and data order.
  # '' : random init; else a ztt-convert (or ztt-train) --workdir whose
  # params a fresh run starts from (configs/finetune.py sets it).
  c.init_from = ''
  c.model = model_config(variant)

  c.data = ml_collections.ConfigDict()
  # Text file, directory, glob (each may hold .jsonl files), builtin:stdlib,
  # or a directory ztt-prepare wrote (token shards, read without loading).
  c.data.path = 'builtin:stdlib'
  c.data.tokenizer = 'byte'  # byte | char | sentencepiece | hf.
  # An existing tokenizer to load, not train: a SentencePiece .model
  # (sentencepiece) or a Hugging Face tokenizer.json (hf, required there).
  # The vocabulary size then follows it.
  c.data.tokenizer_path = ''
  c.data.vocab_size = 1024  # sentencepiece trained here only.
  c.data.sp_model_type = 'bpe'  # sentencepiece trained here: bpe | unigram.
  c.data.seq_len = 128  # Tokens per training sequence.
  # Held-out validation (file, directory, glob or prepared directory); ''
  # takes the last val_fraction of data.path instead.
  c.data.val_path = ''
  c.data.val_fraction = 0.1  # Last fraction of the corpus (nanoGPT split).
  c.data.jsonl_field = 'text'  # The text of each record of a .jsonl file.
  c.data.cache_dir = ''  # '': $ZTT_CACHE_DIR or ~/.cache/ztt_jax.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer steps; the schedule ends here.
  c.train.batch_size = 32  # Global, across all processes and devices.
  c.train.grad_accum_steps = 1  # Micro-batches per step (batch split).
  c.train.lr = 1e-3  # Peak learning rate.
  c.train.warmup_steps = 100  # Linear warmup from 0 to lr.
  c.train.min_lr_ratio = 0.1  # Cosine decays to lr * min_lr_ratio.
  c.train.weight_decay = 0.1  # Not on norms, biases, zero keys, gates.
  # Multiplies the gate params' (gate_w, gate_b) updates: a slower gate.
  c.train.gate_lr_scale = 1.0
  c.train.b1 = 0.9  # AdamW first-moment decay.
  c.train.b2 = 0.99  # AdamW second-moment decay.
  c.train.grad_clip = 1.0  # Global-norm clipping; 0 turns it off.
  c.train.log_every_steps = 50  # Metrics to metrics.jsonl and the console.
  c.train.eval_every_steps = 250  # 0: only at the end.
  c.train.eval_batches = 8  # Fixed validation batches per eval.
  c.train.peak_flops = 0.0  # Per-device FLOP/s for MFU; 0: measure matmul.
  # Non-finite loss or grads: 'stop' (save state + batch under
  # WORKDIR/nonfinite/, exit 1) or 'skip' (drop that update, go on).
  c.train.nan_policy = 'stop'
  # Debugging switch: make step N's loss and gradients NaN, to rehearse
  # nan_policy (the stop, the dump under nonfinite/, the resume) on a real
  # setup before a long run relies on it; -1: off.
  c.train.debug_nan_at_step = -1
  # A jax.profiler trace of steps FIRST to LAST (both included, as
  # metrics.jsonl numbers them), e.g. '10,15', or of one step, '12', into
  # WORKDIR/profile (process 0); '' : off.
  c.train.profile_steps = ''
  # Weights & Biases (the `wandb` extra): '' : off; else the project that
  # process 0 logs the metrics and the config to, resuming the same W&B run
  # (its id is kept in WORKDIR/wandb_run_id).
  c.train.wandb_project = ''
  c.train.wandb_entity = ''  # '' : W&B's default entity.
  c.train.wandb_name = ''  # '' : the workdir's name.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # Also at the end and on preemption.
  c.checkpoint.keep = 3  # Newest checkpoints kept.
  c.checkpoint.async_save = True  # Write in the background while training.

  # Device mesh; -1 takes the remaining devices. data, fsdp and tensor lay
  # out one slice; dcn_data > 1 (multislice) repeats that across dcn_data
  # slices along the data axis (processes where devices have no slice), so
  # the data axis is dcn_data * data.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn_data=1))
  # Logical axis -> mesh axes. The only place mesh axes are named.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (
      ('activation_batch', ('data', 'fsdp')),
      ('activation_length', None),
      ('activation_embed', None),
      ('activation_mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),  # Key/value heads under grouped-query attention.
      ('kv', None),
      ('mlp', 'tensor'),
      ('layers', None),
      ('cycles', None),
      ('positions', None),  # Rows of a learned position table.
  )

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = ''  # '' : the start of the validation split.
  c.sample.max_new_tokens = 200  # 0: no sample at the end of training.
  c.sample.temperature = 0.8  # 0: greedy.
  c.sample.top_k = 0  # 0: off.
  return c


# ------------------------------------------------------------------ files --


def from_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of config file `spec` = 'PATH[:ARG]' (no ARG:
  `get_config()`), as the commands' `--config` flag loads it."""
  path, _, arg = spec.partition(':')
  check(os.path.isfile(path), f'--config={spec}: {path!r} is not a file; '
        'pass a config file as PATH[:ARG], e.g. --config=configs/tiny.py')
  name = 'ztt_config_' + re.sub(r'\W', '_', os.path.basename(path)[:-3])
  module_spec = importlib.util.spec_from_file_location(name, path)
  check(module_spec is not None, f'--config={spec}: {path!r} is not a '
        'Python file; pass a .py file that defines get_config()')
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
    get_config = getattr(module, 'get_config', None)
    check(callable(get_config), f'--config={spec}: {path} has no '
          'get_config(); define one that returns a ConfigDict')
    config = get_config(arg) if arg else get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'--config={spec}: loading it raised '
                      f'{_one_line(e, path)}; fix the file or its argument '
                      '(PATH[:ARG])') from e
  check(isinstance(config, ml_collections.ConfigDict),
        f'--config={spec}: get_config() returned {type(config).__name__}, '
        'not a ConfigDict; return configlib.base_config() with your changes')
  return config


def _one_line(error: Exception, path: str) -> str:
  """'TypeError: message (file.py line 12)', the line in `path` if any."""
  text = ' '.join(str(error).split())
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  if isinstance(error, SyntaxError):
    where = f' ({path} line {error.lineno})'
  else:
    where = f' ({path} line {frames[-1].lineno})' if frames else ''
  return f'{type(error).__name__}: {text}{where}'


def with_defaults(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`saved` (a config as a checkpoint stores it) over `base_config()`:
  fields added to the code since it was saved take their defaults."""
  variant = dict(saved.get('model') or {}).get('variant', 'ztt')
  merged = base_config(variant).to_dict()

  def update(into: dict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
      if isinstance(value, Mapping) and isinstance(into.get(key), dict):
        update(into[key], value)
      else:
        into[key] = value

  update(merged, saved)
  return ml_collections.ConfigDict(merged)


# -------------------------------------------------------------- overrides --


def override(config: ml_collections.ConfigDict,
             overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` ('section.field' -> value) set.

  A str value is parsed as the field's type, as `--config.section.field=
  VALUE` gives it: int, float, bool (true/false), text, or a tuple as a
  Python literal. Unknown fields and unparsable values raise ConfigError.
  """
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    node, *keys = [config, *path.split('.')]
    for depth, key in enumerate(keys):
      at = '.'.join(keys[:depth + 1])
      check(isinstance(node, ml_collections.ConfigDict),
            f'--config.{path}: {".".join(keys[:depth])} is a value, not a '
            'section; set it as --config.' + '.'.join(keys[:depth]) + '=...')
      check(key in node, f'--config.{at}: no such field; '
            + _known(node, key, '.'.join(keys[:depth])))
      if depth < len(keys) - 1:
        node = node[key]
    current = node[keys[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f'--config.{path} is a section; set one of its '
                        f'fields, e.g. --config.{path}.'
                        f'{next(iter(current.keys()), "FIELD")}=VALUE')
    if isinstance(value, str):
      value = _parse(path, value, current)
    try:
      node[keys[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f'--config.{path}={value!r}: {e}; pass a '
                        f'{type(current).__name__} like {current!r}') from None
  return config


def _known(node: ml_collections.ConfigDict, key: str, section: str) -> str:
  """The fix for an unknown field: the closest names, else all of them."""
  prefix = f'--config.{section}.' if section else '--config.'
  close = difflib.get_close_matches(key, list(node.keys()), n=3)
  if close:
    return 'did you mean ' + ' or '.join(prefix + c for c in close) + '?'
  return (f'fields here: {", ".join(sorted(node.keys()))} (all of them, '
          'with defaults: ztt_jax/configlib.py)')


def _parse(path: str, text: str, current: Any) -> Any:
  """`text` as a value of the type of `current`; raises ConfigError."""
  kind = type(current)
  try:
    if kind is bool:
      if text.lower() in ('true', '1', 'yes'):
        return True
      if text.lower() in ('false', '0', 'no'):
        return False
      raise ValueError(text)
    if kind in (int, float):
      return kind(text)
    if kind in (tuple, list):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError(text)
      return kind(value)
  except (SyntaxError, ValueError):
    what = {bool: 'true or false', int: 'an integer', float: 'a number',
            tuple: 'a Python tuple', list: 'a Python list'}[kind]
    like = repr(current) if len(repr(current)) < 60 else (
        repr(current)[:55] + ' ...')
    raise ConfigError(f'--config.{path}={text!r} is not {what}; pass '
                      f'{what} (the config holds {like})') from None
  if kind is str:
    return text
  try:  # Any other type (e.g. None): a Python literal, else text.
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


# ----------------------------------------------------------------- checks --


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check that needs neither data nor devices; raises ConfigError."""
  t = config.train
  for name in ('steps', 'batch_size', 'log_every_steps', 'eval_batches',
               'grad_accum_steps'):
    _positive_int(f'train.{name}', t[name])
  check(t.eval_every_steps >= 0,
        f'train.eval_every_steps={t.eval_every_steps} must be >= 0 '
        '(0: only at the end)')
  check(t.batch_size % t.grad_accum_steps == 0,
        f'train.batch_size={t.batch_size} is not divisible by '
        f'train.grad_accum_steps={t.grad_accum_steps}; make it a multiple')
  check(t.nan_policy in NAN_POLICIES,
        f'train.nan_policy={t.nan_policy!r} is not one of {NAN_POLICIES}')
  profile_range(t)
  for name in ('wandb_project', 'wandb_entity', 'wandb_name'):
    check(isinstance(t.get(name, ''), str),
          f'train.{name}={t.get(name)!r} must be text (\'\' : off or the '
          'default)')
  validate_data(config.data)
  _positive_int('mesh.dcn_data', config.mesh.get('dcn_data', 1))
  for name in ('every_steps', 'keep'):
    _positive_int(f'checkpoint.{name}', config.checkpoint[name])
  # The model config, with a placeholder vocabulary until the tokenizer runs.
  model_config = config.model.to_dict()
  model_config['vocab_size'] = model_config['vocab_size'] or 256
  ModelConfig.from_config(model_config)
  optim.make_optimizer(t)


def profile_range(train_config) -> tuple[int, int] | None:
  """`train.profile_steps` as (FIRST, LAST), both included; None when off.

  'FIRST,LAST' or one step 'N'; 1 <= FIRST <= LAST <= train.steps, else a
  ConfigError.
  """
  text = train_config.get('profile_steps', '')
  check(isinstance(text, str), f'train.profile_steps={text!r} must be text '
        "'FIRST,LAST', e.g. '10,15' (steps 10 to 15), or '' (off)")
  if not text.strip():
    return None
  parts = [p.strip() for p in text.split(',')]
  check(len(parts) in (1, 2) and all(re.fullmatch(r'\d+', p) for p in parts),
        f'train.profile_steps={text!r} is not FIRST,LAST; pass two step '
        'numbers, e.g. train.profile_steps=10,15 (steps 10 to 15), one step '
        "(12), or '' (off)")
  first, last = int(parts[0]), int(parts[-1])
  steps = train_config.steps
  check(1 <= first <= last <= steps,
        f'train.profile_steps={text!r} is out of range: FIRST,LAST must '
        f'satisfy 1 <= FIRST <= LAST <= train.steps={steps}; e.g. '
        f'train.profile_steps={min(10, steps)},{min(15, steps)}')
  return first, last


def validate_data(data_config: ml_collections.ConfigDict) -> None:
  """The checks of `config.data` that need no files; raises ConfigError."""
  d = data_config
  check(d.tokenizer in tokenizers.KINDS, f'data.tokenizer={d.tokenizer!r} is '
        f'unknown; use one of {", ".join(tokenizers.KINDS)}')
  check(isinstance(d.val_fraction, (int, float)) and
        not isinstance(d.val_fraction, bool) and 0 <= d.val_fraction < 0.5,
        f'data.val_fraction={d.val_fraction!r} is out of range; use a number '
        'in [0, 0.5), e.g. 0.1 (0 disables evaluation)')
  check(isinstance(d.seq_len, int) and not isinstance(d.seq_len, bool)
        and d.seq_len > 0,
        f'data.seq_len={d.seq_len!r} must be a positive integer; e.g. '
        'data.seq_len=256')
  check(d.sp_model_type in tokenizers.SP_MODEL_TYPES,
        f'data.sp_model_type={d.sp_model_type!r} is unknown; use one of '
        f'{", ".join(tokenizers.SP_MODEL_TYPES)}')
  path = d.get('tokenizer_path', '')
  check(not path or d.tokenizer in tokenizers.FILE_KINDS,
        f'data.tokenizer_path={path!r} is for data.tokenizer=sentencepiece '
        f'or hf, not {d.tokenizer}; set data.tokenizer_path= (empty) or '
        'change data.tokenizer')
  check(bool(path) or d.tokenizer != 'hf', 'data.tokenizer=hf needs '
        'data.tokenizer_path=PATH/tokenizer.json (a Hugging Face tokenizer '
        'file); pass it')
  check(isinstance(d.get('jsonl_field', 'text'), str)
        and bool(d.get('jsonl_field', 'text')),
        f'data.jsonl_field={d.get("jsonl_field")!r} must name the text field '
        'of each JSONL record, e.g. data.jsonl_field=text')


def _positive_int(name: str, value: Any) -> None:
  check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f'{name}={value!r} must be a positive integer')
