"""Tests for ztt_jax.data."""

import pathlib

import chex
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ztt_jax import configlib
from ztt_jax import data
from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError

TEXT = ''.join(f'line {i}: the quick brown fox, ünïcode ☃ {i * i}\n'
               for i in range(200))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> pathlib.Path:
  path = tmp_path / 'cache'
  monkeypatch.setenv('ZTT_CACHE_DIR', str(path))
  return path


def _config(path, **overrides) -> ml_collections.ConfigDict:
  config = configlib.base_config().data
  config.update(path=str(path), tokenizer='byte', val_fraction=0.1,
                seq_len=16, cache_dir='')
  config.update(overrides)
  return config


def _write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, str):
    content = content.encode('utf-8')
  path.write_bytes(content)
  return path


def _is_absent_or_empty(path: pathlib.Path) -> bool:
  return not path.exists() or not any(path.iterdir())


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert '\n' not in message
  return message


# ----------------------------------------------------------------- sources --


def test_resolve_file(tmp_path):
  source = _write(tmp_path / 'a.txt', 'hello')
  assert data.resolve_sources(str(source)) == [source]


def test_resolve_directory_recursive_sorted_skips_hidden(tmp_path):
  root = tmp_path / 'corpus'
  for name in ['b.txt', 'a/z.txt', 'a/b/c.txt', '.hidden.txt', '.git/x.txt',
               'a/.secret/y.txt']:
    _write(root / name, name)
  found = data.resolve_sources(str(root))
  assert [p.relative_to(root).as_posix() for p in found] == [
      'a/b/c.txt', 'a/z.txt', 'b.txt']


def test_resolve_glob_sorted(tmp_path):
  for name in ['2.txt', '1.txt', '3.md', 'sub/4.txt']:
    _write(tmp_path / name, name)
  found = data.resolve_sources(str(tmp_path / '*.txt'))
  assert [p.name for p in found] == ['1.txt', '2.txt']
  found = data.resolve_sources(str(tmp_path / '**' / '*.txt'))
  assert sorted(p.name for p in found) == ['1.txt', '2.txt', '4.txt']


def test_resolve_builtin_stdlib():
  found = data.resolve_sources('builtin:stdlib')
  assert len(found) > 500
  assert all(p.suffix == '.py' and p.is_file() for p in found)
  assert not any({'site-packages', 'dist-packages'} & set(p.parts)
                 for p in found)
  assert any(p.name == 'textwrap.py' for p in found)
  assert found == sorted(found)


@pytest.mark.parametrize('name', ['missing.txt', 'nothing*.txt'])
def test_resolve_missing_is_config_error(tmp_path, name):
  with pytest.raises(ConfigError) as error:
    data.resolve_sources(str(tmp_path / name))
  assert name in _one_line(error)


# ---------------------------------------------------------- prepare errors --


def _assert_prepare_fails(config, workdir, cache_dir, match):
  with pytest.raises(ConfigError, match=match) as error:
    data.load_corpus(config, workdir)
  _one_line(error)
  assert not workdir.exists()
  assert _is_absent_or_empty(cache_dir)
  return str(error.value)


def test_missing_path_writes_nothing(tmp_path, cache_dir):
  _assert_prepare_fails(_config(tmp_path / 'nope.txt'), tmp_path / 'work',
                        cache_dir, 'no such file')


def test_empty_file_writes_nothing(tmp_path, cache_dir):
  source = _write(tmp_path / 'empty.txt', '')
  _assert_prepare_fails(_config(source), tmp_path / 'work', cache_dir,
                        'corpus is empty')


def test_empty_directory_writes_nothing(tmp_path, cache_dir):
  (tmp_path / 'empty_dir').mkdir()
  _assert_prepare_fails(_config(tmp_path / 'empty_dir'), tmp_path / 'work',
                        cache_dir, 'directory has no')


def test_corpus_shorter_than_window_writes_nothing(tmp_path, cache_dir):
  source = _write(tmp_path / 'short.txt', 'x' * 100)
  message = _assert_prepare_fails(
      _config(source, seq_len=128, val_fraction=0.0), tmp_path / 'work',
      cache_dir, 'too short')
  assert '100 tokens' in message and 'data.seq_len=128' in message
  # Train is long enough but the 10 byte validation tail is not.
  message = _assert_prepare_fails(
      _config(source, seq_len=16, val_fraction=0.1), tmp_path / 'work',
      cache_dir, 'validation split has 10 tokens')
  assert 'higher data.val_fraction' in message


