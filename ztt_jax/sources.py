"""Text sources: the files `data.path` names and the documents in them.

A source file is one document, except a `.jsonl` file: one document per
record, its `data.jsonl_field` text. The corpus is the text of the files, in
sorted order, joined by newlines (a `.jsonl` file's text being its records
joined by newlines), as `read_corpus` returns it.

`plan_units` cuts the files into line-aligned byte ranges (`Piece`s) grouped
into units of about a given size, and `piece_blocks` streams one piece's
share of that same corpus text in bounded blocks: ztt-prepare tokenizes a
corpus larger than memory, one unit per process at a time.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import sysconfig
from typing import Iterator, Sequence

from ztt_jax.errors import ConfigError, check

BUILTIN_STDLIB = 'builtin:stdlib'
JSONL_SUFFIX = '.jsonl'
SEPARATOR = b'\n'  # Between documents.
_GLOB_CHARS = frozenset('*?[')
_SITE_DIRS = frozenset({'site-packages', 'dist-packages'})
_PATH_FIX = ('pass an existing text file, directory or glob, or '
             f'{BUILTIN_STDLIB}')
_MAX_LINE_SEEK = 1 << 20  # A cut looks this far for a newline.


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


def resolve_sources(path: str, field: str = 'data.path'
                    ) -> list[pathlib.Path]:
  """The files named by `data.path` (or `field`), in corpus order.

  Args:
    path: a text file; a directory (all regular files below it, recursively,
      skipping hidden files and directories); a glob pattern; or
      'builtin:stdlib' (the running Python's standard-library .py files).
    field: the config field that holds it, for messages.

  Returns:
    The sorted list of files.

  Raises:
    ConfigError: the path does not exist, matches nothing or is empty.
  """
  check(isinstance(path, str) and bool(path),
        f'{field}={path!r}: this config names no corpus; pass '
        f'--config.{field}=PATH (a text file, directory or glob, a '
        f'ztt-prepare directory, or {BUILTIN_STDLIB})')
  if path == BUILTIN_STDLIB:
    files = _stdlib_files()
  elif _GLOB_CHARS & set(path):
    files = _glob_files(os.path.expanduser(path))
    check(bool(files), f'{field}={path!r}: the glob matches no files; '
          f'{_PATH_FIX}')
  else:
    source = pathlib.Path(path).expanduser()
    check(source.exists(), f'{field}={path!r}: no such file; {_PATH_FIX}')
    files = _directory_files(source) if source.is_dir() else [source]
    check(bool(files), f'{field}={path!r}: the directory has no '
          f'(non-hidden) files; {_PATH_FIX}')
  check(bool(files), f'{field}={path!r}: no files found; {_PATH_FIX}')
  return files


def is_jsonl(path: str | os.PathLike[str]) -> bool:
  return str(path).endswith(JSONL_SUFFIX)


def _record_text(line: bytes, path: str | os.PathLike[str], offset: int,
                 jsonl_field: str) -> bytes | None:
  """The UTF-8 text of one JSONL line (None for a blank line)."""
  if not line.strip():
    return None
  where = f'{str(path)!r} byte {offset}'
  try:
    record = json.loads(line)
  except ValueError as e:
    raise ConfigError(f'data: {where} is not a JSON record ({e.msg}); fix '
                      'the line, or name the file without .jsonl to read it '
                      'as text') from None
  text = record.get(jsonl_field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    fields = ', '.join(sorted(record)) if isinstance(record, dict) else (
        type(record).__name__)
    raise ConfigError(f'data: the record at {where} has no text field '
                      f'{jsonl_field!r} (it has: {fields}); set '
                      '--config.data.jsonl_field=NAME')
  return text.encode('utf-8', errors='surrogatepass')


def _read_file(path: pathlib.Path, field: str) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise ConfigError(f'{field}: cannot read {str(path)!r} ({e.strerror}); '
                      'fix its permissions or exclude it') from None


def read_documents(files: Sequence[pathlib.Path], jsonl_field: str = 'text',
                   field: str = 'data.path') -> list[bytes]:
  """Each file's text in memory: its bytes, or a .jsonl file's records'
  texts joined by newlines."""
  blobs = []
  for path in files:
    blob = _read_file(path, field)
    if is_jsonl(path):
      texts, offset = [], 0
      for line in blob.splitlines(keepends=True):
        text = _record_text(line, path, offset, jsonl_field)
        offset += len(line)
        if text is not None:
          texts.append(text)
      blob = SEPARATOR.join(texts)
    blobs.append(blob)
  return blobs


def read_corpus(files: Sequence[pathlib.Path], jsonl_field: str = 'text',
                field: str = 'data.path') -> bytes:
  """The whole corpus text: every file's documents, joined by newlines."""
  return SEPARATOR.join(read_documents(files, jsonl_field, field))


def check_utf8(files: Sequence[pathlib.Path], blobs: Sequence[bytes],
               offsets: Sequence[int] | None = None) -> None:
  """ConfigError naming the file and byte offset of the first non-UTF-8."""
  for i, (source, blob) in enumerate(zip(files, blobs)):
    try:
      blob.decode('utf-8')
    except UnicodeDecodeError as e:
      at = e.start + (offsets[i] if offsets else 0)
      raise ConfigError(
          f'data: {str(source)!r} byte 0x{blob[e.start]:02x} at offset '
          f'{at} is not valid UTF-8 and the char tokenizer needs UTF-8 '
          'text; use data.tokenizer=byte (or sentencepiece)') from None


# --------------------------------------------------------------- streaming --


@dataclasses.dataclass(frozen=True)
class Piece:
  """Bytes [start, stop) of one source file, cut after a newline.

  Attributes:
    path: the file.
    start, stop: the byte range.
    end_of_file: stop is the file's end (a separator follows unless last).
    last: the file is the corpus's last (no separator after it).
  """
  path: str
  start: int
  stop: int
  end_of_file: bool
  last: bool


def _cut_after(f, pos: int, stop: int, whole_lines: bool) -> int:
  """The first line start at or after `pos` (text files: at most
  _MAX_LINE_SEEK on, else the next UTF-8 character start)."""
  f.seek(pos - 1)
  if f.read(1) == b'\n':
    return pos
  line = f.readline() if whole_lines else f.readline(_MAX_LINE_SEEK)
  if line.endswith(b'\n') or whole_lines:
    return min(pos + len(line), stop)
  f.seek(pos)
  head = f.read(4)
  return pos + next((i for i, b in enumerate(head) if (b & 0xC0) != 0x80),
                    len(head))


def plan_units(files: Sequence[pathlib.Path],
               unit_bytes: int) -> list[list[Piece]]:
  """Cuts the files into pieces of at most about `unit_bytes` (after a
  newline; .jsonl files between records) and groups consecutive pieces into
  units of about `unit_bytes`. Reads a few bytes at each cut only."""
  pieces = []
  for k, path in enumerate(files):
    size = path.stat().st_size
    cuts = [0]
    with open(path, 'rb') as f:
      for pos in range(unit_bytes, size, unit_bytes):
        if pos > cuts[-1]:
          cut = _cut_after(f, pos, size, is_jsonl(path))
          if cuts[-1] < cut < size:
            cuts.append(cut)
    cuts.append(size)
    for start, stop in zip(cuts[:-1], cuts[1:]):
      pieces.append(Piece(str(path), start, stop, stop == size,
                          k == len(files) - 1))
  units, unit, unit_size = [], [], 0
  for piece in pieces:
    unit.append(piece)
    unit_size += piece.stop - piece.start
    if unit_size >= unit_bytes:
      units.append(unit)
      unit, unit_size = [], 0
  if unit:
    units.append(unit)
  return units


def _char_start(buf: bytes) -> int:
  """The start of `buf`'s last UTF-8 character (len(buf) for other bytes,
  which any cut suits)."""
  cut = len(buf)
  while cut > len(buf) - 3 and cut > 0 and (buf[cut - 1] & 0xC0) == 0x80:
    cut -= 1
  if cut > 0 and buf[cut - 1] >= 0xC0:
    cut -= 1
  return cut or len(buf)


def _text_blocks(f, piece: Piece, block_bytes: int) -> Iterator[bytes]:
  """The piece's bytes in blocks that end after a newline where one is
  within the block (else at a UTF-8 character start)."""
  f.seek(piece.start)
  left, carry = piece.stop - piece.start, b''
  while left > 0:
    chunk = f.read(min(block_bytes, left))
    check(bool(chunk), f'data: {piece.path!r} shrank while it was read; '
          'leave the corpus unchanged while ztt-prepare runs')
    left -= len(chunk)
    buf, carry = carry + chunk, b''
    if left > 0:
      cut = buf.rfind(b'\n') + 1 or _char_start(buf)
      buf, carry = buf[:cut], buf[cut:]
    yield buf
  if carry:
    yield carry


def _jsonl_blocks(f, piece: Piece, jsonl_field: str,
                  block_bytes: int) -> Iterator[bytes]:
  """The piece's records' texts, newline-joined (a newline before each
  record but a file's first), in blocks of about `block_bytes`."""
  f.seek(piece.start)
  offset, block, size, first = piece.start, [], 0, piece.start == 0
  while offset < piece.stop:
    line = f.readline()
    if not line:
      break
    text = _record_text(line, piece.path, offset, jsonl_field)
    offset += len(line)
    if text is None:
      continue
    if not first:
      block.append(SEPARATOR)
    first = False
    block.append(text)
    size += len(text) + 1
    if size >= block_bytes:
      yield b''.join(block)
      block, size = [], 0
  if block:
    yield b''.join(block)


def piece_blocks(piece: Piece, jsonl_field: str = 'text',
                 block_bytes: int = 1 << 22) -> Iterator[bytes]:
  """The piece's share of the corpus text (`read_corpus`), in blocks of
  about `block_bytes`: concatenated over a unit's pieces in order, and the
  units in order, they are the corpus."""
  with open(piece.path, 'rb') as f:
    if is_jsonl(piece.path):
      yield from _jsonl_blocks(f, piece, jsonl_field, block_bytes)
    else:
      yield from _text_blocks(f, piece, block_bytes)
  if piece.end_of_file and not piece.last:
    yield SEPARATOR
