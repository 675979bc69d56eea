"""The full set of config fields with their defaults, shared by `configs/`.

Files in `configs/` start from `base_config(variant)` and override what they
need; every field is documented here once.
"""

from __future__ import annotations

import ml_collections

from ztt_jax import model


def model_config(variant: str = 'ztt') -> ml_collections.ConfigDict:
  """`config.model`: every `model.ModelConfig` field, 'auto' where derived."""
  m = ml_collections.ConfigDict(
      {f: getattr(model.ModelConfig, f)
       for f in model.ModelConfig.__dataclass_fields__})
  m.variant = variant
  m.vocab_size = 0  # 0: the tokenizer's vocabulary size.
  # 'auto': cycle_layer / token / linear for ztt, none for the baselines.
  m.zero_pool = 'auto'
  m.gate = 'auto'
  m.exit_loss = 'auto'
  return m


def base_config(variant: str = 'ztt') -> ml_collections.ConfigDict:
  """Defaults for every field; configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Params init and data order.
  c.model = model_config(variant)

  c.data = ml_collections.ConfigDict()
  c.data.path = 'builtin:stdlib'  # File, directory, glob or builtin:stdlib.
  c.data.tokenizer = 'byte'  # byte | char | sentencepiece.
  c.data.vocab_size = 1024  # sentencepiece only.
  c.data.seq_len = 128
  c.data.val_fraction = 0.1  # Last fraction of the corpus (nanoGPT split).
  c.data.cache_dir = ''  # '': $ZTT_CACHE_DIR or ~/.cache/ztt_jax.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32  # Global, across all processes and devices.
  c.train.grad_accum_steps = 1  # Micro-batches per step (batch split).
  c.train.lr = 1e-3  # Peak learning rate.
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1  # Cosine decays to lr * min_lr_ratio.
  c.train.weight_decay = 0.1  # Not on norms, biases, zero keys, gates.
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.grad_clip = 1.0  # Global-norm clipping; 0 turns it off.
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 250  # 0: only at the end.
  c.train.eval_batches = 8  # Fixed validation batches per eval.
  c.train.peak_flops = 0.0  # Per-device FLOP/s for MFU; 0: measure matmul.
  # Non-finite loss or grads: 'stop' (save state + batch under
  # WORKDIR/nonfinite/, exit 1) or 'skip' (drop that update, go on).
  c.train.nan_policy = 'stop'
  c.train.inject_nan_at_step = -1  # Tests only: poison this step.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # Device mesh; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis -> mesh axes. The only place mesh axes are named.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (
      ('activation_batch', ('data', 'fsdp')),
      ('activation_length', None),
      ('activation_embed', None),
      ('activation_mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),  # Key/value heads under grouped-query attention.
      ('kv', None),
      ('mlp', 'tensor'),
      ('layers', None),
      ('cycles', None),
      ('positions', None),  # Rows of a learned position table.
  )

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = ''  # '' : the start of the validation split.
  c.sample.max_new_tokens = 200
  c.sample.temperature = 0.8
  c.sample.top_k = 0  # 0: off.
  return c
