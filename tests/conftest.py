"""Test session settings: CPU only, a compilation cache shared by the
tests of one session (many tests compile the same tiny train step), and the
`corpus` fixture."""

import os
import pathlib
import sysconfig
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

_CACHE = os.path.join(tempfile.gettempdir(),
                      f'ztt_jax_test_xla_cache_{os.getuid()}')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
  """Real text that is on every machine: a few standard-library modules."""
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  text = ''.join((stdlib / name).read_text(encoding='utf-8')
                 for name in ('textwrap.py', 'shlex.py', 'fnmatch.py'))
  path = tmp_path_factory.mktemp('corpus') / 'stdlib.txt'
  path.write_text(text, encoding='utf-8')
  return str(path)
