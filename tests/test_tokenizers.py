"""Tests for ztt_jax.tokenizers."""

import errno
import json
import os
import pathlib
import sysconfig
import tempfile
import textwrap

import numpy as np
import pytest

from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError

SHAKESPEARE = (pathlib.Path(__file__).resolve().parents[2] / 'shared' /
               'data' / 'tinyshakespeare.txt')
SP_VOCAB = 400


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert '\n' not in message
  return message


@pytest.fixture(scope='module')
def sp_text() -> str:
  """A few KB of real text: the stdlib's textwrap.py source."""
  return pathlib.Path(textwrap.__file__).read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def sp_tokenizer(sp_text) -> tokenizers.Tokenizer:
  return tokenizers.build_tokenizer('sentencepiece', sp_text.encode(),
                                    vocab_size=SP_VOCAB)


# -------------------------------------------------------------------- byte --


def test_byte_encode_bytes_accepts_any_bytes():
  tok = tokenizers.build_tokenizer('byte', b'')
  data = bytes(range(256)) + b'\xff\xfe\x80abc'
  ids_N = tok.encode_bytes(data)
  assert tok.vocab_size == 256
  np.testing.assert_array_equal(ids_N, np.frombuffer(data, np.uint8))
  # Invalid UTF-8 decodes with replacement characters instead of failing.
  assert tok.decode(tok.encode_bytes(b'ok\xffok')) == 'ok\ufffdok'


def test_byte_round_trips_valid_text_exactly():
  tok = tokenizers.ByteTokenizer()
  text = 'héllo\x00 wörld ☃ 😀\r\n\t'
  ids_N = tok.encode(text)
  assert ids_N.dtype == np.int32
  assert len(ids_N) == len(text.encode('utf-8'))
  assert tok.decode(ids_N) == text


def test_byte_save_load(tmp_path):
  tokenizers.ByteTokenizer().save(tmp_path)
  assert json.loads((tmp_path / 'tokenizer.json').read_text()) == {
      'type': 'byte'}
  assert tokenizers.load_tokenizer(tmp_path).name == 'byte'


# -------------------------------------------------------------------- char --


def test_char_vocab_is_sorted_training_chars():
  tok = tokenizers.build_tokenizer('char', 'hello world\n'.encode())
  assert tok.chars == sorted(set('hello world\n'))
  assert tok.vocab_size == 9
  np.testing.assert_array_equal(tok.encode('hello'),
                                [tok.chars.index(c) for c in 'hello'])


def test_char_round_trip_exact_with_unicode():
  text = 'Zoë says: ☃ 😀\x00 tab\tCR\r\n'
  tok = tokenizers.build_tokenizer('char', text.encode())
  ids_N = tok.encode_bytes(text.encode())
  assert ids_N.dtype == np.int32
  assert len(ids_N) == len(text)
  assert tok.decode(ids_N) == text
  assert ids_N.max() < tok.vocab_size


def test_char_round_trips_standard_library_text():
  # Real text on every machine: the running Python's own os.py.
  text = (pathlib.Path(sysconfig.get_paths()['stdlib']) / 'os.py').read_text(
      encoding='utf-8')
  tok = tokenizers.build_tokenizer('char', text.encode())
  assert tok.vocab_size == len(set(text))
  assert tok.decode(tok.encode(text)) == text


def test_char_shakespeare_has_65_symbols():
  if not SHAKESPEARE.exists():
    pytest.skip(f'{SHAKESPEARE} absent')
  text = SHAKESPEARE.read_text(encoding='utf-8')
  tok = tokenizers.build_tokenizer('char', text.encode())
  assert tok.vocab_size == 65
  assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_char_unknown_character_is_config_error():
  tok = tokenizers.build_tokenizer('char', b'abc')
  with pytest.raises(ConfigError) as error:
    tok.encode('abz')
  message = _one_line(error)
  assert "'z'" in message and 'training corpus' in message
  with pytest.raises(ConfigError, match='not in the vocabulary'):
    tok.encode('\U0001F600')  # Beyond the lookup table.


def test_char_non_utf8_is_config_error_naming_offset():
  with pytest.raises(ConfigError) as error:
    tokenizers.build_tokenizer('char', b'abc\xffdef')
  message = _one_line(error)
  assert 'offset 3' in message and 'data.tokenizer=byte' in message
  tok = tokenizers.build_tokenizer('char', b'abc')
  with pytest.raises(ConfigError, match='offset 1'):
    tok.encode_bytes(b'a\x80')


