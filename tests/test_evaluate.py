"""The early-exit sweep: the real while_loop path against the replay, and
the ztt-eval / ztt-generate tools on a trained workdir."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ztt_jax
from configs import tiny
from ztt_jax import convert
from ztt_jax import data
from ztt_jax import evaluate
from ztt_jax import generate
from ztt_jax import model
from ztt_jax import train
from ztt_jax.errors import ConfigError


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny ZTT trained for 30 steps on real text (stdlib modules)."""
  root = tmp_path_factory.mktemp('eval')
  os.environ['ZTT_CACHE_DIR'] = str(root / 'cache')
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  corpus = root / 'corpus.txt'
  corpus.write_text(''.join((stdlib / n).read_text(encoding='utf-8') for n in
                            ('textwrap.py', 'shlex.py', 'fnmatch.py')))
  config = tiny.get_config('ztt')
  config.data.path = str(corpus)
  config.train.update(steps=30, log_every_steps=10, eval_every_steps=0)
  config.sample.max_new_tokens = 0
  train.train(config, str(root / 'run'))
  return root / 'run'


def test_sweep_matches_the_replay_from_one_pass(workdir):
  module, params, config = ztt_jax.load(workdir)
  corpus = data.prepare(config.data, str(workdir))
  batches = [jax.tree.map(jnp.asarray, b) for b in data.eval_batches(
      corpus.val_N, config.data.seq_len, 8, 2)]
  outs = [evaluate.eval_outputs(module, params, b) for b in batches]
  ce_CxB = np.concatenate([o['ce_CxB'] for o in outs], 1)
  stat_CxB = np.concatenate([o['zero_attention_CxB'] for o in outs], 1)
  taus = np.quantile(stat_CxB[:-1], [0.2, 0.5, 0.8])
  replay = evaluate.early_exit_table(ce_CxB, stat_CxB, taus)
  real = evaluate.sweep(module.cfg, params, batches, 'zero_attention', taus)
  assert len(real) == len(replay) == 3 + 3
  for a, b in zip(real, replay):
    assert a['mean_cycles'] == pytest.approx(b['mean_cycles'])
    assert a['val_loss'] == pytest.approx(b['val_loss'], abs=1e-4)
  assert [r['mean_cycles'] for r in real[:3]] == [1, 2, 3]
  assert real[3]['mean_cycles'] <= real[4]['mean_cycles'] <= real[5][
      'mean_cycles']


def test_ztt_eval_writes_json_table_and_plot(workdir, capsys):
  rows = evaluate.run_eval(str(workdir), batches=2)
  out_dir = workdir / 'eval'
  saved = json.loads((out_dir / 'early_exit.json').read_text())
  assert saved == rows
  for row in rows:
    assert {'criterion', 'val_loss', 'mean_cycles', 'compute_saved'} <= set(
        row)
    assert ('threshold' in row) != ('fixed_cycles' in row)
    assert row['compute_saved'] == pytest.approx(1 - row['mean_cycles'] / 3)
  assert (out_dir / 'early_exit.png').read_bytes()[:4] == b'\x89PNG'
  assert '| fixed 3 cycles |' in (out_dir / 'early_exit.md').read_text()
  assert 'wrote' in capsys.readouterr().out


def test_ztt_generate_prints_text_and_cycles(workdir, capsys):
  out = generate.run_generate(str(workdir), 'def f(x):', max_new_tokens=12,
                              exit_threshold=0.0, min_cycles=2)
  assert np.all(out.cycles_BxN == 2)
  printed = capsys.readouterr().out
  assert printed.startswith('def f(x):')
  assert 'mean cycles per generated token 2.00 of 3' in printed


def test_prompt_outside_the_char_vocabulary(workdir):
  with pytest.raises(ConfigError, match='vocabulary'):
    generate.run_generate(str(workdir), 'caf\u00e9 \u2603', max_new_tokens=2)


def test_no_checkpoint_is_one_line(tmp_path):
  with pytest.raises(ConfigError, match='no checkpoints') as e:
    generate.run_generate(str(tmp_path), 'x')
  assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match='no checkpoints'):
    evaluate.run_eval(str(tmp_path))


def _old_relative_copy(workdir, tmp_path) -> tuple[pathlib.Path, str]:
  """A copy of `workdir` as if an older version had trained it from a
  relative data.path: saved configs without data.sp_model_type and
  init_from, and data.path='corpus.txt'. Returns it and the real path."""
  old = tmp_path / 'old_run'
  shutil.copytree(workdir, old, ignore=shutil.ignore_patterns('eval'))
  for metadata in old.glob('checkpoints/*/config/metadata'):
    saved = json.loads(metadata.read_text())
    corpus = saved['data']['path']
    saved['data']['path'] = 'corpus.txt'
    del saved['data']['sp_model_type'], saved['init_from']
    metadata.write_text(json.dumps(saved))
  return old, corpus


def test_ztt_eval_overrides_the_saved_config(workdir, tmp_path, monkeypatch):
  old, corpus = _old_relative_copy(workdir, tmp_path)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match="data.path='corpus.txt'"):
    evaluate.run_eval(str(old), batches=1)
  rows = evaluate.run_eval(str(old), batches=1,
                           overrides={'data.path': corpus})
  assert [r['mean_cycles'] for r in rows[:3]] == [1, 2, 3]
  # Only the settings that do not shape the params may change.
  with pytest.raises(ConfigError, match='model comes from the checkpoint'):
    generate.run_generate(str(old), 'x', overrides={'model.n_cycles': '2'})
  # The same from the command line, from a directory where the saved
  # relative path does not resolve.
  result = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.evaluate', f'--workdir={old}',
       '--config.data.path=elsewhere.txt'], capture_output=True, text=True,
      cwd=tmp_path, timeout=120,
      env={**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).parents[1])})
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith(
      "ztt-eval: error: data.path='elsewhere.txt': no such file")
  assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize('variant, exit_loss, message', [
    ('head_tail_cycle', 'auto', 'head_tail_cycle model has no exit heads'),
    ('ztt', 'none', 'ztt model has no exit heads'),
    ('vanilla', 'auto', 'vanilla model runs one cycle'),
])
def test_ztt_eval_needs_cycles_and_exit_heads(tmp_path, variant, exit_loss,
                                              message):
  config = tiny.get_config(variant)
  config.model.update(vocab_size=64, exit_loss=exit_loss)
  abstract = model.abstract_params(model.build(config.model))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  convert._save(  # pylint: disable=protected-access
      str(tmp_path / 'run'), config, params)
  with pytest.raises(ConfigError, match=message) as e:
    evaluate.run_eval(str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
