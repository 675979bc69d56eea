"""README demo: a small ZTT on the Python standard library, a few minutes on 2 CPU cores.

ztt-train --config=configs/default.py --workdir=runs/demo

Byte-level tokens over the running Python's standard-library sources (present
on every machine, no download). The argument picks the variant, e.g.
`configs/default.py:head_tail_cycle`.
"""

from ztt_jax import configlib


def get_config(variant: str = 'ztt'):
  config = configlib.base_config(variant)
  config.model.update(d_model=128, n_heads=4, n_head_layers=1, n_mid_layers=2,
                      n_tail_layers=1, n_cycles=3)
  config.data.update(path='builtin:stdlib', tokenizer='byte', seq_len=64)
  config.train.update(steps=600, batch_size=16, lr=3e-3, warmup_steps=50,
                      log_every_steps=25, eval_every_steps=200,
                      eval_batches=8)
  config.checkpoint.update(every_steps=200, keep=2)
  config.sample.update(max_new_tokens=120, temperature=0.7,
                       prompt='def main():\n    ')
  return config
