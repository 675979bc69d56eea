"""Fine-tune a converted pretrained checkpoint (docs/FINETUNE.md).

ztt-convert --hf_dir=models/gpt2 --workdir=runs/gpt2-ztt --variant=ztt \
    --n_mid_layers=5 --n_cycles=2
ztt-train --config=configs/finetune.py:runs/gpt2-ztt --workdir=runs/gpt2-ft

The argument is the ztt-convert --workdir. The model section is copied from
the config saved there, and `init_from` makes ztt-train start from its params
(with a fresh optimizer state) when the fine-tune workdir has no checkpoint
yet; later runs in the same workdir resume as usual. The data is tokenized
with the source model's own tokenizer when ztt-convert recorded it (a
tokenizer.json or tokenizer.model in the Hugging Face directory); else
bytes: exact for models converted with a 256-token byte vocabulary, while a
pretrained BPE model (GPT-2, Llama) would read the bytes as its first 256
ids, which is not its tokenizer (see docs/FINETUNE.md).
"""

from ztt_jax import configlib
from ztt_jax import convert
from ztt_jax.errors import check


def get_config(init_from: str = ''):
  check(bool(init_from), 'configs/finetune.py needs the converted directory: '
        '--config=configs/finetune.py:OUT, OUT being the ztt-convert --workdir')
  model = convert.converted_model_config(init_from)
  config = configlib.base_config(model.variant)
  config.model.update(model.to_dict())
  config.init_from = init_from  # Params to start from (ztt-convert output).
  seq_len = 128
  if config.model.positions == 'learned':
    seq_len = min(seq_len, config.model.max_seq_len)
  config.data.update(path='builtin:stdlib', tokenizer='byte', seq_len=seq_len)
  recorded = convert.converted_tokenizer(init_from)
  if recorded:
    config.data.update(tokenizer=recorded[0], tokenizer_path=recorded[1])
  config.train.update(steps=200, batch_size=8, lr=1e-4, warmup_steps=20,
                      weight_decay=0.0, log_every_steps=10,
                      eval_every_steps=100, eval_batches=4)
  config.checkpoint.update(every_steps=100, keep=2)
  config.sample.update(max_new_tokens=64)
  return config
