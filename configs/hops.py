"""Known per-token difficulty: k-hop induction (or variable chains), built in.

ztt-train --config=configs/hops.py:ztt --workdir=runs/hops_ztt
ztt-train --config=configs/hops.py:head_tail_cycle --workdir=runs/hops_htc
ztt-train --config=configs/hops.py:vanilla --workdir=runs/hops_vanilla
ztt-eval --workdir=runs/hops_ztt --per=token

`synthetic:hops` draws a context of random letters and queries whose answer
is k hops away (k = 1..4 per query, ztt_jax/synthetic.py); only the answers
carry loss, and ztt-eval reports accuracy and cycles per k. Other tasks:
--config.data.path=synthetic:vars (variable-binding chains) or
synthetic:hops:6 (up to 6 hops).

The variant picks the model at the same distinct layers (1 head + 2 middle
+ 1 tail, 64 wide): vanilla runs them once; basic_cycle, head_tail_cycle
and ztt cycle (C=4 here; --config.model.n_cycles=2 or 8). vanilla_compute
is vanilla at ZTT's compute: 1 + 2C + 1 distinct layers.
"""

from ztt_jax import configlib

CYCLES = 4


def get_config(variant: str = 'ztt'):
  compute = variant == 'vanilla_compute'
  config = configlib.base_config('vanilla' if compute else variant)
  config.model.update(d_model=64, n_heads=4, n_head_layers=1,
                      n_mid_layers=2 * CYCLES if compute else 2,
                      n_tail_layers=1, n_cycles=1 if compute else CYCLES,
                      dropout=0.0)
  if variant == 'vanilla':
    config.model.n_cycles = 1
  config.data.update(path='synthetic:hops', tokenizer='char', seq_len=64)
  config.train.update(steps=2000, batch_size=32, lr=2e-3, warmup_steps=100,
                      min_lr_ratio=0.1, weight_decay=0.1, b2=0.99,
                      log_every_steps=100, eval_every_steps=500,
                      eval_batches=8)
  config.checkpoint.update(every_steps=500, keep=2)
  config.sample.update(max_new_tokens=0)
  return config
