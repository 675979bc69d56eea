"""Tests for ztt_jax.shards and ztt_jax.sources: ztt-prepare's directories,
read as training reads them, against the in-memory path."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from ztt_jax import configlib
from ztt_jax import data
from ztt_jax import shards
from ztt_jax import sources
from ztt_jax import train
from ztt_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = ''.join(f'line {i}: the quick brown fox, ünïcode ☃ {i * i}\n'
               for i in range(300))
SHARD_MB = 2000 / (1 << 20)  # About 2 KB of text a shard: several shards.


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> pathlib.Path:
  path = tmp_path / 'cache'
  monkeypatch.setenv('ZTT_CACHE_DIR', str(path))
  return path


def _data_config(path, **overrides):
  config = configlib.base_config().data
  config.update(path=str(path), tokenizer='byte', val_fraction=0.1,
                seq_len=16)
  config.update(overrides)
  return config


def _corpus_dir(tmp_path) -> pathlib.Path:
  """Two text files (one without a final newline, one empty) and a JSONL
  file, with a character ('_') only in the last one."""
  root = tmp_path / 'src'
  root.mkdir()
  (root / 'a.txt').write_text(TEXT, encoding='utf-8')
  (root / 'b.txt').write_text('')
  records = [{'text': f'record {i}\nwith two lines ☃', 'id': i}
             for i in range(40)] + [{'text': 'last_one'}]
  (root / 'e.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records) + '\n',
      encoding='utf-8')
  (root / 'd.txt').write_text(TEXT[:3000].rstrip('\n'), encoding='utf-8')
  return root


def _prepare(tmp_path, name='prepared', **overrides) -> pathlib.Path:
  if not (tmp_path / 'src').exists():
    _corpus_dir(tmp_path)
  output = tmp_path / name
  shards.write_shards(_data_config(tmp_path / 'src', **overrides), output,
                 workers=1, shard_mb=SHARD_MB, log=lambda _: None)
  return output


# ----------------------------------------------------------------- sources --


def test_pieces_stream_exactly_the_corpus(tmp_path):
  files = sources.resolve_sources(str(_corpus_dir(tmp_path)))
  units = sources.plan_units(files, 1000)
  assert len(units) > 5
  streamed = b''.join(block for unit in units for piece in unit
                      for block in sources.piece_blocks(piece,
                                                        block_bytes=300))
  assert streamed == sources.read_corpus(files)
  for unit in units:  # Cut after a newline, never inside a character.
    for piece in unit:
      head = pathlib.Path(piece.path).read_bytes()[:piece.start]
      assert not head or head.endswith(b'\n')


def test_a_long_line_is_cut_at_a_character_start(tmp_path):
  path = tmp_path / 'one_line.txt'
  path.write_text('☃' * 5000, encoding='utf-8')  # 3 bytes each, no newline.
  units = sources.plan_units([path], 1000)
  assert len(units) >= 10
  blocks = [block for unit in units for piece in unit
            for block in sources.piece_blocks(piece, block_bytes=100)]
  assert all(len(b) <= 103 for b in blocks)
  assert all(b.decode('utf-8') for b in blocks)  # Each one valid UTF-8.
  assert b''.join(blocks) == path.read_bytes()


def test_jsonl_records_are_documents(tmp_path):
  root = _corpus_dir(tmp_path)
  text = sources.read_corpus([root / 'e.jsonl'])
  assert text.startswith(b'record 0\nwith two lines \xe2\x98\x83\nrecord 1')
  assert text.endswith(b'\nlast_one')
  with pytest.raises(ConfigError, match="no text field 'body'") as e:
    sources.read_corpus([root / 'e.jsonl'], jsonl_field='body')
  assert 'data.jsonl_field' in str(e.value) and '\n' not in str(e.value)


def test_bad_jsonl_line_names_file_and_offset(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(ConfigError, match=r"bad.jsonl' byte 15 is not a JSON"):
    sources.read_corpus([path])


# ----------------------------------------------------------------- prepare --


@pytest.mark.parametrize('tokenizer', ['byte', 'char'])
def test_prepared_tokens_are_the_in_memory_tokens(tmp_path, tokenizer):
  output = _prepare(tmp_path, tokenizer=tokenizer)
  manifest = json.loads((output / 'manifest.json').read_text())
  assert len(manifest['shards']) > 5
  assert manifest['dtype'] == 'uint8'  # byte: 256 ids; char: a few dozen.
  config = _data_config(tmp_path / 'src', tokenizer=tokenizer)
  in_memory = data.load_corpus(config, tmp_path / 'work_text')
  from_dir = data.load_corpus(_data_config(output, tokenizer=tokenizer),
                          tmp_path / 'work_dir')
  assert from_dir.tokenizer.fingerprint() == in_memory.tokenizer.fingerprint()
  assert '_' in from_dir.tokenizer.decode(np.asarray(from_dir.val_N))
  for split in ('train_N', 'val_N'):
    np.testing.assert_array_equal(np.asarray(getattr(from_dir, split)),
                                  np.asarray(getattr(in_memory, split)))
  # The same batches for the same (seed, step), rows of one process too.
  for rows in (None, [1, 3]):
    ds_text = data.make_train_dataset(in_memory.train_N, 16, 4, 7, rows)
    ds_dir = data.make_train_dataset(from_dir.train_N, 16, 4, 7, rows)
    for step in (0, 1, 50, 1234):
      for key in ('inputs', 'targets'):
        np.testing.assert_array_equal(ds_dir[step][key], ds_text[step][key])
  np.testing.assert_array_equal(
      data.eval_batches(from_dir.val_N, 16, 4, 2)[1]['inputs'],
      data.eval_batches(in_memory.val_N, 16, 4, 2)[1]['inputs'])


def test_processes_write_the_same_shards(tmp_path):
  one = _prepare(tmp_path, 'one')
  two = tmp_path / 'two'
  shards.write_shards(_data_config(tmp_path / 'src'), two, workers=2,
                 shard_mb=SHARD_MB, log=lambda _: None)
  manifests = [json.loads((d / 'manifest.json').read_text())
               for d in (one, two)]
  assert manifests[0]['shards'] == manifests[1]['shards']
  assert shards.verify(two) == []


def test_opening_reads_no_tokens_and_checks_sizes(tmp_path, monkeypatch):
  output = _prepare(tmp_path)
  opened = []
  real_memmap = np.memmap
  monkeypatch.setattr(np, 'memmap', lambda *a, **k: opened.append(a) or
                      real_memmap(*a, **k))
  prepared = shards.open_prepared(output)
  assert isinstance(prepared.tokens_N, shards.TokenStream)
  assert len(opened) == len(prepared.manifest['shards'])
  everything = np.concatenate([
      np.fromfile(output / s['file'], np.uint8)
      for s in prepared.manifest['shards']])
  index = np.array([[0, 1999, 2000, 2001], [len(everything) - 1, 5, 6, 7]])
  np.testing.assert_array_equal(prepared.tokens_N[index], everything[index])
  view = prepared.tokens_N[1990:2010]
  np.testing.assert_array_equal(np.asarray(view), everything[1990:2010])
  with pytest.raises(IndexError):
    prepared.tokens_N[np.array([len(everything)])]
  first = output / prepared.manifest['shards'][0]['file']
  first.write_bytes(first.read_bytes()[:-1])  # Truncated.
  with pytest.raises(ConfigError, match='shard_00000.bin is .* bytes but the '
                     'manifest says') as e:
    shards.open_prepared(output)
  assert '\n' not in str(e.value)
  assert shards.verify(output) == ['shard_00000.bin']


def test_tokenizer_mismatch_is_one_line(tmp_path):
  output = _prepare(tmp_path, tokenizer='char')
  with pytest.raises(ConfigError, match='prepared with the char tokenizer but '
                     'data.tokenizer=byte; set --config.data.tokenizer=char'):
    data.load_corpus(_data_config(output), tmp_path / 'work')


@pytest.mark.parametrize('kind, fixture', [
    ('sentencepiece', 'sp_model_file'), ('hf', 'hf_tokenizer_file'),
    ('sentencepiece', None)])
def test_prepare_with_other_tokenizers(tmp_path, request, kind, fixture):
  path = request.getfixturevalue(fixture) if fixture else ''
  output = _prepare(tmp_path, tokenizer=kind, tokenizer_path=path,
                    vocab_size=300)
  corpus = data.load_corpus(_data_config(output, tokenizer=kind,
                                     tokenizer_path=path, vocab_size=300),
                        tmp_path / 'work')
  assert corpus.meta['dtype'] == 'uint16'
  text = corpus.tokenizer.decode(np.concatenate(
      [np.asarray(corpus.train_N), np.asarray(corpus.val_N)]))
  expected = sources.read_corpus(sources.resolve_sources(
      str(tmp_path / 'src'))).decode()
  assert text == expected


def test_other_processes_only_read_a_prepared_dir(tmp_path):
  output = _prepare(tmp_path, tokenizer='char')
  config = _data_config(output, tokenizer='char')
  workdir = tmp_path / 'run'
  # Before process 0 saved the tokenizer: refused, nothing written.
  with pytest.raises(ConfigError, match='tokenizer.json'):
    data.load_corpus(config, workdir, write=False)
  assert not workdir.exists()
  first = data.load_corpus(config, workdir)  # Process 0.
  before = sorted(p.name for p in workdir.iterdir())
  other = data.load_corpus(config, workdir, write=False)
  assert sorted(p.name for p in workdir.iterdir()) == before
  np.testing.assert_array_equal(np.asarray(other.train_N),
                                np.asarray(first.train_N))
  # A workdir trained with another tokenizer is refused.
  with pytest.raises(ConfigError, match='holds another tokenizer'):
    data.load_corpus(_data_config(_prepare(tmp_path, 'bytes'), tokenizer='byte'),
                 workdir)


# ---------------------------------------------------------------- held out --


def test_val_path_text_and_prepared(tmp_path):
  train_text = tmp_path / 'train.txt'
  train_text.write_text(TEXT)
  val_text = tmp_path / 'val.txt'
  val_text.write_text('held out text: zebra_quartz\n' * 20)
  config = _data_config(train_text, tokenizer='char', val_path=str(val_text))
  corpus = data.load_corpus(config, tmp_path / 'work')
  assert len(corpus.train_N) == len(TEXT)  # All of data.path trains.
  assert corpus.tokenizer.decode(corpus.val_N) == val_text.read_text()
  val_dir = tmp_path / 'val_prepared'
  shards.write_shards(_data_config(val_text, tokenizer='byte'), val_dir,
                 workers=1, log=lambda _: None)
  corpus = data.load_corpus(_data_config(train_text, val_path=str(val_dir)),
                        tmp_path / 'work_byte')
  assert bytes(np.asarray(corpus.val_N)) == val_text.read_bytes()
  with pytest.raises(ConfigError, match='was prepared with another '
                     'tokenizer'):
    data.load_corpus(_data_config(train_text, tokenizer='char',
                              val_path=str(val_dir)), tmp_path / 'work_char')
  with pytest.raises(ConfigError, match='data.val_path=.*no such file'):
    data.load_corpus(_data_config(train_text, val_path=str(tmp_path / 'nope')),
                 tmp_path / 'work_3')
  assert not (tmp_path / 'work_3').exists()


# ------------------------------------------------------------ train, resume --


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.mark.slow(22)
def test_train_from_prepared_dir_resumes_exactly(tmp_path):
  output = _prepare(tmp_path, tokenizer='char')
  config = tiny.get_config('ztt')
  config.data.update(path=str(output), seq_len=16)
  config.train.update(steps=4, log_every_steps=1, eval_every_steps=2)
  config.sample.max_new_tokens = 0
  config.checkpoint.update(async_save=False, every_steps=2)
  train.train(config, str(tmp_path / 'straight'))
  train.train(config, str(tmp_path / 'resumed'), stop_at=2)
  train.train(config, str(tmp_path / 'resumed'))
  straight, resumed = (_losses(tmp_path / d) for d in ('straight', 'resumed'))
  assert sorted(straight) == [1, 2, 3, 4]
  assert all(resumed[s] == straight[s] for s in straight)
  # The same run from the text itself takes the same batches: same losses.
  config.data.path = str(tmp_path / 'src')
  train.train(config, str(tmp_path / 'text'))
  assert _losses(tmp_path / 'text') == straight


# -------------------------------------------------------------- bad inputs --


def _ztt_prepare(tmp_path, *args) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.prepare',
       f'--config={REPO}/configs/tiny.py', '--workers=1', *args],
      capture_output=True, text=True, cwd=tmp_path, timeout=120,
      env={**os.environ, 'PYTHONPATH': str(REPO)})


def test_ztt_prepare_command_and_its_bad_inputs(tmp_path):
  root = _corpus_dir(tmp_path)
  result = _ztt_prepare(tmp_path, f'--config.data.path={root}',
                        '--output=out', '--shard_mb=0.002')
  assert result.returncode == 0, result.stderr
  assert 'tokens/s' in result.stdout and (tmp_path / 'out' /
                                          'manifest.json').is_file()
  keep = tmp_path / 'keep'
  keep.mkdir()
  (keep / 'mine.txt').write_text('precious')
  (tmp_path / 'bad.jsonl').write_text('{"text": "a"}\nnot json\n')
  for args, expected in [
      ([f'--config.data.path={root}', f'--output={keep}'],
       'already exists and is not an empty directory'),
      ([f'--config.data.path={tmp_path}/bad.jsonl', '--output=new'],
       "bad.jsonl' byte 14 is not a JSON record"),
      ([f'--config.data.path={tmp_path}/nope*.txt', '--output=new'],
       'the glob matches no files'),
      ([f'--config.data.path={tmp_path}/out', '--output=new'],
       'is a prepared directory already'),
      ([f'--config.data.path={root}', f'--output={root}/inside'],
       'inside the corpus it reads'),
      ([f'--config.data.path={root}', '--output=new',
        '--config.data.tokenizer=hf'], 'data.tokenizer=hf needs'),
  ]:
    result = _ztt_prepare(tmp_path, *args)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith('ztt-prepare: error: ') and expected in lines[0]
    assert not (tmp_path / 'new').exists()  # Nothing left behind.
  assert (keep / 'mine.txt').read_text() == 'precious'
  assert not (root / 'inside').exists()
  result = _ztt_prepare(tmp_path, '--output=out', '--verify')
  assert result.returncode == 0 and 'every shard matches' in result.stdout
