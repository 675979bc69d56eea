"""Metric writers: JSON lines, TensorBoard, plain console lines off a tty."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ztt_jax import metrics


def test_jsonl_rows_and_plain_console(tmp_path):
  stream = io.StringIO()
  writer = metrics.MetricWriter(str(tmp_path), total_steps=10, stream=stream)
  row = writer.write(5, {'loss': np.float32(2.5),
                         'zero_attention': np.array([0.1, 0.2])})
  writer.console(5, row)
  writer.close()
  saved = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert saved == [{'step': 5, 'loss': 2.5,
                    'zero_attention': [0.1, 0.2]}]
  out = stream.getvalue()
  assert '\r' not in out and out.endswith('\n')
  assert 'step 5/10' in out and 'loss=2.5' in out
  assert list((tmp_path / 'tb').iterdir())


def test_disabled_writer_writes_nothing(tmp_path):
  stream = io.StringIO()
  writer = metrics.MetricWriter(str(tmp_path), 10, enabled=False,
                                stream=stream)
  writer.console(1, writer.write(1, {'loss': 1.0}))
  writer.print('hello')
  assert stream.getvalue() == '' and not list(tmp_path.iterdir())


def test_progress_bar():
  assert metrics.progress_bar(5, 10, width=10) == '[#####.....]'
  assert metrics.progress_bar(10, 10, width=4) == '[####]'


class _Clock:
  """A stand-in for the time module whose perf_counter reads `ticks`."""

  def __init__(self, ticks):
    self._ticks = iter(ticks)

  def perf_counter(self):
    return next(self._ticks)


def test_matmul_peak_is_xla_flops_over_the_fastest_repeat(monkeypatch):
  m, k, n = 48, 40, 24
  # XLA's own FLOP count of the op, not metrics' formula.
  lhs, rhs = jnp.ones((m, k)), jnp.ones((k, n))
  cost = jax.jit(jnp.matmul).lower(lhs, rhs).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  # Three timed repeats of 3 s, 2 s and 5 s: the fastest one counts.
  monkeypatch.setattr(metrics, 'time',
                      _Clock([0.0, 3.0, 10.0, 12.0, 20.0, 25.0]))
  peak = metrics.measure_matmul_peak(shape=(m, k, n), repeats=3)
  assert peak == pytest.approx(flops / 2.0)
  # The square default: n x n by n x n.
  cost = jax.jit(jnp.matmul).lower(jnp.ones((32, 32)), jnp.ones(
      (32, 32))).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  monkeypatch.setattr(metrics, 'time', _Clock([0.0, 0.5]))
  assert metrics.measure_matmul_peak(n=32, repeats=1) == pytest.approx(
      flops / 0.5)
