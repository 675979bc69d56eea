"""Ahead-of-time compilation of the sharded train step for a TPU slice.

    ztt-compile --config=configs/budget.py:1b --topology=v5e:16x16
    ztt-compile --config=configs/budget.py:350m,vanilla --topology=v5p:2x2x2 \
        --mesh=1,-1,2

Lowers and compiles the exact train step `ztt-train` runs (same shardings,
same donation) for a TPU topology, on any machine, with nothing allocated:
`jax[tpu]` brings libtpu, whose compiler targets the slice named by
`--topology` (`jax.experimental.topologies`). Prints the per-device memory
(arguments, outputs, temporaries) against the chip's HBM, the compiled
FLOPs, and a roofline estimate (`roofline`: XLA's FLOPs and bytes accessed
against the chip's peak bf16 FLOP/s and HBM bandwidth, a lower bound on the
step time and an upper bound on MFU), and ends with one JSON line:

    {"topology": "v5e:16x16", "per_device_bytes": ..., "hbm_bytes": ...,
     "fits": true, "flops": ..., "bytes_accessed": ...,
     "roofline_step_s": ..., "mfu_upper_bound": ..., ...}

`--mesh=DATA,FSDP,TENSOR` overrides `config.mesh` (-1: the remaining
devices); any config field can be overridden as in ztt-train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import re
import time
from typing import Any

import jax
from jax.experimental import topologies
import jax.numpy as jnp
import ml_collections

from ztt_jax import checkpoint
from ztt_jax import model as model_lib
from ztt_jax import params as params_lib
from ztt_jax import sharding
from ztt_jax import train
from ztt_jax.errors import ConfigError, check

GIB = 1 << 30
# HBM per chip, GiB (Cloud TPU system architecture pages).
HBM_GIB_PER_CHIP = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}


@dataclasses.dataclass(frozen=True)
class ChipPeak:
  """A chip's peak dense bfloat16 FLOP/s and HBM bandwidth (bytes/s)."""
  flops_per_s: float
  hbm_bytes_per_s: float


# Public spec values, per chip, from the key-specifications tables of the
# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): v4 275 TFLOP/s bf16, HBM2 1200 GB/s; v5e 197 TFLOP/s, HBM2
# 819 GB/s; v5p 459 TFLOP/s, HBM2e 2765 GB/s; v6e (Trillium) 918 TFLOP/s,
# 1638 GB/s. ztt-compile targets TPU topologies only, so no GPU is listed.
PEAK_PER_CHIP = {
    'v4': ChipPeak(275e12, 1200e9),
    'v5e': ChipPeak(197e12, 819e9),
    'v5p': ChipPeak(459e12, 2765e9),
    'v6e': ChipPeak(918e12, 1638e9),
}
_TOPOLOGY_RE = re.compile(r'^(v4|v5e|v5p|v6e):([1-9][0-9]*(?:x[1-9][0-9]*){1,2})$')
_INSTALL_TPU = 'pip install -e ".[tpu]"'


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5e:16x16' -> ('v5e', (16, 16)); raises ConfigError."""
  match = _TOPOLOGY_RE.match(name or '')
  check(match is not None,
        f'--topology={name!r} is not a TPU topology; use GENERATION:CHIPS '
        f'with GENERATION one of {", ".join(HBM_GIB_PER_CHIP)}, e.g. '
        'v5e:2x2, v5e:16x16, v5p:2x2x2, v4:2x2x1, v6e:4x4')
  return match.group(1), tuple(int(d) for d in match.group(2).split('x'))


