"""ztt-convert: a Hugging Face GPT-2 / Llama-family checkpoint as ZTT.

    ztt-convert --hf_dir=models/gpt2 --workdir=runs/gpt2-ztt --variant=ztt \\
        --n_mid_layers=5 --n_cycles=2
    ztt-train --config=configs/finetune.py:runs/gpt2-ztt --workdir=runs/ft

Reads a local save_pretrained directory (never the network) and writes
WORKDIR/checkpoints/0 and WORKDIR/convert.json. convert.py explains the
layer map and how the zero keys and gate start; docs/FINETUNE.md the rest.
Runs `convert.convert`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ztt_jax.commands import common

PROG = 'ztt-convert'


@dataclasses.dataclass(frozen=True)
class Options:
  hf_dir: str = common.flag(
      None, 'Local Hugging Face model directory (config.json and '
      '*.safetensors).', required=True, metavar='DIR')
  workdir: str = common.flag(None, 'Where to write the ZTT checkpoint (a '
                             'new directory).', required=True, metavar='DIR')
  variant: str = common.flag(
      'ztt', 'Target variant: vanilla, basic_cycle, head_tail_cycle or ztt.')
  n_head_layers: int | None = common.flag(
      None, 'Head layers; unset: 1 (0 for basic_cycle).')
  n_mid_layers: int | None = common.flag(
      None, 'Middle stack layers; unset: every replaced layer for vanilla, '
      'else a 1/n_cycles share.')
  n_tail_layers: int | None = common.flag(
      None, 'Tail layers; unset: 1 (0 for basic_cycle).')
  n_cycles: int | None = common.flag(
      None, 'Cycles of the middle stack; unset: 2 (1 for vanilla).')
  mid_init: str = common.flag(
      'block', 'How the shared stack starts from the layers it replaces: '
      'block or average.')
  zero_init: str = common.flag(
      'suppress', 'How zero keys start: suppress, zero or random.')
  zero_mass: float = common.flag(
      0.01, 'Target mean zero-token mass for --zero_init=suppress.')
  gate_bias: float = common.flag(
      6.0, 'Initial gate bias (sigmoid(6) = 0.9975).')
  zero_pool: str = common.flag('auto', 'model.zero_pool of the result.')
  gate: str = common.flag('auto', 'model.gate of the result.')
  exit_loss: str = common.flag('auto', 'model.exit_loss of the result.')
  calib_data: str = common.flag(
      'builtin:stdlib', 'Text whose bytes calibrate the zero keys and the '
      'report (a data.path), or random (uniform token ids).')
  seed: int = common.flag(0, 'Seed of the calibration windows.')


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-convert [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, _ = common.parse(Options, argv, PROG, __doc__)
  common.run(PROG, lambda: _convert(options))


def _convert(options: Options) -> None:
  # After the flags: --help and flag errors do not wait for jax.
  from ztt_jax import convert  # pylint: disable=g-import-not-at-top
  convert.convert(**dataclasses.asdict(options))


if __name__ == '__main__':
  main()