def test_char_save_load(tmp_path):
  tok = tokenizers.build_tokenizer('char', 'ab\x00ç'.encode())
  tok.save(tmp_path)
  saved = json.loads((tmp_path / 'tokenizer.json').read_text())
  assert saved == {'type': 'char', 'chars': ['\x00', 'a', 'b', 'ç']}
  loaded = tokenizers.load_tokenizer(tmp_path)
  np.testing.assert_array_equal(loaded.encode('çab\x00'),
                                tok.encode('çab\x00'))


# ----------------------------------------------------------- sentencepiece --


def test_sentencepiece_round_trip(sp_tokenizer, sp_text):
  assert sp_tokenizer.vocab_size == SP_VOCAB
  ids_N = sp_tokenizer.encode(sp_text)
  assert ids_N.dtype == np.int32
  assert len(ids_N) < 0.8 * len(sp_text)  # It actually merges.
  assert sp_tokenizer.decode(ids_N) == sp_text
  # Byte fallback: unseen characters and whitespace survive exactly.
  other = '  Zoë ☃ 😀\x00\n\n\tend '
  assert sp_tokenizer.decode(sp_tokenizer.encode(other)) == other
  corpus_N = sp_tokenizer.encode_bytes(sp_text.encode())
  assert sp_tokenizer.decode(corpus_N) == sp_text


def test_sentencepiece_save_load_same_ids(sp_tokenizer, sp_text, tmp_path):
  sp_tokenizer.save(tmp_path)
  assert (tmp_path / 'tokenizer.model').is_file()
  saved = json.loads((tmp_path / 'tokenizer.json').read_text())
  assert saved['type'] == 'sentencepiece'
  loaded = tokenizers.load_tokenizer(tmp_path)
  np.testing.assert_array_equal(loaded.encode(sp_text),
                                sp_tokenizer.encode(sp_text))
  assert loaded.fingerprint() == sp_tokenizer.fingerprint()


def test_sentencepiece_training_is_deterministic(sp_tokenizer, sp_text):
  again = tokenizers.build_tokenizer('sentencepiece', sp_text.encode(),
                                     vocab_size=SP_VOCAB)
  assert again.model_bytes == sp_tokenizer.model_bytes


def test_sentencepiece_unigram(sp_text):
  tok = tokenizers.build_tokenizer('sentencepiece', sp_text.encode(),
                                   vocab_size=SP_VOCAB, model_type='unigram')
  assert tok.decode(tok.encode(sp_text[:2000])) == sp_text[:2000]


def test_sentencepiece_corpus_too_small_is_config_error():
  with pytest.raises(ConfigError) as error:
    tokenizers.build_tokenizer('sentencepiece', b'tiny text\nhere\n',
                               vocab_size=5000)
  assert 'smaller data.vocab_size' in _one_line(error)


def test_sentencepiece_vocab_too_small_is_config_error(sp_text):
  with pytest.raises(ConfigError, match='data.vocab_size'):
    tokenizers.build_tokenizer('sentencepiece', sp_text.encode(),
                               vocab_size=100)


# ---------------------------------------------------------------- building --


def test_unknown_kind_lists_valid_ones():
  with pytest.raises(ConfigError) as error:
    tokenizers.build_tokenizer('wordpiece', b'abc')
  message = _one_line(error)
  assert all(kind in message for kind in ('byte', 'char', 'sentencepiece'))


def test_load_missing_is_config_error(tmp_path):
  with pytest.raises(ConfigError) as error:
    tokenizers.load_tokenizer(tmp_path / 'nowhere')
  assert 'tokenizer.json' in _one_line(error)


@pytest.mark.parametrize('content', ['{not json', '[1, 2]', '{"type": "x"}',
                                     '{"type": "char"}'])
def test_load_corrupt_is_config_error(tmp_path, content):
  (tmp_path / 'tokenizer.json').write_text(content)
  with pytest.raises(ConfigError) as error:
    tokenizers.load_tokenizer(tmp_path)
  assert str(tmp_path) in _one_line(error)


def test_load_sentencepiece_without_model_is_config_error(tmp_path):
  (tmp_path / 'tokenizer.json').write_text('{"type": "sentencepiece"}')
  with pytest.raises(ConfigError, match='tokenizer.model'):
    tokenizers.load_tokenizer(tmp_path)
  (tmp_path / 'tokenizer.model').write_bytes(b'garbage')
  with pytest.raises(ConfigError, match='tokenizer.model'):
    tokenizers.load_tokenizer(tmp_path)


