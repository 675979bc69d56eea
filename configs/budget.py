"""Fixed parameter budgets (125M, 350M, 1B) for pod pretraining, every variant.

ztt-train --config=configs/budget.py:125m,ztt --workdir=runs/125m_ztt \
    --config.data.path='/data/corpus/*.txt'

The argument is `SIZE[,VARIANT]`: SIZE one of 125m, 350m, 1b; VARIANT one of
vanilla, basic_cycle, head_tail_cycle, ztt (default ztt). Check that a budget
fits a TPU slice before renting it, from any CPU machine:

ztt-compile --config=configs/budget.py:1b,ztt --topology=v5e:16x16

Every variant of a size has the same distinct layers and width, so the same
parameter count (within 1% of the budget; ztt adds its zero-key pool and
gate, under 0.1%); they differ in how often the layers run per token:

| size | d_model | heads | d_ff | distinct layers (head+mid+tail) | layers run per token: vanilla / basic_cycle / head_tail_cycle, ztt |
|---|---|---|---|---|---|
| 125m | 768 | 12 | 2048 | 1 + 12 + 1 = 14 | 14 / 28 / 26 |
| 350m | 1024 | 16 | 2752 | 1 + 23 + 1 = 25 | 25 / 50 / 48 |
| 1b | 2048 | 16 | 5632 | 1 + 16 + 1 = 18 | 18 / 36 / 34 |

with `model.n_cycles=2` (override it: `--config.model.n_cycles=4`).
basic_cycle cycles all its layers; head_tail_cycle and ztt cycle the middle
stack only. Training FLOPs per token (`params.flops_per_token`, seq_len 2048)
are printed by `ztt-train` and `ztt-compile` and tabulated in the README.

Shared settings: a 32k SentencePiece vocabulary (`data.tokenizer=
'sentencepiece'`, trained on the training split, `model.vocab_size=32768`
fixed so every run and the compile check agree), tied embeddings, sequences
of 2048 tokens, 256 sequences per step (0.5M tokens), about 20 tokens per
parameter (Chinchilla), AdamW (b2=0.95, decay 0.1) with warmup + cosine,
bfloat16 compute with float32 params, full rematerialisation, and a fully
sharded (FSDP) mesh: `mesh.fsdp=-1` takes every device; add tensor
parallelism with e.g. `--config.mesh.fsdp=-1 --config.mesh.tensor=4`.
"""

from ztt_jax import configlib
from ztt_jax import model
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax.errors import check

# name: (budget, d_model, n_heads, d_ff, (head, mid, tail), lr, steps).
SIZES = {
    '125m': (125e6, 768, 12, 2048, (1, 12, 1), 6e-4, 5_000),
    '350m': (350e6, 1024, 16, 2752, (1, 23, 1), 3e-4, 13_500),
    '1b': (1e9, 2048, 16, 5632, (1, 16, 1), 2e-4, 38_000),
}
VOCAB_SIZE = 32768
SEQ_LEN = 2048
BATCH_SIZE = 256


def parse_arg(arg: str) -> tuple[str, str]:
  """'125m' or '125m,ztt' -> (size, variant); raises ConfigError."""
  parts = [p.strip() for p in (arg or '').split(',')]
  size = parts[0].lower()
  variant = parts[1] if len(parts) > 1 and parts[1] else 'ztt'
  check(len(parts) <= 2 and size in SIZES,
        f'configs/budget.py:{arg}: the argument is SIZE[,VARIANT] with SIZE '
        f'one of {", ".join(SIZES)}; e.g. configs/budget.py:125m,ztt')
  check(variant in model_config.VARIANTS,
        f'configs/budget.py:{arg}: variant {variant!r} is not one of '
        f'{", ".join(model_config.VARIANTS)}; e.g. configs/budget.py:{size},ztt')
  return size, variant


def get_config(arg: str = '125m'):
  size, variant = parse_arg(arg)
  _, d_model, n_heads, d_ff, (head, mid, tail), lr, steps = SIZES[size]
  config = configlib.base_config(variant)
  config.model.update(
      vocab_size=VOCAB_SIZE, d_model=d_model, n_heads=n_heads, d_ff=d_ff,
      n_head_layers=head, n_mid_layers=mid, n_tail_layers=tail, n_cycles=2,
      dtype='bfloat16', param_dtype='float32', remat_policy='full')
  config.data.update(tokenizer='sentencepiece', vocab_size=VOCAB_SIZE,
                     seq_len=SEQ_LEN)
  config.train.update(
      steps=steps, batch_size=BATCH_SIZE, lr=lr, warmup_steps=steps // 50,
      b2=0.95, weight_decay=0.1, log_every_steps=50, eval_every_steps=1000,
      eval_batches=16)
  config.checkpoint.update(every_steps=1000, keep=3)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.sample.update(max_new_tokens=64)
  return config
