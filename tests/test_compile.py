"""ztt-compile: the sharded train step compiled ahead of time, no arrays."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from configs import budget
from configs import tiny
from ztt_jax import compile as compile_lib
from ztt_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.fixture(autouse=True)
def _restore_environment():
  """compile.py names this host a TPU worker for libtpu (os.environ): keep
  that out of later tests in the same process, whose subprocesses would
  otherwise look like Cloud TPU workers."""
  saved = dict(os.environ)
  yield
  os.environ.clear()
  os.environ.update(saved)


def test_parse_topology_and_hbm():
  assert compile_lib.parse_topology('v5e:16x16') == ('v5e', (16, 16))
  assert compile_lib.parse_topology('v5p:2x2x1') == ('v5p', (2, 2, 1))
  gib = compile_lib.GIB
  assert compile_lib.hbm_bytes_per_device('v5e', 4, 4) == 16 * gib
  assert compile_lib.hbm_bytes_per_device('v5p', 8, 8) == 95 * gib
  # v4 shows each of a chip's two TensorCores as a device.
  assert compile_lib.hbm_bytes_per_device('v4', 4, 8) == 16 * gib
  for bad in ('v5e', 'v9:2x2', 'v5e:2x', 'tpu:2x2', 'v5e:0x2'):
    with pytest.raises(ConfigError, match='--topology') as e:
      compile_lib.parse_topology(bad)
    assert '\n' not in str(e.value)


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu'
                      else real(name, *a))
  with pytest.raises(ConfigError, match=r'pip install -e "\.\[tpu\]"') as e:
    compile_lib.compile_for_topology(budget.get_config('125m'), 'v5e:2x2')
  assert '\n' not in str(e.value)


def test_cli_bad_topology_is_one_line_exit_2():
  result = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.compile',
       f'--config={REPO}/configs/budget.py:125m', '--topology=v9:2x2'],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines() if 'error' in l.lower()]
  assert len(errors) == 1 and '--topology' in errors[0], result.stderr
  assert 'Traceback' not in result.stderr


def test_libtpu_settings_do_not_leak(monkeypatch):
  monkeypatch.setattr(compile_lib.glob, 'glob', lambda pattern: [])
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES', raising=False)
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', 'mine')
  with compile_lib._libtpu_without_tpus():
    assert os.environ['TPU_WORKER_HOSTNAMES'] == 'localhost'
    assert os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] == 'mine'
  # Child processes (ztt-train) must not think they are on a TPU pod.
  assert 'TPU_WORKER_HOSTNAMES' not in os.environ
  assert os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] == 'mine'


def test_roofline_by_hand():
  v5p = compile_lib.PEAK_PER_CHIP['v5p']
  assert (v5p.flops_per_s, v5p.hbm_bytes_per_s) == (459e12, 2765e9)
  # 4.59e12 FLOPs take 10 ms at peak; 13.825 GB take 5 ms: compute-bound,
  # and 3.672e12 model FLOPs (80% of those run) bound MFU at 80%.
  est = compile_lib.roofline(4.59e12, 13.825e9, 3.672e12, v5p)
  assert est['roofline_step_s'] == pytest.approx(0.010)
  assert est['roofline_bound'] == 'compute'
  assert est['mfu_upper_bound'] == pytest.approx(0.8)
  # Twice the bytes and XLA's FLOPs undercounted (a scanned loop counted
  # once): memory-bound at 10 ms, the model FLOPs' 8 ms bound MFU at 80%.
  est = compile_lib.roofline(1e12, 27.65e9, 3.672e12, v5p)
  assert est['roofline_step_s'] == pytest.approx(0.010)
  assert est['roofline_bound'] == 'memory'
  assert est['mfu_upper_bound'] == pytest.approx(0.8)
  # XLA's FLOPs below the model's: the model's set the compute term.
  est = compile_lib.roofline(1e12, 0.0, 4.59e12, v5p)
  assert est['roofline_step_s'] == pytest.approx(0.010)
  assert est['mfu_upper_bound'] == pytest.approx(1.0)
  # v4 shows a chip's two TensorCores as two devices: half a chip each.
  half = compile_lib.peak_per_device('v4', 4, 8)
  assert (half.flops_per_s, half.hbm_bytes_per_s) == (137.5e12, 600e9)


def test_out_of_hbm_message_is_parsed():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
             'required for HLO temporaries (58.29G) exceeds available HBM '
             '(15.75G).')
  parsed = compile_lib._out_of_memory(message)
  assert parsed['required_bytes'] == int(58.29 * compile_lib.GIB)
  assert parsed['available_bytes'] == int(15.75 * compile_lib.GIB)
  assert compile_lib._out_of_memory('INVALID_ARGUMENT: nope') is None


def test_aot_compile_on_local_devices_reports_memory_and_flops():
  config = tiny.get_config('ztt')
  # Unrolled: XLA's cost analysis counts the body of a loop (a scan) once.
  config.model.update(vocab_size=96, scan_layers=False)
  report = compile_lib.aot_compile(config, jax.devices()[:1],
                                   hbm_bytes=1 << 30,
                                   peak=compile_lib.PEAK_PER_CHIP['v5e'])
  # Params + Adam's two moments, float32, all on the one device.
  state_bytes = 3 * 4 * report['params']
  assert state_bytes <= report['argument_bytes'] < state_bytes + (1 << 20)
  assert report['per_device_bytes'] > report['argument_bytes']
  assert report['fits'] is True and report['mesh'] == {
      'data': 1, 'fsdp': 1, 'tensor': 1}
  # Model FLOPs by hand (d=32, 4 heads of 8, SwiGLU width 96, V=96,
  # T=32): a layer's matmuls hold 4 * 32 * 32 + 3 * 32 * 96 weights; 10
  # layers run (1 head, 3 cycles x 2, the tail once per exit head), each
  # with 4 * T * 32 attention FLOPs; the LM head runs per exit head; the
  # zero token's logit costs 4 * 32 per cycled layer. Forward x 3 (training)
  # x 8 x 32 tokens.
  layer = 4 * 32 * 32 + 3 * 32 * 96
  forward = (2 * layer * 10 + 2 * 32 * 96 * 3 + 4 * 32 * 32 * 10
             + 4 * 32 * 3 * 2)
  assert report['model_flops_per_device'] == 3 * forward * 8 * 32
  # XLA's own count of the compiled step adds what the model count leaves
  # out (norms, softmax, the loss, AdamW): a little more, never less.
  ratio = report['compiled_flops_per_device'] / report[
      'model_flops_per_device']
  assert 1.0 < ratio < 1.25, report
  # Roofline with v5e's peaks, by hand: this tiny step is memory-bound
  # (every param and both Adam moments are read at least once).
  assert report['flops'] == report['compiled_flops_per_device']
  assert report['bytes_accessed'] >= report['argument_bytes']
  compute_s = report['flops'] / 197e12
  memory_s = report['bytes_accessed'] / 819e9
  assert memory_s > compute_s
  assert report['roofline_step_s'] == pytest.approx(memory_s, rel=1e-12)
  assert report['roofline_bound'] == 'memory'
  assert report['mfu_upper_bound'] == pytest.approx(
      3 * forward * 8 * 32 / 197e12 / memory_s, rel=1e-12)
  lines = compile_lib.format_report(report).splitlines()
  assert json.loads(lines[-1]) == report
  assert 'roofline per device' in lines[-2] and 'memory-bound' in lines[-2]
  with pytest.raises(ConfigError, match='model.vocab_size'):
    compile_lib.aot_compile(tiny.get_config('ztt'), jax.devices()[:1])


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip '
                    'install -e ".[tpu]"); it compiles for TPU topologies')
@pytest.mark.slow(60)
def test_budget_125m_compiles_for_v5e_2x2():
  # The 125M model and optimizer as configured, with shorter sequences and
  # a smaller batch so the compile fits the test budget (the full 2048 x 256
  # step is in docs/SCALING.md's table). A fresh process, as a user runs it
  # (and away from this session's persistent compilation cache).
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'JAX_COMPILATION_CACHE'))}
  result = subprocess.run(
      [sys.executable, '-m', 'ztt_jax.commands.compile',
       f'--config={REPO}/configs/budget.py:125m,ztt', '--topology=v5e:2x2',
       '--config.data.seq_len=128', '--config.train.batch_size=4'],
      capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not [l for l in result.stderr.splitlines() if 'rror' in l], (
      result.stderr[-3000:])
  lines = result.stdout.splitlines()
  assert 'fits' in lines[-4] and 'GiB' in lines[-4], lines
  report = json.loads(lines[-1])
  assert report['topology'] == 'v5e:2x2' and report['chips'] == 4
  assert report['devices'] == 4 and report['device_kind'] == 'TPU v5 lite'
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert abs(report['params'] / 125e6 - 1) < 0.03
  assert report['hbm_bytes'] == 16 * compile_lib.GIB
  assert report['fits'] is True and 'compile_error' not in report
  assert 0 < report['per_device_bytes'] < report['hbm_bytes']
  # FSDP: each device holds a quarter of params + Adam moments (float32).
  assert report['argument_bytes'] < 12 * report['params'] / 4 * 1.1
  # Model FLOPs by hand (d=768, 12 heads of 64, SwiGLU width 2048, V=32768,
  # T=128): 27 layers run (1 head, 2 cycles x 12, the tail once per exit
  # head), the LM head twice, the zero logit per cycled layer; x 3
  # (training) x 4 x 128 tokens / 4 devices.
  layer = 4 * 768 * 768 + 3 * 768 * 2048
  lm_heads = 2 * 768 * 32768 * 2
  forward = (2 * layer * 27 + lm_heads + 4 * 768 * 128 * 27
             + 4 * 768 * 2 * 12)
  assert report['model_flops_per_device'] == 3 * forward * 128
  # XLA counts a scanned layer once, so the compiled count lies between the
  # LM heads alone (outside any loop, forward and backward) and the model
  # count with full remat's second forward (4/3), plus a quarter for norms,
  # softmax and AdamW.
  compiled = report['compiled_flops_per_device']
  assert 3 * lm_heads * 128 < compiled < 4 / 3 * 1.25 * 3 * forward * 128
  # Roofline with v5e's peaks (197 TFLOP/s, 819 GB/s): XLA's FLOPs count
  # the scanned layers once, so the model's FLOPs set the compute term.
  assert report['flops'] == compiled
  compute_s = 3 * forward * 128 / 197e12
  memory_s = report['bytes_accessed'] / 819e9
  assert report['roofline_step_s'] == pytest.approx(max(compute_s, memory_s))
  assert report['mfu_upper_bound'] == pytest.approx(
      compute_s / max(compute_s, memory_s))
  assert 'roofline per device' in lines[-2]
