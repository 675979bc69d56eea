"""experiments/: the studies' runs and flags, the runner's notion of a
finished run, the reports' arithmetic and the package's import structure
(no training here)."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import data_bench
from experiments import fair as fair_study
from experiments import fair_report
from experiments import grid as grid_study
from experiments import position
from experiments import records
from experiments import regime
from experiments import regime_report
from experiments import report
from experiments import roofline
from experiments import runner
from experiments import summary
from experiments import tables
from ztt_jax import model_config

fair = fair_study.STUDY
grid = grid_study.STUDY
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'experiments'


def test_schedule_trains_the_main_grid_at_every_seed_first():
  pairs = grid.schedule()
  n_main = len(grid.main) * len(grid.seeds)
  assert [r.group for r, _ in pairs[:n_main]] == ['main'] * n_main
  assert [s for _, s in pairs[:len(grid.main)]] == [grid.seeds[0]] * len(
      grid.main)
  assert {r.group for r, _ in pairs[n_main:]} == {'ablation'}
  names = [r.name for r in grid.runs]
  assert len(names) == len(set(names))


def test_every_run_is_a_valid_model_and_equal_compute_matches():
  def cfg(run):
    m = dict(variant='ztt', vocab_size=65, d_model=128, n_heads=4,
             n_head_layers=1, n_mid_layers=2, n_tail_layers=1, n_cycles=3,
             zero_pool='auto', gate='auto', exit_loss='auto')
    m.update({k.split('.', 1)[1]: v for k, v in run.overrides})
    return model_config.ModelConfig.from_config(m)
  cfgs = {r.name: cfg(r) for r in grid.runs}
  for c in (2, 4):
    eq = cfgs['vanilla_6' if c == 2 else 'vanilla_10']
    assert eq.executed_layers == cfgs[f'htc_c{c}'].executed_layers
    assert cfgs[f'ztt_c{c}'].cycles == c
  for run in grid.ablations:
    base = cfgs[grid.ablation_base]
    changed = {f for f in base.__dataclass_fields__
               if getattr(cfgs[run.name], f) != getattr(base, f)}
    assert len(changed) == 1, (run.name, changed)
  flags = grid.by_name('ztt_c4').flags(1)
  assert '--config.model.n_cycles=4' in flags and flags[-1] == (
      '--config.seed=1')


def write_metrics(path, losses, steps=10):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for step, loss in losses:
      row = {'step': step, 'loss': loss}
      if step % 5 == 0:
        row['val_loss'] = loss
      f.write(json.dumps(row) + '\n')


def test_finished_needs_the_eval_of_the_last_step(tmp_path):
  path = str(tmp_path / 'run')
  assert not records.finished(path, 10)
  write_metrics(path, [(5, 2.0), (9, 1.9)])
  assert not records.finished(path, 10)
  write_metrics(path, [(5, 2.0), (10, 1.8)])
  assert records.finished(path, 10)


def test_report_means_spreads_and_verdicts(tmp_path):
  out = str(tmp_path)
  for name, seeds in (('vanilla', (1.80, 1.82)), ('htc_c2', (1.70, 1.71)),
                      ('ztt_c2', (1.79, 1.84))):
    for seed, loss in zip(grid.seeds, seeds):
      write_metrics(os.path.join(out, name, f'seed{seed}'),
                    [(5, 2.0), (10, loss)])
  results = report.collect(out, 10)
  s = report.loss_summary(results['vanilla'])
  assert s['mean'] == pytest.approx(1.81) and s['spread'] == pytest.approx(
      0.02)
  assert report.loss_summary(results['bc_c2']) is None
  table = report.comparisons(results)
  rows = {tuple(cell.strip(' `') for cell in line.split('|')[1:3]): line
          for line in table.splitlines()[2:]}
  assert 'A better, beyond the spread' in rows[('htc_c2', 'vanilla')]
  assert 'within the seed spread' in rows[('ztt_c2', 'vanilla')]
  assert 'missing' in rows[('ztt_c2', 'bc_c2')]
  assert 'missing' in report.main_table(results).splitlines()[3]


def test_position_r2_and_buckets():
  rng = np.random.default_rng(0)
  by_position = np.broadcast_to(1 / (np.arange(8) + 2), (2000, 8))
  assert position.position_r2(by_position) == pytest.approx(1.0)
  noise = rng.normal(size=(2000, 8))
  assert position.position_r2(noise) < 0.01
  assert position.position_r2(by_position + 0.01 * noise) > 0.9
  assert position.buckets(64) == [(0, 2), (2, 4), (4, 8), (8, 16), (16, 32),
                                  (32, 64)]
  assert position.buckets(5) == [(0, 2), (2, 4), (4, 5)]


def fair_cfg(run):
  m = dict(variant='ztt', vocab_size=256, d_model=32, n_heads=2,
           n_head_layers=1, n_mid_layers=1, n_tail_layers=1, n_cycles=3,
           zero_pool='auto', gate='auto', exit_loss='auto')
  m.update({k.split('.', 1)[1]: v for k, v in run.overrides
            if k.startswith('model.')})
  return model_config.ModelConfig.from_config(m)


def test_fair_grid_compares_one_change_at_a_time():
  cfgs = {r.name: fair_cfg(r) for r in fair.runs}
  assert len(cfgs) == len(fair.main) + len(fair.ablations)
  fields = lambda a, b: {f for f in cfgs[a].__dataclass_fields__
                         if getattr(cfgs[a], f) != getattr(cfgs[b], f)}
  for c in (2, 4):
    for v in ('bc', 'htc', 'ztt'):
      # With and without exit heads: the objective alone differs.
      assert fields(f'{v}_c{c}', f'{v}_c{c}_exit') == {'exit_loss'}
      assert cfgs[f'{v}_c{c}'].exit_loss == 'none'
    # HTC against ZTT: the zero tokens and the gate, the objective shared.
    assert fields(f'htc_c{c}_exit', f'ztt_c{c}_exit') == {
        'variant', 'zero_pool', 'gate'}
    assert (cfgs[f'vanilla_mid{c}'].executed_layers
            == cfgs[f'htc_c{c}'].executed_layers)
  for run in fair.ablations:
    changed = fields(run.name, fair.ablation_base)
    train_changes = [k for k, _ in run.overrides if k.startswith('train.')]
    assert len(changed) + len(train_changes) == 1, (run.name, changed)


def test_summary_json_reads_the_runs(tmp_path, monkeypatch):
  out = str(tmp_path)
  for seed, loss in ((0, 1.61), (1, 1.63)):
    write_metrics(os.path.join(out, 'vanilla', f'seed{seed}'),
                  [(5, 2.0), (10, loss)])
  write_metrics(os.path.join(out, 'htc_c2', 'seed0'), [(5, 2.0)])  # Unfinished.
  assert summary.finished_losses(out, 'vanilla', (0, 1, 2), 10) == (
      [0, 1], [1.61, 1.63])
  monkeypatch.setattr(summary, 'model_fields', lambda path: dict(
      variant='vanilla', path=os.path.relpath(path, out)))
  eval_dir = os.path.join(out, 'ztt_c4_exit', 'seed0', 'eval')
  os.makedirs(eval_dir)
  fixed = dict(criterion='fixed', fixed_cycles=1, val_loss=1.7,
               mean_cycles=1.0, cycles_run=1.0)
  for criterion, tau in (('zero_weight', -3.0), ('kl', 0.01)):
    with open(os.path.join(eval_dir, f'early_exit_{criterion}.json'),
              'w') as f:
      json.dump([fixed,
                 dict(criterion=criterion, threshold=tau, val_loss=1.6,
                      mean_cycles=2.5, cycles_run=3.5),
                 dict(criterion='random', matches=tau, val_loss=1.65,
                      mean_cycles=2.5, cycles_run=4.0)], f)
  assert fair.early_exit['ztt_c4_exit'][1:] == ('zero_weight', 'zero_margin',
                                              'kl')
  path = str(tmp_path / 'summary.json')
  written = summary.write_summary(fair, out, 10, (0, 1), (0,), path)
  assert json.load(open(path)) == written
  assert written['runs'] == [dict(
      name='vanilla', variant='vanilla', path=os.path.join('vanilla', 'seed0'),
      steps=10, seeds=[0, 1], val_loss=[1.61, 1.63])]
  rows = written['early_exit']
  # The fixed depth once; each rule followed by its random twin.
  assert [r['criterion'] for r in rows] == [
      'fixed', 'zero_weight', 'random', 'kl', 'random']
  assert rows[0]['threshold'] is None
  assert [(r['threshold'], r['matches']) for r in rows
          if r['criterion'] == 'random'] == [(-3.0, 'zero_weight'),
                                             (0.01, 'kl')]
  assert all(r['run'] == 'ztt_c4_exit' for r in rows)


def test_fair_sweeps_name_their_criterion():
  sweeps = fair.early_exit_sweeps()
  assert ('ztt_c4_exit', 'zero_attention') in sweeps
  assert ('htc_c4_exit', 'kl') in sweeps
  # Zero-token statistics only where the run has zero tokens.
  for name, criterion in sweeps:
    variant = fair.by_name(name).get('model.variant')
    assert variant == 'ztt' or not criterion.startswith('zero')
  cmd = runner.eval_command(fair, 'w', 'kl')
  assert {'--criterion=kl', '--name=early_exit_kl', '--per=token'} <= set(cmd)
  assert grid.early_exit_sweeps() == [('ztt_c4', ''), ('ztt_c2', '')]
  assert not any(a.startswith('--name')
                 for a in runner.eval_command(grid, 'w'))


def test_fair_runs_train_on_the_configs_own_data():
  cmd = runner.train_command(fair, fair.by_name('abl_gate_slow'), 1, 'w')
  assert '--config=configs/default.py' in cmd
  assert not any(a.startswith('--config.data.path') for a in cmd)
  assert {'--config.model.d_model=32', '--config.train.gate_lr_scale=0.1',
          '--config.seed=1'} <= set(cmd)
  assert '--config.train.steps=1500' in cmd
  assert runner.eval_command(fair, 'w')[-3:] == list(fair.early_exit_flags)


def test_data_bench_measures_both_paths_at_a_tiny_size(tmp_path, monkeypatch):
  monkeypatch.setattr(data_bench, 'FILE_MB', 1)
  corpus = data_bench.make_corpus(tmp_path, 2)
  assert sorted(p.name for p in corpus.iterdir()) == [
      '.complete', 'part_0000.txt', 'part_0001.txt']
  assert sum(p.stat().st_size for p in corpus.glob('*.txt')) == 2 << 20
  base = dict(tokenizer='byte', cache_dir=str(tmp_path / 'cache'),
              batches=2, workers=1, path=str(corpus))
  first = data_bench.child(dict(base, kind='start',
                                workdir=str(tmp_path / 'w1')))
  prepared = data_bench.child(dict(base, kind='prepare',
                                   output=str(tmp_path / 'prepared')))
  start = data_bench.child(dict(base, kind='start',
                                path=str(tmp_path / 'prepared'),
                                workdir=str(tmp_path / 'w2')))
  assert first['tokens'] == prepared['tokens'] == start['tokens'] == (
      (2 << 20) + 1)  # The files and the newline between them.
  assert all(r['seconds'] > 0 and r['rss_mb'] > 0
             for r in (first, prepared, start))


def test_fair_ztt_runs_pin_their_readings():
  """A later change of the package's 'auto' defaults cannot reach the
  grid's remaining seeds: every ZTT run names its pool and gate."""
  for run in fair.runs:
    given = dict(run.overrides)
    if given['model.variant'] == 'ztt':
      assert given['model.zero_pool'] == 'cycle_layer', run.name
      assert given['model.gate'] in ('token', 'scalar', 'none'), run.name
    else:
      assert 'model.gate' not in given, run.name
  assert dict(fair.by_name('abl_gate_scalar').overrides)['model.gate'] == (
      'scalar')


