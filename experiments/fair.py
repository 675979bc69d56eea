"""The fair grid (issue "make ZTT do the paper's job"): every comparison
changes one thing, in a regime where cycling pays.

    python experiments/run_all.py --study=fair --seeds=0,1,2

Regime (experiments/regime.py, docs/results/regime.md): `configs/default.py`
(byte-level `builtin:stdlib`, the Python standard library's sources) made
narrow and shallow, so that extra depth has something to add: d_model 32,
2 heads, 1 head + 1 middle + 1 tail distinct layers, context 128, batch 32,
1500 steps (6.1M tokens).

Main grid: vanilla; BC, HTC and ZTT at C in {2, 4}, each with and without
exit heads (`model.exit_loss` none or linear, alike for every variant, so
no row compares two objectives); equal-compute vanilla (as many distinct
middle layers as the cycled stack runs). Ablations change one reading of
ZTT C=4 with exit heads at a time.
"""

from __future__ import annotations

from grid import Run, _run, ordered

CONFIG = 'configs/default.py'
STEPS = 1500
STEP_FLAGS = (
    '--config.model.d_model=32', '--config.model.n_heads=2',
    '--config.model.n_mid_layers=1', '--config.data.seq_len=128',
    '--config.train.batch_size=32', '--config.train.lr=0.003',
    '--config.train.warmup_steps=100',
    '--config.train.log_every_steps=100',
    '--config.train.eval_every_steps=500', '--config.train.eval_batches=32',
    '--config.checkpoint.every_steps=500',
    '--config.sample.max_new_tokens=0')
EVAL_BATCHES = 16  # Of 32 windows: the per-token early-exit sweep's set.
EARLY_EXIT_FLAGS = ('--per=token', '--random_baseline', '--n_thresholds=4')

_VARIANTS = (('bc', 'basic_cycle', 'BC'), ('htc', 'head_tail_cycle', 'HTC'),
             ('ztt', 'ztt', 'ZTT'))

MAIN = [_run('vanilla', 'main', 'vanilla, 1+1+1 layers', 'vanilla')]
for _c in (2, 4):
  for _short, _variant, _label in _VARIANTS:
    MAIN += [
        _run(f'{_short}_c{_c}', 'main', f'{_label} C={_c}, no exit heads',
             _variant, _c, exit_loss='none'),
        _run(f'{_short}_c{_c}_exit', 'main',
             f'{_label} C={_c}, exit heads (linear)', _variant, _c,
             exit_loss='linear')]
  MAIN.append(_run(f'vanilla_mid{_c}', 'main',
                   f'vanilla, 1+{_c}+1 layers (compute of C={_c})',
                   'vanilla', n_mid_layers=_c))

ABLATION_BASE = 'ztt_c4_exit'
ABLATIONS = [
    _run('abl_gate_input', 'ablation', 'gate reads the cycle input h',
         'ztt', 4, exit_loss='linear', gate_input='input'),
    _run('abl_gate_scalar', 'ablation', 'scalar gate per cycle', 'ztt', 4,
         exit_loss='linear', gate='scalar'),
    _run('abl_gate_none', 'ablation', 'no gate', 'ztt', 4,
         exit_loss='linear', gate='none'),
    _run('abl_exit_uniform', 'ablation', 'exit-loss weights uniform', 'ztt',
         4, exit_loss='uniform'),
    _run('abl_exit_final_heavy', 'ablation', 'exit-loss weights final-heavy',
         'ztt', 4, exit_loss='final_heavy'),
    _run('abl_exit_detach', 'ablation', 'early exit losses train only the '
         'tail and LM head', 'ztt', 4, exit_loss='linear', exit_grad='detach'),
    _run('abl_key_projected', 'ablation', 'zero key through each layer\'s '
         'W_k', 'ztt', 4, exit_loss='linear', zero_key='projected'),
    _run('abl_key_init_0p2', 'ablation', 'zero keys start 10x larger '
         '(std 0.2)', 'ztt', 4, exit_loss='linear', zero_key_init_std=0.2),
]
# A slower gate is a training setting, not a model one.
ABLATIONS.append(Run('abl_gate_slow', 'ablation', 'gate updates x0.1',
                     (('model.variant', 'ztt'), ('model.n_cycles', 4),
                      ('model.exit_loss', 'linear'),
                      ('train.gate_lr_scale', 0.1))))

# The per-token early-exit sweeps (ztt-eval) on each run's first seed, one
# per exit statistic, each in eval/early_exit_CRITERION.json: the zero-token
# statistics (the paper's mass a0, its weight relative to the mean key and
# its margin over the strongest key) against KL on the C=4 run with exit
# heads; zero weight and KL on the other ZTT runs with exit heads; HTC and
# BC by KL.
EARLY_EXIT = {
    'ztt_c4_exit': ('zero_attention', 'zero_weight', 'zero_margin', 'kl'),
    'htc_c4_exit': ('kl',), 'bc_c4_exit': ('kl',),
    'ztt_c2_exit': ('zero_weight', 'zero_margin', 'kl'),
    **{r.name: ('zero_weight', 'kl') for r in ABLATIONS},
    # The one reading whose gates stay open with exit heads: every statistic.
    'abl_gate_scalar': ('zero_attention', 'zero_weight', 'zero_margin', 'kl'),
}
EARLY_EXIT_RUNS = tuple(EARLY_EXIT)

# ZTT's readings pinned to those the grid started with, so that a change
# of the package defaults (model.gate, zero_pool) never reaches later seeds.
_PINNED = (('model.zero_pool', 'cycle_layer'), ('model.gate', 'token'))


def _pinned(run: Run) -> Run:
  if dict(run.overrides).get('model.variant') != 'ztt':
    return run
  given = {k for k, _ in run.overrides}
  return Run(run.name, run.group, run.label, run.overrides + tuple(
      (k, v) for k, v in _PINNED if k not in given))


MAIN = [_pinned(r) for r in MAIN]
ABLATIONS = [_pinned(r) for r in ABLATIONS]

SEEDS = (0, 1, 2)
ABLATION_SEEDS = (0,)


def schedule(seeds=SEEDS, names=None, ablation_seeds=ABLATION_SEEDS):
  return ordered(MAIN, ABLATIONS, seeds, names, ablation_seeds)


def by_name(name: str) -> Run:
  return {r.name: r for r in MAIN + ABLATIONS}[name]
