"""Peak memory of the train step with the cheaper exit heads, from XLA.

    python experiments/exit_head_memory.py [VARIANT] [--config.x.y=z ...]

Compiles (never runs) the train step of `configs/shakespeare_char.py:VARIANT`
(default ztt) with a 32k vocabulary on one local device, once per setting of
the exit-head loss (full logits; `model.ce_chunk_len`; `model.
exit_loss_fraction`; both), and prints `compiled.memory_analysis()`'s
temporaries and total per device as a markdown table. The figures are the
compiler's, not measured, so any machine gives the same ones for the same
jax version and platform. Overrides apply to every row.
"""

from __future__ import annotations

import os
import sys

import jax

from ztt_jax import compile as compile_lib
from ztt_jax import configlib

# The config file the rows start from (any working directory).
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'configs', 'shakespeare_char.py')

VOCAB_SIZE = 32768
# (label, model overrides): the exit-head loss settings compared.
SETTINGS = (
    ('full logits', {}),
    ('ce_chunk_len=16', {'ce_chunk_len': 16}),
    ('exit_loss_fraction=0.25', {'exit_loss_fraction': 0.25}),
    ('both', {'ce_chunk_len': 16, 'exit_loss_fraction': 0.25}),
)


def memory_rows(variant: str, overrides: dict[str, str]) -> list[dict]:
  rows = []
  for label, model_overrides in SETTINGS:
    config = configlib.from_file(f'{CONFIG}:{variant}')
    config = configlib.override(config, overrides)
    config.model.update(vocab_size=VOCAB_SIZE, **model_overrides)
    report = compile_lib.aot_compile(config, jax.devices()[:1])
    rows.append({'setting': label, **report})
  return rows


def format_table(rows: list[dict]) -> str:
  gib = lambda n: f'{n / compile_lib.GIB:.3f}'
  r0 = rows[0]
  lines = [
      f"{r0['variant']}, V={VOCAB_SIZE}, batch {r0['batch_size']} x "
      f"{r0['seq_len']}, {r0['params']:,} params, {r0['device_kind']} "
      '(compiled memory_analysis, GiB per device)',
      '| setting | temporaries | total |', '|---|---|---|']
  lines += [f"| {r['setting']} | {gib(r['temp_bytes'])} | "
            f"{gib(r['per_device_bytes'])} |" for r in rows]
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  variant = argv[0] if argv and not argv[0].startswith('--') else 'ztt'
  overrides = dict(a.removeprefix('--config.').split('=', 1)
                   for a in argv if a.startswith('--config.'))
  print(format_table(memory_rows(variant, overrides)))


if __name__ == '__main__':
  main(sys.argv[1:])