@pytest.mark.parametrize('overrides, match', [
    ({'val_fraction': 0.5}, 'data.val_fraction'),
    ({'val_fraction': -0.1}, 'data.val_fraction'),
    ({'seq_len': 0}, 'data.seq_len'),
    ({'tokenizer': 'words'}, 'data.tokenizer'),
    ({'tokenizer': 'sentencepiece', 'vocab_size': 100000}, 'vocab_size'),
])
def test_bad_config_writes_nothing(tmp_path, cache_dir, overrides, match):
  source = _write(tmp_path / 'a.txt', TEXT)
  _assert_prepare_fails(_config(source, **overrides), tmp_path / 'work',
                        cache_dir, match)


def test_char_non_utf8_names_file_and_offset(tmp_path, cache_dir):
  _write(tmp_path / 'src' / 'a.txt', TEXT)
  _write(tmp_path / 'src' / 'b.bin', b'abc\xfe')
  message = _assert_prepare_fails(
      _config(tmp_path / 'src', tokenizer='char'), tmp_path / 'work',
      cache_dir, 'offset 3')
  assert 'b.bin' in message and 'data.tokenizer=byte' in message


# ----------------------------------------------------------------- prepare --


def test_byte_split_is_contiguous_head_and_tail(tmp_path):
  source = _write(tmp_path / 'src' / 'a.txt', TEXT)
  _write(tmp_path / 'src' / 'b.txt', 'second file')
  corpus = data.load_corpus(_config(tmp_path / 'src'), tmp_path / 'work')
  raw = TEXT.encode() + b'\n' + b'second file'
  n_train = int(len(raw) * 0.9)
  assert corpus.train_N.tobytes() == raw[:n_train]  # One byte a token.
  np.testing.assert_array_equal(corpus.val_N,
                                np.frombuffer(raw[n_train:], np.uint8))
  assert corpus.train_N.dtype == np.uint8  # The smallest that holds 256.
  assert isinstance(corpus.train_N, np.memmap)
  with pytest.raises(ValueError):
    corpus.train_N[0] = 1  # Read-only.
  assert corpus.meta['n_sources'] == 2
  assert corpus.meta['n_train_tokens'] + corpus.meta['n_val_tokens'] == len(
      raw)
  assert corpus.meta['tokenizer'] == 'byte' and corpus.meta['dtype'] == (
      'uint8')
  assert tokenizers.load_tokenizer(tmp_path / 'work').name == 'byte'
  assert source.exists()


def test_char_split_at_character_boundary(tmp_path):
  source = _write(tmp_path / 'a.txt', TEXT)
  corpus = data.load_corpus(_config(source, tokenizer='char'), tmp_path / 'work')
  n_train = int(len(TEXT) * 0.9)
  tok = corpus.tokenizer
  assert tok.decode(corpus.train_N) == TEXT[:n_train]
  assert tok.decode(corpus.val_N) == TEXT[n_train:]
  assert tok.chars == sorted(set(TEXT))
  loaded = tokenizers.load_tokenizer(tmp_path / 'work')
  assert loaded.chars == tok.chars


def test_char_vocabulary_covers_the_validation_tail(tmp_path):
  # '_' first appears in the last 10%: once fatal ("not in the vocabulary").
  text = 'abc def\n' * 90 + 'x_y\n' * 10
  source = _write(tmp_path / 'a.txt', text)
  corpus = data.load_corpus(_config(source, tokenizer='char', seq_len=4),
                        tmp_path / 'work')
  assert '_' in corpus.tokenizer.chars
  assert corpus.tokenizer.decode(corpus.val_N).endswith('x_y\n')


def test_sentencepiece_prepare_round_trip(tmp_path):
  source = _write(tmp_path / 'a.txt', TEXT * 3)
  corpus = data.load_corpus(
      _config(source, tokenizer='sentencepiece', vocab_size=300),
      tmp_path / 'work')
  tok = corpus.tokenizer
  assert tok.vocab_size == 300 and corpus.meta['vocab_size'] == 300
  assert (tmp_path / 'work' / 'tokenizer.model').is_file()
  text = tok.decode(corpus.train_N) + tok.decode(corpus.val_N)
  assert text == TEXT * 3


