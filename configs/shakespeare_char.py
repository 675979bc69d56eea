"""tinyshakespeare at character level, nanoGPT's split and CPU-scale budget.

ztt-train --config=configs/shakespeare_char.py:ztt --workdir=runs/shakespeare_ztt \
    --config.data.path=tinyshakespeare.txt
ztt-train --config=configs/shakespeare_char.py:head_tail_cycle \
    --workdir=runs/shakespeare_htc --config.data.path=tinyshakespeare.txt

tinyshakespeare is nanoGPT's shakespeare_char text (1.1 MB, from Karpathy's
char-rnn repository): get it with
  curl -o tinyshakespeare.txt https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
Without --config.data.path the run stops at once with one line asking for it.

Reference (nanoGPT shakespeare_char, CPU setting): 4 layers x 128 wide,
context 64, batch 12, 2000 iterations, val loss about 1.88. Here the same
distinct layers (1 head + 2 middle + 1 tail, 128 wide) run with the middle
pair cycled 3 times, under the same token budget.
"""

from ztt_jax import configlib


def get_config(variant: str = 'ztt'):
  config = configlib.base_config(variant)
  config.model.update(d_model=128, n_heads=4, n_head_layers=1, n_mid_layers=2,
                      n_tail_layers=1, n_cycles=3, dropout=0.0)
  config.data.update(path='',  # No default: pass the text (see above).
                     tokenizer='char', seq_len=64)
  config.train.update(steps=2000, batch_size=12, lr=1e-3, warmup_steps=100,
                      min_lr_ratio=0.1, weight_decay=0.1, b2=0.99,
                      log_every_steps=100, eval_every_steps=250,
                      eval_batches=20)
  config.checkpoint.update(every_steps=500, keep=2)
  config.sample.update(max_new_tokens=300, temperature=0.8)
  return config
