"""Metric writers: JSON lines, TensorBoard (scalars, the config as
hyperparameters), Weights & Biases through a stand-in module, plain console
lines off a tty."""

import io
import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ztt_jax import metrics
from ztt_jax.errors import ConfigError


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


def read_events(tb_dir):
  """Every Event in the TensorBoard files under `tb_dir`, read with
  tensorboardX's protos (TFRecord framing: length, its CRC, data, CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for path in sorted(tb_dir.rglob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(record)
      events.append(event)
  return events


def tb_scalars(tb_dir) -> dict[int, dict[str, float]]:
  out = {}
  for event in read_events(tb_dir):
    for value in event.summary.value:
      if value.HasField('simple_value'):
        out.setdefault(event.step, {})[value.tag] = value.simple_value
  return out


ROWS = {3: {'loss': np.float32(2.5), 'lr': 1e-3,
            'zero_attention': np.array([0.1, 0.2])},
        6: {'loss': 2.0, 'val_loss': 2.25, 'lr': 5e-4,
            'zero_attention': np.array([0.3, 0.4])}}


def write_rows(workdir, config, rows):
  writer = metrics.MetricWriter(str(workdir), total_steps=10,
                                stream=io.StringIO(), config=config)
  for step, row in rows.items():
    writer.write(step, row)
  writer.close()


def test_wandb_gets_the_tensorboard_scalars_and_resumes_its_run(
    tmp_path, fake_wandb):
  config = tiny.get_config('ztt')
  config.train.wandb_project = 'ztt-tests'
  workdir = tmp_path / 'my_run'
  workdir.mkdir()
  write_rows(workdir, config, {3: ROWS[3]})
  # Read now: a second writer within the same second reuses the file name.
  tb = tb_scalars(workdir / 'tb')
  [init] = fake_wandb.inits
  assert init['project'] == 'ztt-tests' and init['entity'] is None
  assert init['name'] == 'my_run' and init['resume'] == 'allow'
  assert init['dir'] == str(workdir)
  assert init['config']['train']['lr'] == config.train.lr
  assert init['config']['model']['n_cycles'] == config.model.n_cycles
  run_id = (workdir / metrics.WANDB_RUN_ID_FILE).read_text().strip()
  assert init['id'] == run_id and run_id
  assert fake_wandb.finished == 1
  # Resumed: the same W&B run id, the next rows into it.
  config.train.wandb_entity, config.train.wandb_name = 'team', 'named'
  write_rows(workdir, config, {6: ROWS[6]})
  assert [i['id'] for i in fake_wandb.inits] == [run_id, run_id]
  assert fake_wandb.inits[1]['entity'] == 'team'
  assert fake_wandb.inits[1]['name'] == 'named'
  # The same scalars, at the same steps, as TensorBoard got.
  tb.update(tb_scalars(workdir / 'tb'))
  logged = dict(fake_wandb.logs)
  assert sorted(logged) == [3, 6]
  for step in (3, 6):
    assert logged[step].keys() == tb[step].keys()
    for tag, value in logged[step].items():
      assert value == pytest.approx(tb[step][tag])
  assert logged[6] == pytest.approx({
      'loss': 2.0, 'val_loss': 2.25, 'lr': 5e-4,
      'zero_attention/cycle_1': 0.3, 'zero_attention/cycle_2': 0.4})
  # And the same rows as metrics.jsonl.
  saved = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in saved] == [3, 6]
  assert saved[1]['zero_attention'] == pytest.approx([0.3, 0.4])


def test_no_wandb_unless_configured_and_never_off_process_0(
    tmp_path, fake_wandb):
  config = tiny.get_config('ztt')
  write_rows(tmp_path, config, ROWS)  # wandb_project = '' (the default).
  assert not fake_wandb.inits and not fake_wandb.logs
  assert not (tmp_path / metrics.WANDB_RUN_ID_FILE).exists()
  config.train.wandb_project = 'ztt-tests'
  other = tmp_path / 'process_1'
  other.mkdir()
  writer = metrics.MetricWriter(str(other), 10, enabled=False,
                                stream=io.StringIO(), config=config)
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert not fake_wandb.inits and not list(other.iterdir())


def test_wandb_project_without_wandb_installed_is_one_line(monkeypatch):
  config = tiny.get_config('ztt')
  metrics.require_wandb(config)  # Off: wandb is not needed.
  config.train.wandb_project = 'ztt-tests'
  monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb fails.
  with pytest.raises(ConfigError) as e:
    metrics.require_wandb(config)
  message = str(e.value)
  assert '\n' not in message and 'train.wandb_project' in message
  assert 'pip install -e ".[wandb]"' in message


def test_config_is_in_tensorboard_as_hparams_and_text(tmp_path):
  config = tiny.get_config('ztt')
  config.train.lr = 3e-4
  write_rows(tmp_path, config, {1: {'loss': 3.0}})
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  hparams, text = None, None
  for event in read_events(tmp_path / 'tb'):
    for value in event.summary.value:
      if value.tag == '_hparams_/session_start_info':
        assert value.metadata.plugin_data.plugin_name == 'hparams'
        data = plugin_hparams_pb2.HParamsPluginData()
        data.ParseFromString(value.metadata.plugin_data.content)
        hparams = data.session_start_info.hparams
      elif value.tag == 'config/text_summary':
        text = value.tensor.string_val[0].decode()
  assert hparams is not None and text is not None
  flat = metrics.flat_config(config)
  assert set(hparams) == set(flat)
  assert hparams['train.lr'].number_value == pytest.approx(3e-4)
  assert hparams['model.variant'].string_value == 'ztt'
  assert hparams['checkpoint.async_save'].bool_value == (
      config.checkpoint.async_save)
  assert hparams['sharding.rules'].string_value == repr(config.sharding.rules)
  assert '| `train.lr` | `0.0003` |' in text