def test_roofline_table_from_a_saved_report(tmp_path, capsys):
  """A saved row is not compiled again; the table's per-chip tokens/s is
  the global batch over the roofline step time over the chips."""
  row = roofline.by_name('125m_v5e-4x4_ga4')
  assert row.command()[1:] == ['--config=configs/budget.py:125m',
                               '--topology=v5e:4x4',
                               '--config.train.grad_accum_steps=4']
  report = {'row': row.name, 'topology': 'v5e:4x4', 'chips': 16,
            'batch_size': 256, 'seq_len': 2048, 'fits': True,
            'per_device_bytes': 8 << 30, 'hbm_bytes': 16 << 30,
            'flops': 3.5e12, 'model_flops_per_device': 6.4e13,
            'bytes_accessed': 88 * (1 << 30), 'roofline_step_s': 0.25,
            'hbm_bytes_per_s_per_device': 88 * (1 << 30) / 0.125,
            'roofline_bound': 'compute', 'mfu_upper_bound': 1.0,
            'compile_s': 80.0}
  with open(roofline.json_path(row, str(tmp_path)), 'w',
            encoding='utf-8') as f:
    json.dump(report, f)
  assert roofline.run_row(row, str(tmp_path)) == report  # No compile.
  assert roofline.tokens_per_s_per_chip(report) == 256 * 2048 / 0.25 / 16
  assert roofline.tokens_per_s_per_chip(
      dict(report, roofline_step_s=None)) is None
  roofline.main(['--table-only', f'--out={tmp_path}', row.name])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3 and lines[1].startswith('|---')
  cells = [c.strip() for c in lines[2].strip('|').split('|')]
  assert cells == ['125m', 'v5e:4x4 (16)',
                   '`--config.train.grad_accum_steps=4`', 'yes', '8.00 of 16',
                   '3.5e+12', '6.4e+13', '88.0', '0.125', '0.250', 'compute',
                   '100%',
                   '131,072', '80.0']
  assert roofline.last_json('noise\n{"a": 1}\n') == {'a': 1}
  assert roofline.last_json('no report') is None


