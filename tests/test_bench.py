"""ztt-bench reports consistent numbers for a tiny config (no timing
targets here: those are measured by running the benchmark, not in tests)."""

import time

import pytest

from configs import tiny
from ztt_jax import bench
from ztt_jax import model
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax.commands import bench as bench_command
from ztt_jax.errors import ConfigError


# Train FLOPs per token of the tiny ZTT config, by hand (d=32, 4 heads of
# 8, SwiGLU width 96, char vocabulary 65, T=32): a layer's matmuls hold
# 4 * 32 * 32 + 3 * 32 * 96 weights; 10 layers run (1 head, 3 cycles x 2,
# the tail once per exit head), each with 4 * T * 32 attention FLOPs; the LM
# head runs per exit head; the zero token's logit costs 4 * 32 per cycled
# layer; training is 3 x forward.
TINY_LAYER = 4 * 32 * 32 + 3 * 32 * 96
TINY_FLOPS_PER_TOKEN = 3 * (2 * TINY_LAYER * 10 + 2 * 32 * 65 * 3
                            + 4 * 32 * 32 * 10 + 4 * 32 * 3 * 2)


def test_bench_numbers_are_consistent():
  config = tiny.get_config('ztt')
  start = time.perf_counter()
  r = bench.bench(config, steps=3, warmup=1)
  wall = time.perf_counter() - start
  b, t = config.train.batch_size, config.data.seq_len
  assert r['tokens_per_s'] == pytest.approx(b * t / r['step_s_median'])
  assert r['step_s_min'] <= r['step_s_median'] <= r['step_s_max']
  cfg = dict(config.model, vocab_size=65)
  assert r['flops_per_token'] == TINY_FLOPS_PER_TOKEN
  assert r['achieved_flops_per_s'] == pytest.approx(
      TINY_FLOPS_PER_TOKEN * b * t / r['step_s_median'])
  assert r['devices'] == 1 and r['mfu'] == pytest.approx(
      TINY_FLOPS_PER_TOKEN * b * t / r['step_s_median']
      / r['matmul_peak_flops_per_s'])
  # Lowering, compiling and the timed steps happened inside this call, in
  # seconds (the test's own clock bounds their sum).
  assert 0 < r['trace_lower_s'] and 0 < r['compile_s']
  assert r['trace_lower_s'] + r['compile_s'] + 3 * r['step_s_min'] < wall
  assert r['mlp_matmul_shape'] == [b * t, config.model.d_model,
                                   model_config.ModelConfig.from_config(
                                       cfg).resolved_d_ff]
  assert r['mlp_matmul_over_peak'] == pytest.approx(
      r['mlp_matmul_flops_per_s'] / r['matmul_peak_flops_per_s'])
  assert r['temp_size_in_bytes'] > 0
  assert r['params'] == params_lib.count_params(
      params_lib.abstract_params(model.build(cfg)))


@pytest.mark.slow(22)
def test_compare_reports_ratios_and_targets():
  config = tiny.get_config('ztt')
  r = bench.compare(config, steps=1, warmup=0, baseline='head_tail_cycle',
                    compile_cycles=(1, 3))
  base = r['baseline']
  assert base['config'] == 'head_tail_cycle'
  assert base['matmul_peak_flops_per_s'] == r['matmul_peak_flops_per_s']
  assert r['step_ratio_vs_baseline'] == pytest.approx(
      r['step_s_median'] / base['step_s_median'])
  # Without exit heads ZTT counts fewer FLOPs; with them, more than HTC.
  bare = r['ztt_without_exit_heads']
  assert bare['flops_per_token'] < r['flops_per_token']
  assert base['flops_per_token'] < bare['flops_per_token']
  assert set(r['compile_s_by_cycles']) == {'1', '3'}
  assert r['compile_ratio'] == pytest.approx(
      r['compile_s_by_cycles']['3'] / r['compile_s_by_cycles']['1'])
  targets = r['targets']
  assert targets['mfu']['met'] == (r['mfu'] >= bench.MFU_TARGET)
  assert targets['compile_3_over_1_cycles']['value'] == r['compile_ratio']
  assert set(targets) == {
      'mfu', 'ztt_over_head_tail_cycle_step_time',
      'ztt_without_exit_heads_over_head_tail_cycle_step_time',
      'compile_3_over_1_cycles'}


def test_bad_compile_cycles_is_a_config_error():
  with pytest.raises(ConfigError, match='compile_cycles'):
    bench_command.cycle_counts('8')
  assert bench_command.cycle_counts('2,8') == (2, 8)
  assert bench_command.cycle_counts('') == ()


def test_bad_attention_baseline_fails_before_any_timing():
  with pytest.raises(ConfigError, match='--attention_baseline=.flash.') as e:
    bench.compare(tiny.get_config('ztt'), attention_baseline='flash')
  assert '\n' not in str(e.value)
