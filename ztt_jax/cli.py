"""Shared plumbing for the console scripts: quiet logs, one-line errors."""

from __future__ import annotations

import sys
from typing import Callable

from ztt_jax.errors import ConfigError


def run_main(name: str, fn: Callable[[], object]) -> None:
  """Runs `fn`; a ConfigError becomes `name: error: ...` and exit code 2."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  try:
    fn()
  except ConfigError as e:
    print(f'{name}: error: {e}', file=sys.stderr)
    sys.exit(2)
