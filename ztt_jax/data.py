"""Corpus preparation (sources -> tokenizer -> token arrays) and input.

`load_corpus` gives a run its tokenizer and two token arrays, train and
validation, from one of:

* text (`data.path` a file, directory, glob, .jsonl files or
  builtin:stdlib): read whole, split contiguously into train (head) and
  validation (tail), tokenized into a content-addressed cache
  (`cache_dir/<key>/{train,val}.bin` + `meta.json`) read as memmaps;
* a directory `ztt-prepare` wrote (`shards.py`): opened without reading or
  hashing the corpus; the validation tail is the last val_fraction of its
  tokens.

`data.val_path` (text or a prepared directory) replaces the tail by a
held-out set; all of data.path then trains.

`make_train_dataset` turns the train tokens into an infinite, seeded grain
`MapDataset` of `{'inputs', 'targets'}` batches whose element `s` is this
process's rows of the batch for step `s`; `eval_batches` gives a fixed set
of evaluation batches. `train_dataset` and `eval_set` do the same for any
corpus, a synthetic task's included (`data.path=synthetic:hops`,
synthetic.py), whose batches add a loss `mask` and each target's
`difficulty`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

from ztt_jax import configlib
from ztt_jax import shards
from ztt_jax import sources
from ztt_jax import synthetic
from ztt_jax import tokenizers
from ztt_jax.errors import check

# Where data.path's files come from (kept here for callers of data.*).
BUILTIN_STDLIB = sources.BUILTIN_STDLIB
resolve_sources = sources.resolve_sources
CACHE_ENV_VAR = 'ZTT_CACHE_DIR'
DEFAULT_CACHE_DIR = '~/.cache/ztt_jax'
_CACHE_FORMAT = 2  # 2: uint8 tokens for vocabularies of up to 256.


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized corpus.

  Attributes:
    tokenizer: the tokenizer (saved in the workdir).
    train_N: read-only tokens of the training split (the head): a memmap,
      or a `shards.TokenStream` over a prepared directory's shards.
    val_N: read-only tokens of the validation split (the tail, or
      data.val_path's); empty when data.val_fraction is 0 and there is no
      data.val_path.
    meta: the cache's meta.json contents (a prepared directory: a summary
      of its manifest).
    cache_path: the cache directory holding train.bin / val.bin / meta.json,
      or the prepared directory.
    task: a built-in synthetic task (`data.path=synthetic:...`), whose
      examples are drawn, not read: then the token arrays are empty.
  """
  tokenizer: tokenizers.Tokenizer
  train_N: np.ndarray
  val_N: np.ndarray
  meta: dict[str, Any]
  cache_path: pathlib.Path
  task: synthetic.Task | None = None


@dataclasses.dataclass(frozen=True)
class _Options:
  """Validated data config values."""
  path: str
  kind: str
  tokenizer_path: str
  vocab_size: int
  model_type: str
  val_fraction: float
  val_path: str
  jsonl_field: str
  seq_len: int
  cache_root: pathlib.Path


# ------------------------------------------------------------------ config --


def _cache_root(data_config) -> pathlib.Path:
  """data.cache_dir if set, else $ZTT_CACHE_DIR, else ~/.cache/ztt_jax."""
  root = (data_config.cache_dir or os.environ.get(CACHE_ENV_VAR) or
          DEFAULT_CACHE_DIR)
  return pathlib.Path(os.path.expanduser(str(root)))


def _options(data_config) -> _Options:
  """The data config fields `prepare` uses, checked by
  `configlib.validate_data`."""
  configlib.validate_data(data_config)
  d = data_config
  return _Options(
      path=d.path, kind=d.tokenizer,
      tokenizer_path=os.path.expanduser(d.get('tokenizer_path', '')),
      vocab_size=d.vocab_size,
      model_type=d.sp_model_type,
      # A held-out set replaces the tail: all of data.path trains.
      val_fraction=0.0 if d.get('val_path', '') else float(d.val_fraction),
      val_path=d.get('val_path', ''), jsonl_field=d.get('jsonl_field', 'text'),
      seq_len=d.seq_len, cache_root=_cache_root(d))


# ------------------------------------------------------------------- split --


