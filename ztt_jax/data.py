"""Corpus preparation (sources → tokenizer → cached token arrays) and input.

`prepare` reads the text sources named by `data.path`, splits them
contiguously into train (head) and validation (tail), builds or reloads the
workdir's tokenizer and tokenizes both splits into a content-addressed cache
(`cache_dir/<key>/{train,val}.bin` + `meta.json`), returning read-only memmaps.

`make_train_dataset` turns the train tokens into an infinite, seeded grain
`MapDataset` of `{'inputs', 'targets'}` batches whose element `s` is this
process's rows of the batch for step `s`; `eval_batches` gives a fixed set of evaluation batches.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Any, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

from ztt_jax import configlib
from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError, check

BUILTIN_STDLIB = 'builtin:stdlib'
CACHE_ENV_VAR = 'ZTT_CACHE_DIR'
DEFAULT_CACHE_DIR = '~/.cache/ztt_jax'
_CACHE_FORMAT = 1
_GLOB_CHARS = frozenset('*?[')
_SITE_DIRS = frozenset({'site-packages', 'dist-packages'})
_PATH_FIX = ('pass an existing text file, directory or glob, or '
             f'{BUILTIN_STDLIB}')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized corpus.

  Attributes:
    tokenizer: the tokenizer (saved in the workdir).
    train_N: read-only token memmap of the training split (the head).
    val_N: read-only token memmap of the validation split (the tail); an empty
      read-only array when data.val_fraction is 0.
    meta: the cache's meta.json contents.
    cache_path: the cache directory holding train.bin / val.bin / meta.json.
  """
  tokenizer: tokenizers.Tokenizer
  train_N: np.ndarray
  val_N: np.ndarray
  meta: dict[str, Any]
  cache_path: pathlib.Path


@dataclasses.dataclass(frozen=True)
class _Options:
  """Validated data config values."""
  path: str
  kind: str
  tokenizer_path: str
  vocab_size: int
  model_type: str
  val_fraction: float
  seq_len: int
  cache_root: pathlib.Path


# ----------------------------------------------------------------- sources --


def _directory_files(root: pathlib.Path) -> list[pathlib.Path]:
  """All regular non-hidden files under `root`, sorted by relative path."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if not name.startswith('.') and path.is_file():
        found.append(path)
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_files() -> list[pathlib.Path]:
  """The running Python's standard-library .py files (no site-packages)."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  check(root.is_dir(), f'data.path={BUILTIN_STDLIB}: the stdlib directory '
        f'{str(root)!r} does not exist; pass a text file, directory or glob')
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SITE_DIRS)
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if name.endswith('.py') and path.is_file():
        found.append(path)
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _glob_files(pattern: str) -> list[pathlib.Path]:
  matches = glob.glob(pattern, recursive=True)
  return sorted(pathlib.Path(m) for m in matches if os.path.isfile(m))


def resolve_sources(path: str) -> list[pathlib.Path]:
  """The files named by `data.path`, in the order they are concatenated.

  Args:
    path: a text file; a directory (all regular files below it, recursively,
      skipping hidden files and directories); a glob pattern; or
      'builtin:stdlib' (the running Python's standard-library .py files).

  Returns:
    The sorted list of files.

  Raises:
    ConfigError: the path does not exist, matches nothing or is empty.
  """
  check(isinstance(path, str) and bool(path),
        f'data.path={path!r}: this config names no corpus; pass '
        '--config.data.path=PATH (a text file, directory or glob, a '
        f'ztt-prepare directory, or {BUILTIN_STDLIB})')
  if path == BUILTIN_STDLIB:
    files = _stdlib_files()
  elif _GLOB_CHARS & set(path):
    files = _glob_files(os.path.expanduser(path))
    check(bool(files), f'data.path={path!r}: the glob matches no files; '
          f'{_PATH_FIX}')
  else:
    source = pathlib.Path(path).expanduser()
    check(source.exists(), f'data.path={path!r}: no such file; {_PATH_FIX}')
    files = _directory_files(source) if source.is_dir() else [source]
    check(bool(files), f'data.path={path!r}: the directory has no '
          f'(non-hidden) files; {_PATH_FIX}')
  check(bool(files), f'data.path={path!r}: no files found; {_PATH_FIX}')
  return files


def _read_sources(path: str,
                  sources: Sequence[pathlib.Path]) -> list[bytes]:
  blobs = []
  for source in sources:
    try:
      blobs.append(source.read_bytes())
    except OSError as e:
      raise ConfigError(f'data.path={path!r}: cannot read {str(source)!r} '
                        f'({e.strerror}); fix its permissions or '
                        'exclude it') from None
  return blobs


