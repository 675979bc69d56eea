"""Failure behaviour: kill -9, SIGTERM, corrupt checkpoints, NaN, bad flags."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
from jax._src import array as array_lib
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ztt_jax
from configs import tiny
from ztt_jax import data
from ztt_jax import train
from ztt_jax import watch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
import crash_loop  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  monkeypatch.setenv('ZTT_CACHE_DIR', str(tmp_path / 'cache'))
  return crash_loop.write_corpus(tmp_path / 'corpus.txt')


def config_for(corpus, **train_overrides):
  config = tiny.get_config('ztt')
  config.data.path = corpus
  config.sample.max_new_tokens = 0
  config.checkpoint.update(every_steps=3, async_save=False)
  config.train.update({'log_every_steps': 1, 'eval_every_steps': 0,
                       **train_overrides})
  return config


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows}


def subprocess_env(tmp_path):
  return {**os.environ, 'ZTT_CACHE_DIR': str(tmp_path / 'cache'),
          'JAX_PLATFORMS': 'cpu',
          'JAX_COMPILATION_CACHE_DIR': os.environ['ZTT_TEST_XLA_CACHE'],
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}


@pytest.mark.slow(45)
def test_random_kill_9_then_resume_is_exact(tmp_path, capsys):
  """One kill after a logged step, one while an async save is written; the
  restarts reuse this session's compiled programs (conftest's cache)."""
  code = crash_loop.main(['--trials=1', '--kills=2', '--steps=12',
                          f'--root={tmp_path}', '--xla_cache='
                          f'{jax.config.jax_compilation_cache_dir}'])
  out = capsys.readouterr().out
  report = json.loads(out.splitlines()[-1])
  assert report['kills'] == report['kills_landed'] == 2, out
  assert report['restarts_resumed'] == 2, out
  assert report['saves_cut'] >= 1, out
  assert report['trials'] == report['exact'] == 1, out
  assert code == 0


def _fake_run(workdir, *dirs, step=None):
  """A command that makes checkpoint dirs, logs `step`, then sleeps."""
  return [sys.executable, '-c', '; '.join(
      ['import json, os, time']
      + [f'os.makedirs({str(workdir / "checkpoints" / d)!r})' for d in dirs]
      + ([] if step is None else [
          f'open({str(workdir / "metrics.jsonl")!r}, "w").write(json.dumps('
          f'{{"step": {step}, "loss": 1.0}}) + "\\n")'])
      + ['time.sleep(120)'])]


def test_crash_loop_tells_landed_kills_and_cut_saves_from_misses(tmp_path):
  env, run = dict(os.environ), tmp_path / 'run'
  kill = crash_loop.Kill('step', 4)
  crash_loop.kill_when_seen(_fake_run(run, '3', step=4), env,
                            str(tmp_path / 'a.log'), str(run), kill)
  assert kill.landed and kill.seen == 'step 4 logged'
  assert kill.cut_save is None
  kill = crash_loop.Kill('save', 5)
  crash_loop.kill_when_seen(
      _fake_run(run, '6', f'9{crash_loop.TMP_SUFFIX}'), env,
      str(tmp_path / 'b.log'), str(run), kill)
  assert kill.landed and kill.seen == 'save 9 in progress'
  assert kill.cut_save == 9
  # A run that ends before the point it waits for: the kill misses.
  kill = crash_loop.Kill('step', 50)
  crash_loop.kill_when_seen([sys.executable, '-c', 'pass'], env,
                            str(tmp_path / 'c.log'), str(run), kill)
  assert not kill.landed and not kill.seen


@pytest.mark.slow(45)
def test_sigterm_saves_then_the_next_start_continues(tmp_path, corpus):
  workdir = tmp_path / 'run'
  cmd = crash_loop.train_command(str(workdir), corpus, 100_000)
  env = subprocess_env(tmp_path)

  def start_and_term(wait_for):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not wait_for():
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err

  metrics = workdir / 'metrics.jsonl'
  code, out, err = start_and_term(
      lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5)
  assert code == 143, err
  step = int(out.split('stopped by SIGTERM at step ')[1].split(':')[0])
  assert str(step) in os.listdir(workdir / 'checkpoints')
  rows_before = len(metrics.read_text().splitlines())
  code, out, err = start_and_term(
      lambda: len(metrics.read_text().splitlines()) > rows_before + 2)
  assert code == 143, err
  assert f'resumed from {workdir}/checkpoints/{step} (step {step})' in out
  first_new = json.loads(metrics.read_text().splitlines()[rows_before])
  assert first_new['step'] == step + 1


@pytest.mark.slow(20)
def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, corpus):
  config = config_for(corpus, steps=8)
  train.train(config, str(tmp_path / 'straight'))
  workdir = tmp_path / 'run'
  train.train(config, str(workdir), stop_at=6)
  files = [p for p in (workdir / 'checkpoints' / '6' / 'params').rglob('*')
           if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
  stream = io.StringIO()
  train.train(config, str(workdir), stream=stream)
  log = stream.getvalue()
  assert 'warning: checkpoint 6 is unreadable' in log
  assert 'resumed from' in log and '(step 3)' in log
  kept = os.listdir(workdir / 'checkpoints_corrupt')
  assert len(kept) == 1 and kept[0].startswith('6-')
  straight, resumed = losses(tmp_path / 'straight'), losses(workdir)
  assert [resumed[s] for s in range(4, 9)] == [straight[s]
                                               for s in range(4, 9)]


def test_nan_stops_naming_the_step_and_keeps_checkpoints(tmp_path, corpus):
  config = config_for(corpus, steps=8, debug_nan_at_step=5)
  workdir = tmp_path / 'run'
  with pytest.raises(watch.TrainingDiverged, match='step 5') as e:
    train.train(config, str(workdir))
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  debug = workdir / 'nonfinite' / 'step_5'
  assert (debug / 'state').is_dir()
  batch = np.load(debug / 'batch.npz')
  assert batch['inputs'].shape == (config.train.batch_size,
                                   config.data.seq_len)
  # The good checkpoint still loads.
  _, params, _ = ztt_jax.load(workdir)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_nan_skip_policy_drops_the_update_and_goes_on(tmp_path, corpus):
  config = config_for(corpus, steps=8, debug_nan_at_step=7,
                      nan_policy='skip')
  config.checkpoint.every_steps = 1  # Keeps steps 6, 7 (skipped) and 8.
  stream = io.StringIO()
  train.train(config, str(tmp_path / 'run'), stream=stream)
  assert 'non-finite loss or gradients at step 7: update skipped' in (
      stream.getvalue())
  loss = losses(tmp_path / 'run')
  assert np.isnan(loss[7]) and np.isfinite(loss[8])
  params = {s: ztt_jax.load(tmp_path / 'run', step=s)[1] for s in (6, 7, 8)}
  # The skipped step left every param as step 6 left it, bit for bit ...
  chex.assert_trees_all_equal(params[6], params[7])
  # ... and training went on from there.
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(params[7]), jax.tree.leaves(params[8])))
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params[8]))


def count_device_reads(monkeypatch):
  """Patches the train step and jax.Array's host read (every device_get,
  bool(), float(), np.asarray goes through ArrayImpl._value); returns the
  list of steps dispatched at each read."""
  dispatched, reads = [0], []
  real_jit = train.Setup.jit_train_step

  def counting_jit(self, *args, **kwargs):
    step_fn, *rest = real_jit(self, *args, **kwargs)

    def counted(*step_args):
      out = step_fn(*step_args)
      dispatched[0] += 1
      return out
    return (counted, *rest)

  real_value = array_lib.ArrayImpl._value

  def value(self):
    reads.append(dispatched[0])
    return real_value.fget(self)

  monkeypatch.setattr(train.Setup, 'jit_train_step', counting_jit)
  monkeypatch.setattr(array_lib.ArrayImpl, '_value', property(value))
  return reads


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_nan_guard_reads_the_device_only_at_log_and_checkpoint_steps(
    tmp_path, corpus, monkeypatch, policy):
  config = config_for(corpus, steps=8, log_every_steps=4, nan_policy=policy)
  config.checkpoint.every_steps = 6
  reads = count_device_reads(monkeypatch)
  train.train(config, str(tmp_path / 'run'))
  # Steps 1-3, 5 and 7 are dispatched without waiting on the device; 4
  # (log), 6 (checkpoint) and 8 (end) read the flags and metrics.
  in_loop = {r for r in reads if 0 < r < 8}
  assert in_loop == {4, 6}, sorted(reads)


def test_nan_stop_found_late_saves_the_state_before_the_bad_step(
    tmp_path, corpus):
  # The bad step 5 is read at step 6 (a checkpoint step; logs every 4):
  # step 6 ran on the device meanwhile but changed nothing.
  config = config_for(corpus, steps=8, debug_nan_at_step=5,
                      log_every_steps=4)
  workdir = tmp_path / 'run'
  with pytest.raises(watch.TrainingDiverged, match='at step 5;'):
    train.train(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  debug = workdir / 'nonfinite' / 'step_5'
  with ocp.StandardCheckpointer() as reader:
    saved = reader.restore(debug / 'state')
  assert int(saved['step']) == 4
  # The state an uninterrupted run has after step 4 ...
  clean = config_for(corpus, steps=8)
  train.train(clean, str(tmp_path / 'clean'), stop_at=4)
  _, params_4, _ = ztt_jax.load(tmp_path / 'clean', step=4)
  # (To float32 rounding: the two runs compile different programs. One
  # step moves the parameters by orders of magnitude more, so the state is
  # neither step 3's nor step 5's.)
  _, params_3, _ = ztt_jax.load(tmp_path / 'clean', step=3)
  chex.assert_trees_all_close(saved['params'], params_4, rtol=1e-6, atol=1e-7)
  step_change = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(params_4), jax.tree.leaves(params_3)))
  assert step_change > 1e-4, step_change
  # ... and the batch step 5 took (the iterator's fifth).
  dataset_iter = train_iterator(clean, tmp_path / 'clean')
  for _ in range(5):
    batch_5 = next(dataset_iter)
  saved_batch = np.load(debug / 'batch.npz')
  for name in ('inputs', 'targets'):
    np.testing.assert_array_equal(saved_batch[name], batch_5[name])


def train_iterator(config, workdir):
  corpus = data.load_corpus(config.data, workdir, write=False)
  return data.make_train_iterator(data.make_train_dataset(
      corpus.train_N, config.data.seq_len, config.train.batch_size,
      config.seed))


def test_mistyped_override_is_one_line_exit_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.train',
       f'--config={REPO}/configs/tiny.py',
       f'--workdir={tmp_path}/run', '--config.train.stepz=3'],
      capture_output=True, text=True, timeout=120, env=subprocess_env(tmp_path))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'stepz' in lines[0] and 'steps' in lines[0], (
      result.stderr)
  assert not (tmp_path / 'run').exists()