def split_offset(corpus: bytes, kind: str, val_fraction: float) -> int:
  """Byte offset where the validation tail starts.

  The byte tokenizer splits at byte `int(n * (1 - val_fraction))` (nanoGPT's
  90/10 split); the char tokenizer splits the decoded text at a character
  count; SentencePiece moves the byte split back to a UTF-8 boundary.

  Args:
    corpus: the concatenated source bytes.
    kind: the tokenizer kind.
    val_fraction: the fraction of the corpus used for validation.

  Returns:
    The offset; corpus[:offset] is train and corpus[offset:] validation.
  """
  if kind == 'char':
    text = tokenizers.decode_utf8(corpus)
    n_train_chars = int(len(text) * (1.0 - val_fraction))
    return len(text[:n_train_chars].encode('utf-8'))
  offset = int(len(corpus) * (1.0 - val_fraction))
  if kind == 'sentencepiece':
    while 0 < offset < len(corpus) and (corpus[offset] & 0xC0) == 0x80:
      offset -= 1
  return offset


# --------------------------------------------------------------- tokenizer --


def _workdir_tokenizer(options: _Options, workdir: pathlib.Path,
                       train_bytes: bytes) -> tuple[tokenizers.Tokenizer,
                                                    bool]:
  """Loads the workdir's tokenizer, or builds one; returns (it, is_new)."""
  if not (workdir / tokenizers.JSON_NAME).exists():
    tokenizer = tokenizers.build_tokenizer(
        options.kind, train_bytes, options.vocab_size, options.model_type,
        options.tokenizer_path)
    return tokenizer, True
  tokenizer = tokenizers.load_tokenizer(workdir)
  check(tokenizer.name == options.kind,
        f'data.tokenizer={options.kind!r} but {str(workdir)!r} holds a '
        f'{tokenizer.name!r} tokenizer; set data.tokenizer={tokenizer.name} '
        'to resume, or use a fresh workdir')
  if options.tokenizer_path:
    given = tokenizers.build_tokenizer(options.kind, b'', path=options
                                       .tokenizer_path)
    check(given.fingerprint() == tokenizer.fingerprint(),
          f'data.tokenizer_path={options.tokenizer_path!r} differs from the '
          f'tokenizer {str(workdir)!r} was trained with; pass that one to '
          'resume, or use a fresh workdir')
    return tokenizer, False
  check(options.kind != 'sentencepiece' or
        tokenizer.vocab_size == options.vocab_size,
        f'data.vocab_size={options.vocab_size} but {str(workdir)!r} holds a '
        f'sentencepiece tokenizer with vocab_size={tokenizer.vocab_size}; set '
        f'data.vocab_size={tokenizer.vocab_size} to resume, or use a fresh '
        'workdir')
  return tokenizer, False


token_dtype = shards.token_dtype  # The smallest that holds the vocabulary.


# ------------------------------------------------------------------- cache --


