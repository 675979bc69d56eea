"""Tokenizers: byte, char (nanoGPT style), SentencePiece (trained here or an
existing `.model`) and an existing Hugging Face `tokenizer.json` (hf).

All share one interface (`Tokenizer`): `encode(text)` / `decode(ids)`
for prompts and samples, `encode_bytes(data)` for whole corpora, and
`save(directory)` / `load_tokenizer(directory)` so that a resumed run keeps
exactly the same ids. Every saved tokenizer writes `tokenizer.json` (ours,
with a "type" field); SentencePiece also writes its model as
`tokenizer.model`, hf the Hugging Face file as `hf_tokenizer.json`.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from ztt_jax.errors import ConfigError, check

JSON_NAME = 'tokenizer.json'
SP_MODEL_NAME = 'tokenizer.model'
HF_JSON_NAME = 'hf_tokenizer.json'
KINDS = ('byte', 'char', 'sentencepiece', 'hf')
# The kinds data.tokenizer_path can load from a file (hf only from one).
FILE_KINDS = ('sentencepiece', 'hf')
SP_MODEL_TYPES = ('bpe', 'unigram')
# Chunk size (in characters) for batched SentencePiece encoding of corpora.
_SP_CHUNK_CHARS = 1 << 16
_SP_SEED = 0


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` via a temp file in the same directory."""
  path = pathlib.Path(path)
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp_name, path)
  except BaseException:
    if os.path.exists(tmp_name):
      os.unlink(tmp_name)
    raise


class Tokenizer(abc.ABC):
  """Common interface of all tokenizers."""

  name: str

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of distinct ids; every id is in [0, vocab_size)."""

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Encodes a string into an int32 id array of shape [N]."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids back into a string."""

  @abc.abstractmethod
  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Encodes raw corpus bytes into an integer id array of shape [N]."""

  @abc.abstractmethod
  def files(self) -> dict[str, bytes]:
    """The files `save` writes: {file name: content}."""

  def save(self, directory: str | os.PathLike[str]) -> None:
    """Writes the tokenizer files into `directory` (created if needed)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = self.files()
    # tokenizer.json last: its presence marks a complete save.
    for name in sorted(files, key=lambda n: n == JSON_NAME):
      atomic_write_bytes(directory / name, files[name])

  def fingerprint(self) -> str:
    """A sha256 hex digest of the saved files (identifies the id mapping)."""
    digest = hashlib.sha256()
    for name, content in sorted(self.files().items()):
      digest.update(name.encode() + b'\0')
      digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def _json_bytes(obj: dict[str, Any]) -> bytes:
  return (json.dumps(obj, indent=1, ensure_ascii=True) + '\n').encode()


class ByteTokenizer(Tokenizer):
  """Raw UTF-8 bytes as ids (vocabulary 256); accepts any bytes."""

  name = 'byte'

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    return self.encode_bytes(text.encode('utf-8')).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids_N = np.asarray(ids, dtype=np.int64)
    return ids_N.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)

  def files(self) -> dict[str, bytes]:
    return {JSON_NAME: _json_bytes({'type': self.name})}