def test_each_study_describes_its_runs():
  """The three studies' run names, groups and the commands they give."""
  assert [r.name for r in grid.main][:4] == ['vanilla', 'bc_c2', 'htc_c2',
                                             'ztt_c2']
  assert grid.by_name('vanilla_10').get('model.n_mid_layers') == 8
  assert len(fair.main) == 15 and len(fair.ablations) == 9
  assert len(fair.schedule()) == 15 * 3 + 9
  assert fair.schedule(seeds=[5], names={'vanilla', 'abl_gate_none'},
                       ablation_seeds=[1]) == [
                           (fair.by_name('vanilla'), 5),
                           (fair.by_name('abl_gate_none'), 1)]
  names = [r.name for r in regime.STUDY.runs]
  assert names[:2] == ['s1_d64_l3_ctx128/vanilla', 's1_d64_l3_ctx128/htc_c2']
  assert len(names) == len(regime.SETTINGS) * len(regime.VARIANTS)
  run = regime.STUDY.by_name('s4_d32_l3_ctx128_b32/htc_c4')
  assert regime.STUDY.steps_of(run) == 1500
  assert run.get('train.steps') is None  # The runner passes the steps.
  cmd = runner.train_command(regime.STUDY, run, 1, 'w')
  assert cmd.count('--config.train.steps=1500') == 1
  assert {'--config=configs/default.py', '--config.model.n_cycles=4',
          '--config.model.variant=head_tail_cycle', '--config.data.seq_len=128',
          '--config.train.batch_size=32', '--config.model.exit_loss=none',
          '--config.seed=1'} <= set(cmd)
  assert regime.SETTINGS['s4_d32_l3_ctx128_b32']['description'].endswith(
      '(6.1M tokens)')
  with pytest.raises(KeyError):
    fair.by_name('no_such_run')


