"""Training metrics: JSON lines, TensorBoard, and the console.

Only process 0 writes files. The console shows a one-line progress bar when
stdout is a terminal and plain lines otherwise (logs, CI).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _plain(value: Any) -> Any:
  """JSON-friendly Python values (lists for per-cycle arrays)."""
  value = np.asarray(value) if isinstance(value, (jax.Array, np.ndarray,
                                                  np.generic)) else value
  if isinstance(value, np.ndarray):
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricWriter:
  """Writes `WORKDIR/metrics.jsonl`, `WORKDIR/tb` and the console."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True,
               stream=None):
    self.enabled = enabled
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self._jsonl = None
    self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a',
                         encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    if not self.enabled:
      return row
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for name, value in row.items():
      if name == 'step':
        continue
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f'{name}/cycle_{i + 1}', v, step)
      elif isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
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
