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
from ztt_jax import params as params_lib
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


# Under jit (the module static): one compile each, not op by op.
eval_outputs = jax.jit(evaluate.eval_outputs, static_argnums=0)
token_statistics = jax.jit(evaluate.token_statistics, static_argnums=0)


def replay(ce_CxB, stat_CxB, tau, low: bool, min_cycles: int = 1):
  """Sequence-level early exit replayed from one full pass (cycle c's
  output never depends on later cycles): `(val loss, mean cycles)`."""
  passed_CxB = stat_CxB <= tau if low else stat_CxB >= tau
  passed_CxB[:min_cycles - 1] = False
  passed_CxB[-1] = True
  exit_B = passed_CxB.argmax(0)  # First cycle that passes.
  return (ce_CxB[exit_B, np.arange(ce_CxB.shape[1])].mean(),
          (exit_B + 1).mean())


@pytest.mark.parametrize('criterion, min_cycles', [('kl', 1),
                                                   ('zero_attention', 2)])
def test_sweep_matches_the_replay_from_one_pass(workdir, criterion,
                                                min_cycles):
  module, params, config = ztt_jax.load(workdir)
  corpus = data.load_corpus(config.data, str(workdir))
  batches = [jax.tree.map(jnp.asarray, b) for b in data.eval_batches(
      corpus.val_N, config.data.seq_len, 8, 2)]
  ce_CxB = np.concatenate([eval_outputs(module, params, b)['ce_CxB']
                           for b in batches], 1)
  stat_CxB = np.concatenate([
      token_statistics(module, params, b)[criterion].mean(-1)
      for b in batches], 1)
  # Thresholds halfway between observed values: no float32 ties.
  values = np.unique(stat_CxB[min_cycles - 1:-1])
  values = values[np.isfinite(values)]
  i = (np.array([0.2, 0.5, 0.8]) * (len(values) - 1)).astype(int)
  taus = (values[i] + values[i + 1]) / 2
  real = evaluate.sweep(module, params, batches, criterion, taus, min_cycles)
  assert len(real) == 3 + 3
  for k, row in enumerate(real[:3]):
    assert row['mean_cycles'] == k + 1
    assert row['val_loss'] == pytest.approx(ce_CxB[k].mean(), abs=1e-4)
  low = criterion == 'kl'
  for tau, row in zip(taus, real[3:]):
    loss, mean_cycles = replay(ce_CxB, stat_CxB, tau, low, min_cycles)
    assert row['mean_cycles'] == pytest.approx(mean_cycles)
    assert row['val_loss'] == pytest.approx(loss, abs=1e-4)
  cycles = [r['mean_cycles'] for r in real[3:]]
  assert cycles == sorted(cycles, reverse=low)
  assert len(set(cycles)) > 1, cycles  # The thresholds really differ.


def test_per_token_sweep_decodes_with_the_cache(workdir):
  """Per-token exits through cached decoding: a fixed depth k gives exit
  head k's loss (every earlier token ran those k cycles too), the random
  baseline deals out the rule's own cycles, and what the loop ran is at
  least the mean."""
  module, params, config = ztt_jax.load(workdir)
  corpus = data.load_corpus(config.data, str(workdir))
  batches = [jax.tree.map(jnp.asarray, b) for b in data.eval_batches(
      corpus.val_N, config.data.seq_len, 4, 2)]
  ce_C = np.mean([eval_outputs(module, params, b)['ce_CxB']
                  for b in batches], axis=(0, 2))
  criterion, rows = evaluate.early_exit_sweep(
      module, params, batches, 'zero_weight', n_thresholds=2, per='token',
      random_baseline=True)
  assert criterion == 'zero_weight'
  fixed = [r for r in rows if r['criterion'] == 'fixed']
  for k, row in enumerate(fixed):
    assert row['per'] == 'token' and row['mean_cycles'] == k + 1
    assert row['val_loss'] == pytest.approx(ce_C[k], abs=1e-4)
  ruled = [r for r in rows if r['criterion'] == 'zero_weight']
  random = [r for r in rows if r['criterion'] == 'random']
  assert len(ruled) == len(random) == 2
  for r, rand in zip(ruled, random):
    assert rand['matches'] == r['threshold']
    assert rand['mean_cycles'] == pytest.approx(r['mean_cycles'])
    assert r['mean_cycles'] <= r['cycles_run'] <= 3
    assert r['compute_saved'] == pytest.approx(1 - r['cycles_run'] / 3)
    by_position = r['mean_cycles_by_position']
    assert len(by_position) == config.data.seq_len
    assert np.mean(by_position) == pytest.approx(r['mean_cycles'], abs=1e-3)


def test_ztt_eval_writes_json_table_and_plot(workdir, capsys):
  rows = evaluate.run_eval(str(workdir), batches=2)
  out_dir = workdir / 'eval'
  saved = json.loads((out_dir / 'early_exit.json').read_text())
  assert saved == rows
  for row in rows:
    assert {'criterion', 'val_loss', 'mean_cycles', 'compute_saved'} <= set(
        row)
    assert ('threshold' in row) != ('fixed_cycles' in row)
    assert row['compute_saved'] == pytest.approx(1 - row['cycles_run'] / 3)
    assert row['mean_cycles'] <= row['cycles_run'] + 1e-9
  assert (out_dir / 'early_exit.png').read_bytes()[:4] == b'\x89PNG'
  assert '| fixed 3 cycles |' in (out_dir / 'early_exit.md').read_text()
  assert 'wrote' in capsys.readouterr().out


