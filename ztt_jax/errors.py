"""The one exception type for user errors (bad config, bad input, bad files).

Its message is a single line naming the problem and the fix; the CLIs print it
and exit with status 2 instead of showing a traceback.
"""


class ConfigError(ValueError):
  """A user error: a config value out of range, a missing file, bad data."""


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) when condition is false."""
  if not condition:
    raise ConfigError(message)
