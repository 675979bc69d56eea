"""The first grid (docs/results/shakespeare.md): names, overrides, seeds.

Every run starts from `configs/shakespeare_char.py` (nanoGPT's
shakespeare_char CPU budget: char tokens, context 64, batch 12, 2000 steps,
128 wide, 1 head + 2 middle + 1 tail distinct layers) and changes only what
its name says. `schedule()` gives the order `run_all.py` trains them: the main grid at
both seeds first, then the ablations (one seed unless asked for more).
"""

from __future__ import annotations

import dataclasses

CONFIG = 'configs/shakespeare_char.py'
# Half nanoGPT's token budget (1000 steps of 12 x 64 tokens), so that the
# grid trains in one sitting on 2 cores: ZTT C=4 takes about 10 minutes on one
# core, BC C=4 about 14.
STEPS = 1000
STEP_FLAGS = ('--config.train.warmup_steps=50',
              '--config.train.log_every_steps=50',
              '--config.train.eval_every_steps=250',
              '--config.checkpoint.every_steps=250',
              '--config.sample.max_new_tokens=100')
EVAL_BATCHES = 40  # Of 12 windows: the early-exit sweep's validation set.
# Runs whose first seed gets the ztt-eval early-exit sweep.
EARLY_EXIT_RUNS = ('ztt_c4', 'ztt_c2')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  group: str  # 'main' (the equal-budget grid) or 'ablation'.
  label: str  # What the tables call it.
  overrides: tuple[tuple[str, object], ...]

  def flags(self, seed: int) -> list[str]:
    return [f'--config.{k}={v}' for k, v in self.overrides] + [
        f'--config.seed={seed}']


def _run(name, group, label, variant, cycles=None, **model):
  overrides = [('model.variant', variant)]
  if cycles is not None:
    overrides.append(('model.n_cycles', cycles))
  overrides += [(f'model.{k}', v) for k, v in model.items()]
  return Run(name, group, label, tuple(overrides))


MAIN = [
    _run('vanilla', 'main', 'vanilla, 1+2+1 layers', 'vanilla'),
    _run('bc_c2', 'main', 'BC, 4 layers x 2', 'basic_cycle', 2),
    _run('htc_c2', 'main', 'HTC, 1 + 2x2 + 1', 'head_tail_cycle', 2),
    _run('ztt_c2', 'main', 'ZTT, 1 + 2x2 + 1', 'ztt', 2),
    _run('bc_c4', 'main', 'BC, 4 layers x 4', 'basic_cycle', 4),
    _run('htc_c4', 'main', 'HTC, 1 + 2x4 + 1', 'head_tail_cycle', 4),
    _run('ztt_c4', 'main', 'ZTT, 1 + 2x4 + 1', 'ztt', 4),
    # Equal compute: as many distinct layers as HTC/ZTT run per token.
    _run('vanilla_6', 'main', 'vanilla, 1+4+1 layers (compute of C=2)',
         'vanilla', n_mid_layers=4),
    _run('vanilla_10', 'main', 'vanilla, 1+8+1 layers (compute of C=4)',
         'vanilla', n_mid_layers=8),
]

# DESIGN.md's readings, each switched alone on ZTT C=2 (default:
# zero_pool=cycle_layer, exit_loss=linear, gate=token, zero_key=key_space).
# C=2 rather than 4 so that they fit the same sitting as the main grid.
ABLATION_BASE = 'ztt_c2'
ABLATIONS = [
    _run('abl_pool_cycle', 'ablation', 'pool indexed by cycle only', 'ztt',
         2, zero_pool='cycle'),
    _run('abl_pool_layer', 'ablation', 'pool indexed by layer only', 'ztt',
         2, zero_pool='layer'),
    _run('abl_exit_uniform', 'ablation', 'exit-loss weights uniform, not '
         'linear', 'ztt', 2, exit_loss='uniform'),
    _run('abl_gate_none', 'ablation', 'no gate', 'ztt', 2, gate='none'),
    _run('abl_key_projected', 'ablation', 'zero key through each layer\'s '
         'W_k (pool of [D] vectors)', 'ztt', 2, zero_key='projected'),
]

SEEDS = (0, 1)
ABLATION_SEEDS = (0,)  # More with run_all.py --ablation_seeds=0,1.


def ordered(main, ablations, seeds, names, ablation_seeds):
  """(run, seed) pairs in training order: the main grid seed by seed, then
  the ablations; only `names` when given."""
  keep = lambda runs: [r for r in runs if names is None or r.name in names]
  return ([(r, s) for s in seeds for r in keep(main)] +
          [(r, s) for s in ablation_seeds for r in keep(ablations)])


def schedule(seeds=SEEDS, names=None, ablation_seeds=ABLATION_SEEDS):
  return ordered(MAIN, ABLATIONS, seeds, names, ablation_seeds)


def by_name(name: str) -> Run:
  return {r.name: r for r in MAIN + ABLATIONS}[name]
