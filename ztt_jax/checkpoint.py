"""Orbax checkpoints: params, optimizer state, data iterator and config.

Layout under `WORKDIR/checkpoints/<step>/`: `params` and `opt_state` (array
trees), `data` (the grain iterator state) and `config` (JSON). Params are a
separate item so tools can load them without the optimizer state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any
import zlib

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ztt_jax import configlib
from ztt_jax.errors import ConfigError
from ztt_jax.errors import check_local_path


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the training loop."""

  def __init__(self, directory: str | os.PathLike[str], every_steps: int,
               keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, config,
           force: bool = False) -> bool:
    """Saves at `step` when the interval says so (always with `force`)."""
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(
            {'step': state.step, 'opt_state': state.opt_state}),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config.to_dict())), force=force)

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote checkpoint `step` (from its data iterator
    files, `process_I-of-N.json`); None when that cannot be read."""
    counts = set()
    try:
      for name in os.listdir(os.path.join(self.directory, str(step), 'data')):
        match = _DATA_FILE.fullmatch(name)
        if match:
          counts.add(int(match.group(1)))
    except OSError:
      return None
    return counts.pop() if len(counts) == 1 else None

  def restore(self, step: int, abstract_state: Any, data_iterator):
    """Restores the train state (sharded like `abstract_state`) and moves
    `data_iterator` to where it was at `step`.

    A checkpoint written by another number of processes restores too: Orbax
    reshards the arrays onto `abstract_state`'s shardings, and the iterator,
    whose saved state is per process, is moved to step `step` instead (the
    batch for step s is a pure function of (seed, s)).
    """
    same_processes = self.saved_process_count(step) in (
        None, jax.process_count())
    items = dict(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(
            {'step': abstract_state.step,
             'opt_state': abstract_state.opt_state}))
    if same_processes:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not same_processes:
      data_iterator.set_state({'next_index': step})
    return abstract_state.replace(
        step=restored.opt_state['step'], params=restored.params,
        opt_state=restored.opt_state['opt_state'])

  def restore_latest_good(self, abstract_state: Any, data_iterator,
                          warn=print, comms=None):
    """Restores the newest checkpoint that reads back; `(state, step)`.

    Each restore error is classified, and every process acts on the same
    verdict (`comms.allgather`):

    * damaged files (truncated, missing, undecodable; `is_corruption`): the
      checkpoint is moved to `WORKDIR/checkpoints_corrupt/` for inspection
      (never deleted) by process 0 alone while the others wait at a
      barrier, with a warning, and the next older one is tried;
    * written by another number of processes, and it does not restore
      resharded onto this run: ConfigError (one line); nothing is moved;
    * anything else (out of memory, a bug, ...): raised; nothing is moved.

    `(None, None)` when no checkpoint is left.

    Args:
      abstract_state: the restore target (ShapeDtypeStructs with
        shardings).
      data_iterator: the training iterator, moved to the restored step.
      warn: prints a warning line.
      comms: the processes (multihost.Comms; default: the running JAX
        processes).
    """
    if comms is None:
      from ztt_jax import multihost  # pylint: disable=g-import-not-at-top
      comms = multihost.Comms.from_jax()
    for step in sorted(self.manager.all_steps(), reverse=True):
      saved = self.saved_process_count(step)
      try:
        state, error, verdict = self.restore(
            step, abstract_state, data_iterator), None, _OK
      except Exception as e:  # pylint: disable=broad-except
        state, error = None, e
        if saved not in (None, comms.process_count):
          verdict = _TOPOLOGY
        else:
          verdict = _CORRUPT if is_corruption(e) else _OTHER
      verdict_P = comms.allgather(np.int32(verdict))
      if (verdict_P == _OK).all():
        return state, step
      if (verdict_P == _OTHER).any():
        if error is not None and verdict == _OTHER:
          raise error
        failed = [i for i, v in enumerate(verdict_P) if v == _OTHER]
        raise RuntimeError(
            f'process(es) {failed} could not restore checkpoint {step} '
            '(not a damaged file; see their error); nothing was moved')
      if (verdict_P == _TOPOLOGY).any():
        why = (f' ({type(error).__name__}: {_first_line(error)})'
               if error is not None else '')
        raise ConfigError(
            f'checkpoint {step} in {self.directory} was written by {saved} '
            f'processes and does not restore resharded onto these '
            f'{comms.process_count}{why}; resume with {saved} processes (it '
            'was left in place)')
      where = 'checkpoints_corrupt/'
      if comms.process_index == 0:
        where = self.quarantine(step)
      comms.barrier(f'ztt_quarantine_{step}')
      self.manager.reload()
      why = (f'{type(error).__name__}: {_first_line(error)}'
             if error is not None else 'unreadable on another process')
      warn(f'warning: checkpoint {step} is unreadable ({why}); moved it to '
           f'{where} and trying an older one')
    return None, None

  def quarantine(self, step: int) -> str:
    """Moves checkpoint `step` out of the manager's view; returns where."""
    bad_dir = os.path.join(os.path.dirname(self.directory),
                           'checkpoints_corrupt')
    os.makedirs(bad_dir, exist_ok=True)
    target = os.path.join(bad_dir, f'{step}-{int(time.time())}')
    shutil.move(os.path.join(self.directory, str(step)), target)
    return target

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