def test_ztt_eval_name_keeps_sweeps_side_by_side(workdir):
  kl = evaluate.run_eval(str(workdir), criterion='kl', batches=1,
                         n_thresholds=2, name='early_exit_kl')
  out_dir = workdir / 'eval'
  assert json.loads((out_dir / 'early_exit_kl.json').read_text()) == kl
  assert {r['criterion'] for r in kl} == {'fixed', 'kl'}
  assert (out_dir / 'early_exit_kl.md').exists()
  before = sorted(p.name for p in out_dir.iterdir())
  for bad in ('../x', 'a/b', '.hidden', ''):
    with pytest.raises(ConfigError, match='--name'):
      evaluate.run_eval(str(workdir), batches=1, name=bad)
  assert sorted(p.name for p in out_dir.iterdir()) == before


def test_ztt_generate_prints_text_and_cycles(workdir, capsys):
  out = generate.run_generate(str(workdir), 'def f(x):', max_new_tokens=12,
                              exit_threshold=0.0, min_cycles=2)
  assert np.all(out.cycles_BxN == 2)
  printed = capsys.readouterr().out
  assert printed.startswith('def f(x):')
  assert 'mean cycles per generated token 2.00 of 3' in printed


def test_ztt_eval_on_a_held_out_val_path(workdir, tmp_path):
  held_out = tmp_path / 'held_out.txt'
  held_out.write_text((pathlib.Path(sysconfig.get_paths()['stdlib']) /
                       'fnmatch.py').read_text(encoding='utf-8'))
  default = evaluate.run_eval(str(workdir), batches=1, n_thresholds=2,
                              name='tail')
  rows = evaluate.run_eval(str(workdir), batches=1, n_thresholds=2,
                           name='held_out',
                           overrides={'data.val_path': str(held_out)})
  assert [r['val_loss'] for r in rows] != [r['val_loss'] for r in default]
  with pytest.raises(ConfigError, match='data.val_path=.*no such file'):
    evaluate.run_eval(str(workdir), batches=1, overrides={
        'data.val_path': str(tmp_path / 'nope.txt')})


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


def test_kl_sweep_at_two_cycles_has_fixed_depths_only():
  """KL after cycle 1 has no previous head (+inf): with C=2 no token can
  exit early by KL, so the sweep is the two fixed depths, not a crash."""
  config = tiny.get_config('head_tail_cycle')
  config.model.update(vocab_size=64, n_cycles=2, exit_loss='linear')
  module = model.build(config.model)
  tokens_BxT = jnp.asarray(np.arange(2 * 9).reshape(2, 9) % 64)
  params = jax.jit(module.init)(jax.random.key(0), tokens_BxT)['params']
  batches = [{'inputs': tokens_BxT[:, :-1], 'targets': tokens_BxT[:, 1:]}]
  criterion, rows = evaluate.early_exit_sweep(module, params, batches, 'kl',
                                              n_thresholds=3)
  assert criterion == 'kl'
  assert [r.get('fixed_cycles') for r in rows] == [1, 2]


@pytest.mark.parametrize('variant, exit_loss, message', [
    ('head_tail_cycle', 'auto', 'head_tail_cycle model has no exit heads'),
    ('ztt', 'none', 'ztt model has no exit heads'),
    ('vanilla', 'auto', 'vanilla model runs one cycle'),
])
def test_ztt_eval_needs_cycles_and_exit_heads(tmp_path, variant, exit_loss,
                                              message):
  config = tiny.get_config(variant)
  config.model.update(vocab_size=64, exit_loss=exit_loss)
  abstract = params_lib.abstract_params(model.build(config.model))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  convert._save(  # pylint: disable=protected-access
      str(tmp_path / 'run'), config, params)
  with pytest.raises(ConfigError, match=message) as e:
    evaluate.run_eval(str(tmp_path / 'run'))
  assert '\n' not in str(e.value)


def test_zero_margin_sweep_refuses_the_dot_product_path_before_any_pass():
  config = tiny.get_config('ztt')
  config.model.update(vocab_size=64, attention='dot_product')
  module = model.build(config.model)
  with pytest.raises(ConfigError, match='zero_margin needs') as e:
    evaluate.early_exit_sweep(module, None, [], 'zero_margin')
  assert '\n' not in str(e.value)


def test_a_checkpoint_loads_with_either_attention(tmp_path):
  """model.attention shapes no param: a saved run loads with the other one
  (how a dot_product run gets its zero_margin)."""
  config = tiny.get_config('ztt')
  config.model.update(vocab_size=64, attention='dot_product')
  abstract = params_lib.abstract_params(model.build(config.model))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  convert._save(  # pylint: disable=protected-access
      str(tmp_path / 'run'), config, params)
  module, _, _ = ztt_jax.load(str(tmp_path / 'run'))
  assert module.cfg.attention == 'dot_product'
  module, _, _ = ztt_jax.load(str(tmp_path / 'run'),
                              overrides={'model.attention': 'xla'})
  assert module.cfg.attention == 'xla'
  generate.ExitRule('zero_margin').validate(module.cfg)