def decode_utf8(data: bytes) -> str:
  """Strict UTF-8 decoding; a bad byte raises ConfigError naming its offset."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(
        f'data: byte 0x{data[e.start]:02x} at offset {e.start} is not valid '
        'UTF-8 and the char tokenizer needs UTF-8 text; use '
        'data.tokenizer=byte (or sentencepiece) for arbitrary bytes') from None


def _code_points(text: str) -> np.ndarray:
  """The code points of `text` as a uint32 array of shape [N]."""
  encoded = text.encode('utf-32-le', errors='surrogatepass')
  return np.frombuffer(encoded, dtype='<u4')


class CharTokenizer(Tokenizer):
  """One id per character; the vocabulary is the sorted characters of the
  whole corpus (training and validation text, as nanoGPT builds it)."""

  name = 'char'

  def __init__(self, chars: Sequence[str]):
    check(len(chars) > 0,
          'char tokenizer: empty vocabulary; train it on non-empty text')
    check(all(isinstance(c, str) and len(c) == 1 for c in chars),
          'char tokenizer: every vocabulary entry must be one character; '
          'delete the corrupt tokenizer.json')
    check(len(set(chars)) == len(chars),
          'char tokenizer: duplicate characters in the vocabulary; '
          'delete the corrupt tokenizer.json')
    self.chars = list(chars)
    # An object array: numpy '<U1' strings would drop '\x00' characters.
    self._chars_V = np.array(self.chars, dtype=object)
    points_V = _code_points(''.join(self.chars)).astype(np.int64)
    self._table = np.full(int(points_V.max()) + 1, -1, dtype=np.int32)
    self._table[points_V] = np.arange(len(self.chars), dtype=np.int32)

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    """Builds the vocabulary from the characters of `text`."""
    check(len(text) > 0, 'char tokenizer: the training text is empty; '
          'point data.path at a non-empty corpus')
    points = np.unique(_code_points(text))
    chars = points.astype('<u4').tobytes().decode('utf-32-le', 'surrogatepass')
    return cls(list(chars))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    points_N = _code_points(text).astype(np.int64)
    top = len(self._table) - 1
    ids_N = self._table[np.minimum(points_N, top)]
    ids_N = np.where(points_N > top, -1, ids_N)
    bad_N = np.flatnonzero(ids_N < 0)
    if bad_N.size:
      index = int(bad_N[0])
      raise ConfigError(
          f'char tokenizer: character {text[index]!r} (position {index}) is '
          'not in the vocabulary, which comes from the training corpus; '
          'remove it from the text or use data.tokenizer=byte or '
          'sentencepiece')
    return ids_N.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids_N = np.asarray(ids, dtype=np.int64)
    return ''.join(self._chars_V[ids_N].tolist())

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return self.encode(decode_utf8(data))

  def files(self) -> dict[str, bytes]:
    return {JSON_NAME: _json_bytes({'type': self.name, 'chars': self.chars})}


def _sp_train_lines(text: str) -> Iterator[str]:
  """Training sentences: the text's lines, newlines kept, empties skipped."""
  for line in text.splitlines(keepends=True):
    if line.strip():
      yield line


def _sp_error(error: Exception, vocab_size: int) -> ConfigError:
  """Turns a SentencePiece training failure into a one-line ConfigError."""
  message = ' '.join(str(error).split())
  if 'too high' in message:
    hint = ('the training text is too small for this vocabulary; use a '
            'smaller data.vocab_size or a larger corpus')
  elif 'smaller than required_chars' in message:
    hint = ('the vocabulary must hold 256 byte pieces plus every distinct '
            'character; use a larger data.vocab_size')
  else:
    hint = 'check data.vocab_size and the corpus'
  return ConfigError(f'sentencepiece training with data.vocab_size='
                     f'{vocab_size} failed ({message}); {hint}')


