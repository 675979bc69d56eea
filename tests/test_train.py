"""The training loop: loss falls, exact resume, accumulation, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ztt_jax
from configs import tiny
from ztt_jax import metrics
from ztt_jax import tokenizers
from ztt_jax import train
from ztt_jax import watch
from ztt_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv('ZTT_CACHE_DIR', str(tmp_path / 'cache'))


def small_config(path, **train_overrides):
  config = tiny.get_config('ztt')
  config.data.path = path
  config.data.seq_len = 16
  config.sample.max_new_tokens = 0
  config.train.update(log_every_steps=1, **train_overrides)
  config.checkpoint.async_save = False
  return config


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in
          open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  return {r['step']: r['loss'] for r in rows}


@pytest.mark.slow(10)
def test_tiny_config_trains_on_real_text(tmp_path):
  # Its corpus, the running Python's standard library, is real text on
  # every machine (no shared data needed).
  config = tiny.get_config('ztt')
  config.train.log_every_steps = 1
  config.sample.max_new_tokens = 8
  summary = train.train(config, str(tmp_path / 'run'))
  loss = losses(tmp_path / 'run')
  assert sorted(loss) == list(range(1, 21))
  assert np.mean([loss[s] for s in range(16, 21)]) < loss[1] - 0.3
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  for key in ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'mfu'):
    assert key in rows[-1], key
  assert len(rows[-1]['zero_attention']) == 3 and len(rows[-1]['gate']) == 3
  assert 'val_loss' in rows[-1] and 'val_loss' in rows[9]
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['10', '20']
  assert os.listdir(tmp_path / 'run' / 'tb')
  assert summary['val_loss'] < 4.0 and len(summary['sample']) > 0
  assert [r['fixed_cycles'] for r in summary['early_exit'][:3]] == [1, 2, 3]


@pytest.mark.slow(18)
def test_resume_gives_the_same_losses(tmp_path, corpus):
  config = small_config(corpus)
  train.train(config, str(tmp_path / 'straight'))
  train.train(config, str(tmp_path / 'resumed'), stop_at=10)
  assert max(losses(tmp_path / 'resumed')) == 10
  train.train(config, str(tmp_path / 'resumed'))
  # Three runs of one setup in this process (nan_policy=stop runs the
  # stopping step): its step was traced and compiled once.
  step_fn = train.Setup(config, str(tmp_path / 'resumed')).jit_train_step(
      stop_on_nonfinite=True)[0]
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access
  straight, resumed = losses(tmp_path / 'straight'), losses(
      tmp_path / 'resumed')
  assert sorted(resumed) == list(range(1, 21))
  assert [straight[s] for s in range(1, 21)] == [resumed[s]
                                                 for s in range(1, 21)]
  # The last checkpoint holds the same params either way.
  _, p1, _ = ztt_jax.load(tmp_path / 'straight')
  _, p2, _ = ztt_jax.load(tmp_path / 'resumed')
  chex.assert_trees_all_equal(p1, p2)


@pytest.mark.slow(16)
def test_load_gives_a_working_model(tmp_path, corpus):
  config = small_config(corpus, steps=3)
  train.train(config, str(tmp_path / 'run'))
  module, params, saved = ztt_jax.load(tmp_path / 'run')
  vocab = tokenizers.load_tokenizer(tmp_path / 'run').vocab_size
  assert saved.model.vocab_size == vocab and saved.train.steps == 3
  out = jax.jit(module.apply)({'params': params}, jnp.zeros((2, 5), jnp.int32))
  chex.assert_shape(out.cycle_logits, (3, 2, 5, vocab))
  with pytest.raises(ConfigError, match='step 7'):
    ztt_jax.load(tmp_path / 'run', step=7)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, corpus):
  full = small_config(corpus, steps=3)
  accum = small_config(corpus, steps=3, grad_accum_steps=2)
  train.train(full, str(tmp_path / 'full'))
  train.train(accum, str(tmp_path / 'accum'))
  a, b = losses(tmp_path / 'full'), losses(tmp_path / 'accum')
  np.testing.assert_allclose([a[s] for s in (1, 2, 3)],
                             [b[s] for s in (1, 2, 3)], rtol=2e-5)


def test_an_equal_setup_reuses_the_jitted_programs(tmp_path, corpus):
  """A second setup of the same model, optimizer and batch layout (logging
  settings aside) gets the programs the first one traced and compiled; any
  change to what they are built from gets new ones."""
  config = small_config(corpus, steps=3)
  first = train.Setup(config, str(tmp_path / 'a'))
  programs = (first.jit_train_step()[0], first.jit_init(), first.jit_eval(),
              first.state_shardings())
  config.train.log_every_steps = 7
  again = train.Setup(config, str(tmp_path / 'b'))
  reused = (again.jit_train_step()[0], again.jit_init(), again.jit_eval(),
            again.state_shardings())
  assert all(a is b for a, b in zip(reused, programs))
  assert again.jit_train_step(reuse=False)[0] is not programs[0]
  assert again.jit_train_step(stop_on_nonfinite=True)[0] is not programs[0]
  for section, name, value in [('train', 'steps', 4), ('model', 'n_cycles', 2),
                               ('seed', None, 1), ('data', 'seq_len', 8)]:
    other = small_config(corpus, steps=3)
    if name is None:
      other[section] = value
    else:
      other[section][name] = value
    setup = train.Setup(other, str(tmp_path / 'c'))
    assert setup.jit_train_step()[0] is not programs[0], (section, name)


def tree_listing(path) -> dict[str, int]:
  return {str(p.relative_to(path)): p.stat().st_size
          for p in pathlib.Path(path).rglob('*') if p.is_file()}


def test_resume_with_another_model_shape_is_refused(tmp_path, corpus):
  config = small_config(corpus, steps=3)
  config.model.attention = 'xla'
  train.train(config, str(tmp_path / 'run'))
  before = tree_listing(tmp_path / 'run')
  for field, value in (('d_model', 64), ('n_cycles', 2), ('gate', 'none'),
                       ('exit_loss', 'uniform'), ('scan_layers', False)):
    changed = small_config(corpus, steps=3)
    changed.model[field] = value
    with pytest.raises(ConfigError, match=f'{field}: '):
      train.train(changed, str(tmp_path / 'run'))
    # Refused before anything is written: no new TensorBoard event file,
    # metrics row or checkpoint.
    assert tree_listing(tmp_path / 'run') == before, field
  # An execution-only field (its effect is 'none') may change on a resume,
  # as it may on `ztt_jax.load`: the run continues from its checkpoint.
  config.model.attention = 'dot_product'
  config.train.steps = 5
  train.train(config, str(tmp_path / 'run'))
  assert sorted(losses(tmp_path / 'run')) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize('corpus_kind, change, message', [
    ('missing', {}, 'no such file'),
    ('empty', {}, 'empty'),
    ('short', {}, 'seq_len'),
    ('valid', {'train.steps': 0}, 'train.steps'),
    ('valid', {'train.steps': -5}, 'train.steps'),
    ('valid', {'model.variant': 'deep'}, 'model.variant'),
    ('valid', {'model.n_cycles': 0}, 'model.n_cycles'),
    ('valid', {'model.n_heads': 5}, 'model.n_heads'),
    ('valid', {'train.grad_accum_steps': 3}, 'grad_accum_steps'),
    ('valid', {'mesh.data': 3}, 'config.mesh'),
    ('valid', {'mesh.dcn_data': 2}, 'mesh.dcn_data=2'),
    ('valid', {'data.tokenizer': 'words'}, 'tokenizer'),
    ('binary', {'data.tokenizer': 'char'}, 'UTF-8'),
    ('valid', {'data.val_path': '/nonexistent/val.txt'}, 'data.val_path'),
    ('valid', {'data.tokenizer': 'hf'}, 'data.tokenizer_path'),
    ('valid', {'data.seq_len': 100_000}, 'seq_len'),
    ('valid', {'data.seq_len': 0}, 'data.seq_len'),
    ('valid', {'data.val_fraction': 0.7}, 'val_fraction'),
    ('valid', {'train.log_every_steps': 0}, 'train.log_every_steps'),
    ('valid', {'train.eval_every_steps': -1}, 'train.eval_every_steps'),
    ('valid', {'train.lr': 0.0}, 'train.lr'),
    ('valid', {'train.nan_policy': 'ignore'}, 'train.nan_policy'),
    ('valid', {'checkpoint.keep': 0}, 'checkpoint.keep'),
    ('valid', {'train.profile_steps': '5,50'}, 'train.profile_steps'),
    ('valid', {'train.profile_steps': 'x'}, 'train.profile_steps'),
    ('valid', {'model.dropout': 1.5}, 'model.dropout'),
    ('valid', {'model.zero_pool': 'everywhere'}, 'model.zero_pool'),
    ('valid', {'model.variant': 'head_tail_cycle', 'model.gate': 'token'},
     'model.gate'),
    ('unwritable', {}, 'writable'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, corpus_kind,
                                                  change, message):
  (tmp_path / 'empty.txt').write_bytes(b'')
  (tmp_path / 'short.txt').write_text('too short')
  (tmp_path / 'binary.bin').write_bytes(bytes(range(256)) * 64)
  (tmp_path / 'a_file').write_text('not a directory')
  config = tiny.get_config('ztt')
  config.data.tokenizer = 'byte'
  config.data.path = {'missing': str(tmp_path / 'nonexistent.txt'),
                      'empty': str(tmp_path / 'empty.txt'),
                      'short': str(tmp_path / 'short.txt'),
                      'binary': str(tmp_path / 'binary.bin'),
                      'valid': __file__,
                      'unwritable': __file__}[corpus_kind]
  for dotted, value in change.items():
    section, name = dotted.split('.')
    config[section][name] = value
  workdir = (tmp_path / 'a_file' / 'run' if corpus_kind == 'unwritable'
             else tmp_path / 'run')
  with pytest.raises(ConfigError, match=message) as e:
    train.train(config, str(workdir))
  assert '\n' not in str(e.value)
  assert not workdir.exists()
  assert not (tmp_path / 'cache').exists() or not any(
      (tmp_path / 'cache').rglob('*.bin'))


def test_cli_prints_one_line_and_exits_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.train',
       f'--config={REPO}/configs/tiny.py', f'--workdir={tmp_path}/run',
       '--config.data.path=/nonexistent/file.txt'],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, 'ZTT_CACHE_DIR': str(tmp_path / 'cache')})
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines() if 'error' in l.lower()]
  assert len(errors) == 1 and 'data.path' in errors[0], result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run').exists()


def test_wandb_project_without_wandb_is_one_line_and_exits_2(tmp_path):
  # `import wandb` fails here whether or not wandb is installed.
  blocker = tmp_path / 'blocker'
  blocker.mkdir()
  (blocker / 'wandb.py').write_text('raise ImportError("blocked")\n')
  result = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.train',
       f'--config={REPO}/configs/tiny.py', f'--workdir={tmp_path}/run',
       '--config.train.wandb_project=ztt'],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, 'ZTT_CACHE_DIR': str(tmp_path / 'cache'),
           'PYTHONPATH': f'{blocker}{os.pathsep}{REPO}'})
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines() if 'error' in l.lower()]
  assert len(errors) == 1, result.stderr
  assert errors[0].startswith('ztt-train: error: train.wandb_project=')
  assert 'pip install -e ".[wandb]"' in errors[0]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run').exists()


def xplane_files(workdir) -> list[pathlib.Path]:
  return sorted((pathlib.Path(workdir) / 'profile').rglob('*.xplane.pb'))


def assert_no_trace_running(tmp_path):
  """A trace left running would make this start_trace raise."""
  jax.profiler.start_trace(str(tmp_path / 'probe'))
  jax.profiler.stop_trace()


def test_profile_and_wandb_through_a_preempted_and_resumed_run(
    tmp_path, corpus, monkeypatch, fake_wandb):
  wandb = fake_wandb
  config = small_config(corpus, steps=3, profile_steps='2,3',
                        wandb_project='ztt-tests')
  workdir = tmp_path / 'run'
  # Preempted (SIGTERM) after step 2, inside the profiled range.
  monkeypatch.setattr(watch.StopSignals, 'check',  # pylint: disable=protected-access
                      lambda self, step: 'SIGTERM' if step == 2 else None)
  summary = train.train(config, str(workdir))
  assert summary['preempted'] == 'SIGTERM' and summary['step'] == 2
  assert len(xplane_files(workdir)) == 1  # Stopped and written.
  assert_no_trace_running(tmp_path)
  # Resumed: traces the rest of the range (step 3), same W&B run.
  monkeypatch.setattr(watch.StopSignals, 'check',  # pylint: disable=protected-access
                      lambda self, step: None)
  first_trace = xplane_files(workdir)[0]
  first_trace.unlink()
  summary = train.train(config, str(workdir))
  assert summary['step'] == 3 and 'preempted' not in summary
  # A new trace (the first one was deleted; within the same second the
  # profiler writes it under the same name).
  assert xplane_files(workdir)
  assert_no_trace_running(tmp_path)
  run_id = (workdir / 'wandb_run_id').read_text().strip()
  assert [i['id'] for i in wandb.inits] == [run_id, run_id]
  assert wandb.finished == 2
  # The W&B config is the run's, with the tokenizer's vocabulary filled in.
  vocab = tokenizers.load_tokenizer(workdir).vocab_size
  assert wandb.inits[0]['config']['model']['vocab_size'] == vocab
  assert wandb.inits[0]['config']['train']['profile_steps'] == '2,3'
  # Every logged row went to W&B too, as TensorBoard scalars.
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [step for step, _ in wandb.logs] == [r['step'] for r in rows] == [
      1, 2, 3]
  for (_, logged), row in zip(wandb.logs, rows):
    assert logged == pytest.approx(dict(metrics.scalars(row)))
    assert 'zero_attention/cycle_3' in logged


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_one_process_stops_on_its_own_signal(sig):
  before = signal.getsignal(sig)
  with watch.StopSignals(multi_process=False) as signals:  # pylint: disable=protected-access
    assert signals.check(1) is None
    os.kill(os.getpid(), sig)
    assert signals.check(2) == sig.name
  assert signal.getsignal(sig) is before
  assert watch.EXIT_CODES[sig.name] == 128 + sig


def test_several_processes_leave_sigterm_to_jax_and_forward_sigint():
  """With several processes SIGTERM belongs to JAX's preemption notifier
  (not replaced here), and SIGINT is sent on to it as SIGTERM."""
  got = []
  outer = signal.signal(signal.SIGTERM, lambda signum, _: got.append(signum))
  try:
    jax_notifier = signal.getsignal(signal.SIGTERM)
    with watch.StopSignals(multi_process=True) as signals:  # pylint: disable=protected-access
      assert signal.getsignal(signal.SIGTERM) is jax_notifier
      os.kill(os.getpid(), signal.SIGINT)
      assert got == [signal.SIGTERM]
      # One process, no coordination service: no sync point is reached.
      assert signals.check(1) is None
  finally:
    signal.signal(signal.SIGTERM, outer)
