"""Looks for a regime where cycling pays: HTC against vanilla, equal params.

    python experiments/regime.py --out=/work/runs/regime \\
        --settings=s1_d64_l3_ctx128 --variants=vanilla,htc_c4 --seeds=0

Each setting in `SETTINGS` is a set of config overrides on top of
`configs/default.py` (byte-level `builtin:stdlib`, the Python standard
library's sources); each variant in `VARIANTS` adds only `model.variant` (and
`model.n_cycles`), so the two runs of a pair differ in nothing else. None has
exit heads (`model.exit_loss` is `auto`, which is `none` for vanilla and HTC).

Runs land in `--out`/SETTING/VARIANT/seedS (log beside as seedS.log, the
seconds each attempt took in seedS.wall). A finished run (its metrics hold the
eval of the last step) is skipped, an unfinished one resumes from its last
checkpoint, so the command can be stopped and started again. `--jobs=2` trains
two runs at a time, each pinned to one core with `taskset` and run under
`nice -n 19` (the machine is shared); `--cores=1` runs one at a time on
core 1. Compiled programs are shared through a
JAX compilation cache in `--out`/jax_cache.

At the end (or alone, with `--report_only`) it reads every run under `--out`
and writes docs/results/regime.json (per setting and variant: the final val
loss per seed, mean, spread = max - min over seeds; per setting and cycled
variant: its mean minus vanilla's and whether the gap exceeds twice the larger
spread) and docs/results/regime_table.md (the same as a markdown table).
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import regime_report
from experiments import runner
from experiments.study import Run, Study

CONFIG = 'configs/default.py'

# Shared by every setting unless it overrides them.
BASE = (
    ('sample.max_new_tokens', 0),
    ('train.log_every_steps', 100),
    ('train.eval_batches', 32),
    ('model.exit_loss', 'none'),
)


def setting(d_model: int, n_heads: int, seq_len: int, batch_size: int
            ) -> dict:
  """A setting: 1+1+1 layers `d_model` wide, `n_heads` heads, windows of
  `seq_len`, `batch_size` windows a step, lr 3e-3, 1500 steps."""
  tokens = 1500 * batch_size * seq_len / 1e6
  return {'description': (
      f'd_model {d_model}, {n_heads} heads, 1+1+1 layers, context {seq_len}, '
      f'batch {batch_size}, lr 3e-3, 1500 steps ({tokens:.1f}M tokens)'),
          'overrides': {
              'model.d_model': d_model, 'model.n_heads': n_heads,
              'model.n_mid_layers': 1, 'data.seq_len': seq_len,
              'train.batch_size': batch_size, 'train.lr': 3e-3,
              'train.warmup_steps': 100, 'train.steps': 1500,
              'train.eval_every_steps': 500, 'checkpoint.every_steps': 500}}


# Candidate settings, in the order they were tried. Names say what changes.
SETTINGS = {
    # 176,576 distinct params; vanilla runs 3 layers, HTC C=4 runs 6.
    's1_d64_l3_ctx128': setting(64, 4, 128, 16),
    # s1 with half the width (2 heads of 16): ~50K params, saturates sooner.
    's2_d32_l3_ctx128': setting(32, 2, 128, 16),
    # s1 with twice the context (batch halved: same tokens per step).
    's3_d64_l3_ctx256': setting(64, 4, 256, 8),
    # s2 with twice the batch: twice the tokens (6.1M) in as many steps.
    's4_d32_l3_ctx128_b32': setting(32, 2, 128, 32),
}

# name -> (variant, n_cycles or None, label, other model overrides). The
# pairs compared (vanilla against a cycled variant) differ only in
# model.variant and model.n_cycles; vanilla_mid4 is a reference, not a pair:
# the equal-compute vanilla of HTC C=4 when the setting has one middle layer
# (1 + 4 + 1 distinct layers, more parameters).
VARIANTS = {
    'vanilla': ('vanilla', None, 'vanilla', {}),
    'htc_c2': ('head_tail_cycle', 2, 'HTC C=2', {}),
    'htc_c4': ('head_tail_cycle', 4, 'HTC C=4', {}),
    'bc_c4': ('basic_cycle', 4, 'BC C=4', {}),
    'vanilla_mid4': ('vanilla', None, 'vanilla, 4 middle layers', {
        'model.n_mid_layers': 4}),
}


def steps_of(setting: str) -> int:
  return int(SETTINGS[setting]['overrides'].get('train.steps', 600))


def regime_run(setting: str, variant: str) -> Run:
  """The run of `variant` in `setting`, named SETTING/VARIANT."""
  kind, cycles, label, extra = VARIANTS[variant]
  overrides = dict(BASE)
  overrides.update(SETTINGS[setting]['overrides'])
  overrides.update(extra)
  overrides['model.variant'] = kind
  if cycles is not None:
    overrides['model.n_cycles'] = cycles
  overrides.pop('train.steps', None)  # The runner passes the run's steps.
  return Run(f'{setting}/{variant}', 'main', label,
             tuple(overrides.items()), steps=steps_of(setting))


STUDY = Study(
    name='regime', config=CONFIG, steps=600, step_flags=(),
    main=tuple(regime_run(s, v) for s in SETTINGS for v in VARIANTS),
    seeds=(0,), out='runs/regime')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/regime')
  p.add_argument('--settings', default='', help='Comma-separated; default '
                 'all.')
  p.add_argument('--variants', default='vanilla,htc_c4')
  p.add_argument('--seeds', default='0')
  p.add_argument('--jobs', type=int, default=2)
  p.add_argument('--cores', default='', help='Comma-separated cores to pin '
                 'to, one job each (overrides --jobs), e.g. 1 when core 0 '
                 'is busy; default 0..jobs-1.')
  p.add_argument('--report_only', action='store_true')
  args = p.parse_args()
  out = os.path.abspath(args.out)
  settings = [s for s in args.settings.split(',') if s] or list(SETTINGS)
  variants = [v for v in args.variants.split(',') if v]
  for name in settings:
    if name not in SETTINGS:
      sys.exit(f'regime.py: error: unknown setting {name!r}; one of '
               f'{", ".join(SETTINGS)}')
  for name in variants:
    if name not in VARIANTS:
      sys.exit(f'regime.py: error: unknown variant {name!r}; one of '
               f'{", ".join(VARIANTS)}')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  if not args.report_only:
    pairs = [(STUDY.by_name(f'{setting}/{variant}'), seed) for seed in seeds
             for setting in settings for variant in variants]
    cores = ([int(c) for c in args.cores.split(',') if c] or
             list(range(args.jobs)))
    failures = runner.train(STUDY, out, pairs, cores=cores, nice=19)
    if failures:
      print(f'failed: {", ".join(failures)}', flush=True)
  regime_report.write_summary(SETTINGS, VARIANTS, out, os.path.join(
      runner.REPO, 'docs', 'results'))


if __name__ == '__main__':
  main()
