"""Test session settings: CPU only, and a compilation cache shared by the
tests of one session (many tests compile the same tiny train step)."""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top

_CACHE = os.path.join(tempfile.gettempdir(),
                      f'ztt_jax_test_xla_cache_{os.getuid()}')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