def test_runner_trains_only_unfinished_runs(tmp_path, monkeypatch):
  out = str(tmp_path)
  write_metrics(records.workdir(out, 'vanilla', 0), [(5, 2.0), (10, 1.8)])
  seen = []
  monkeypatch.setattr(runner, 'run_jobs', lambda todo, *a, **k: seen.extend(
      todo) or [])
  pairs = fair.schedule(seeds=[0], names={'vanilla', 'bc_c2'},
                        ablation_seeds=[])
  assert runner.train(fair, out, pairs, steps=10) == []
  assert [label for label, _, _ in seen] == ['bc_c2 seed 0']
  assert seen[0][2] == os.path.join(out, 'bc_c2', 'seed0.log')


def test_fair_report_tables_from_a_fixture_summary(tmp_path):
  runs = [dict(name=n, distinct_params=48352, flops_per_token=8.2e5,
               seeds=[0, 1, 2], val_loss=v)
          for n, v in (('vanilla', [1.60, 1.61, 1.62]),
                       ('htc_c2', [1.50, 1.51, 1.50]))]
  summ = {'runs': runs, 'early_exit': []}
  lines = fair_report.main_table(summ).splitlines()
  assert lines[0].startswith('| run | distinct params |')
  assert lines[2] == ('| `vanilla`: vanilla, 1+1+1 layers | 48,352 | 0.82 M'
                      ' | 1.6000, 1.6100, 1.6200 (seeds 0,1,2) | 1.6100 | '
                      '0.0200 |')
  assert lines[3].endswith('| | | not run yet | | |')
  rows = {tuple(c.strip(' `') for c in line.split('|')[1:3]): line
          for line in fair_report.comparisons(summ).splitlines()[2:]}
  assert '**A lower**, at every seed, beyond twice' in rows[('htc_c2',
                                                             'vanilla')]
  assert 'not run yet' in rows[('ztt_c2', 'htc_c2')]
  path = records.workdir(str(tmp_path), 'ztt_c4_exit', 0)
  os.makedirs(path)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for row in ({'step': 1000, 'gate': [0.5, 0.25], 'zero_attention': [0.1,
                                                                      0.2]},
                {'step': 1500, 'val_loss': 1.5, 'val_loss_cycle': [1.7, 1.5]}):
      f.write(json.dumps(row) + '\n')
  assert fair_report.dynamics_table(str(tmp_path), [
      'ztt_c4_exit', 'ztt_c2_exit']).splitlines()[2:] == [
          '| `ztt_c4_exit` | 1.700, 1.500 | 0.500, 0.250 | 0.100, 0.200 |']