# restore_latest_good's verdicts, one per process.
_OK, _CORRUPT, _TOPOLOGY, _OTHER = 0, 1, 2, 3
_DATA_FILE = re.compile(r'process_\d+-of-(\d+)\.json')
# What TensorStore, Orbax and grain say about damaged or missing files.
_CORRUPTION_MARKERS = (
    'DATA_LOSS', 'OUT_OF_RANGE', 'NOT_FOUND', 'Error reading',
    'Error decoding', 'corrupt', 'checksum', 'does not exist',
    'No such file', 'Expecting value', 'Unterminated string',
    'unexpected end', 'truncated')
# Never a damaged file, whatever the message says.
_NOT_CORRUPTION = (MemoryError, TypeError, AttributeError, NameError,
                   KeyError, AssertionError, NotImplementedError,
                   RecursionError)


def is_corruption(e: BaseException) -> bool:
  """Whether a restore error says the checkpoint's files are damaged.

  Looks through the exception and its causes: a missing file, a JSON or
  compressed stream that does not decode, or TensorStore/Orbax reporting a
  short or unreadable file (DATA_LOSS, OUT_OF_RANGE, NOT_FOUND, "Error
  reading"). Out-of-memory, type errors and other bugs are not.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, _NOT_CORRUPTION):
      return False
    if isinstance(e, (FileNotFoundError, EOFError, json.JSONDecodeError,
                      zlib.error)):
      return True
    if any(m in str(e) for m in _CORRUPTION_MARKERS):
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ''


def checkpoint_dir(workdir) -> str:
  check_local_path('--workdir', workdir)
  return os.path.join(os.path.abspath(os.fspath(workdir)), 'checkpoints')


def read_config(workdir, step: int | None = None
                ) -> tuple[ml_collections.ConfigDict, int]:
  """The config saved with a checkpoint (latest when `step` is None), over
  `configlib.base_config()`: fields added since it was saved take their
  defaults."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ConfigError(f'no checkpoints in {directory}; train first with '
                      f'ztt-train --workdir={workdir}')
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise ConfigError(
          f'no checkpoint for step {step} in {directory} (have '
          f'{list(manager.all_steps())}); pass one of those or train first')
    restored = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
  return configlib.with_defaults(restored.config), step


def restore_params(workdir, step: int, abstract_params: Any) -> Any:
  """Just the params of a checkpoint, placed like `abstract_params`."""
  with ocp.CheckpointManager(checkpoint_dir(workdir)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
  return restored.params


def with_sharding(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the given shardings (restore targets)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
