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

from experiments.study import Run, Study, model_run

VARIANTS = (('bc', 'basic_cycle', 'BC'), ('htc', 'head_tail_cycle', 'HTC'),
            ('ztt', 'ztt', 'ZTT'))
# ZTT's readings pinned to those the grid started with, so that a change
# of the package defaults (model.gate, zero_pool) never reaches later seeds.
PINNED = (('model.zero_pool', 'cycle_layer'), ('model.gate', 'token'))


def pinned(run: Run) -> Run:
  """`run` with PINNED's readings added where it is ZTT and names none."""
  if run.get('model.variant') != 'ztt':
    return run
  given = {k for k, _ in run.overrides}
  return Run(run.name, run.group, run.label, run.overrides + tuple(
      (k, v) for k, v in PINNED if k not in given))


def main_runs() -> list[Run]:
  """Vanilla; each variant at C=2 and 4 without and with exit heads; the
  equal-compute vanilla of each C."""
  runs = [model_run('vanilla', 'main', 'vanilla, 1+1+1 layers', 'vanilla')]
  for c in (2, 4):
    for short, variant, label in VARIANTS:
      runs += [
          model_run(f'{short}_c{c}', 'main', f'{label} C={c}, no exit heads',
                    variant, c, exit_loss='none'),
          model_run(f'{short}_c{c}_exit', 'main',
                    f'{label} C={c}, exit heads (linear)', variant, c,
                    exit_loss='linear')]
    runs.append(model_run(f'vanilla_mid{c}', 'main',
                          f'vanilla, 1+{c}+1 layers (compute of C={c})',
                          'vanilla', n_mid_layers=c))
  return runs


def ablation(name: str, label: str, **model) -> Run:
  """A change of ZTT C=4 with exit heads (linear unless it says)."""
  return model_run(name, 'ablation', label, 'ztt', 4,
                   **{'exit_loss': 'linear', **model})


ABLATIONS = [
    ablation('abl_gate_input', 'gate reads the cycle input h',
             gate_input='input'),
    ablation('abl_gate_scalar', 'scalar gate per cycle', gate='scalar'),
    ablation('abl_gate_none', 'no gate', gate='none'),
    ablation('abl_exit_uniform', 'exit-loss weights uniform',
             exit_loss='uniform'),
    ablation('abl_exit_final_heavy', 'exit-loss weights final-heavy',
             exit_loss='final_heavy'),
    ablation('abl_exit_detach', 'early exit losses train only the tail and '
             'LM head', exit_grad='detach'),
    ablation('abl_key_projected', 'zero key through each layer\'s W_k',
             zero_key='projected'),
    ablation('abl_key_init_0p2', 'zero keys start 10x larger (std 0.2)',
             zero_key_init_std=0.2),
    # A slower gate is a training setting, not a model one.
    Run('abl_gate_slow', 'ablation', 'gate updates x0.1',
        (('model.variant', 'ztt'), ('model.n_cycles', 4),
         ('model.exit_loss', 'linear'), ('train.gate_lr_scale', 0.1))),
]

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

STUDY = Study(
    name='fair', config='configs/default.py', steps=1500,
    step_flags=(
        '--config.model.d_model=32', '--config.model.n_heads=2',
        '--config.model.n_mid_layers=1', '--config.data.seq_len=128',
        '--config.train.batch_size=32', '--config.train.lr=0.003',
        '--config.train.warmup_steps=100',
        '--config.train.log_every_steps=100',
        '--config.train.eval_every_steps=500',
        '--config.train.eval_batches=32',
        '--config.checkpoint.every_steps=500',
        '--config.sample.max_new_tokens=0'),
    main=tuple(pinned(r) for r in main_runs()), seeds=(0, 1, 2),
    ablations=tuple(pinned(r) for r in ABLATIONS), ablation_seeds=(0,),
    ablation_base='ztt_c4_exit', early_exit=EARLY_EXIT,
    eval_batches=16,  # Of 32 windows: the per-token early-exit sweep's set.
    early_exit_flags=('--per=token', '--random_baseline', '--n_thresholds=4'),
    out='runs/fair')