def test_failed_build_writes_nothing(tmp_path, monkeypatch):
  """SentencePiece trains in memory: a failed build leaves nothing where it
  could write, the working directory or the temporary directory."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  with pytest.raises(ConfigError, match='vocab_size=5000'):
    tokenizers.build_tokenizer('sentencepiece', b'tiny', vocab_size=5000)
  assert not list(tmp_path.iterdir())


_REAL_REPLACE = os.replace


def _replace_failing_at(n: int):
  """os.replace that fails like a full disk on its n-th call (from 0)."""
  calls = []

  def replace(src, dst):
    calls.append(dst)
    if len(calls) == n + 1:
      raise OSError(errno.ENOSPC, 'No space left on device', str(dst))
    _REAL_REPLACE(src, dst)
  return replace


def test_failed_save_leaves_no_partial_files(tmp_path, monkeypatch,
                                             sp_tokenizer):
  # The first file (tokenizer.model) fails: the directory stays empty.
  monkeypatch.setattr(tokenizers.os, 'replace', _replace_failing_at(0))
  with pytest.raises(OSError, match='No space'):
    sp_tokenizer.save(tmp_path / 'a')
  assert not list((tmp_path / 'a').iterdir())
  # tokenizer.json (written last) fails: no temporary file is left, and
  # without it the directory does not pass for a saved tokenizer.
  monkeypatch.setattr(tokenizers.os, 'replace', _replace_failing_at(1))
  with pytest.raises(OSError, match='No space'):
    sp_tokenizer.save(tmp_path / 'b')
  assert [p.name for p in (tmp_path / 'b').iterdir()] == [
      tokenizers.SP_MODEL_NAME]
  with pytest.raises(ConfigError, match='no such tokenizer file'):
    tokenizers.load_tokenizer(tmp_path / 'b')


# ---------------------------------------------------- existing tokenizers --


def test_sentencepiece_model_file_is_loaded_not_trained(sp_model_file,
                                                        sp_text, tmp_path):
  tok = tokenizers.build_tokenizer('sentencepiece', b'ignored',
                                   vocab_size=5000, path=sp_model_file)
  assert tok.vocab_size == 400  # The file's, not data.vocab_size.
  assert tok.decode(tok.encode(sp_text)) == sp_text
  tok.save(tmp_path)
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert loaded.fingerprint() == tok.fingerprint()
  np.testing.assert_array_equal(loaded.encode(sp_text), tok.encode(sp_text))


def test_hf_tokenizer_json_round_trips(hf_tokenizer_file, sp_text, tmp_path):
  tok = tokenizers.build_tokenizer('hf', b'', path=hf_tokenizer_file)
  assert tok.vocab_size == 320
  ids_N = tok.encode(sp_text)
  assert ids_N.dtype == np.int32 and len(ids_N) < 0.8 * len(sp_text)
  assert tok.decode(ids_N) == sp_text
  other = '  Zoë ☃ 😀\n\n\tend '  # Byte-level: anything survives.
  assert tok.decode(tok.encode(other)) == other
  np.testing.assert_array_equal(tok.encode_bytes(sp_text.encode()), ids_N)
  tok.save(tmp_path)
  assert (tmp_path / tokenizers.HF_JSON_NAME).is_file()
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert loaded.name == 'hf' and loaded.fingerprint() == tok.fingerprint()
  np.testing.assert_array_equal(loaded.encode(sp_text), ids_N)


@pytest.mark.parametrize('kind, content, message', [
    ('hf', None, 'data.tokenizer=hf needs data.tokenizer_path'),
    ('byte', b'x', 'is for data.tokenizer=sentencepiece or hf, not byte'),
    ('sentencepiece', b'not a model', 'is not a SentencePiece model'),
    ('hf', b'{"nope": 1}', 'is not a Hugging Face tokenizer.json'),
])
def test_bad_tokenizer_path_is_one_line(tmp_path, kind, content, message):
  path = ''
  if content is not None:
    path = str(tmp_path / 'tok')
    pathlib.Path(path).write_bytes(content)
  with pytest.raises(ConfigError, match=message) as error:
    tokenizers.build_tokenizer(kind, b'abc', path=path)
  _one_line(error)


def test_missing_tokenizer_path_names_it(tmp_path):
  with pytest.raises(ConfigError, match='no such file') as error:
    tokenizers.build_tokenizer('hf', b'', path=str(tmp_path / 'x.json'))
  assert 'data.tokenizer_path=' in _one_line(error)
