"""configlib: config files, --config.FIELD=VALUE overrides, old saved
configs, and the one validate."""

import pytest

from configs import tiny
from ztt_jax import configlib
from ztt_jax.errors import ConfigError


def test_override_parses_text_as_the_field_type():
  config = tiny.get_config('ztt')
  new = configlib.override(config, {
      'train.steps': '7', 'train.lr': '3e-4', 'checkpoint.async_save': 'false',
      'data.path': 'a b.txt', 'model.variant': 'vanilla',
      'sharding.rules': "(('activation_batch', 'data'),)",
      'seed': 3})
  assert new.train.steps == 7 and new.train.lr == 3e-4
  assert new.checkpoint.async_save is False and new.data.path == 'a b.txt'
  assert new.model.variant == 'vanilla' and new.seed == 3
  assert new.sharding.rules == (('activation_batch', 'data'),)
  assert config.train.steps != 7  # A copy: the original is unchanged.


@pytest.mark.parametrize('path, value, message', [
    ('train.stepz', '3', 'did you mean --config.train.steps'),
    ('model.nope', '1', 'no such field; fields here: attention, ce_chunk_len'),
    ('nope', '1', 'no such field'),
    ('train', '1', 'is a section'),
    ('train.steps.x', '1', 'train.steps is a value, not a section'),
    ('train.steps', '2.5', 'is not an integer'),
    ('train.lr', 'fast', 'is not a number'),
    ('checkpoint.async_save', 'maybe', 'true or false'),
    ('sharding.rules', '3', 'is not a Python tuple'),
])
def test_bad_override_is_one_line(path, value, message):
  with pytest.raises(ConfigError, match=message) as e:
    configlib.override(tiny.get_config('ztt'), {path: value})
  assert '\n' not in str(e.value) and f'--config.{path}' in str(e.value)


def test_old_saved_config_gets_the_new_fields_defaults():
  saved = tiny.get_config('ztt').to_dict()
  del saved['init_from'], saved['data']['sp_model_type']
  del saved['model']['zero_key']
  saved['data']['seq_len'] = 48
  saved['retired_field'] = 1  # Fields since removed stay (and are unused).
  config = configlib.with_defaults(saved)
  assert config.init_from == '' and config.data.sp_model_type == 'bpe'
  assert config.model.zero_key == 'key_space'
  assert config.data.seq_len == 48 and config.retired_field == 1
  configlib.validate(config)


def test_config_file_that_raises_is_one_line_with_its_line(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text('def get_config(arg=None):\n  return undefined_name\n')
  with pytest.raises(ConfigError) as e:
    configlib.from_file(f'{path}:x')
  message = str(e.value)
  assert '\n' not in message and 'NameError' in message
  assert f'{path} line 2' in message
  with pytest.raises(ConfigError, match='takes 0 positional'):
    path.write_text('def get_config():\n  return None\n')
    configlib.from_file(f'{path}:x')
  with pytest.raises(ConfigError, match='not a ConfigDict'):
    configlib.from_file(str(path))
  with pytest.raises(ConfigError, match='is not a file'):
    configlib.from_file(str(tmp_path / 'nope.py'))


def test_validate_checks_every_section():
  for path, value, message in [
      ('train.steps', 0, 'train.steps=0 must be a positive integer'),
      ('train.nan_policy', 'ignore', 'train.nan_policy'),
      ('data.sp_model_type', 'words', 'data.sp_model_type'),
      ('data.val_fraction', 0.6, 'data.val_fraction'),
      ('data.tokenizer', 'hf', 'data.tokenizer=hf needs data.tokenizer_path'),
      ('data.tokenizer_path', 'x.model', 'data.tokenizer_path=.x.model. is '
       'for data.tokenizer=sentencepiece or hf, not char'),
      ('data.jsonl_field', '', 'data.jsonl_field'),
      ('checkpoint.keep', 0, 'checkpoint.keep'),
      ('mesh.dcn_data', 0, 'mesh.dcn_data=0 must be a positive integer'),
      ('model.n_cycles', 0, 'model.n_cycles'),
      ('model.attention', 'flash', "model.attention='flash' is not one of"),
      ('train.lr', 0.0, 'train.lr'),
      ('train.profile_steps', '15,10', 'train.profile_steps=.15,10. is out '
       'of range')]:
    config = configlib.override(tiny.get_config('ztt'), {path: value})
    with pytest.raises(ConfigError, match=message):
      configlib.validate(config)
  configlib.validate(tiny.get_config('ztt'))


def test_profile_steps_first_last_or_one_step():
  config = tiny.get_config('ztt')  # train.steps = 20.
  for text, expected in [('', None), ('  ', None), ('10,15', (10, 15)),
                         (' 3, 5 ', (3, 5)), ('12', (12, 12)),
                         ('1,20', (1, 20))]:
    # As --config.train.profile_steps=TEXT gives it: text, kept as text.
    new = configlib.override(config, {'train.profile_steps': text})
    assert new.train.profile_steps == text
    assert configlib.profile_range(new.train) == expected, text
  for text, message in [
      ('0,5', 'out of range: FIRST,LAST must satisfy 1 <= FIRST <= LAST <= '
       'train.steps=20'),
      ('5,3', 'out of range'), ('10,21', 'out of range'),
      ('a,b', 'is not FIRST,LAST; pass two step numbers, e.g. '
       'train.profile_steps=10,15'),
      ('1,2,3', 'is not FIRST,LAST'), ('-1,4', 'is not FIRST,LAST'),
      ('2.5', 'is not FIRST,LAST')]:
    new = configlib.override(config, {'train.profile_steps': text})
    with pytest.raises(ConfigError, match=message) as e:
      configlib.validate(new)
    assert '\n' not in str(e.value) and 'train.profile_steps' in str(e.value)
