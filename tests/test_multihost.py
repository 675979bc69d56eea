"""Two JAX processes on 127.0.0.1 (two CPU devices each) train as one run."""

import io
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import ztt_jax
from configs import tiny
from ztt_jax import data
from ztt_jax import model
from ztt_jax import params as params_lib
from ztt_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4

# What each process runs: ztt-train's real entry point, with the metric
# writer enabled on every process (process i > 0 writes
# WORKDIR/process_i/metrics.jsonl), so each one reports the losses it saw.
_DRIVER = r'''
import os
import jax
from ztt_jax import metrics, train
from ztt_jax import params as params_lib
from ztt_jax.commands import train as train_command

class EveryProcessWriter(metrics.MetricWriter):
  def __init__(self, workdir, total_steps, enabled=True, stream=None,
               config=None):
    index = jax.process_index()
    if index:
      workdir = os.path.join(workdir, f'process_{index}')
      os.makedirs(workdir, exist_ok=True)
    super().__init__(workdir, total_steps, True, stream, config)

train.metrics_lib.MetricWriter = EveryProcessWriter
if os.environ.get('ZTT_TEST_STOP_AT'):  # train(stop_at=...), as if stopped.
  train_fn = train.train
  train.train = lambda config, workdir: train_fn(
      config, workdir, stop_at=int(os.environ['ZTT_TEST_STOP_AT']))
train_command.main()
'''


def settings(corpus: str) -> dict[str, object]:
  return {'data.path': corpus, 'data.seq_len': 16, 'train.steps': STEPS,
          'train.batch_size': 8, 'train.log_every_steps': 1,
          'train.eval_every_steps': 0, 'train.eval_batches': 1,
          'train.peak_flops': 1e12, 'checkpoint.every_steps': STEPS,
          'checkpoint.async_save': False, 'sample.max_new_tokens': 0}


def losses(path) -> list[float]:
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return [r['loss'] for r in rows]


@pytest.mark.slow(55)
def test_two_processes_train_as_one_and_restore_in_one(tmp_path, corpus):
  workdir = tmp_path / 'run'
  driver = tmp_path / 'driver.py'
  driver.write_text(_DRIVER, encoding='utf-8')
  overrides = [f'--config.{k}={v}' for k, v in settings(corpus).items()]
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHON': sys.executable,
         'ZTT_CACHE_DIR': str(tmp_path / 'cache'),
         'JAX_COMPILATION_CACHE_DIR': os.environ['ZTT_TEST_XLA_CACHE']}
  env['XLA_FLAGS'] = os.environ['ZTT_TEST_XLA_FLAGS']  # No device count.
  # mesh fsdp=4 over the 4 devices of both processes: every parameter is
  # split across the two processes (devices are laid out in process order,
  # so with data=2 x fsdp=2 the fsdp halves would stay inside a process).
  # The run is set for STEPS + 2 steps and stopped after STEPS (as if
  # interrupted, with a checkpoint), so that the one-process resume below
  # continues the same schedule, and the reference steps here and the
  # resume share one compiled step.
  env['ZTT_TEST_STOP_AT'] = str(STEPS)
  result = subprocess.run(
      ['bash', str(REPO / 'launch' / 'multiprocess_cpu.sh'),
       f'--program={sys.executable} {driver}',
       f'--config={REPO}/configs/tiny.py', f'--workdir={workdir}',
       '--config.mesh.data=1', '--config.mesh.fsdp=4', *overrides,
       f'--config.train.steps={STEPS + 2}'],
      capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}, 4 device(s)" in (
      result.stdout), result.stdout[-3000:]
  assert '[process 0] ' in result.stdout and '[process 1] ' in result.stdout

  # Both processes saw the same global losses.
  loss_0 = losses(workdir / 'metrics.jsonl')
  loss_1 = losses(workdir / 'process_1' / 'metrics.jsonl')
  assert len(loss_0) == STEPS and loss_0 == loss_1

  # The workdir was checked to be shared (the nonce file is gone again),
  # and only process 0 wrote the tokenizer.
  assert not (workdir / '.ztt_shared_workdir_check').exists()
  assert (workdir / 'tokenizer.json').exists()

  # ... which are the losses of one process on one device: the two local
  # halves of each batch make up the single-process batch. (The train step
  # of train.train, without its eval and checkpoints.)
  config = tiny.get_config('ztt')
  for dotted, value in settings(corpus).items():
    section, name = dotted.split('.')
    config[section][name] = value
  config.train.steps = STEPS + 2
  setup = train.Setup(config, str(tmp_path / 'single'),
                      devices=jax.devices()[:1])
  step_fn, _, shardings, batch_sharding = setup.jit_train_step()
  dataset = data.make_train_dataset(setup.corpus.train_N, 16, 8, config.seed)
  single_losses = []
  with setup.context():
    state = setup.jit_init()(jax.random.key(config.seed))
    for step in range(STEPS):
      state, metrics = step_fn(
          state, data.to_global_batch(dataset[step], batch_sharding))
      single_losses.append(float(metrics['loss']))
  np.testing.assert_allclose(loss_0, single_losses, rtol=1e-4)
  final_state = state

  # The checkpoint both processes wrote restores in this one process, and
  # holds the parameters the single process reached.
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(STEPS)]
  module, params, saved = ztt_jax.load(workdir)
  assert saved.train.steps == STEPS + 2 and saved.mesh.fsdp == 4
  assert jax.tree.leaves(params)[0].sharding.is_fully_addressable
  single_params = jax.device_get(state.params)
  assert params_lib.count_params(params) == params_lib.count_params(single_params)
  chex.assert_trees_all_close(params, single_params, rtol=1e-3, atol=1e-5)
  out = jax.jit(module.apply)({'params': params}, np.zeros((1, 4), np.int32))
  assert np.isfinite(out.logits).all()

  # Resumed by ONE process (another process count): the checkpoint is
  # restored resharded, not quarantined, and the data iterator, whose
  # saved state was per process, is recomputed for step 5: the losses of
  # steps 5 and 6 are those of the single process continuing.
  stream = io.StringIO()
  train.train(config, str(workdir), stream=stream)
  assert f'(step {STEPS})' in stream.getvalue(), stream.getvalue()
  assert not (workdir / 'checkpoints_corrupt').exists()
  resumed = losses(workdir / 'metrics.jsonl')[STEPS:]
  expected, state = [], final_state
  with setup.context():
    for step in range(STEPS, STEPS + 2):
      state, metrics = step_fn(
          state, data.to_global_batch(dataset[step], batch_sharding))
      expected.append(float(metrics['loss']))
  np.testing.assert_allclose(resumed, expected, rtol=1e-4)