def test_val_fraction_zero_gives_empty_val(tmp_path):
  source = _write(tmp_path / 'a.txt', TEXT)
  corpus = data.load_corpus(_config(source, val_fraction=0.0), tmp_path / 'work')
  assert corpus.val_N.shape == (0,) and corpus.val_N.dtype == np.uint8
  assert corpus.train_N.size == len(TEXT.encode())
  again = data.load_corpus(_config(source, val_fraction=0.0), tmp_path / 'work')
  assert again.val_N.size == 0


def test_cache_reused_then_invalidated_by_source_change(
    tmp_path, cache_dir, monkeypatch):
  source = _write(tmp_path / 'a.txt', TEXT)
  config = _config(source)
  first = data.load_corpus(config, tmp_path / 'work')
  train_bin = first.cache_path / 'train.bin'
  stat = train_bin.stat()

  def fail(*args):
    raise AssertionError('re-tokenized although the cache is valid')

  with monkeypatch.context() as patch:
    patch.setattr(tokenizers.ByteTokenizer, 'encode_bytes', fail)
    second = data.load_corpus(config, tmp_path / 'work')
  assert second.cache_path == first.cache_path
  assert (train_bin.stat().st_ino, train_bin.stat().st_mtime_ns) == (
      stat.st_ino, stat.st_mtime_ns)
  np.testing.assert_array_equal(second.train_N, first.train_N)

  _write(source, TEXT.replace('fox', 'cat'))
  third = data.load_corpus(config, tmp_path / 'work')
  assert third.cache_path != first.cache_path
  assert third.meta['sources_sha256'] != first.meta['sources_sha256']
  assert b'cat' in third.train_N.astype(np.uint8).tobytes()
  assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
      [first.cache_path.name, third.cache_path.name])
  assert not [p for p in third.cache_path.iterdir()
              if p.name.startswith('.')]  # No leftover temp files.


def test_cache_key_depends_on_paths_and_val_fraction(tmp_path):
  first = data.load_corpus(_config(_write(tmp_path / 'a.txt', TEXT)),
                       tmp_path / 'work')
  renamed = data.load_corpus(_config(_write(tmp_path / 'b.txt', TEXT)),
                         tmp_path / 'work')
  other_split = data.load_corpus(
      _config(tmp_path / 'a.txt', val_fraction=0.2), tmp_path / 'work')
  keys = {c.cache_path for c in (first, renamed, other_split)}
  assert len(keys) == 3


def test_resumed_run_keeps_workdir_tokenizer(tmp_path):
  source = _write(tmp_path / 'a.txt', 'abcdefgh' * 50)
  workdir = tmp_path / 'work'
  first = data.load_corpus(_config(source, tokenizer='char'), workdir)
  saved = (workdir / 'tokenizer.json').read_bytes()
  _write(source, 'abcd' * 100)  # Fewer distinct characters now.
  second = data.load_corpus(_config(source, tokenizer='char'), workdir)
  assert second.tokenizer.chars == first.tokenizer.chars
  assert (workdir / 'tokenizer.json').read_bytes() == saved
  np.testing.assert_array_equal(second.train_N[:4], [0, 1, 2, 3])
  with pytest.raises(ConfigError, match='holds a .char. tokenizer'):
    data.load_corpus(_config(source, tokenizer='byte'), workdir)


@pytest.mark.parametrize('kind, fixture, vocab', [
    ('sentencepiece', 'sp_model_file', 400), ('hf', 'hf_tokenizer_file', 320)])
def test_existing_tokenizer_is_loaded_and_sets_the_vocabulary(
    tmp_path, request, kind, fixture, vocab):
  path = request.getfixturevalue(fixture)
  source = _write(tmp_path / 'a.txt', TEXT)
  config = _config(source, tokenizer=kind, tokenizer_path=path,
                   vocab_size=5000)
  corpus = data.load_corpus(config, tmp_path / 'work')
  tok = corpus.tokenizer
  assert tok.vocab_size == vocab and corpus.meta['vocab_size'] == vocab
  assert tok.decode(corpus.train_N) + tok.decode(corpus.val_N) == TEXT
  assert tokenizers.load_tokenizer(tmp_path / 'work').fingerprint() == (
      tok.fingerprint())
  again = data.load_corpus(config, tmp_path / 'work')  # Resumes: same ids.
  np.testing.assert_array_equal(again.train_N, corpus.train_N)