def _cache_key(sources_sha256: str, files: Sequence[pathlib.Path],
               tokenizer: tokenizers.Tokenizer, val_fraction: float) -> str:
  payload = {
      'format': _CACHE_FORMAT,
      'sources_sha256': sources_sha256,
      'paths': [str(p.resolve()) for p in files],
      'tokenizer': tokenizer.name,
      'tokenizer_sha256': tokenizer.fingerprint(),
      'val_fraction': val_fraction,
  }
  blob = json.dumps(payload, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()


def _cached_meta(cache_path: pathlib.Path, key: str) -> dict[str, Any] | None:
  """meta.json when it matches `key` and the .bin files are complete."""
  try:
    meta = json.loads((cache_path / 'meta.json').read_text())
    itemsize = np.dtype(meta['dtype']).itemsize
    sizes_ok = all(
        (cache_path / f'{split}.bin').stat().st_size ==
        meta[f'n_{split}_tokens'] * itemsize for split in ('train', 'val'))
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return meta if meta.get('key') == key and sizes_ok else None


def _write_cache(cache_path: pathlib.Path, meta: dict[str, Any],
                 train_N: np.ndarray, val_N: np.ndarray) -> None:
  """Writes train.bin, val.bin, then meta.json, each atomically."""
  cache_path.mkdir(parents=True, exist_ok=True)
  dtype = np.dtype(meta['dtype'])
  for split, ids_N in (('train', train_N), ('val', val_N)):
    tokenizers.atomic_write_bytes(cache_path / f'{split}.bin',
                                  np.asarray(ids_N, dtype=dtype).tobytes())
  meta_bytes = (json.dumps(meta, indent=1, sort_keys=True) + '\n').encode()
  tokenizers.atomic_write_bytes(cache_path / 'meta.json', meta_bytes)


def _open_tokens(path: pathlib.Path, dtype: np.dtype, n: int) -> np.ndarray:
  if n == 0:  # mmap cannot map an empty file.
    empty_N = np.zeros(0, dtype=dtype)
    empty_N.flags.writeable = False
    return empty_N
  return np.memmap(path, dtype=dtype, mode='r', shape=(n,))


def _check_lengths(options: _Options, n_train: int, n_val: int) -> None:
  need = options.seq_len + 1
  fix = 'a lower data.val_fraction, ' if options.val_fraction > 0 else ''
  check(n_train >= need,
        f'data: the corpus is too short for data.seq_len={options.seq_len}: '
        f'the training split has {n_train} tokens but needs at least {need}; '
        f'use a smaller data.seq_len, {fix}or a larger corpus')
  check(options.val_fraction == 0 or n_val >= need,
        f'data: the corpus is too short for data.seq_len={options.seq_len}: '
        f'the validation split has {n_val} tokens but needs at least {need}; '
        'use a smaller data.seq_len, a higher data.val_fraction, or '
        'data.val_fraction=0 to skip evaluation')


# ---------------------------------------------------------------- held out --


def _held_out_text(options: _Options) -> bytes | None:
  """data.val_path's text when it names text (None: unset or prepared)."""
  if not options.val_path or shards.is_prepared(options.val_path):
    return None
  files = sources.resolve_sources(options.val_path, 'data.val_path')
  text = sources.read_corpus(files, options.jsonl_field, 'data.val_path')
  check(len(text) > 0, f'data.val_path={options.val_path!r}: the validation '
        'text is empty; pass a file with some text in it')
  return text


def _held_out_tokens(options: _Options, tokenizer: tokenizers.Tokenizer,
                     text: bytes | None):
  """data.val_path's tokens (None when unset): `text` tokenized in memory
  (validation sets are small), or a prepared directory's tokens."""
  if not options.val_path:
    return None
  if text is None:
    prepared = shards.open_prepared(options.val_path, 'data.val_path')
    check(prepared.manifest['tokenizer_sha256'] == tokenizer.fingerprint(),
          f'data.val_path={options.val_path!r} was prepared with another '
          f'tokenizer ({prepared.tokenizer.name}) than this run\'s '
          f'({tokenizer.name}); prepare it with the run\'s data settings')
    tokens_N = prepared.tokens_N
  else:
    tokens_N = np.asarray(tokenizer.encode_bytes(text),
                          dtype=token_dtype(tokenizer.vocab_size))
    tokens_N.flags.writeable = False
  need = options.seq_len + 1
  check(len(tokens_N) >= need,
        f'data.val_path={options.val_path!r} has {len(tokens_N)} tokens but '
        f'data.seq_len={options.seq_len} needs at least {need}; use a longer '
        'validation set or a smaller data.seq_len')
  return tokens_N


# ---------------------------------------------------------------- prepared --


def _prepare_from_shards(options: _Options, workdir: pathlib.Path,
                         write: bool) -> Corpus:
  """The Corpus of a ztt-prepare directory: reads its manifest and
  tokenizer, stats its shards; no token is read here."""
  prepared = shards.open_prepared(options.path)
  tokenizer = prepared.tokenizer
  check(tokenizer.name == options.kind,
        f'data.path={options.path!r} was prepared with the '
        f'{tokenizer.name} tokenizer but data.tokenizer={options.kind}; set '
        f'--config.data.tokenizer={tokenizer.name}')
  saved = workdir / tokenizers.JSON_NAME
  if saved.exists():
    check(tokenizers.load_tokenizer(workdir).fingerprint() ==
          tokenizer.fingerprint(),
          f'{str(workdir)!r} holds another tokenizer than data.path='
          f'{options.path!r}; resume with the data it was trained on, or use '
          'a fresh workdir')
  else:
    check(write, f'{str(workdir)!r} has no {tokenizers.JSON_NAME} although '
          'process 0 prepared the corpus; the workdir must be one directory '
          'every process sees')
  held_out = _held_out_tokens(options, tokenizer, _held_out_text(options))
  tokens_N = prepared.tokens_N
  n_train = int(len(tokens_N) * (1.0 - options.val_fraction))
  train_N, val_N = tokens_N[:n_train], tokens_N[n_train:]
  _check_lengths(options, len(train_N), len(val_N))
  if held_out is not None:
    val_N = held_out
  manifest = prepared.manifest
  meta = {
      'path': options.path, 'prepared': True, 'tokenizer': tokenizer.name,
      'vocab_size': tokenizer.vocab_size, 'dtype': manifest['dtype'],
      'n_train_tokens': len(train_N), 'n_val_tokens': len(val_N),
      'n_sources': manifest['n_sources'], 'n_shards': len(manifest['shards']),
      'val_fraction': options.val_fraction, 'val_path': options.val_path,
  }
  if write and not saved.exists():
    tokenizer.save(workdir)
  return Corpus(tokenizer=tokenizer, train_N=train_N, val_N=val_N,
                meta=meta, cache_path=prepared.path)


# ------------------------------------------------------------- load_corpus --


def load_corpus(data_config: ml_collections.ConfigDict,
            workdir: str | os.PathLike[str], write: bool = True) -> Corpus:
  """Tokenizes the configured corpus (cached) and returns its two splits.

  Nothing is written (workdir, tokenizer, cache) unless every check passes.

  Args:
    data_config: the `data` ConfigDict (path, tokenizer, tokenizer_path,
      vocab_size, sp_model_type, val_fraction, val_path, jsonl_field,
      seq_len, cache_dir).
    workdir: the run directory; holds tokenizer.json (reused when present).
    write: False: only read (the processes other than 0 of a multi-process
      run, see multihost.coordinated_corpus): the workdir's tokenizer.json must
      exist, and a token cache that is not there is tokenized in memory.

  Returns:
    The Corpus.

  Raises:
    ConfigError: for any bad config value or unusable corpus.
  """
  options = _options(data_config)
  workdir = pathlib.Path(workdir).expanduser()
  if synthetic.is_synthetic(options.path):
    return _synthetic_corpus(options, workdir, write)
  if shards.is_prepared(options.path):
    return _prepare_from_shards(options, workdir, write)
  files = sources.resolve_sources(options.path)
  blobs = sources.read_documents(files, options.jsonl_field)
  corpus = sources.SEPARATOR.join(blobs)
  check(len(corpus) > 0, f'data.path={options.path!r}: the corpus is empty '
        '(0 bytes); pass a text file, directory or glob with some text in it')
  if options.kind == 'char':
    sources.check_utf8(files, blobs)
  del blobs
  held_out_text = _held_out_text(options)
  offset = split_offset(corpus, options.kind, options.val_fraction)
  check(write or (workdir / tokenizers.JSON_NAME).exists(),
        f'{str(workdir)!r} has no {tokenizers.JSON_NAME} although process 0 '
        'prepared the corpus; the workdir must be one directory every '
        'process sees')
  # char: every character of the corpus (nanoGPT) and of a held-out text,
  # so one first seen in the validation set is no error; sentencepiece
  # learns from the training split.
  if options.kind == 'char':
    learn_from = corpus if held_out_text is None else (
        corpus + sources.SEPARATOR + held_out_text)
  else:
    learn_from = corpus[:offset]
  tokenizer, is_new = _workdir_tokenizer(options, workdir, learn_from)
  del learn_from
  held_out = _held_out_tokens(options, tokenizer, held_out_text)
  sources_sha256 = hashlib.sha256(corpus).hexdigest()
  key = _cache_key(sources_sha256, files, tokenizer, options.val_fraction)
  cache_path = options.cache_root / key
  meta = _cached_meta(cache_path, key)
  if meta is None:
    train_N = tokenizer.encode_bytes(corpus[:offset])
    val_N = tokenizer.encode_bytes(corpus[offset:])
    meta = {
        'key': key, 'path': options.path, 'tokenizer': tokenizer.name,
        'vocab_size': tokenizer.vocab_size,
        'n_train_tokens': int(train_N.size), 'n_val_tokens': int(val_N.size),
        'n_train_bytes': offset, 'n_val_bytes': len(corpus) - offset,
        'sources_sha256': sources_sha256, 'n_sources': len(files),
        'val_fraction': options.val_fraction,
        'dtype': token_dtype(tokenizer.vocab_size).name,
    }
    _check_lengths(options, train_N.size, val_N.size)
    dtype = np.dtype(meta['dtype'])
    if not write:  # In memory, as the cache would hold them.
      return Corpus(tokenizer=tokenizer,
                    train_N=np.asarray(train_N, dtype=dtype),
                    val_N=(np.asarray(val_N, dtype=dtype) if held_out is None
                           else held_out), meta=meta, cache_path=cache_path)
    if is_new:
      tokenizer.save(workdir)
    _write_cache(cache_path, meta, train_N, val_N)
  else:
    _check_lengths(options, meta['n_train_tokens'], meta['n_val_tokens'])
    if is_new:
      tokenizer.save(workdir)
  dtype = np.dtype(meta['dtype'])
  val_N = _open_tokens(cache_path / 'val.bin', dtype, meta['n_val_tokens'])
  return Corpus(
      tokenizer=tokenizer,
      train_N=_open_tokens(cache_path / 'train.bin', dtype,
                           meta['n_train_tokens']),
      val_N=val_N if held_out is None else held_out,
      meta=meta, cache_path=cache_path)


def _synthetic_corpus(options: _Options, workdir: pathlib.Path,
                      write: bool) -> Corpus:
  """A synthetic task's corpus: its char alphabet as the tokenizer (saved
  in the workdir like any other), no token arrays."""
  task = synthetic.parse(options.path)
  check(options.kind == 'char', f'data.path={options.path!r} is read with '
        f'its own alphabet; set data.tokenizer=char (not {options.kind})')
  tokenizer = tokenizers.CharTokenizer(list(task.alphabet))
  if (workdir / tokenizers.JSON_NAME).exists():
    saved = tokenizers.load_tokenizer(workdir)
    check(saved.files() == tokenizer.files(), f'{workdir} holds another '
          f'tokenizer than {options.path!r} uses; use a new --workdir')
  elif write:
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(workdir)
  empty = np.zeros(0, np.uint8)
  return Corpus(tokenizer=tokenizer, train_N=empty, val_N=empty,
                meta={'path': options.path, 'task': task.name,
                      'max_difficulty': task.max_difficulty,
                      'vocab_size': tokenizer.vocab_size},
                cache_path=workdir, task=task)


# ------------------------------------------------------------------- input --


class _DrawRows:
  """Maps a step index to this process's rows of that step's batch of a
  synthetic task: inputs, targets, the loss mask (1 at answers) and each
  target's difficulty (0 elsewhere), [R, seq_len] each."""

  def __init__(self, task: synthetic.Task, tokenizer, seq_len: int,
               seed: int, stream: int, rows_R: np.ndarray):
    self.task, self.tokenizer, self.seq_len = task, tokenizer, seq_len
    self.seed, self.stream, self.rows_R = seed, stream, rows_R

  def __call__(self, index) -> dict[str, np.ndarray]:
    examples = [synthetic.draw(self.task, self.seed, self.stream, int(index),
                               int(row), self.seq_len + 1)
                for row in self.rows_R]
    windows_RxW = np.stack([self.tokenizer.encode(e.text) for e in examples])
    difficulty_RxT = np.stack([e.difficulty_W[1:] for e in examples])
    return dict(_inputs_targets(windows_RxW),
                mask=(difficulty_RxT > 0).astype(np.float32),
                difficulty=difficulty_RxT.astype(np.int32))


# Steps a synthetic training stream holds (it never runs out in practice).
_SYNTHETIC_STEPS = 1 << 40
# Evaluation examples do not depend on the run's seed: every seed of a
# study scores the same ones.
_SYNTHETIC_EVAL_SEED = 0


def train_dataset(corpus: Corpus, seq_len: int, global_batch_size: int,
                  seed: int, rows_R: Sequence[int] | None = None
                  ) -> grain.MapDataset:
  """`make_train_dataset` of the corpus's training tokens, or a synthetic
  task's stream (element s: this process's rows of step s's batch, drawn
  from (seed, s, row))."""
  if corpus.task is None:
    return make_train_dataset(corpus.train_N, seq_len, global_batch_size,
                              seed, rows_R)
  rows_R = _checked_rows(rows_R, global_batch_size)
  return grain.MapDataset.range(_SYNTHETIC_STEPS).map(_DrawRows(
      corpus.task, corpus.tokenizer, seq_len, seed, synthetic.TRAIN, rows_R))


def eval_set(corpus: Corpus, seq_len: int, batch_size: int, n_batches: int,
             split: str = 'val') -> list[dict[str, np.ndarray]]:
  """The fixed evaluation batches: `eval_batches` of the split's tokens
  ([] when the split is shorter than a window), or a synthetic task's
  evaluation stream (the same whatever the run's seed)."""
  if corpus.task is None:
    tokens_N = corpus.val_N if split == 'val' else corpus.train_N
    if len(tokens_N) <= seq_len:
      return []
    return eval_batches(tokens_N, seq_len, batch_size, n_batches)
  draw = _DrawRows(corpus.task, corpus.tokenizer, seq_len,
                   _SYNTHETIC_EVAL_SEED, synthetic.EVAL, np.arange(batch_size))
  offset = 0 if split == 'val' else n_batches  # 'train': other examples.
  return [draw(offset + i) for i in range(n_batches)]


def sample_prompt(corpus: Corpus, seq_len: int) -> np.ndarray:
  """The closing sample's default prompt: the first half window of the
  validation text (or the training text), or of a synthetic example."""
  if corpus.task is not None:
    example = synthetic.draw(corpus.task, _SYNTHETIC_EVAL_SEED,
                             synthetic.EVAL, 0, 0, seq_len + 1)
    return corpus.tokenizer.encode(example.text[:seq_len // 2])
  source = corpus.val_N if len(corpus.val_N) else corpus.train_N
  return np.asarray(source[:seq_len // 2])


def _checked_rows(rows_R, global_batch_size: int) -> np.ndarray:
  check(global_batch_size > 0,
        f'batch size {global_batch_size} must be positive')
  rows_R = (np.arange(global_batch_size) if rows_R is None
            else np.asarray(rows_R, dtype=np.int64))
  check(len(rows_R) > 0 and (np.diff(rows_R) > 0).all()
        and 0 <= rows_R[0] and rows_R[-1] < global_batch_size,
        f'rows {rows_R.tolist()} are not ascending rows of a batch of '
        f'{global_batch_size}')
  return rows_R



class _ReadRows:
  """Maps a step's [B] window starts to this process's rows, as inputs and
  targets [R, seq_len]: only those R windows are read."""

  def __init__(self, tokens_N: np.ndarray, seq_len: int, rows_R: np.ndarray):
    self.tokens_N = tokens_N
    self.offsets_W = np.arange(seq_len + 1, dtype=np.int64)
    self.rows_R = rows_R

  def __call__(self, starts_B: np.ndarray) -> dict[str, np.ndarray]:
    starts_R = np.asarray(starts_B, dtype=np.int64)[self.rows_R]
    windows_RxW = np.asarray(
        self.tokens_N[starts_R[:, None] + self.offsets_W[None, :]],
        dtype=np.int32)
    return _inputs_targets(windows_RxW)


def _inputs_targets(windows_BxW: np.ndarray) -> dict[str, np.ndarray]:
  """Splits [B, T+1] windows into next-token inputs and targets [B, T]."""
  return {
      'inputs': np.ascontiguousarray(windows_BxW[:, :-1], dtype=np.int32),
      'targets': np.ascontiguousarray(windows_BxW[:, 1:], dtype=np.int32),
  }


def _check_split(tokens_N: np.ndarray, seq_len: int, what: str) -> None:
  check(isinstance(seq_len, int) and seq_len > 0,
        f'data.seq_len={seq_len!r} must be a positive integer')
  check(len(tokens_N) >= seq_len + 1,
        f'data: the {what} split has {len(tokens_N)} tokens but '
        f'data.seq_len={seq_len} needs at least {seq_len + 1}; use a smaller '
        'data.seq_len or a larger corpus')


def make_train_dataset(tokens_N: np.ndarray, seq_len: int,
                       global_batch_size: int, seed: int,
                       rows_R: Sequence[int] | None = None
                       ) -> grain.MapDataset:
  """An infinite dataset whose element `s` is this process's rows of the
  step-`s` batch.

  Every window start position of `tokens_N` is shuffled with `seed` (a new
  permutation every epoch) and repeated forever; the global batch for step
  s is the s-th run of `global_batch_size` of them, a function of (seed, s)
  only, whatever the number of processes. Each process reads only the rows
  `rows_R` of it that its devices hold (`sharding.process_rows`), so
  processes holding replicas of one data shard (a tensor axis across
  processes) read the same rows.

  Args:
    tokens_N: the training tokens.
    seq_len: tokens per example.
    global_batch_size: examples per step over all processes.
    seed: the shuffle seed.
    rows_R: this process's rows of each global batch, ascending (default:
      all of them).

  Returns:
    A MapDataset of {'inputs', 'targets'}: int32 [R, seq_len] each, targets
    being inputs shifted by one.
  """
  _check_split(tokens_N, seq_len, 'training')
  rows_R = _checked_rows(rows_R, global_batch_size)
  n_windows = len(tokens_N) - seq_len
  ds = grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat()
  ds = ds.batch(global_batch_size, drop_remainder=True)  # Starts [B].
  return ds.map(_ReadRows(tokens_N, seq_len, rows_R))


def make_train_iterator(
    dataset: grain.MapDataset,
    read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset` (get_state / set_state).

  Save and restore it with Orbax through
  `grain.checkpoint.CheckpointSave(iterator)` /
  `grain.checkpoint.CheckpointRestore(iterator)`.

  Args:
    dataset: from make_train_dataset.
    read_options: reader threads and prefetch depth (default: 2 threads, 8
      batches ahead; grain's own default of 500 batches is far too deep).

  Returns:
    The iterator, positioned at step 0.
  """
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(tokens_N: np.ndarray, seq_len: int, batch_size: int,
                 n_batches: int) -> list[dict[str, np.ndarray]]:
  """A fixed list of evaluation batches of evenly spaced windows.

  Args:
    tokens_N: the validation tokens (at least seq_len + 1 of them).
    seq_len: tokens per example.
    batch_size: examples per batch.
    n_batches: number of batches.

  Returns:
    `n_batches` dicts of int32 [batch_size, seq_len] 'inputs' / 'targets'.
    Windows repeat when the split has fewer distinct windows than examples.
  """
  _check_split(tokens_N, seq_len, 'validation')
  check(batch_size > 0 and n_batches > 0,
        f'eval batch_size={batch_size} and n_batches={n_batches} must be '
        'positive')
  last_start = len(tokens_N) - seq_len - 1
  starts_E = np.linspace(0, last_start, batch_size * n_batches)
  starts_E = np.round(starts_E).astype(np.int64)
  offsets_W = np.arange(seq_len + 1, dtype=np.int64)
  batches = []
  for starts_B in starts_E.reshape(n_batches, batch_size):
    windows_BxW = np.asarray(tokens_N[starts_B[:, None] + offsets_W[None, :]],
                             dtype=np.int32)
    batches.append(_inputs_targets(windows_BxW))
  return batches


def to_global_batch(local_batch: Mapping[str, np.ndarray],
                    sharding: jax.sharding.Sharding,
                    global_batch_size: int | None = None
                    ) -> dict[str, jax.Array]:
  """Assembles each process's rows into global [B, T] jax.Arrays.

  Args:
    local_batch: {name: [R, T]}, the rows `sharding.process_rows` names, in
      its order.
    sharding: the batch sharding.
    global_batch_size: B (default: inferred by JAX, which assumes that no
      two processes hold the same rows).
  """
  return {
      name: jax.make_array_from_process_local_data(
          sharding, local_RxT, None if global_batch_size is None
          else (global_batch_size, *local_RxT.shape[1:]))
      for name, local_RxT in local_batch.items()
  }