def hbm_bytes_per_device(generation: str, n_chips: int,
                         n_devices: int) -> int:
  """A chip's HBM split over its JAX devices (v4 exposes 2 per chip)."""
  per_chip = max(n_devices // n_chips, 1)
  return HBM_GIB_PER_CHIP[generation] * GIB // per_chip


def peak_per_device(generation: str, n_chips: int,
                    n_devices: int) -> ChipPeak:
  """A chip's peak FLOP/s and HBM bandwidth split over its JAX devices."""
  per_chip = max(n_devices // n_chips, 1)
  chip = PEAK_PER_CHIP[generation]
  return ChipPeak(chip.flops_per_s / per_chip,
                  chip.hbm_bytes_per_s / per_chip)


def roofline(flops: float, bytes_accessed: float, model_flops: float,
             peak: ChipPeak) -> dict[str, Any]:
  """A lower bound on one device's step time and an upper bound on MFU.

  The step cannot be faster than its FLOPs at peak FLOP/s nor than its
  memory traffic at peak HBM bandwidth: `roofline_step_s` is the larger of
  the two. XLA's cost analysis counts the body of a loop (a scan over
  layers, cycles or micro-batches) once, so for a scanned model its FLOPs
  and bytes are below what runs; the compute term therefore takes the
  larger of XLA's FLOPs and the model FLOPs (which all run), and the memory
  term stays a lower bound. `mfu_upper_bound` is the model FLOPs' time at
  peak over that step time: the MFU no implementation of this program can
  beat on this chip.
  """
  compute_s = max(flops, model_flops) / peak.flops_per_s
  memory_s = bytes_accessed / peak.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {'roofline_step_s': step_s,
          'roofline_bound': 'compute' if compute_s >= memory_s else 'memory',
          'mfu_upper_bound': (model_flops / peak.flops_per_s / step_s
                              if step_s > 0 else None)}


@contextlib.contextmanager
def _libtpu_without_tpus():
  """Settings for starting libtpu on a host with no TPU (none on a TPU VM).

  libtpu looks for TPU workers at start-up and logs errors when there are
  none: name this host as the only worker. It also takes a lock file that
  lets one process per host use it, which only matters for real chips: let
  several compiles run side by side. The environment is restored after
  (libtpu reads it once, when it starts).
  """
  if glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'):
    yield
    return
  settings = {'TPU_WORKER_HOSTNAMES': 'localhost',
              'TPU_ACCELERATOR_TYPE': 'v5litepod-4',
              'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  saved = {k: os.environ.get(k) for k in settings}
  for k, v in settings.items():
    os.environ.setdefault(k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def topology_devices(name: str) -> list[Any]:
  """The devices of TPU topology `name` (no TPU needed; libtpu is)."""
  parse_topology(name)
  check(importlib.util.find_spec('libtpu') is not None,
        f'ztt-compile --topology={name} needs libtpu (the TPU compiler), '
        f'which is not installed; run {_INSTALL_TPU}')
  try:
    with _libtpu_without_tpus():
      topology = topologies.get_topology_desc(platform='tpu',
                                              topology_name=name)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ConfigError(f'--topology={name}: libtpu refused it ({first}); '
                      'use a slice shape TPUs come in, e.g. v5e:2x2, '
                      'v5e:4x4, v5p:2x2x1, v4:2x2x1') from None
  return list(topology.devices)


def _mesh_override(config: ml_collections.ConfigDict,
                   mesh: str | None) -> ml_collections.ConfigDict:
  if not mesh:
    return config
  parts = mesh.split(',')
  ok = len(parts) == 3 and all(re.fullmatch(r'-1|[1-9][0-9]*', p.strip())
                               for p in parts)
  check(ok, f'--mesh={mesh!r} must be DATA,FSDP,TENSOR sizes (-1: the '
        'remaining devices), e.g. --mesh=1,-1,4')
  config = ml_collections.ConfigDict(config.to_dict())
  for axis, size in zip(sharding.MESH_AXES, parts):
    config.mesh[axis] = int(size)
  return config


def _first(analysis) -> dict[str, float]:
  """cost_analysis() is a dict (older jax: a list with one dict per
  program)."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def aot_compile(config: ml_collections.ConfigDict, devices,
                hbm_bytes: int | None = None,
                peak: ChipPeak | None = None) -> dict[str, Any]:
  """Compiles the sharded train step for `devices`; nothing is allocated.

  Args:
    config: a training config (`model.vocab_size` must be set).
    devices: the devices of the mesh: a TPU topology's, or local ones.
    hbm_bytes: memory per device to compare against (None: not compared).
    peak: a device's peak FLOP/s and HBM bandwidth for the roofline
      estimate (None: no estimate).

  Returns:
    The report: per-device argument/output/alias/temp/code bytes and their
    total, `fits`, compiled and model FLOPs per device per step, XLA's
    `flops` and `bytes_accessed`, the roofline estimate (`roofline`; None
    without `peak` or a compiled program), and what was compiled (mesh,
    params, batch, seconds).
  """
  setup = train.Setup(config, None, devices=devices)
  # A new jitted step (reuse=False): the compile is timed.
  step_fn, abstract, shardings, batch_sharding = setup.jit_train_step(
      reuse=False)
  cfg = setup.config
  batch_size, seq_len = cfg.train.batch_size, cfg.data.seq_len
  batch = {name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                      sharding=batch_sharding)
           for name in ('inputs', 'targets')}
  state = checkpoint.with_sharding(abstract, shardings)
  t0 = time.perf_counter()
  error = None
  with setup.context():
    lowered = step_fn.lower(state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler refuses a program that cannot fit in HBM.
      error = _out_of_memory(str(e))
      if error is None:
        raise
  seconds = time.perf_counter() - t0

  if error is None:
    mem = compiled.memory_analysis()
    sizes = {name: int(getattr(mem, f'{name}_size_in_bytes', 0) or 0)
             for name in ('argument', 'output', 'alias', 'temp',
                          'generated_code')}
    cost = _first(compiled.cost_analysis())
  else:
    # Arguments from the shardings; temporaries from the compiler's message;
    # outputs are the donated state (aliased), code unknown.
    args = _sharded_bytes(state) + _sharded_bytes(batch)
    sizes = {'argument': args, 'output': args - _sharded_bytes(batch),
             'alias': args - _sharded_bytes(batch),
             'temp': error['required_bytes'], 'generated_code': 0}
    cost = {}
  # Donated state: outputs that alias arguments take no extra memory.
  total = (sizes['argument'] + sizes['output'] - sizes['alias']
           + sizes['temp'] + sizes['generated_code'])
  n_devices = len(devices)
  model_flops = params_lib.flops_per_token(setup.model_cfg, seq_len) * (
      batch_size * seq_len) / n_devices
  report = {
      'devices': n_devices,
      'device_kind': devices[0].device_kind,
      'mesh': dict(setup.mesh.shape),
      'variant': setup.model_cfg.variant,
      'params': params_lib.count_params(abstract.params),
      'executed_layers': setup.model_cfg.executed_layers,
      'batch_size': batch_size,
      'seq_len': seq_len,
      'grad_accum_steps': cfg.train.grad_accum_steps,
      'argument_bytes': sizes['argument'],
      'output_bytes': sizes['output'],
      'alias_bytes': sizes['alias'],
      'temp_bytes': sizes['temp'],
      'code_bytes': sizes['generated_code'],
      'per_device_bytes': total,
      'hbm_bytes': hbm_bytes,
      'fits': None if hbm_bytes is None else total <= hbm_bytes,
      'compiled_flops_per_device': (float(cost['flops']) if 'flops' in cost
                                    else None),
      'model_flops_per_device': model_flops,
      'flops': float(cost['flops']) if 'flops' in cost else None,
      'bytes_accessed': (float(cost['bytes accessed'])
                         if 'bytes accessed' in cost else None),
      'peak_flops_per_device': None if peak is None else peak.flops_per_s,
      'hbm_bytes_per_s_per_device': (None if peak is None
                                     else peak.hbm_bytes_per_s),
      'roofline_step_s': None,
      'roofline_bound': None,
      'mfu_upper_bound': None,
      'compile_s': round(seconds, 1),
  }
  if peak is not None and report['flops'] is not None and (
      report['bytes_accessed'] is not None):
    report.update(roofline(report['flops'], report['bytes_accessed'],
                           model_flops, peak))
  if error is not None:
    report['fits'] = False
    report['compile_error'] = error['message']
    report['compiler_available_bytes'] = error['available_bytes']
  return report


_SIZE_RE = r'\(([0-9.]+)([KMGT]?)i?B?\)'


def _out_of_memory(message: str) -> dict[str, Any] | None:
  """The sizes in the TPU compiler's out-of-HBM error, or None for another
  error. The message reads like: 'RESOURCE_EXHAUSTED: Ran out of memory on
  HBM, the total memory required for HLO temporaries (58.29G) exceeds
  available HBM (15.75G).' (sizes in GiB)."""
  if 'RESOURCE_EXHAUSTED' not in message:
    return None
  units = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
  sizes = [int(float(n) * units[u]) for n, u in re.findall(_SIZE_RE, message)]
  line = next((l for l in message.splitlines() if 'RESOURCE_EXHAUSTED' in l),
              message.splitlines()[0])
  return {'message': line.strip()[:300],
          'required_bytes': sizes[0] if sizes else 0,
          'available_bytes': sizes[1] if len(sizes) > 1 else None}


def _sharded_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    n = 1
    for d in shape:
      n *= d
    total += n * jnp.dtype(leaf.dtype).itemsize
  return total


def compile_for_topology(config: ml_collections.ConfigDict, topology: str,
                         mesh: str | None = None) -> dict[str, Any]:
  """`aot_compile` for TPU topology `topology` (e.g. 'v5e:16x16')."""
  generation, dims = parse_topology(topology)
  config = _mesh_override(config, mesh)
  devices = topology_devices(topology)
  n_chips = 1
  for d in dims:
    n_chips *= d
  hbm = hbm_bytes_per_device(generation, n_chips, len(devices))
  peak = peak_per_device(generation, n_chips, len(devices))
  return {'topology': topology, 'chips': n_chips,
          **aot_compile(config, devices, hbm, peak)}


def format_report(report: dict[str, Any]) -> str:
  """Human-readable lines, then the report as one JSON line."""
  g = lambda n: f'{n / GIB:.2f} GiB'
  hbm = report.get('hbm_bytes')
  verdict = ('' if hbm is None else
             f" of {g(hbm)} HBM: {'fits' if report['fits'] else 'DOES NOT FIT'}")
  flops = report['compiled_flops_per_device']
  lines = [
      f"ztt-compile: {report['variant']}, {report['params']:,} distinct "
      f"params, {report['executed_layers']} layers executed per token, "
      f"batch {report['batch_size']} x {report['seq_len']}"
      + (f" ({report['grad_accum_steps']} micro-batches)"
         if report['grad_accum_steps'] > 1 else ''),
      f"target: {report.get('topology', 'local')} ({report['devices']} x "
      f"{report['device_kind']}), mesh {report['mesh']}, compiled in "
      f"{report['compile_s']}s",
      'per device: arguments {} + outputs {} - aliased (donated) {} + '
      'temporaries {} + code {}'.format(
          g(report['argument_bytes']), g(report['output_bytes']),
          g(report['alias_bytes']), g(report['temp_bytes']),
          g(report['code_bytes'])),
      f"total per device {g(report['per_device_bytes'])}{verdict}"
      + (' (the compiler refused it: ' + report['compile_error'] + ')'
         if 'compile_error' in report else ''),
      f"FLOPs per device per step: compiled "
      f"{'n/a' if flops is None else f'{flops:.4g}'} (XLA cost analysis, "
      'which counts a loop body once), '
      f"model {report['model_flops_per_device']:.4g} "
      '(params.flops_per_token x tokens / devices)',
      *_roofline_lines(report),
      json.dumps(report),
  ]
  return '\n'.join(lines)


def _roofline_lines(report: dict[str, Any]) -> list[str]:
  if report.get('roofline_step_s') is None:
    return []
  return [
      f"roofline per device: {report['flops']:.4g} FLOPs (XLA), "
      f"{report['bytes_accessed'] / GIB:.2f} GiB accessed at "
      f"{report['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 and "
      f"{report['hbm_bytes_per_s_per_device'] / 1e9:.0f} GB/s HBM: step "
      f">= {report['roofline_step_s'] * 1e3:.2f} ms "
      f"({report['roofline_bound']}-bound), MFU <= "
      f"{report['mfu_upper_bound']:.1%}"]
