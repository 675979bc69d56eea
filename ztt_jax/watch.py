"""What watches a training run from outside the step: the profiler window
(`train.profile_steps`), stop signals and preemption notices (single- and
multi-process), and the non-finite guard (`train.nan_policy`).

`train.train` enters all three around its loop; each is a small object with
a `check`/`before_step`/`after_step` the loop calls, so the loop itself reads
as the steps it takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from ztt_jax import sharding


class StepProfiler:
  """`train.profile_steps`: a `jax.profiler` trace of steps FIRST..LAST.

  Process 0 only (every process runs the same program), into
  WORKDIR/profile (`plugins/profile/<time>/<host>.xplane.pb`, which
  TensorBoard's profile plugin and XProf open). The trace starts before
  step FIRST is dispatched and stops once step LAST has finished on the
  device. A run that starts inside the range (resumed there) traces the
  rest of it. Used as a context manager around the loop: leaving it (the
  run ends or is preempted inside the range, or an error) stops the trace
  and writes it.
  """

  def __init__(self, steps: tuple[int, int] | None, log_dir: str,
               enabled: bool, log=print):
    self.steps = steps if enabled else None
    self.log_dir, self.log = log_dir, log
    self.active = False
    self._state = None  # The newest state dispatched while tracing.

  def __enter__(self):
    return self

  def before_step(self, step: int) -> None:
    """Call before dispatching step `step` (1-based, as metrics count)."""
    if self.steps and not self.active and (
        self.steps[0] <= step <= self.steps[1]):
      jax.profiler.start_trace(self.log_dir)
      self.active = True
      self.log(f'profiling steps {step} to {self.steps[1]} into '
               f'{self.log_dir}')

  def annotate(self, step: int):
    """The step's trace annotation while tracing (the profiler's step
    view), else nothing."""
    if self.active:
      return jax.profiler.StepTraceAnnotation('train', step_num=step)
    return contextlib.nullcontext()

  def after_step(self, step: int, state) -> None:
    """Call after dispatching step `step`; stops after step LAST."""
    if self.active:
      self._state = state
      if step >= self.steps[1]:
        self.stop()

  def stop(self) -> None:
    """Waits for the traced steps to finish, then writes the trace."""
    if not self.active:
      return
    try:
      jax.block_until_ready(self._state)
    except Exception:  # pylint: disable=broad-except
      pass  # Donated by a step that then failed: nothing left to wait on.
    self._state = None
    self.active = False
    jax.profiler.stop_trace()
    self.log(f'profile written to {self.log_dir}')

  def __exit__(self, *exc):
    self.stop()


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient with `train.nan_policy='stop'`."""


class StopSignals:
  """When the loop stops early for a signal: `check(step)` after every step
  returns what stopped it (a key of `EXIT_CODES`) or None.

  One process: our own SIGTERM and SIGINT handlers set a flag; the loop
  stops after the step in flight, saves it and exits 143 or 130.

  Several processes: a signal may reach one host only, or each host at a
  different step, yet all of them must save the same step together (the
  save is a collective). `jax.distributed.initialize()` starts JAX's
  preemption sync manager, whose notifier owns SIGTERM: a SIGTERM on any
  process is passed to all of them through the coordination service, they
  agree on the step after the furthest one, and
  `reached_preemption_sync_point(step)` is True at that step on every
  process, those that got no signal included. So no handler of ours is
  installed for SIGTERM (it would replace JAX's notifier), and SIGINT,
  which JAX does not watch, is sent on to this process as SIGTERM. Every
  process then stops with 'a preemption notice' (exit 143).

  JAX stops at the step after the furthest one it has been told of, so it
  is told the start step on entry: a notice during the first (compiling)
  step of a resumed run still stops it. One before that, while a resumed
  run prepares the corpus or restores, is not acted on (JAX then picks step
  1, already past): the run goes on until the platform kills it.
  """

  def __init__(self, multi_process: bool, start_step: int = 0):
    self.multi_process = multi_process
    self.start_step = start_step

  def __enter__(self):
    self.received, self._old = None, {}
    if self.multi_process:
      multihost_utils.reached_preemption_sync_point(self.start_step)
    if threading.current_thread() is threading.main_thread():
      if self.multi_process:
        self._old[signal.SIGINT] = signal.signal(signal.SIGINT,
                                                 self._forward_as_sigterm)
      else:
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def _forward_as_sigterm(self, signum, frame):
    del signum, frame
    os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier.

  def check(self, step: int) -> str | None:
    if self.multi_process:
      if multihost_utils.reached_preemption_sync_point(step):
        return 'a preemption notice'
      return None
    return self.received

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


# Exit status of ztt-train after saving on a signal (128 + signal number).
EXIT_CODES = {'SIGTERM': 143, 'SIGINT': 130, 'a preemption notice': 143}


class NonfiniteGuard:
  """`train.nan_policy` without a host sync per step.

  The train step itself drops a non-finite update (and under `stop`
  freezes the state from there on, `make_train_step`), so the loop only
  keeps each step's `finite` flag, still on the device (`record`), and
  reads them all at once at steps that read the device anyway: log, eval
  and checkpoint steps and the end (`check`, before anything is saved).
  Then `skip` warns once per dropped step; `stop` saves the state from
  before the first bad step and that step's batch under
  WORKDIR/nonfinite/step_N (beside the checkpoints, never over them) and
  raises TrainingDiverged. The batch is read again from the dataset (batch
  s is a pure function of (seed, s)), so none is kept in memory meanwhile.
  """

  def __init__(self, policy: str, dataset, workdir: str, writer, mesh):
    self.policy, self.dataset = policy, dataset
    self.workdir, self.writer = workdir, writer
    self.pending = []  # (step, finite flag on the device), oldest first.
    self.healthy = (jax.device_put(np.bool_(True), sharding.replicated(mesh))
                    if policy == 'stop' else None)

  def step_args(self) -> tuple[Any, ...]:
    """The train step's arguments after (state, batch)."""
    return () if self.healthy is None else (self.healthy,)

  def record(self, step: int, metrics) -> None:
    self.pending.append((step, metrics['finite']))
    if self.healthy is not None:
      self.healthy = metrics['healthy']

  def check(self, state) -> None:
    """Reads the flags recorded since the last check (one transfer)."""
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    finite = jax.device_get([f for _, f in self.pending])
    self.pending = []
    for step, ok in zip(steps, finite):
      if ok:
        continue
      if self.policy == 'skip':
        self.writer.print(f'warning: non-finite loss or gradients at step '
                          f'{step}: update skipped (train.nan_policy=skip)')
      else:
        self._stop(step, state)

  def _stop(self, step: int, state) -> None:
    debug_dir = os.path.join(self.workdir, 'nonfinite', f'step_{step}')
    with ocp.StandardCheckpointer() as saver:
      saver.save(os.path.join(debug_dir, 'state'), state, force=True)
    if jax.process_index() == 0:
      # This process's rows of the batch of step `step` (dataset[step - 1]).
      np.savez(os.path.join(debug_dir, 'batch.npz'), **self.dataset[step - 1])
    raise TrainingDiverged(
        f'non-finite loss or gradients at step {step}; the state before it '
        f'and the batch are in {debug_dir}, the checkpoints are untouched; '
        'lower train.lr or set train.nan_policy=skip')
