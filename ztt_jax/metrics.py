"""Training metrics: JSON lines, TensorBoard, Weights & Biases, the console.

Only process 0 writes files. The console shows a one-line progress bar when
stdout is a terminal and plain lines otherwise (logs, CI). Given the run's
config, the writer also records it: in TensorBoard as hyperparameters (the
HPARAMS tab) and as a text table (TEXT tab), and, with
`train.wandb_project` set, as the config of a W&B run that gets the same
scalars as TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import string
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ztt_jax import tokenizers
from ztt_jax.errors import ConfigError

# The W&B run of a workdir, so that a resumed run logs into the same one.
WANDB_RUN_ID_FILE = 'wandb_run_id'
WANDB_INSTALL = 'pip install -e ".[wandb]"'


def _plain(value: Any) -> Any:
  """JSON-friendly Python values (lists for per-cycle arrays)."""
  value = np.asarray(value) if isinstance(value, (jax.Array, np.ndarray,
                                                  np.generic)) else value
  if isinstance(value, np.ndarray):
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def scalars(row: dict[str, Any]) -> Iterator[tuple[str, float]]:
  """The scalars of a metrics row as TensorBoard and W&B get them: a
  per-cycle list `x` becomes `x/cycle_1`, `x/cycle_2`, ...; `step` and
  non-numbers are left out."""
  for name, value in row.items():
    if name == 'step':
      continue
    if isinstance(value, list):
      for i, v in enumerate(value):
        yield f'{name}/cycle_{i + 1}', v
    elif isinstance(value, (int, float)):
      yield name, value


def flat_config(config) -> dict[str, bool | int | float | str]:
  """The config as {'train.lr': 0.001, ...}, sorted; a value that is not a
  bool, number or text (a tuple, None) as its repr."""
  flat = {}

  def walk(prefix: str, node) -> None:
    for key, value in node.items():
      name = f'{prefix}{key}'
      if hasattr(value, 'items'):
        walk(name + '.', value)
      elif isinstance(value, (bool, int, float, str)):
        flat[name] = value
      else:
        flat[name] = repr(value)

  walk('', config)
  return dict(sorted(flat.items()))


def config_markdown(config) -> str:
  """The flattened config as a markdown table (TensorBoard's TEXT tab)."""
  rows = [f'| `{k}` | `{v!r}` |' for k, v in flat_config(config).items()]
  return '\n'.join(['| field | value |', '|---|---|', *rows])


def require_wandb(config) -> None:
  """With `train.wandb_project` set, wandb must import: else a ConfigError
  naming the fix (the CLIs print it as one line, exit status 2)."""
  project = config.train.get('wandb_project', '')
  if not project:
    return
  try:
    import wandb  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  except ImportError:
    raise ConfigError(
        f'train.wandb_project={project!r} needs the wandb package, which is '
        f'not installed; run {WANDB_INSTALL} (or pip install wandb), or set '
        "train.wandb_project='' to train without W&B") from None


def wandb_run_id(workdir: str) -> str:
  """The W&B run id of this workdir: read from WORKDIR/wandb_run_id, or a
  new one written there (so every restart resumes the same run)."""
  path = os.path.join(workdir, WANDB_RUN_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  alphabet = string.ascii_lowercase + string.digits
  run_id = ''.join(secrets.choice(alphabet) for _ in range(12))
  tokenizers.atomic_write_bytes(path, (run_id + '\n').encode())
  return run_id


class WandbWriter:
  """One W&B run per workdir: started (or resumed, by the id kept in the
  workdir) with the config, then `log` per metrics row, `close` at the end.
  W&B's own files go to WORKDIR/wandb."""

  def __init__(self, workdir: str, config):
    import wandb  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    t = config.train
    self.run_id = wandb_run_id(workdir)
    self.run = wandb.init(
        project=t.wandb_project, entity=t.wandb_entity or None,
        name=t.wandb_name or os.path.basename(os.path.normpath(workdir)),
        id=self.run_id, resume='allow', dir=workdir,
        config=config.to_dict())

  def log(self, step: int, row: dict[str, Any]) -> None:
    self.run.log(dict(scalars(row)), step=step)

  def close(self) -> None:
    self.run.finish()


def _tensorboardx():
  """tensorboardX, imported without torch. Where torch is installed,
  tensorboardX imports it at once (1.2 s of every start) only to recognise
  torch tensors, which we never pass it."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    return tensorboardX
  sys.modules['torch'] = None  # Makes `import torch` raise ImportError.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    import tensorboardX.summary  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  finally:
    del sys.modules['torch']
  return tensorboardX


class MetricWriter:
  """Writes `WORKDIR/metrics.jsonl`, `WORKDIR/tb`, W&B and the console.

  With `config` (the run's), TensorBoard gets it as hyperparameters and as
  a text table at the start, and `config.train.wandb_project` (non-empty)
  adds a `WandbWriter`. Nothing is written when not `enabled` (processes
  other than 0).
  """

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True,
               stream=None, config=None):
    self.enabled = enabled
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a',
                         encoding='utf-8')
      self._tb = _tensorboardx().SummaryWriter(os.path.join(workdir, 'tb'))
      if config is not None:
        self._write_config(config)
        if config.train.get('wandb_project', ''):
          self._wandb = WandbWriter(workdir, config)

  def _write_config(self, config) -> None:
    """The config in TensorBoard: a session-start record of the HParams
    plugin per run (no experiment record, so TensorBoard builds the
    comparison table from all the runs under its --logdir, the metrics
    from their scalars), and the text table."""
    _, session_start, _ = _tensorboardx().summary.hparams(
        flat_config(config), {})
    self._tb.file_writer.add_summary(session_start)
    self._tb.add_text('config', config_markdown(config))
    self._tb.flush()

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    if not self.enabled:
      return row
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for name, value in scalars(row):
      self._tb.add_scalar(name, value, step)
    if self._wandb:
      self._wandb.log(step, row)
    return row

  def console(self, step: int, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    parts = [f'{k}={_fmt(row[k])}' for k in (
        'loss', 'val_loss', 'lr', 'grad_norm', 'tokens_per_s', 'mfu',
        'zero_attention', 'gate') if k in row]
    bar = progress_bar(step, self.total_steps)
    line = f'{bar} step {step}/{self.total_steps} ' + ' '.join(parts)
    if self.tty and 'val_loss' not in row:
      # One line, redrawn in place; eval lines stay on screen.
      width = shutil.get_terminal_size().columns - 1
      self.stream.write('\r' + line[:width].ljust(width))
    else:
      self.stream.write(('\n' if self.tty else '') + line + '\n')
    self.stream.flush()

  def print(self, text: str) -> None:
    if self.enabled:
      self.stream.write(('\n' if self.tty else '') + text + '\n')
      self.stream.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = None
    if self._wandb:
      self._wandb.close()
      self._wandb = None


def _fmt(value: Any) -> str:
  if isinstance(value, list):
    return '[' + ','.join(_fmt(v) for v in value) + ']'
  if isinstance(value, float):
    if value and (abs(value) < 1e-3 or abs(value) >= 1e5):
      return f'{value:.2e}'
    return f'{value:.4g}'
  return str(value)


def progress_bar(step: int, total: int, width: int = 20) -> str:
  filled = int(width * step / max(total, 1))
  return '[' + '#' * filled + '.' * (width - filled) + ']'


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32,
                        repeats: int = 5, shape=None) -> float:
  """FLOP/s of one device on an n x n matmul (best of `repeats`).

  The MFU denominator when `config.train.peak_flops` is 0: a measured peak of
  the same machine, not a datasheet number. `shape=(m, k, n)` times an
  [m, k] x [k, n] matmul instead (e.g. a model's own MLP shape).
  """
  m, k, n = shape or (n, n, n)
  a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * m * k * n / best