def _train_sentencepiece(text: str, vocab_size: int, model_type: str) -> bytes:
  """Trains a SentencePiece model on `text` and returns the model bytes."""
  writer = io.BytesIO()
  spm.set_random_generator_seed(_SP_SEED)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sp_train_lines(text),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        # Exact round trips: no normalisation, keep all whitespace.
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        max_sentence_length=1 << 16,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2)
  except RuntimeError as e:
    raise _sp_error(e, vocab_size) from None
  return writer.getvalue()


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (BPE or unigram) with byte fallback."""

  name = 'sentencepiece'

  def __init__(self, model_bytes: bytes, model_type: str = 'bpe'):
    self.model_bytes = model_bytes
    self.model_type = model_type
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError:
      raise ConfigError('sentencepiece: the model bytes are not a valid '
                        f'model; delete the corrupt {SP_MODEL_NAME} and its '
                        f'{JSON_NAME} to retrain') from None

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
    """Loads an existing SentencePiece `.model` file (not trained here)."""
    model_bytes = _read_file(path, 'a SentencePiece .model file')
    try:
      return cls(model_bytes, model_type='file')
    except ConfigError:
      raise ConfigError(f'data.tokenizer_path={str(path)!r} is not a '
                        'SentencePiece model; pass a .model file, or use '
                        'data.tokenizer=hf for a tokenizer.json') from None

  @classmethod
  def train(cls, text: str, vocab_size: int,
            model_type: str = 'bpe') -> SentencePieceTokenizer:
    """Trains a model on `text` (deterministic for the same inputs)."""
    check(model_type in SP_MODEL_TYPES,
          f'sentencepiece model_type={model_type!r} is unknown; use one of '
          f'{", ".join(SP_MODEL_TYPES)}')
    check(isinstance(vocab_size, int) and vocab_size > 257,
          f'data.vocab_size={vocab_size!r}: sentencepiece needs more than 257 '
          '(256 byte pieces + unk); use e.g. data.vocab_size=1024')
    check(bool(text.strip()), 'sentencepiece: the training text is empty; '
          'point data.path at a non-empty corpus')
    return cls(_train_sentencepiece(text, vocab_size, model_type), model_type)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode(np.asarray(ids, dtype=np.int64).tolist())

  def encode_bytes(self, data: bytes) -> np.ndarray:
    text = data.decode('utf-8', errors='replace')
    chunks = list(_line_chunks(text, _SP_CHUNK_CHARS))
    if not chunks:
      return np.zeros(0, dtype=np.int32)
    pieces = self._sp.encode(chunks, num_threads=min(4, os.cpu_count() or 1))
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in pieces])

  def files(self) -> dict[str, bytes]:
    meta = {'type': self.name, 'vocab_size': self.vocab_size,
            'model_type': self.model_type, 'model_file': SP_MODEL_NAME}
    return {SP_MODEL_NAME: self.model_bytes, JSON_NAME: _json_bytes(meta)}


def _read_file(path: str | os.PathLike[str], what: str) -> bytes:
  """The bytes of data.tokenizer_path; ConfigError if it is not a file."""
  path = pathlib.Path(path).expanduser()
  check(path.is_file(), f'data.tokenizer_path={str(path)!r}: no such file; '
        f'pass {what}')
  try:
    return path.read_bytes()
  except OSError as e:
    raise ConfigError(f'data.tokenizer_path={str(path)!r}: cannot read it '
                      f'({e.strerror}); fix its permissions') from None


class HFTokenizer(Tokenizer):
  """An existing Hugging Face `tokenizer.json` (the `tokenizers` library):
  ids as the source model has them, no special tokens added."""

  name = 'hf'

  def __init__(self, json_bytes: bytes, what: str = HF_JSON_NAME):
    import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
    self.json_bytes = json_bytes
    try:
      self._tok = hf_tokenizers.Tokenizer.from_str(json_bytes.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except
      first = ' '.join(str(e).split())[:120]
      raise ConfigError(f'{what} is not a Hugging Face tokenizer.json '
                        f'({first}); pass the tokenizer.json of a '
                        'tokenizers / transformers model') from None
    # Ids may leave gaps: the size is one past the largest.
    self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True)
                           .values(), default=-1) + 1
    check(self._vocab_size > 0, f'{what} has an empty vocabulary; pass the '
          'tokenizer.json of a trained tokenizer')

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> HFTokenizer:
    """Loads a Hugging Face `tokenizer.json`."""
    return cls(_read_file(path, 'a Hugging Face tokenizer.json'),
               f'data.tokenizer_path={str(path)!r}')

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> np.ndarray:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(),
                            skip_special_tokens=False)

  def encode_bytes(self, data: bytes) -> np.ndarray:
    text = data.decode('utf-8', errors='replace')
    chunks = list(_line_chunks(text, _SP_CHUNK_CHARS))
    if not chunks:
      return np.zeros(0, dtype=np.int32)
    encodings = self._tok.encode_batch(chunks, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int32)
                           for e in encodings])

  def files(self) -> dict[str, bytes]:
    meta = {'type': self.name, 'vocab_size': self.vocab_size,
            'model_file': HF_JSON_NAME}
    return {HF_JSON_NAME: self.json_bytes, JSON_NAME: _json_bytes(meta)}


def _line_chunks(text: str, chunk_chars: int) -> Iterator[str]:
  """Splits `text` after newlines into chunks of about `chunk_chars`."""
  start = 0
  while start < len(text):
    end = text.find('\n', start + chunk_chars)
    end = len(text) if end < 0 else end + 1
    yield text[start:end]
    start = end


def build_tokenizer(kind: str, train_bytes: bytes,
                    vocab_size: int | None = None,
                    model_type: str = 'bpe', path: str = '') -> Tokenizer:
  """Builds a tokenizer of `kind` from the corpus bytes, or loads `path`.

  Args:
    kind: 'byte', 'char', 'sentencepiece' or 'hf'.
    train_bytes: the text it learns from: the whole corpus for char (every
      character of train and validation), the training split for
      sentencepiece; unused when `path` is given.
    vocab_size: SentencePiece vocabulary size (default 1024); ignored else.
    model_type: SentencePiece model type, 'bpe' or 'unigram'.
    path: data.tokenizer_path: an existing SentencePiece `.model` or Hugging
      Face `tokenizer.json` to load instead of training one (hf needs it).

  Returns:
    The tokenizer (not yet saved).
  """
  check(kind in KINDS, f'data.tokenizer={kind!r} is unknown; use one of '
        f'{", ".join(KINDS)}')
  check(not path or kind in FILE_KINDS,
        f'data.tokenizer_path={path!r} is for data.tokenizer=sentencepiece '
        f'or hf, not {kind}; set data.tokenizer_path= (empty) or change '
        'data.tokenizer')
  check(bool(path) or kind != 'hf', 'data.tokenizer=hf needs '
        'data.tokenizer_path=PATH/tokenizer.json (a Hugging Face tokenizer '
        'file); pass it')
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'char':
    return CharTokenizer.from_text(decode_utf8(train_bytes))
  if kind == 'hf':
    return HFTokenizer.from_file(path)
  if path:
    return SentencePieceTokenizer.from_file(path)
  text = train_bytes.decode('utf-8', errors='replace')
  return SentencePieceTokenizer.train(
      text, 1024 if vocab_size is None else vocab_size, model_type)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  """Reads tokenizer.json; missing or corrupt → ConfigError."""
  fix = ('delete it (and the workdir\'s other tokenizer files) to rebuild '
         'the tokenizer, or use a fresh workdir')
  if not path.is_file():
    raise ConfigError(f'{path}: no such tokenizer file; pass the directory '
                      'that a run saved its tokenizer into')
  try:
    meta = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path}: unreadable tokenizer file '
                      f'({type(e).__name__}); {fix}') from None
  if not isinstance(meta, dict) or meta.get('type') not in KINDS:
    raise ConfigError(f'{path}: not a tokenizer file (needs "type" in '
                      f'{", ".join(KINDS)}); {fix}')
  return meta


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
  """Loads the tokenizer that `save` wrote into `directory`."""
  path = pathlib.Path(directory) / JSON_NAME
  meta = _read_json(path)
  kind = meta['type']
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'char':
    chars = meta.get('chars')
    check(isinstance(chars, list) and bool(chars),
          f'{path}: char tokenizer without a "chars" list; delete it to '
          'rebuild the tokenizer')
    return CharTokenizer(chars)
  default = HF_JSON_NAME if kind == 'hf' else SP_MODEL_NAME
  model_path = pathlib.Path(directory) / meta.get('model_file', default)
  check(model_path.is_file(),
        f'{model_path}: {kind} model missing next to {path}; delete '
        f'{path} to rebuild the tokenizer, or restore the model file')
  if kind == 'hf':
    return HFTokenizer(model_path.read_bytes(), str(model_path))
  return SentencePieceTokenizer(model_path.read_bytes(),
                                meta.get('model_type', 'bpe'))
