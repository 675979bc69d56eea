"""ztt-bench's numbers against expectations worked out by hand: FLOPs and
params counted from the tiny config's shapes, and the timings, ratios and
targets from a scripted clock and peak (no timing targets here: those are
measured by running the benchmark, not in tests)."""

import types

import pytest

from configs import tiny
from ztt_jax import bench
from ztt_jax import metrics
from ztt_jax.commands import bench as bench_command
from ztt_jax.errors import ConfigError

# The tiny ZTT config, by hand: d=32, 4 heads of 8, SwiGLU width 96, char
# vocabulary 65, T=32, batch 8; 1 head layer, 2 middle layers cycled 3
# times, 1 tail layer, tied embeddings, RMSNorm without bias.
B, T = 8, 32
TINY_LAYER = 4 * 32 * 32 + 3 * 32 * 96  # Matmul weights of one layer.
# Train FLOPs per token: 10 layers run (1 head, 3 cycles x 2, the tail once
# per exit head), each with 4 * T * 32 attention FLOPs; the LM head runs per
# exit head; the zero token's logit costs 4 * 32 per cycled layer; training
# is 3 x forward.
TINY_FLOPS_PER_TOKEN = 3 * (2 * TINY_LAYER * 10 + 2 * 32 * 65 * 3
                            + 4 * T * 32 * 10 + 4 * 32 * 3 * 2)
# Head-tail cycling: the same 8 layers once, one LM head, no zero token.
HTC_FLOPS_PER_TOKEN = 3 * (2 * TINY_LAYER * 8 + 2 * 32 * 65
                           + 4 * T * 32 * 8)
# ZTT without exit heads: HTC's FLOPs plus the zero token's logits.
BARE_ZTT_FLOPS_PER_TOKEN = HTC_FLOPS_PER_TOKEN + 3 * 4 * 32 * 3 * 2
# Params: 4 distinct layers (matmuls and two norm scales each), the
# embedding, the final norm, the gate (a vector and a bias per cycle) and
# the zero keys (cycles x middle layers x heads x head dim).
TINY_PARAMS = (4 * (TINY_LAYER + 2 * 32) + 65 * 32 + 32 + 3 * (32 + 1)
               + 3 * 2 * 4 * 8)


def scripted_clock(monkeypatch, *readings):
  """bench's `time.perf_counter` returns `readings` in order (and fails the
  test if bench reads it more often)."""
  it = iter(readings)
  monkeypatch.setattr(bench, 'time',
                      types.SimpleNamespace(perf_counter=lambda: next(it)))


def test_bench_numbers_from_a_scripted_clock(monkeypatch):
  # Lower 1.5 s, compile 2.5 s, then three steps of 0.5, 0.125 and 0.25 s
  # (binary fractions: the expectations below are exact).
  scripted_clock(monkeypatch, 100.0, 101.5, 104.0,
                 200.0, 200.5, 300.0, 300.125, 400.0, 400.25)
  r = bench.bench(tiny.get_config('ztt'), steps=3, warmup=1, peak=1e9)
  assert (r['trace_lower_s'], r['compile_s']) == (1.5, 2.5)
  assert (r['step_s_min'], r['step_s_median'], r['step_s_max']) == (
      0.125, 0.25, 0.5)
  assert r['tokens_per_s'] == B * T * 4
  assert r['flops_per_token'] == TINY_FLOPS_PER_TOKEN
  assert r['achieved_flops_per_s'] == TINY_FLOPS_PER_TOKEN * B * T * 4
  assert r['mfu'] == pytest.approx(TINY_FLOPS_PER_TOKEN * B * T * 4 / 1e9)
  assert r['devices'] == 1 and r['matmul_peak_flops_per_s'] == 1e9
  assert r['params'] == TINY_PARAMS
  assert r['mlp_matmul_shape'] == [B * T, 32, 96]
  # The compiled step's buffers: at least the params (float32) in and out.
  assert r['argument_size_in_bytes'] >= 4 * TINY_PARAMS
  assert r['temp_size_in_bytes'] > 0


@pytest.mark.slow(22)
def test_compare_reports_ratios_and_targets(monkeypatch):
  monkeypatch.setattr(metrics, 'measure_matmul_peak', lambda **_: 1e6)
  # One timed step each: ZTT 0.5 s, HTC 0.25 s, ZTT without exit heads
  # 0.375 s; then compiles at 1 cycle (2 s) and 3 cycles (2.5 s).
  scripted_clock(monkeypatch, 0.0, 1.0, 2.0, 10.0, 10.5,
                 0.0, 1.0, 2.0, 20.0, 20.25,
                 0.0, 1.0, 2.0, 30.0, 30.375,
                 0.0, 1.0, 3.0, 0.0, 1.0, 3.5)
  r = bench.compare(tiny.get_config('ztt'), steps=1, warmup=0,
                    baseline='head_tail_cycle', compile_cycles=(1, 3))
  base, bare = r['baseline'], r['ztt_without_exit_heads']
  assert base['config'] == 'head_tail_cycle'
  assert (r['flops_per_token'], base['flops_per_token'],
          bare['flops_per_token']) == (
              TINY_FLOPS_PER_TOKEN, HTC_FLOPS_PER_TOKEN,
              BARE_ZTT_FLOPS_PER_TOKEN)
  # HTC lacks the gate and the zero keys; dropping exit heads keeps params.
  assert base['params'] == TINY_PARAMS - 3 * 33 - 3 * 2 * 4 * 8
  assert bare['params'] == TINY_PARAMS
  assert r['step_ratio_vs_baseline'] == 2.0
  assert r['step_ratio_without_exit_heads_vs_baseline'] == 1.5
  assert r['compile_s_by_cycles'] == {'1': 2.0, '3': 2.5}
  assert r['compile_ratio'] == 1.25
  mfu = TINY_FLOPS_PER_TOKEN * B * T / 0.5 / 1e6
  assert r['targets'] == {
      'mfu': dict(value=pytest.approx(mfu), target='>= 0.5', met=True),
      'ztt_over_head_tail_cycle_step_time': dict(
          value=2.0, target='<= 1.05', met=False),
      'ztt_without_exit_heads_over_head_tail_cycle_step_time': dict(
          value=1.5, target='<= 1.05', met=False),
      'compile_3_over_1_cycles': dict(value=1.25, target='<= 1.3', met=True)}


def test_bad_compile_cycles_is_a_config_error():
  with pytest.raises(ConfigError, match='compile_cycles'):
    bench_command.cycle_counts('8')
  assert bench_command.cycle_counts('2,8') == (2, 8)
  assert bench_command.cycle_counts('') == ()


def test_bad_attention_baseline_fails_before_any_timing():
  with pytest.raises(ConfigError, match='--attention_baseline=.flash.') as e:
    bench.compare(tiny.get_config('ztt'), attention_baseline='flash')
  assert '\n' not in str(e.value)
