"""experiments/: the grid's schedule and flags, the runner's notion of a
finished run, and the report's arithmetic (no training here)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'experiments'))
import grid  # pylint: disable=g-import-not-at-top,wrong-import-position
import position  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position
import run_all  # pylint: disable=g-import-not-at-top,wrong-import-position

from ztt_jax import model  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_schedule_trains_the_main_grid_at_every_seed_first():
  pairs = grid.schedule()
  n_main = len(grid.MAIN) * len(grid.SEEDS)
  assert [r.group for r, _ in pairs[:n_main]] == ['main'] * n_main
  assert [s for _, s in pairs[:len(grid.MAIN)]] == [grid.SEEDS[0]] * len(
      grid.MAIN)
  assert {r.group for r, _ in pairs[n_main:]} == {'ablation'}
  names = [r.name for r in grid.MAIN + grid.ABLATIONS]
  assert len(names) == len(set(names))


def test_every_run_is_a_valid_model_and_equal_compute_matches():
  def cfg(run):
    m = dict(variant='ztt', vocab_size=65, d_model=128, n_heads=4,
             n_head_layers=1, n_mid_layers=2, n_tail_layers=1, n_cycles=3,
             zero_pool='auto', gate='auto', exit_loss='auto')
    m.update({k.split('.', 1)[1]: v for k, v in run.overrides})
    return model.ModelConfig.from_config(m)
  cfgs = {r.name: cfg(r) for r in grid.MAIN + grid.ABLATIONS}
  for c in (2, 4):
    eq = cfgs['vanilla_6' if c == 2 else 'vanilla_10']
    assert eq.executed_layers == cfgs[f'htc_c{c}'].executed_layers
    assert cfgs[f'ztt_c{c}'].cycles == c
  for run in grid.ABLATIONS:
    base = cfgs[grid.ABLATION_BASE]
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
  assert not run_all.finished(path, 10)
  write_metrics(path, [(5, 2.0), (9, 1.9)])
  assert not run_all.finished(path, 10)
  write_metrics(path, [(5, 2.0), (10, 1.8)])
  assert run_all.finished(path, 10)


def test_report_means_spreads_and_verdicts(tmp_path):
  out = str(tmp_path)
  for name, seeds in (('vanilla', (1.80, 1.82)), ('htc_c2', (1.70, 1.71)),
                      ('ztt_c2', (1.79, 1.84))):
    for seed, loss in zip(grid.SEEDS, seeds):
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
