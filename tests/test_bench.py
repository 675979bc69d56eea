"""ztt-bench reports consistent numbers for a tiny config (no timing
targets here: those are measured by running the benchmark, not in tests)."""

import pytest

from configs import tiny
from ztt_jax import bench
from ztt_jax import model


def test_bench_numbers_are_consistent():
  config = tiny.get_config('ztt')
  r = bench.bench(config, steps=3, warmup=1)
  b, t = config.train.batch_size, config.data.seq_len
  assert r['tokens_per_s'] == pytest.approx(b * t / r['step_s_median'])
  assert r['step_s_min'] <= r['step_s_median'] <= r['step_s_max']
  cfg = dict(config.model, vocab_size=65)
  assert r['flops_per_token'] == model.flops_per_token(cfg, t)
  assert r['mfu'] == pytest.approx(
      r['achieved_flops_per_s'] / r['matmul_peak_flops_per_s'])
  assert 0 < r['mfu'] < 1.5
  assert r['compile_s'] > 0 and r['temp_size_in_bytes'] > 0
  assert r['params'] == model.count_params(
      model.abstract_params(model.build(cfg)))
