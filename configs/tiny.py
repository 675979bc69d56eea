"""Tiny config for fast CPU tests: trains in seconds, char level.

ztt-train --config=configs/tiny.py:ztt --workdir=runs/tiny

The corpus defaults to builtin:stdlib (this Python's standard-library
source, on every machine); any text with --config.data.path=FILE.

The argument picks the variant: vanilla, basic_cycle, head_tail_cycle or ztt.
"""

from ztt_jax import configlib


def get_config(variant: str = 'ztt'):
  config = configlib.base_config(variant)
  config.model.update(d_model=32, n_heads=4, n_head_layers=1, n_mid_layers=2,
                      n_tail_layers=1, n_cycles=3)
  config.data.update(path='builtin:stdlib',
                     tokenizer='char', seq_len=32)
  config.train.update(steps=20, batch_size=8, lr=3e-3, warmup_steps=5,
                      log_every_steps=5, eval_every_steps=10, eval_batches=2)
  config.checkpoint.update(every_steps=10, keep=3)
  config.sample.update(max_new_tokens=32)
  return config
