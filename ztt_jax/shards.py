"""Prepared token shards: `ztt-prepare` writes them, training reads them.

A prepared directory (`ztt-prepare --output=DIR`) holds

    tokenizer.json (+ tokenizer.model or hf_tokenizer.json)  the tokenizer
    shard_00000.bin, ...  flat token ids, little-endian, in the smallest
                          unsigned dtype that holds the vocabulary
    manifest.json         written last (its presence marks a complete
                          directory): tokenizer and its sha256, dtype,
                          token/byte/shard counts, each shard's sha256,
                          the sources (path, size, mtime)

The shards, concatenated in order, are the tokens of the corpus text
`sources.read_corpus` gives (for byte and char exactly the ids the in-memory
path tokenizes). Flat arrays rather than ArrayRecord: training reads windows
that start at any token, so a memory map of one flat array serves each
process just the pages of its own rows, with nothing to decode or
decompress, and opening a directory reads the manifest and stats each shard
(`open_prepared`); `verify` hashes the shards when asked.

`prepare` streams the corpus in line-aligned units of about `shard_mb`
(`sources.plan_units`), one shard per unit, in parallel processes; memory
per process is one block of text and its ids, whatever the corpus size.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ztt_jax import sources
from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError, check, check_local_path

MANIFEST_NAME = 'manifest.json'
FORMAT = 'ztt-shards'
VERSION = 1
# sentencepiece trained by ztt-prepare learns from this much of the head.
SP_TRAIN_BYTES = 100 << 20


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds ids [0, vocab_size)."""
  for dtype in (np.uint8, np.uint16):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  return np.dtype(np.uint32)


def _file_dtype(name: str) -> np.dtype:
  return np.dtype(name).newbyteorder('<')


# ----------------------------------------------------------------- reading --


class TokenStream:
  """Shards read as one read-only token array [N] (memory maps: nothing is
  loaded until indexed): `len`, slices (a view) and integer-array indexing,
  which is what training and evaluation use."""

  def __init__(self, parts: Sequence[np.ndarray], start: int = 0,
               stop: int | None = None):
    self.parts = list(parts)
    self.bounds = np.cumsum([0] + [len(p) for p in self.parts])
    self.start = start
    self.stop = int(self.bounds[-1]) if stop is None else stop
    self.dtype = self.parts[0].dtype

  def __len__(self) -> int:
    return self.stop - self.start

  @property
  def shape(self) -> tuple[int]:
    return (len(self),)

  @property
  def size(self) -> int:
    return len(self)

  def __getitem__(self, key):
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step != 1:
        raise IndexError('TokenStream slices take no step')
      return TokenStream(self.parts, self.start + start,
                         self.start + max(start, stop))
    index = np.asarray(key, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f'token index out of range [0, {len(self)})')
    flat = index.reshape(-1) + self.start
    part = np.searchsorted(self.bounds, flat, side='right') - 1
    out = np.empty(flat.shape, self.dtype)
    for i in np.unique(part):
      mask = part == i
      out[mask] = self.parts[i][flat[mask] - self.bounds[i]]
    return out.reshape(index.shape)

  def __array__(self, dtype=None, copy=None):
    del copy
    return np.asarray(self[np.arange(len(self))], dtype=dtype)


def concatenate(parts: Sequence[np.ndarray], dtype: np.dtype):
  """One array-like over `parts`: the array itself when there is one."""
  if not parts:
    empty = np.zeros(0, dtype=dtype)
    empty.flags.writeable = False
    return empty
  return parts[0] if len(parts) == 1 else TokenStream(parts)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """An opened prepared directory.

  Attributes:
    path: the directory.
    manifest: manifest.json.
    tokenizer: the tokenizer it was prepared with.
    tokens_N: every token, in order (a memmap or a TokenStream).
  """
  path: pathlib.Path
  manifest: dict[str, Any]
  tokenizer: tokenizers.Tokenizer
  tokens_N: Any