def process_commands(args, devices_per_process=1) -> list[list[str]]:
  """Each process's command line, from launch/multiprocess_cpu.sh."""
  listing = subprocess.run(
      ['bash', str(REPO / 'launch' / 'multiprocess_cpu.sh'), '--dry_run',
       f'--devices_per_process={devices_per_process}', *args],
      capture_output=True, text=True, check=True, cwd=REPO,
      env={**os.environ, 'PYTHON': sys.executable})
  return [shlex.split(line) for line in listing.stdout.splitlines()]


def start_processes(commands, env, log_dir) -> list:
  """Starts one process per command, each writing its output to a file in
  `log_dir`. (Not to a pipe: a pipe that nobody reads while the test waits
  on another process fills up, blocks its writer, and with it the
  collectives of every process.)"""
  log_dir.mkdir(exist_ok=True)
  first = len(list(log_dir.iterdir()))
  procs = []
  for i, cmd in enumerate(commands):
    path = log_dir / f'{first + i}.log'
    with open(path, 'w', encoding='utf-8') as log:
      proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT)
    proc.log = path
    procs.append(proc)
  return procs


def wait_processes(procs, timeout=300) -> tuple[list[int], list[str]]:
  """Exit codes and outputs; fails with every output if one hangs."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
    pytest.fail('a process hung: ' + repr(
        [p.log.read_text(errors='replace')[-5000:] for p in procs]))
  return ([p.returncode for p in procs],
          [p.log.read_text(errors='replace') for p in procs])


def single_process_run(config, tmp_path, steps):
  """Losses of steps 1..`steps` of one process on one device (the train
  step of train.train, without its eval and checkpoints), and its params
  after each step."""
  setup = train.Setup(config, str(tmp_path / 'single'),
                      devices=jax.devices()[:1])
  step_fn, _, shardings, batch_sharding = setup.jit_train_step()
  dataset = data.make_train_dataset(setup.corpus.train_N,
                                    config.data.seq_len,
                                    config.train.batch_size, config.seed)
  result, params = [], {}
  with setup.context():
    state = setup.jit_init()(jax.random.key(config.seed))
    for step in range(steps):
      state, metrics = step_fn(
          state, data.to_global_batch(dataset[step], batch_sharding))
      result.append(float(metrics['loss']))
      params[step + 1] = jax.device_get(state.params)
  return result, params


@pytest.mark.slow(45)
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path, corpus):
  """SIGTERM to process 1 only: JAX's preemption sync manager tells
  process 0 too, both save one checkpoint at the same step (holding the
  parameters of an uninterrupted run) and exit 143; with that checkpoint
  damaged, the next start falls back to the one before (moved aside by
  process 0 alone) and goes on with the losses of an uninterrupted run."""
  long_steps = 500  # Far more than run before the signal takes effect.
  workdir = tmp_path / 'run'
  driver = tmp_path / 'driver.py'
  driver.write_text(_DRIVER, encoding='utf-8')
  config_settings = {**settings(corpus), 'train.steps': long_steps,
                     'checkpoint.every_steps': 2}
  overrides = [f'--config.{k}={v}' for k, v in config_settings.items()]
  commands = process_commands(
      [f'--program={sys.executable} {driver}',
       f'--config={REPO}/configs/tiny.py', f'--workdir={workdir}',
       '--config.mesh.data=2', *overrides])
  env = {**os.environ, 'PYTHONPATH': str(REPO),
         'ZTT_CACHE_DIR': str(tmp_path / 'cache'),
         'JAX_COMPILATION_CACHE_DIR': os.environ['ZTT_TEST_XLA_CACHE']}
  env['XLA_FLAGS'] = os.environ['ZTT_TEST_XLA_FLAGS']  # No device count.

  def start(extra_env=None):
    return start_processes(commands, {**env, **(extra_env or {})},
                           tmp_path / 'logs')

  procs = start()
  metrics_1 = workdir / 'process_1' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (
      metrics_1.exists() and len(metrics_1.read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs), wait_processes(procs)
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  codes, outs = wait_processes(procs)
  assert codes == [143, 143], outs

  # Both stopped at one step and saved it (beside the periodic saves).
  stops = [int(out.split('stopped by a preemption notice at step ')[1]
               .split(':')[0]) for out in outs]
  stop = stops[0]
  assert stops == [stop, stop] and 3 <= stop < long_steps, outs
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints'))
  assert saved[-1] == stop and len(saved) >= 2, saved
  before = saved[-2]  # A periodic save, written by both processes too.
  loss_0 = losses(workdir / 'metrics.jsonl')
  assert len(loss_0) == stop
  assert losses(metrics_1) == loss_0

  config = tiny.get_config('ztt')
  for dotted, value in config_settings.items():
    section, name = dotted.split('.')
    config[section][name] = value
  straight, straight_params = single_process_run(config, tmp_path, stop + 2)
  np.testing.assert_allclose(loss_0, straight[:stop], rtol=1e-4)
  _, params, _ = ztt_jax.load(workdir, step=stop)
  chex.assert_trees_all_close(params, straight_params[stop], rtol=1e-3,
                              atol=1e-5)

  # The preemption checkpoint damaged (a params file cut to a third):
  # process 0 alone moves it aside, both fall back to the one before and
  # go on to two steps past the stop.
  files = [p for p in (workdir / 'checkpoints' / str(stop) /
                       'params').rglob('*') if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
  codes, outs = wait_processes(start({'ZTT_TEST_STOP_AT': str(stop + 2)}))
  assert codes == [0, 0], outs
  for out in outs:
    assert f'checkpoint {stop} is unreadable' in out, out
    assert f'(step {before})' in out, out
  [kept] = os.listdir(workdir / 'checkpoints_corrupt')
  assert kept.startswith(f'{stop}-')
  after = losses(workdir / 'metrics.jsonl')
  # Steps before+1 .. stop were logged twice: before and after the fall-back.
  assert len(after) == stop + (stop + 2 - before) and after[:stop] == loss_0
  assert losses(workdir / 'process_1' / 'metrics.jsonl') == after
  np.testing.assert_allclose(after[stop:], straight[before:stop + 2],
                             rtol=1e-4)


# Each process: for each mesh, the rows it reads of a batch of 8 (from the
# batch sharding), whether every one of its devices holds exactly the rows
# of the one-process batch that its shard covers, and whether the gathered
# global batch is the one-process batch; written to OUT/process_I.json.
_ROWS_DRIVER = r'''
import json, os, sys
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from ztt_jax import configlib, data, sharding
from ztt_jax.errors import ConfigError

flags = dict(a[2:].split('=', 1) for a in sys.argv[1:])
sharding.maybe_initialize_distributed(flags['coordinator_address'],
                                      int(flags['num_processes']),
                                      int(flags['process_id']))
tokens_N = np.arange(5000, dtype=np.uint16)
B, T, SEED = 8, 16, 3
rules = sharding.rules(configlib.base_config())
one_process = data.make_train_dataset(tokens_N, T, B, SEED)
report = {}
for name, mesh in json.loads(os.environ['ZTT_TEST_MESHES']).items():
  config = ml_collections.ConfigDict(
      {'data': -1, 'fsdp': 1, 'tensor': 1, 'dcn_data': 1, **mesh})
  try:
    mesh = sharding.make_mesh(config)
  except ConfigError as e:
    report[name] = {'error': str(e)}
    continue
  batch_sharding = sharding.batch_sharding(mesh, rules)
  rows_R = sharding.process_rows(batch_sharding, (B, T))
  dataset = data.make_train_dataset(tokens_N, T, B, SEED, rows_R)
  shards_ok = global_ok = True
  for step in (0, 7):
    batch = data.to_global_batch(dataset[step], batch_sharding, B)
    want = one_process[step]
    for key, array in batch.items():
      for shard in array.addressable_shards:
        shards_ok &= np.array_equal(np.asarray(shard.data),
                                    want[key][shard.index])
      gathered = multihost_utils.process_allgather(array, tiled=True)
      global_ok &= np.array_equal(np.asarray(gathered), want[key])
  report[name] = {'mesh': dict(mesh.shape), 'rows': rows_R.tolist(),
                  'shards_ok': bool(shards_ok), 'global_ok': bool(global_ok)}
with open(os.path.join(os.environ['ZTT_TEST_OUT'],
                       f'process_{jax.process_index()}.json'), 'w') as f:
  json.dump(report, f)
'''


def run_rows_driver(tmp_path, num_processes, devices_per_process, meshes):
  driver = tmp_path / 'rows_driver.py'
  driver.write_text(_ROWS_DRIVER, encoding='utf-8')
  commands = process_commands(
      [f'--num_processes={num_processes}',
       f'--program={sys.executable} {driver}'], devices_per_process)
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'ZTT_TEST_OUT': str(tmp_path),
         'ZTT_TEST_MESHES': json.dumps(meshes)}
  env['XLA_FLAGS'] = os.environ['ZTT_TEST_XLA_FLAGS']  # No device count.
  codes, outs = wait_processes(
      start_processes(commands, env, tmp_path / 'logs'))
  assert codes == [0] * num_processes, outs
  reports = [json.loads((tmp_path / f'process_{i}.json').read_text())
             for i in range(num_processes)]
  return {name: [r[name] for r in reports] for name in meshes}


@pytest.mark.slow(15)
def test_rows_follow_the_batch_sharding_across_processes(tmp_path):
  """Four processes of one CPU device each. Where the tensor axis spans
  processes, the processes holding one data shard read the same rows;
  every device holds exactly its rows of the one-process batch."""
  got = run_rows_driver(tmp_path, 4, 1, {
      # data shard 0 on processes 0 and 1, shard 1 on 2 and 3.
      'tensor_across': {'data': 2, 'tensor': 2},
      # One data shard, replicated on every process.
      'tensor_only': {'data': 1, 'tensor': 4},
      'data_only': {'data': -1},
      # Processes are the granules on CPU: one per data row block.
      'dcn': {'data': 1, 'dcn_data': 4},
      'dcn_mismatch': {'data': -1, 'dcn_data': 2},
  })
  for name in ('tensor_across', 'tensor_only', 'data_only', 'dcn'):
    for report in got[name]:
      assert report['shards_ok'] and report['global_ok'], (name, report)
  assert [r['rows'] for r in got['tensor_across']] == [
      [0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
  assert [r['rows'] for r in got['tensor_only']] == [list(range(8))] * 4
  assert [r['rows'] for r in got['data_only']] == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
  assert got['dcn'][0]['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert [r['rows'] for r in got['dcn']] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  for report in got['dcn_mismatch']:
    assert report['error'].startswith(
        'mesh.dcn_data=2 but the 4 devices are in 4 processes; set '
        'mesh.dcn_data=4'), report


@pytest.mark.slow(15)
def test_dcn_across_two_processes_with_two_devices_each(tmp_path):
  """mesh.dcn_data=2 over two processes of two CPU devices: each process is
  one granule, laid out (data=1, fsdp=1, tensor=2) inside, and the two are
  stacked along data."""
  got = run_rows_driver(tmp_path, 2, 2, {
      'dcn': {'data': 1, 'tensor': 2, 'dcn_data': 2},
      'tensor_across': {'data': 1, 'tensor': 4},
  })
  for name in got:
    for report in got[name]:
      assert report['shards_ok'] and report['global_ok'], (name, report)
  assert got['dcn'][0]['mesh'] == {'data': 2, 'fsdp': 1, 'tensor': 2}
  assert [r['rows'] for r in got['dcn']] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [r['rows'] for r in got['tensor_across']] == [list(range(8))] * 2
