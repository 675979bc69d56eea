"""Metric writers: JSON lines, TensorBoard, plain console lines off a tty."""

import io
import json

import numpy as np

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


def test_matmul_peak_is_plausible():
  peak = metrics.measure_matmul_peak(n=256, repeats=2)
  assert 1e8 < peak < 1e15