def test_resume_with_another_tokenizer_file_is_refused(
    tmp_path, sp_model_file):
  source = _write(tmp_path / 'a.txt', TEXT)
  data.load_corpus(_config(source, tokenizer='sentencepiece',
                       tokenizer_path=sp_model_file), tmp_path / 'work')
  other = tmp_path / 'other.model'
  other.write_bytes(tokenizers.SentencePieceTokenizer.train(
      TEXT, 300).model_bytes)
  with pytest.raises(ConfigError, match='differs from the tokenizer') as e:
    data.load_corpus(_config(source, tokenizer='sentencepiece',
                         tokenizer_path=str(other)), tmp_path / 'work')
  _one_line(e)


# ------------------------------------------------------------ train input --

SEQ_LEN = 8


def _arange_tokens(n: int) -> np.ndarray:
  """Distinct tokens: a window's first input is its start position."""
  return np.arange(n, dtype=np.uint16)


def test_batch_shapes_types_and_shift():
  ds = data.make_train_dataset(_arange_tokens(5000), SEQ_LEN,
                               global_batch_size=4, seed=0)
  batch = ds[0]
  chex.assert_shape([batch['inputs'], batch['targets']], (4, SEQ_LEN))
  chex.assert_type([batch['inputs'], batch['targets']], np.int32)
  np.testing.assert_array_equal(batch['targets'], batch['inputs'] + 1)
  starts_B = batch['inputs'][:, 0]
  np.testing.assert_array_equal(
      batch['inputs'], starts_B[:, None] + np.arange(SEQ_LEN)[None, :])


def test_batch_shift_on_real_tokens(tmp_path):
  source = _write(tmp_path / 'a.txt', TEXT)
  corpus = data.load_corpus(_config(source), tmp_path / 'work')
  ds = data.make_train_dataset(corpus.train_N, SEQ_LEN, 4, seed=1)
  for step in range(3):
    batch = ds[step]
    np.testing.assert_array_equal(batch['targets'][:, :-1],
                                  batch['inputs'][:, 1:])
    for row in range(4):
      window = batch['inputs'][row].astype(np.uint8).tobytes()
      assert window in TEXT.encode()


def test_epoch_visits_every_window_once():
  tokens_N = _arange_tokens(33 + SEQ_LEN)  # 33 windows = 11 batches of 3.
  ds = data.make_train_dataset(tokens_N, SEQ_LEN, 3, seed=5)
  starts = np.concatenate([ds[s]['inputs'][:, 0] for s in range(11)])
  assert sorted(starts.tolist()) == list(range(33))
  assert starts.tolist() != list(range(33))  # Shuffled.
  next_epoch = np.concatenate([ds[s]['inputs'][:, 0] for s in range(11, 22)])
  assert sorted(next_epoch.tolist()) == list(range(33))
  assert next_epoch.tolist() != starts.tolist()  # Reshuffled.


def test_batches_are_pure_function_of_seed_and_step():
  tokens_N = _arange_tokens(5000)
  ds_a = data.make_train_dataset(tokens_N, SEQ_LEN, 4, seed=7)
  ds_b = data.make_train_dataset(tokens_N, SEQ_LEN, 4, seed=7)
  ds_c = data.make_train_dataset(tokens_N, SEQ_LEN, 4, seed=8)
  for step in (0, 3, 1000, 10**9):
    np.testing.assert_array_equal(ds_a[step]['inputs'], ds_b[step]['inputs'])
  assert not np.array_equal(ds_a[0]['inputs'], ds_c[0]['inputs'])


def test_process_rows_are_rows_of_the_one_global_batch():
  """Whatever rows a process reads, they are those rows of the batch one
  process reads for the same step; replicas asking for the same rows get
  the same windows."""
  tokens_N = _arange_tokens(5000)
  full = data.make_train_dataset(tokens_N, SEQ_LEN, 8, seed=3)
  halves = [data.make_train_dataset(tokens_N, SEQ_LEN, 8, seed=3,
                                    rows_R=range(4 * p, 4 * p + 4))
            for p in range(2)]
  odd = data.make_train_dataset(tokens_N, SEQ_LEN, 8, seed=3,
                                rows_R=[1, 3, 5, 7])
  replica = data.make_train_dataset(tokens_N, SEQ_LEN, 8, seed=3,
                                    rows_R=[1, 3, 5, 7])
  for step in (0, 1, 19, 10**6):
    want = full[step]
    for name in ('inputs', 'targets'):
      np.testing.assert_array_equal(
          np.concatenate([h[step][name] for h in halves]), want[name])
      np.testing.assert_array_equal(odd[step][name], want[name][1::2])
      np.testing.assert_array_equal(replica[step][name], odd[step][name])
  chex.assert_shape(halves[1][0]['inputs'], (4, SEQ_LEN))


