"""ztt-prepare: tokenize a corpus once into token shards that training reads.

    ztt-prepare --config=configs/default.py \\
        --config.data.path='/data/corpus/*.jsonl' --output=/data/prepared
    ztt-train --config=configs/default.py --workdir=runs/big \\
        --config.data.path=/data/prepared

Reads the text files, directories, globs or .jsonl files (the
data.jsonl_field of each record) that data.path names, streaming, in
parallel processes, and writes flat token shards, the tokenizer and
manifest.json into --output (a new directory; nothing is overwritten). The
tokenizer comes from the config's data section: data.tokenizer, and
data.tokenizer_path for an existing SentencePiece .model or Hugging Face
tokenizer.json. Training from the directory reads only the windows it
samples. Runs `shards.write_shards`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

from ztt_jax.commands import common

PROG = 'ztt-prepare'


@dataclasses.dataclass(frozen=True)
class Options:
  config: str = common.config_flag()
  output: str = common.flag(
      None, 'The directory to write (new or empty): shards, tokenizer, '
      'manifest.json.', required=True, metavar='DIR')
  workers: int = common.flag(0, 'Processes; 0: one per CPU core.')
  shard_mb: float = common.flag(
      64, 'About this many MB of text per shard (and per work unit).')
  verify: bool = common.flag(
      False, 'Instead of preparing: hash the shards of --output against its '
      'manifest and say which differ (exit 1 if any).')


def main(argv: Sequence[str] | None = None) -> None:
  """`ztt-prepare [flags]`; `argv` defaults to `sys.argv[1:]`."""
  options, overrides = common.parse(Options, argv, PROG, __doc__,
                                    common.CONFIG_FILE)
  code = common.run(PROG, lambda: _prepare(options, overrides))
  if code:
    sys.exit(code)


def _prepare(options: Options, overrides: dict[str, str]) -> int:
  # After the flags: --help and flag errors do not wait for imports.
  from ztt_jax import configlib, shards  # pylint: disable=g-import-not-at-top
  if options.verify:
    bad = shards.verify(options.output)
    print(f'{PROG}: {options.output}: ' + (
        f'{len(bad)} shard(s) differ from the manifest: {", ".join(bad)}'
        if bad else 'every shard matches the manifest'))
    return 1 if bad else 0
  config = configlib.override(configlib.from_file(options.config), overrides)
  shards.write_shards(config.data, options.output, options.workers,
                 options.shard_mb)
  return 0


if __name__ == '__main__':
  main()
