"""Does a zero-token exit statistic measure position? Old against new.

    python experiments/position.py --workdir=runs/demo \
        --out=docs/results/position

For each zero-token statistic (`zero_attention`, the softmax mass a0;
`zero_weight`, log((t+1) a0 / (1 - a0)), see attention.zero_log_weight; and
`zero_margin`, the zero logit minus the strongest key's, see
attention.zero_token_attention) on the validation batches of a trained ZTT
workdir:

* how much of the statistic's per-token variance position explains (R^2 of
  the per-position means, after cycle 1, from one full pass);
* per-token exits through cached decoding (`ztt-eval --per=token`) at the
  statistic's quartiles: mean cycles by position bucket.

Writes OUT.json and OUT.md (a table per statistic) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import ztt_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ztt_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from ztt_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position

STATISTICS = ('zero_attention', 'zero_weight', 'zero_margin')


def position_r2(stat_NxT: np.ndarray) -> float:
  """Share of the per-token variance explained by the per-position mean."""
  total = np.var(stat_NxT)
  within = np.mean(np.var(stat_NxT, axis=0))
  return float(1 - within / total) if total > 0 else 0.0


def buckets(seq_len: int) -> list[tuple[int, int]]:
  """Position ranges 0-1, 2-3, 4-7, ... up to seq_len (doubling)."""
  edges, lo, hi = [], 0, 2
  while lo < seq_len:
    edges.append((lo, min(hi, seq_len)))
    lo, hi = hi, hi * 2
  return edges


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', default='docs/results/position')
  p.add_argument('--batches', type=int, default=0)
  p.add_argument('--n_thresholds', type=int, default=3)
  args = p.parse_args()
  # zero_margin needs the explicit logits, whatever attention trained.
  module, params, config = ztt_jax.load(args.workdir,
                                        overrides={'model.attention': 'xla'})
  corpus = data.load_corpus(config.data, args.workdir)
  batches = [jax.tree.map(jnp.asarray, b) for b in data.eval_batches(
      corpus.val_N, config.data.seq_len, config.train.batch_size,
      args.batches or config.train.eval_batches)]
  t = config.data.seq_len
  result = {'workdir': args.workdir,
            'sequences': sum(b['inputs'].shape[0] for b in batches),
            'seq_len': t, 'statistics': {}}
  lines = []
  for name in STATISTICS:
    stats = [jax.device_get(evaluate.token_statistics(module, params, b))
             for b in batches]
    stat_CxNxT = np.concatenate([s[name] for s in stats], axis=1)
    r2 = [position_r2(stat_CxNxT[c]) for c in range(stat_CxNxT.shape[0])]
    _, rows = evaluate.early_exit_sweep(
        module, params, batches, name, args.n_thresholds, per='token')
    ruled = [r for r in rows if r['criterion'] == name]
    result['statistics'][name] = dict(position_r2_by_cycle=r2, rows=ruled)
    lines += [f'### {name}', '',
              'Share of per-token variance explained by position, by cycle: '
              + ', '.join(f'{x:.2f}' for x in r2), '',
              '| threshold | val loss | mean cycles | '
              + ' | '.join(f'pos {lo}-{hi - 1}' for lo, hi in buckets(t))
              + ' |', '|---' * (3 + len(buckets(t))) + '|']
    for r in ruled:
      by_pos = np.asarray(r['mean_cycles_by_position'])
      lines.append(f"| {r['threshold']:.4g} | {r['val_loss']:.4f} | "
                   f"{r['mean_cycles']:.2f} | " + ' | '.join(
                       f'{by_pos[lo:hi].mean():.2f}'
                       for lo, hi in buckets(t)) + ' |')
    lines.append('')
  text = '\n'.join(lines)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + '.json', 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  with open(args.out + '.md', 'w', encoding='utf-8') as f:
    f.write(f'<!-- python experiments/position.py --workdir={args.workdir} '
            f'--out={args.out} -->\n\n' + text)
  print(text)


if __name__ == '__main__':
  main()