def is_prepared(path: Any) -> bool:
  """Whether `path` is a directory ztt-prepare wrote (has manifest.json)."""
  return (isinstance(path, str) and bool(path) and
          os.path.isfile(os.path.join(os.path.expanduser(path),
                                      MANIFEST_NAME)))


def read_manifest(path: str | os.PathLike[str],
                  field: str = 'data.path') -> dict[str, Any]:
  """manifest.json of a prepared directory; ConfigError if unusable."""
  file = pathlib.Path(path).expanduser() / MANIFEST_NAME
  fix = 'run ztt-prepare again into a new directory'
  try:
    manifest = json.loads(file.read_text(encoding='utf-8'))
  except (OSError, ValueError) as e:
    raise ConfigError(f'{field}={str(path)!r}: unreadable {MANIFEST_NAME} '
                      f'({type(e).__name__}); {fix}') from None
  check(isinstance(manifest, dict) and manifest.get('format') == FORMAT,
        f'{field}={str(path)!r}: {MANIFEST_NAME} is not a ztt-prepare '
        f'manifest; {fix}')
  check(manifest.get('version') == VERSION,
        f'{field}={str(path)!r}: prepared by another version (format '
        f'{manifest.get("version")}, this code reads {VERSION}); {fix}')
  return manifest


def open_prepared(path: str | os.PathLike[str],
                  field: str = 'data.path') -> Prepared:
  """Opens a prepared directory: reads the manifest and the tokenizer and
  stats each shard (its size must match); reads no tokens."""
  manifest = read_manifest(path, field)
  root = pathlib.Path(path).expanduser()
  tokenizer = tokenizers.load_tokenizer(root)
  check(tokenizer.fingerprint() == manifest['tokenizer_sha256'],
        f'{field}={str(path)!r}: the tokenizer files differ from the ones '
        'the shards were made with; run ztt-prepare again into a new '
        'directory')
  dtype = _file_dtype(manifest['dtype'])
  parts = []
  for shard in manifest['shards']:
    file, n = root / shard['file'], shard['n_tokens']
    try:
      size = file.stat().st_size
    except OSError:
      size = -1
    check(size == n * dtype.itemsize,
          f'{field}={str(path)!r}: {shard["file"]} is '
          f'{"missing" if size < 0 else f"{size} bytes"} but the manifest '
          f'says {n} tokens ({n * dtype.itemsize} bytes); copy it again or '
          'run ztt-prepare again into a new directory')
    if n:
      parts.append(np.memmap(file, dtype=dtype, mode='r', shape=(n,)))
  return Prepared(root, manifest, tokenizer, concatenate(parts, dtype))


def verify(path: str | os.PathLike[str]) -> list[str]:
  """Hashes every shard against the manifest; returns the bad ones."""
  manifest = read_manifest(path)
  bad = []
  for shard in manifest['shards']:
    digest = hashlib.sha256()
    try:
      with open(pathlib.Path(path) / shard['file'], 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):  # pylint: disable=cell-var-from-loop
          digest.update(block)
    except OSError:
      bad.append(shard['file'])
      continue
    if digest.hexdigest() != shard['sha256']:
      bad.append(shard['file'])
  return bad


# ----------------------------------------------------------------- writing --

_WORKER_TOKENIZERS: dict[str, tokenizers.Tokenizer] = {}


def _worker_tokenizer(output: str) -> tokenizers.Tokenizer:
  if output not in _WORKER_TOKENIZERS:
    _WORKER_TOKENIZERS[output] = tokenizers.load_tokenizer(output)
  return _WORKER_TOKENIZERS[output]


def _unit_chars(args: tuple[Sequence[sources.Piece], str]) -> str:
  """The distinct characters of one unit (checks it is UTF-8)."""
  unit, jsonl_field = args
  points = set()
  for piece in unit:
    offset = piece.start
    for block in sources.piece_blocks(piece, jsonl_field):
      sources.check_utf8([pathlib.Path(piece.path)], [block], [offset])
      offset += len(block)
      points.update(block.decode('utf-8'))
  return ''.join(sorted(points))


