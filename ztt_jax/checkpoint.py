"""Orbax checkpoints: params, optimizer state, data iterator and config.

Layout under `WORKDIR/checkpoints/<step>/`: `params` and `opt_state` (array
trees), `data` (the grain iterator state) and `config` (JSON). Params are a
separate item so tools can load them without the optimizer state.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from ztt_jax import configlib
from ztt_jax.errors import ConfigError


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

  def restore(self, step: int, abstract_state: Any, data_iterator):
    """Restores the train state (sharded like `abstract_state`) and moves
    `data_iterator` to where it was at `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(
            {'step': abstract_state.step,
             'opt_state': abstract_state.opt_state}),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return abstract_state.replace(
        step=restored.opt_state['step'], params=restored.params,
        opt_state=restored.opt_state['opt_state'])

  def restore_latest_good(self, abstract_state: Any, data_iterator,
                          warn=print):
    """Restores the newest checkpoint that reads back; `(state, step)`.

    A checkpoint that fails to restore (a truncated or missing file) is
    moved to `WORKDIR/checkpoints_corrupt/` for inspection (never deleted)
    with a warning, and the next older one is tried. `(None, None)` when
    none is left.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except Exception as e:  # pylint: disable=broad-except
        kept = self.quarantine(step)
        warn(f'warning: checkpoint {step} is unreadable ({type(e).__name__}:'
             f' {_first_line(e)}); moved it to {kept} and trying an older '
             'one')
    return None, None

  def quarantine(self, step: int) -> str:
    """Moves checkpoint `step` out of the manager's view; returns where."""
    bad_dir = os.path.join(os.path.dirname(self.directory),
                           'checkpoints_corrupt')
    os.makedirs(bad_dir, exist_ok=True)
    target = os.path.join(bad_dir, f'{step}-{int(time.time())}')
    shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ''


def checkpoint_dir(workdir) -> str:
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
