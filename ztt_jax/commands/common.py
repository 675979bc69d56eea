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


def flags_parser(name: str) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` that turns any flag error (an unknown or
  mistyped `--config.a.b` override, a bad value, a missing config file) into
  one line on stderr and exit code 2."""
  def parse(argv: list[str]) -> list[str]:
    from absl import flags  # pylint: disable=g-import-not-at-top
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError,
            ValueError) as e:
      message = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'")
                         .split()).strip('\'"')
      print(f'{name}: error: bad command-line flag: {message}; see '
            f'{name} --helpfull', file=sys.stderr)
      sys.exit(2)
  return parse
