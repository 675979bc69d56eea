"""Tiny config for fast CPU tests: trains in seconds, char level.

ztt-train --config=configs/tiny.py:ztt --workdir=runs/tiny

The corpus defaults to this Python's top-level standard-library modules
(`<stdlib>/*.py`, 4.7 MB on 3.11, on every machine and all UTF-8, which the
char tokenizer needs; builtin:stdlib also holds test files in other
encodings); any text with --config.data.path=FILE.

The argument picks the variant: vanilla, basic_cycle, head_tail_cycle or ztt.
"""

import os
import sysconfig

from ztt_jax import configlib


def get_config(variant: str = 'ztt'):
  config = configlib.base_config(variant)
  config.model.update(d_model=32, n_heads=4, n_head_layers=1, n_mid_layers=2,
                      n_tail_layers=1, n_cycles=3)
  stdlib_py = os.path.join(sysconfig.get_paths()['stdlib'], '*.py')
  config.data.update(path=stdlib_py,
                     tokenizer='char', seq_len=32)
  config.train.update(steps=20, batch_size=8, lr=3e-3, warmup_steps=5,
                      log_every_steps=5, eval_every_steps=10, eval_batches=2)
  config.checkpoint.update(every_steps=10, keep=3)
  config.sample.update(max_new_tokens=32)
  return config
