"""The one exception type for user errors (bad config, bad input, bad files).

Its message is a single line naming the problem and the fix; the CLIs print it
and exit with status 2 instead of showing a traceback.
"""

import re

_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


class ConfigError(ValueError):
  """A user error: a config value out of range, a missing file, bad data."""


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) when condition is false."""
  if not condition:
    raise ConfigError(message)


def check_local_path(flag: str, path) -> None:
  """Refuses a URL (`gs://b/run`, any `scheme://...`) for a directory flag.

  Metrics, TensorBoard, tokenizer.json, the token cache, checkpoint
  quarantine and nonfinite/ use local file calls, so URL workdirs are not
  supported yet; a bucket mounted with gcsfuse is a local path.
  """
  path = str(path)
  check(not _URL.match(path),
        f'{flag}={path}: URL workdirs are not supported yet (metrics, '
        'tokenizer.json, the token cache and checkpoint recovery write local '
        'files); mount the bucket (gcsfuse, or launch/tpu_pod.sh '
        '--mount_bucket=BUCKET mounts it at /mnt) and pass the mounted path, '
        'e.g. --workdir=/mnt/run')