def test_regime_report_from_fixture_runs(tmp_path):
  out = str(tmp_path)
  settings = {'s': regime.setting(32, 2, 8, 2)}
  for variant, loss in (('vanilla', 1.6), ('htc_c4', 1.5)):
    path = records.workdir(out, f's/{variant}', 0)
    write_metrics(path, [(5, 2.0), (1500, loss)])
    with open(path + '.log', 'w') as f:
      f.write(f'{variant}, 1,234 distinct params\n')
  summ = regime_report.summarize(settings, regime.VARIANTS, out)
  entry = summ['settings']['s']
  assert entry['variants']['htc_c4']['params'] == 1234
  assert entry['vs_vanilla']['htc_c4']['diff'] == pytest.approx(-0.1)
  lines = regime_report.table(summ, regime.VARIANTS).splitlines()
  assert lines[3].startswith('| s | 0.02M | 1,234 | HTC C=4 | s0: 1.5000 |')


def test_tables_header_and_numbers():
  assert tables.header('a', 'b') == ['| a | b |', '|---|---|']
  assert tables.numbers([1, 0.5]) == '1.000, 0.500'
  assert tables.numbers(None) == 'n/a'


def module_imports(path: pathlib.Path) -> set[str]:
  """The experiments modules `path` imports, at top level or in a
  function (`from experiments import x`, `import experiments.x`,
  `from experiments.x import y`)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'experiments':
        found |= {a.name for a in node.names}
      elif node.module.startswith('experiments.'):
        found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names
                if a.name.startswith('experiments.')}
  return found


def test_package_has_no_cycles_private_imports_or_path_edits():
  modules = {p.stem: p for p in PACKAGE.glob('*.py') if p.stem != '__init__'}
  graph = {name: module_imports(p) & set(modules)
           for name, p in modules.items()}
  for name, path in modules.items():
    text = path.read_text()
    assert 'sys.path' not in text, name
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.ImportFrom, ast.Import)):
        assert not any(a.name.startswith('_') for a in node.names), name
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__')
          and isinstance(node.value, ast.Name)
          and node.value.id in modules):
        raise AssertionError(f'{name} uses {node.value.id}.{node.attr}')

  def visit(name, stack):
    assert name not in stack, ' -> '.join(stack + [name])
    for dep in graph[name]:
      visit(dep, stack + [name])

  for name in graph:
    visit(name, [])


def test_every_module_imports_in_a_fresh_interpreter():
  names = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')
  code = ''.join(f'import experiments.{n}\n' for n in names)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', code], check=True, env=env,
                 cwd=PACKAGE.parent)


@pytest.mark.parametrize('how', ['path', 'module'])
def test_run_all_runs_by_path_and_as_a_module(how):
  cmd = ([sys.executable, str(PACKAGE / 'run_all.py')] if how == 'path'
         else [sys.executable, '-m', 'experiments.run_all'])
  out = subprocess.run(cmd + ['--help'], check=True, capture_output=True,
                       text=True, cwd=PACKAGE.parent).stdout
  assert '--report_only' in out and '--study' in out