def _encode_unit(args: tuple[str, int, Sequence[sources.Piece], str, str]
                 ) -> dict[str, Any]:
  """Tokenizes one unit into shard `index`; returns its manifest entry."""
  output, index, unit, jsonl_field, dtype_name = args
  tokenizer = _worker_tokenizer(output)
  dtype = _file_dtype(dtype_name)
  name = f'shard_{index:05d}.bin'
  digest, n_tokens, n_bytes = hashlib.sha256(), 0, 0
  tmp = pathlib.Path(output) / f'.{name}.tmp'
  with open(tmp, 'wb') as f:
    for piece in unit:
      for block in sources.piece_blocks(piece, jsonl_field):
        raw = np.asarray(tokenizer.encode_bytes(block), dtype=dtype).tobytes()
        f.write(raw)
        digest.update(raw)
        n_tokens += len(raw) // dtype.itemsize
        n_bytes += len(block)
  os.replace(tmp, pathlib.Path(output) / name)
  return {'file': name, 'n_tokens': n_tokens, 'n_bytes': n_bytes,
          'sha256': digest.hexdigest()}


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable[..., list[Any]]]:
  """`map(fn, items)` in order: inline for one worker, else processes
  (spawned: a fresh interpreter, no state from this one)."""
  if workers <= 1:
    yield lambda fn, items: [fn(item) for item in items]
    return
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers,
                                              mp_context=context) as pool:
    yield lambda fn, items: list(pool.map(fn, items))


def _head(units: Sequence[Sequence[sources.Piece]], jsonl_field: str,
          n_bytes: int) -> bytes:
  """The first `n_bytes` of the corpus text (streamed)."""
  blocks, size = [], 0
  for unit in units:
    for piece in unit:
      for block in sources.piece_blocks(piece, jsonl_field):
        blocks.append(block)
        size += len(block)
        if size >= n_bytes:
          return b''.join(blocks)[:n_bytes]
  return b''.join(blocks)


def _build_tokenizer(d, units, total_bytes: int, mapper) -> tokenizers.Tokenizer:
  """The tokenizer of the config's data section, learnt from the corpus
  (char: every character, plus those of a text data.val_path;
  sentencepiece: the head of the training share) or loaded."""
  path = os.path.expanduser(d.get('tokenizer_path', ''))
  if d.tokenizer == 'char':
    chars = set(''.join(mapper(_unit_chars,
                               [(u, d.jsonl_field) for u in units])))
    val_path = d.get('val_path', '')
    if val_path and not is_prepared(val_path):
      files = sources.resolve_sources(val_path, 'data.val_path')
      chars.update(tokenizers.decode_utf8(sources.read_corpus(
          files, d.jsonl_field, 'data.val_path')))
    check(bool(chars), f'data.path={d.path!r}: the corpus is empty; pass '
          'some text')
    return tokenizers.CharTokenizer(sorted(chars))
  head = b''
  if d.tokenizer == 'sentencepiece' and not path:
    share = 1.0 if d.get('val_path', '') else 1.0 - float(d.val_fraction)
    head = _head(units, d.jsonl_field,
                 min(SP_TRAIN_BYTES, int(total_bytes * share)))
  return tokenizers.build_tokenizer(d.tokenizer, head, d.vocab_size,
                                    d.sp_model_type, path)


def _check_output(output: pathlib.Path, path: str) -> None:
  check_local_path('--output', output)
  check(not output.exists() or (output.is_dir() and not any(output.iterdir())),
        f'--output={output}: already exists and is not an empty directory; '
        'pass a new directory (ztt-prepare overwrites nothing)')
  root = pathlib.Path(path).expanduser()
  check(not root.is_dir() or not output.resolve().is_relative_to(
      root.resolve()), f'--output={output}: inside the corpus it reads '
        f'(data.path={path}); put it outside data.path')