def test_bad_rows_or_seq_len_is_config_error():
  for rows in ([], [2, 1], [0, 8]):
    with pytest.raises(ConfigError, match='ascending rows'):
      data.make_train_dataset(_arange_tokens(100), SEQ_LEN, 8, seed=0,
                              rows_R=rows)
  with pytest.raises(ConfigError, match='data.seq_len'):
    data.make_train_dataset(_arange_tokens(8), SEQ_LEN, 2, seed=0)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_iterator_state_restore_gives_same_next_batch():
  ds = data.make_train_dataset(_arange_tokens(5000), SEQ_LEN, 4, seed=2)
  iterator = data.make_train_iterator(ds)
  taken = _take(iterator, 3)
  np.testing.assert_array_equal(taken[2]['inputs'], ds[2]['inputs'])
  state = iterator.get_state()
  expected = next(iterator)
  fresh = data.make_train_iterator(ds)
  fresh.set_state(state)
  actual = next(fresh)
  np.testing.assert_array_equal(actual['inputs'], expected['inputs'])
  np.testing.assert_array_equal(actual['targets'], expected['targets'])
  np.testing.assert_array_equal(actual['inputs'], ds[3]['inputs'])


def test_iterator_orbax_round_trip(tmp_path):
  ds = data.make_train_dataset(_arange_tokens(5000), SEQ_LEN, 4, seed=4)
  iterator = data.make_train_iterator(ds)
  _take(iterator, 5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 2)
  fresh = data.make_train_iterator(ds)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    assert manager.latest_step() == 5
    manager.restore(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  actual = _take(fresh, 2)
  for got, want in zip(actual, expected):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
  np.testing.assert_array_equal(actual[0]['inputs'], ds[5]['inputs'])


# ------------------------------------------------------------- eval input --


def test_eval_batches_fixed_and_evenly_spaced():
  tokens_N = _arange_tokens(1000)
  batches = data.eval_batches(tokens_N, SEQ_LEN, batch_size=4, n_batches=3)
  assert len(batches) == 3
  starts = np.concatenate([b['inputs'][:, 0] for b in batches])
  assert starts[0] == 0 and starts[-1] == 1000 - SEQ_LEN - 1
  gaps = np.diff(starts)
  assert np.abs(gaps - (1000 - SEQ_LEN - 1) / 11).max() < 1
  for batch in batches:
    chex.assert_shape([batch['inputs'], batch['targets']], (4, SEQ_LEN))
    chex.assert_type([batch['inputs'], batch['targets']], np.int32)
    np.testing.assert_array_equal(batch['targets'], batch['inputs'] + 1)
  again = data.eval_batches(tokens_N, SEQ_LEN, 4, 3)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


def test_eval_batches_small_split_repeats_windows():
  tokens_N = _arange_tokens(SEQ_LEN + 2)  # Only two distinct windows.
  batches = data.eval_batches(tokens_N, SEQ_LEN, batch_size=4, n_batches=2)
  starts = {int(s) for b in batches for s in b['inputs'][:, 0]}
  assert starts == {0, 1}
  with pytest.raises(ConfigError, match='validation split'):
    data.eval_batches(_arange_tokens(SEQ_LEN), SEQ_LEN, 4, 2)


def test_to_global_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('data'))
  ds = data.make_train_dataset(_arange_tokens(500), SEQ_LEN,
                               jax.device_count() * 2, seed=0)
  local = ds[0]
  batch = data.to_global_batch(local, sharding)
  assert set(batch) == {'inputs', 'targets'}
  assert isinstance(batch['inputs'], jax.Array)
  assert batch['inputs'].sharding == sharding
  chex.assert_shape(batch['inputs'], (jax.device_count() * 2, SEQ_LEN))
  np.testing.assert_array_equal(np.asarray(batch['targets']),
                                local['targets'])