def _check_utf8(sources: Sequence[pathlib.Path],
                blobs: Sequence[bytes]) -> None:
  """ConfigError naming the file and byte offset of the first non-UTF-8."""
  for source, blob in zip(sources, blobs):
    try:
      blob.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ConfigError(
          f'data: {str(source)!r} byte 0x{blob[e.start]:02x} at offset '
          f'{e.start} is not valid UTF-8 and the char tokenizer needs UTF-8 '
          'text; use data.tokenizer=byte (or sentencepiece)') from None


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
      model_type=d.sp_model_type, val_fraction=float(d.val_fraction),
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


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ------------------------------------------------------------------- cache --


def _cache_key(sources_sha256: str, sources: Sequence[pathlib.Path],
               tokenizer: tokenizers.Tokenizer, val_fraction: float) -> str:
  payload = {
      'format': _CACHE_FORMAT,
      'sources_sha256': sources_sha256,
      'paths': [str(p.resolve()) for p in sources],
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


# ----------------------------------------------------------------- prepare --


def prepare(data_config: ml_collections.ConfigDict,
            workdir: str | os.PathLike[str], write: bool = True) -> Corpus:
  """Tokenizes the configured corpus (cached) and returns its two splits.

  Nothing is written (workdir, tokenizer, cache) unless every check passes.

  Args:
    data_config: the `data` ConfigDict (path, tokenizer, vocab_size,
      sp_model_type, val_fraction, seq_len, cache_dir).
    workdir: the run directory; holds tokenizer.json (reused when present).
    write: False: only read (the processes other than 0 of a multi-process
      run, see multihost.prepare_corpus): the workdir's tokenizer.json must
      exist, and a token cache that is not there is tokenized in memory.

  Returns:
    The Corpus.

  Raises:
    ConfigError: for any bad config value or unusable corpus.
  """
  options = _options(data_config)
  workdir = pathlib.Path(workdir).expanduser()
  sources = resolve_sources(options.path)
  blobs = _read_sources(options.path, sources)
  corpus = b'\n'.join(blobs)
  check(len(corpus) > 0, f'data.path={options.path!r}: the corpus is empty '
        f'(0 bytes); {_PATH_FIX} with some text in it')
  if options.kind == 'char':
    _check_utf8(sources, blobs)
  del blobs
  offset = split_offset(corpus, options.kind, options.val_fraction)
  check(write or (workdir / tokenizers.JSON_NAME).exists(),
        f'{str(workdir)!r} has no {tokenizers.JSON_NAME} although process 0 '
        'prepared the corpus; the workdir must be one directory every '
        'process sees')
  # char: every character of the corpus (nanoGPT), so one first seen in
  # the validation tail is no error; sentencepiece learns the train split.
  tokenizer, is_new = _workdir_tokenizer(
      options, workdir, corpus if options.kind == 'char' else corpus[:offset])
  sources_sha256 = hashlib.sha256(corpus).hexdigest()
  key = _cache_key(sources_sha256, sources, tokenizer, options.val_fraction)
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
        'sources_sha256': sources_sha256, 'n_sources': len(sources),
        'val_fraction': options.val_fraction,
        'dtype': token_dtype(tokenizer.vocab_size).name,
    }
    _check_lengths(options, train_N.size, val_N.size)
    dtype = np.dtype(meta['dtype'])
    if not write:  # In memory, as the cache would hold them.
      return Corpus(tokenizer=tokenizer,
                    train_N=np.asarray(train_N, dtype=dtype),
                    val_N=np.asarray(val_N, dtype=dtype), meta=meta,
                    cache_path=cache_path)
    if is_new:
      tokenizer.save(workdir)
    _write_cache(cache_path, meta, train_N, val_N)
  else:
    _check_lengths(options, meta['n_train_tokens'], meta['n_val_tokens'])
    if is_new:
      tokenizer.save(workdir)
  dtype = np.dtype(meta['dtype'])
  return Corpus(
      tokenizer=tokenizer,
      train_N=_open_tokens(cache_path / 'train.bin', dtype,
                           meta['n_train_tokens']),
      val_N=_open_tokens(cache_path / 'val.bin', dtype, meta['n_val_tokens']),
      meta=meta, cache_path=cache_path)


# ------------------------------------------------------------------- input --


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
  check(global_batch_size > 0,
        f'batch size {global_batch_size} must be positive')
  rows_R = (np.arange(global_batch_size) if rows_R is None
            else np.asarray(rows_R, dtype=np.int64))
  check(len(rows_R) > 0 and (np.diff(rows_R) > 0).all()
        and 0 <= rows_R[0] and rows_R[-1] < global_batch_size,
        f'rows {rows_R.tolist()} are not ascending rows of a batch of '
        f'{global_batch_size}')
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
