"""Test session settings: CPU only, a compilation cache shared by the
tests of one session (many tests compile the same tiny train step), and the
`corpus` and `fake_wandb` fixtures."""

import os
import pathlib
import sys
import sysconfig
import tempfile
import types

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# XLA's quick CPU compile settings: the legacy elemental emitters instead of
# the fusion emitters, and LLVM without its optimization passes. Tests run
# tiny programs, so compiling is most of their time: a tiny ZTT train step
# compiles in 1.1 s instead of 4.7 s and gives the same losses (to float32
# rounding). And one LLVM module per program rather than split for parallel
# codegen threads, which two busy test workers on two cores do not have
# spare (0.86 to 0.93 s instead of 0.97 to 1.04 s for that step, quiet).
# The flags reach every subprocess through the environment.
# `ZTT_TEST_XLA_FLAGS= python -m pytest ...` runs the suite with XLA's
# defaults instead.
QUICK_XLA_FLAGS = ('--xla_cpu_use_fusion_emitters=false '
                   '--xla_backend_optimization_level=0 '
                   '--xla_llvm_disable_expensive_passes=true '
                   '--xla_cpu_parallel_codegen_split_count=1')
_flags = os.environ.setdefault('ZTT_TEST_XLA_FLAGS', QUICK_XLA_FLAGS)
if _flags not in os.environ.get('XLA_FLAGS', ''):  # xdist workers inherit.
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flags}".strip()

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# `ZTT_TEST_XLA_CACHE` (.ci/run: a new empty directory, so CI times a cold
# start); by default one directory per user that outlives the session.
_CACHE = os.environ.setdefault(
    'ZTT_TEST_XLA_CACHE', os.path.join(tempfile.gettempdir(),
                                       f'ztt_jax_test_xla_cache_{os.getuid()}'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def pytest_collection_modifyitems(items):
  """Runs the `slow` tier first, longest first (`@pytest.mark.slow(s)`,
  with s a rough duration in seconds on 2 cores). Under `pytest -n 2`
  xdist hands the first tests out one at a time, alternating between the
  workers, so the long end-to-end runs are spread over both workers at the
  start. (Measured on 2 cores: no change to the suite's time against the
  collected order, 339 s against 338 s; kept so that a new long test cannot
  land last on one worker.)"""
  def rank(item):
    mark = item.get_closest_marker('slow')
    if mark is None:
      return 0.0
    return -float(mark.args[0]) if mark.args else -1.0
  items.sort(key=rank)  # Stable: the rest keep their collected order.


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
  """Real text that is on every machine: a few standard-library modules."""
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  text = ''.join((stdlib / name).read_text(encoding='utf-8')
                 for name in ('textwrap.py', 'shlex.py', 'fnmatch.py'))
  path = tmp_path_factory.mktemp('corpus') / 'stdlib.txt'
  path.write_text(text, encoding='utf-8')
  return str(path)


def _sample_text() -> str:
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  return (stdlib / 'textwrap.py').read_text(encoding='utf-8')


@pytest.fixture(scope='session')
def sp_model_file(tmp_path_factory) -> str:
  """An existing SentencePiece .model (400 pieces), trained here."""
  from ztt_jax import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.SentencePieceTokenizer.train(_sample_text(), 400)
  path = tmp_path_factory.mktemp('sp') / 'm.model'
  path.write_bytes(tok.model_bytes)
  return str(path)


@pytest.fixture(scope='session')
def hf_tokenizer_file(tmp_path_factory) -> str:
  """An existing Hugging Face tokenizer.json: a byte-level BPE (GPT-2
  style, 320 ids with one special token), built here with `tokenizers`."""
  from tokenizers import (decoders, models, pre_tokenizers,  # pylint: disable=g-import-not-at-top
                          trainers, Tokenizer)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=320, special_tokens=['<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator([_sample_text()], trainer)
  path = tmp_path_factory.mktemp('hf') / 'tokenizer.json'
  tok.save(str(path))
  return str(path)


class FakeWandb(types.ModuleType):
  """A stand-in `wandb` module: records init arguments and logged rows."""

  def __init__(self):
    super().__init__('wandb')
    self.inits, self.logs, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    fake = self

    class Run:
      id = kwargs['id']

      def log(self, data, step=None):
        fake.logs.append((step, dict(data)))

      def finish(self):
        fake.finished += 1

    return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
  """`import wandb` gives a FakeWandb for the test (no network, no
  package)."""
  module = FakeWandb()
  monkeypatch.setitem(sys.modules, 'wandb', module)
  return module
