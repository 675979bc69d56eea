"""The first grid (docs/results/shakespeare.md): names, overrides, seeds.

    python experiments/run_all.py --study=grid \\
        --data=../shared/data/tinyshakespeare.txt

Every run starts from `configs/shakespeare_char.py` (nanoGPT's
shakespeare_char CPU budget: char tokens, context 64, batch 12, 2000 steps,
128 wide, 1 head + 2 middle + 1 tail distinct layers) and changes only what
its name says. `STUDY.schedule()` gives the order the runner trains them:
the main grid at both seeds first, then the ablations (one seed unless asked
for more).
"""

from __future__ import annotations

from experiments.study import Study, model_run

MAIN = (
    model_run('vanilla', 'main', 'vanilla, 1+2+1 layers', 'vanilla'),
    model_run('bc_c2', 'main', 'BC, 4 layers x 2', 'basic_cycle', 2),
    model_run('htc_c2', 'main', 'HTC, 1 + 2x2 + 1', 'head_tail_cycle', 2),
    model_run('ztt_c2', 'main', 'ZTT, 1 + 2x2 + 1', 'ztt', 2),
    model_run('bc_c4', 'main', 'BC, 4 layers x 4', 'basic_cycle', 4),
    model_run('htc_c4', 'main', 'HTC, 1 + 2x4 + 1', 'head_tail_cycle', 4),
    model_run('ztt_c4', 'main', 'ZTT, 1 + 2x4 + 1', 'ztt', 4),
    # Equal compute: as many distinct layers as HTC/ZTT run per token.
    model_run('vanilla_6', 'main', 'vanilla, 1+4+1 layers (compute of C=2)',
              'vanilla', n_mid_layers=4),
    model_run('vanilla_10', 'main', 'vanilla, 1+8+1 layers (compute of C=4)',
              'vanilla', n_mid_layers=8),
)

# docs/DESIGN.md's readings, each switched alone on ZTT C=2 (default:
# zero_pool=cycle_layer, exit_loss=linear, gate=token, zero_key=key_space).
# C=2 rather than 4 so that they fit the same sitting as the main grid.
ABLATIONS = (
    model_run('abl_pool_cycle', 'ablation', 'pool indexed by cycle only',
              'ztt', 2, zero_pool='cycle'),
    model_run('abl_pool_layer', 'ablation', 'pool indexed by layer only',
              'ztt', 2, zero_pool='layer'),
    model_run('abl_exit_uniform', 'ablation', 'exit-loss weights uniform, '
              'not linear', 'ztt', 2, exit_loss='uniform'),
    model_run('abl_gate_none', 'ablation', 'no gate', 'ztt', 2, gate='none'),
    model_run('abl_key_projected', 'ablation', 'zero key through each '
              'layer\'s W_k (pool of [D] vectors)', 'ztt', 2,
              zero_key='projected'),
)

STUDY = Study(
    name='grid', config='configs/shakespeare_char.py',
    # Half nanoGPT's token budget (1000 steps of 12 x 64 tokens), so that
    # the grid trains in one sitting on 2 cores: ZTT C=4 takes about 10
    # minutes on one core, BC C=4 about 14.
    steps=1000,
    step_flags=('--config.train.warmup_steps=50',
                '--config.train.log_every_steps=50',
                '--config.train.eval_every_steps=250',
                '--config.checkpoint.every_steps=250',
                '--config.sample.max_new_tokens=100'),
    main=MAIN, seeds=(0, 1),
    # More with run_all.py --ablation_seeds=0,1.
    ablations=ABLATIONS, ablation_seeds=(0,), ablation_base='ztt_c2',
    # The first seed of these gets ztt-eval's default early-exit sweep.
    early_exit={'ztt_c4': ('',), 'ztt_c2': ('',)},
    eval_batches=40,  # Of 12 windows: the early-exit sweep's validation set.
    out='runs/experiments', data='../shared/data/tinyshakespeare.txt')
