"""Preparing and reading a large corpus: ztt-prepare shards against today's
in-memory path (read whole, hash, tokenize into the cache).

    python experiments/data_bench.py --size_mb=1024 --dir=/tmp/ztt_data_bench

On a quiet machine. Builds a corpus of --size_mb MB under --dir (the
running Python's standard-library source, concatenated and repeated into
64 MB files; reused when already there), then, each in a fresh process:

* in-memory, first start: data.load_corpus with an empty token cache (read,
  hash, tokenize, write the cache);
* in-memory, next start: data.load_corpus again (read and hash everything, load
  the cached tokens);
* ztt-prepare: shards.write_shards with --workers processes;
* prepared, start: data.load_corpus of the prepared directory and the first
  --batches training batches.

Prints a markdown table: seconds (after imports), tokens/s where it
tokenizes, and peak RSS of the process (and of its largest worker). Delete
--dir afterwards (about 3x --size_mb of disk for byte tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import sysconfig
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
FILE_MB = 64


def make_corpus(root: pathlib.Path, size_mb: int) -> pathlib.Path:
  """--size_mb MB of Python source in 64 MB files under root/corpus."""
  corpus = root / 'corpus'
  done = corpus / '.complete'
  if done.exists() and done.read_text() == str(size_mb):
    return corpus
  shutil.rmtree(corpus, ignore_errors=True)
  corpus.mkdir(parents=True)
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  texts = [p.read_bytes() for p in sorted(stdlib.glob('*.py'))]
  left, index = size_mb << 20, 0
  while left > 0:
    size = min(FILE_MB << 20, left)
    with open(corpus / f'part_{index:04d}.txt', 'wb') as f:
      written = 0
      while written < size:
        for text in texts:
          chunk = text[:size - written]
          f.write(chunk)
          written += len(chunk)
          if written >= size:
            break
    left -= size
    index += 1
  done.write_text(str(size_mb))
  return corpus


def _peak_mb(who: int) -> float:
  return resource.getrusage(who).ru_maxrss / 1024  # KB on Linux.


def child(task: dict) -> dict:
  """One measurement, in this (fresh) process."""
  # pylint: disable=g-import-not-at-top
  from ztt_jax import configlib, data, shards
  config = configlib.base_config().data
  config.update(path=task['path'], tokenizer=task['tokenizer'],
                cache_dir=task['cache_dir'], seq_len=128)
  start = time.perf_counter()
  tokens = None
  if task['kind'] == 'prepare':
    manifest = shards.write_shards(config, task['output'], task['workers'],
                              log=lambda _: None)
    tokens = manifest['n_tokens']
  else:
    corpus = data.load_corpus(config, task['workdir'])
    tokens = len(corpus.train_N) + len(corpus.val_N)
    dataset = data.make_train_dataset(corpus.train_N, 128, 32, 0)
    for step in range(task['batches']):
      dataset[step]  # pylint: disable=pointless-statement
  seconds = time.perf_counter() - start
  return {'seconds': seconds, 'tokens': tokens,
          'rss_mb': _peak_mb(resource.RUSAGE_SELF),
          'worker_rss_mb': _peak_mb(resource.RUSAGE_CHILDREN)}


def measure(task: dict) -> dict:
  result = subprocess.run(
      [sys.executable, __file__, '--child', json.dumps(task)],
      capture_output=True, text=True, cwd=REPO, check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu',
           'PYTHONPATH': str(REPO)})
  if result.returncode:
    sys.exit(f'data_bench.py: {task["kind"]} failed:\n{result.stderr}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size_mb', type=int, default=1024)
  p.add_argument('--dir', default='/tmp/ztt_data_bench')
  p.add_argument('--tokenizer', default='byte', choices=('byte', 'char'))
  p.add_argument('--workers', type=int, default=0, help='0: one per core.')
  p.add_argument('--batches', type=int, default=10)
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  root = pathlib.Path(args.dir)
  started = time.perf_counter()
  corpus = make_corpus(root, args.size_mb)
  print(f'corpus: {args.size_mb} MB in {corpus} '
        f'({time.perf_counter() - started:.0f}s to make or find)')
  for name in ('cache', 'work_text', 'work_prepared', 'prepared'):
    shutil.rmtree(root / name, ignore_errors=True)
  base = dict(tokenizer=args.tokenizer, cache_dir=str(root / 'cache'),
              batches=args.batches, workers=args.workers)
  text = dict(base, path=str(corpus), workdir=str(root / 'work_text'))
  rows = [
      ('in-memory, first start (tokenize + cache)',
       measure(dict(text, kind='start'))),
      ('in-memory, next start (read + hash, cached)',
       measure(dict(text, kind='start'))),
      (f'ztt-prepare ({args.workers or os.cpu_count()} workers)',
       measure(dict(base, kind='prepare', path=str(corpus),
                    output=str(root / 'prepared')))),
      ('prepared directory, start',
       measure(dict(base, kind='start', path=str(root / 'prepared'),
                    workdir=str(root / 'work_prepared')))),
  ]
  print(f'\n{args.size_mb} MB, {args.tokenizer} tokens, first '
        f'{args.batches} batches of 32 x 128 included in the starts:\n')
  print('| path | seconds | tokens/s | peak RSS (MB) | largest worker (MB) |')
  print('|---|---|---|---|---|')
  for name, r in rows:
    tokenizes = name.startswith(('ztt-prepare', 'in-memory, first'))
    rate = f'{r["tokens"] / r["seconds"]:,.0f}' if tokenizes else '-'
    worker = f'{r["worker_rss_mb"]:.0f}' if r['worker_rss_mb'] else '-'
    print(f'| {name} | {r["seconds"]:.1f} | {rate} | {r["rss_mb"]:.0f} | '
          f'{worker} |')


if __name__ == '__main__':
  main()