def write_shards(data_config, output: str | os.PathLike[str], workers: int = 0,
            shard_mb: float = 64, log: Callable[[str], Any] = print
            ) -> dict[str, Any]:
  """ztt-prepare: tokenizes `data_config.path` into a prepared directory.

  Args:
    data_config: the `data` section (path, tokenizer, tokenizer_path,
      vocab_size, sp_model_type, jsonl_field; val_path for the char
      vocabulary; val_fraction for what sentencepiece learns from).
    output: a new (or empty) directory.
    workers: processes; 0: one per CPU core.
    shard_mb: about this many MB of text per shard (and per work unit).
    log: where progress lines go.

  Returns:
    The manifest.

  Raises:
    ConfigError: a bad value, an unusable corpus, or an output that
      exists; nothing is left behind.
  """
  from ztt_jax import configlib  # pylint: disable=g-import-not-at-top
  configlib.validate_data(data_config)
  d = data_config
  check(not is_prepared(d.path), f'data.path={d.path!r} is a prepared '
        'directory already; train from it with --config.data.path='
        f'{d.path}')
  check(isinstance(shard_mb, (int, float)) and shard_mb * (1 << 20) >= 1,
        f'--shard_mb={shard_mb} must be positive, e.g. 64')
  check(isinstance(workers, int) and workers >= 0,
        f'--workers={workers} must be >= 0 (0: one per core)')
  output = pathlib.Path(output).expanduser()
  files = sources.resolve_sources(d.path)
  _check_output(output, d.path)
  workers = workers or os.cpu_count() or 1
  started = time.perf_counter()
  units = sources.plan_units(files, max(int(shard_mb * (1 << 20)), 1))
  total_bytes = sum(p.stop - p.start for u in units for p in u)
  created = not output.exists()
  output.mkdir(parents=True, exist_ok=True)
  try:
    with _mapper(min(workers, len(units))) as mapper:
      tokenizer = _build_tokenizer(d, units, total_bytes, mapper)
      dtype = token_dtype(tokenizer.vocab_size)
      tokenizer.save(output)
      log(f'ztt-prepare: {len(files)} file(s), {total_bytes:,} bytes, '
          f'{len(units)} shard(s), {tokenizer.name} tokenizer '
          f'({tokenizer.vocab_size} ids, {dtype.name}), {workers} '
          'worker(s)')
      shard_list = mapper(_encode_unit, [
          (str(output), i, unit, d.jsonl_field, dtype.name)
          for i, unit in enumerate(units)])
    n_tokens = sum(s['n_tokens'] for s in shard_list)
    check(n_tokens > 0, f'data.path={d.path!r}: the corpus is empty (0 '
          'tokens); pass some text')
    manifest = {
        'format': FORMAT, 'version': VERSION, 'path': d.path,
        'tokenizer': tokenizer.name,
        'tokenizer_sha256': tokenizer.fingerprint(),
        'vocab_size': tokenizer.vocab_size, 'dtype': dtype.name,
        'jsonl_field': d.jsonl_field, 'n_tokens': n_tokens,
        'n_bytes': sum(s['n_bytes'] for s in shard_list),
        'n_sources': len(files), 'shards': shard_list,
        'sources': [{'path': str(f.resolve()), 'size': f.stat().st_size,
                     'mtime_ns': f.stat().st_mtime_ns} for f in files],
    }
    tokenizers.atomic_write_bytes(
        output / MANIFEST_NAME,
        (json.dumps(manifest, indent=1) + '\n').encode())
  except BaseException:
    if created:
      shutil.rmtree(output, ignore_errors=True)
    else:  # It was empty: empty it again.
      for child in output.iterdir():
        if child.is_dir():
          shutil.rmtree(child, ignore_errors=True)
        else:
          child.unlink(missing_ok=True)
    raise
  seconds = time.perf_counter() - started
  log(f'ztt-prepare: {n_tokens:,} tokens in {seconds:.1f}s '
      f'({n_tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {output}')
  return manifest
