"""What the processes of one run agree on before training starts.

Every function takes a `Comms`: this process's index, the process count,
and the three collectives it needs (a barrier, process 0's value, everyone's
value). `Comms.from_jax()` is the real one (`jax.experimental.
multihost_utils`); tests pass fakes, so the ordering logic runs without
extra processes.

* `check_shared_workdir`: process 0 writes a nonce into the workdir, every
  process reads it back after a barrier; a workdir some process cannot see
  (a per-host local directory) fails on every process with one line,
  instead of hanging at the first checkpoint.
* `coordinated_corpus`: process 0 tokenizes and writes the token cache and
  `tokenizer.json`; the others wait, then only read.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError

NONCE_NAME = '.ztt_shared_workdir_check'


@dataclasses.dataclass(frozen=True)
class Comms:
  """This process's place in the run and the collectives between them.

  Attributes:
    process_index: this process, 0 .. process_count - 1.
    process_count: processes in the run.
    barrier: `barrier(name)` returns once every process has called it.
    broadcast: `broadcast(x)` returns process 0's `x` on every process.
    allgather: `allgather(x)` returns every process's scalar `x`, in process
      order, as an array (also a barrier).
  """
  process_index: int
  process_count: int
  barrier: Callable[[str], None]
  broadcast: Callable[[Any], Any]
  allgather: Callable[[Any], np.ndarray]

  @classmethod
  def single(cls) -> Comms:
    return cls(0, 1, lambda name: None, lambda x: x,
               lambda x: np.asarray([x]))

  @classmethod
  def from_jax(cls) -> Comms:
    """The running JAX processes (call after jax.distributed.initialize)."""
    if jax.process_count() == 1:
      return cls.single()
    return cls(
        jax.process_index(), jax.process_count(),
        multihost_utils.sync_global_devices,
        lambda x: np.asarray(multihost_utils.broadcast_one_to_all(
            np.asarray(x))),
        lambda x: np.asarray(multihost_utils.process_allgather(
            np.asarray(x))).reshape(-1))


def check_shared_workdir(workdir: str, comms: Comms) -> None:
  """Checks that every process sees the same `workdir` (multi-process only).

  Raises:
    ConfigError: on every process, naming the processes that could not see
      the nonce file process 0 wrote.
  """
  if comms.process_count == 1:
    return
  nonce = int(comms.broadcast(np.int32(secrets.randbits(31))))
  path = os.path.join(workdir, NONCE_NAME)
  if comms.process_index == 0:
    os.makedirs(workdir, exist_ok=True)
    tokenizers.atomic_write_bytes(path, f'{nonce}\n'.encode())
  comms.barrier('ztt_shared_workdir_written')
  try:
    with open(path, encoding='utf-8') as f:
      seen = f.read().strip() == str(nonce)
  except OSError:
    seen = False
  seen_P = comms.allgather(np.int32(seen))
  if comms.process_index == 0 and seen_P.all():
    os.unlink(path)
  blind = [i for i, ok in enumerate(seen_P) if not ok]
  if blind:
    raise ConfigError(
        f'--workdir={workdir} is not shared: process(es) '
        f'{", ".join(map(str, blind))} of {comms.process_count} cannot see '
        f'the file process 0 wrote there ({NONCE_NAME}); put the workdir on '
        'a file system every host mounts at the same path (NFS, Filestore, '
        'or a bucket via gcsfuse: launch/tpu_pod.sh --mount_bucket=BUCKET)')


def coordinated_corpus(data_config, workdir: str, comms: Comms,
                       load: Callable[..., Any] | None = None):
  """`data.load_corpus` by process 0 only; the others wait, then only read.

  Process 0 tokenizes (or finds the cache) and writes the token cache and
  `WORKDIR/tokenizer.json`; after it is done (an allgather of its outcome,
  so a failure there stops every process) the others load the tokenizer
  and read the cache without writing anything (a cache they cannot see,
  e.g. a host-local data.cache_dir, is tokenized in memory).

  Args:
    data_config: the `data` ConfigDict.
    workdir: the run directory (shared, see `check_shared_workdir`).
    comms: the processes.
    load: `data.load_corpus` (tests pass a spy).

  Returns:
    The Corpus.
  """
  if load is None:
    from ztt_jax import data  # pylint: disable=g-import-not-at-top
    load = data.load_corpus
  if comms.process_count == 1:
    return load(data_config, workdir)
  corpus, error = None, None
  if comms.process_index == 0:
    try:
      corpus = load(data_config, workdir)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # Raised below, after telling the others.
  done_P = comms.allgather(np.int32(error is None))
  if error is not None:
    raise error
  if not done_P[0]:
    raise ConfigError('process 0 could not prepare the corpus (its error '
                      'says why); fix that and run again')
  if comms.process_index != 0:
    corpus = load(data_config, workdir, write=False)
  return corpus
