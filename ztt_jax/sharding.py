"""The device mesh, logical-axis rules, sharded shapes, and multi-host start.

Parameters carry logical axis names (`nn.with_logical_partitioning` in
model.py); `config.sharding.rules` maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. Nothing else in the code names a mesh axis.

With `mesh.dcn_data > 1` (multislice) the data axis spans slices as well:
data, fsdp and tensor lay out each slice, and the slices are stacked along
data (`mesh_shapes`, `hybrid_device_array`).

The default rules (configlib.py) are FSDP + tensor parallelism:

  batch rows      -> ('data', 'fsdp')   every device sees its own rows
  embed (width D) -> 'fsdp'             every weight is split over fsdp and
                                        gathered just in time for its matmul
  heads, mlp, vocab -> 'tensor'         Megatron-style column/row splits of
                                        attention, MLP and the (tied) LM head
  kv, layers, cycles -> None            head dim and the scan axes stay whole

A parameter dimension that a mesh axis does not divide (e.g. a 65-symbol
char vocabulary on tensor=2) is replicated over that axis instead
(`fit_spec`), so any config runs on any mesh; batches must divide
`data * fsdp` (`check_batch`).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ztt_jax.errors import ConfigError, check

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shapes(mesh_config, n_devices: int
                ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """The mesh's shape within a granule (ICI) and across granules (DCN).

  A granule is a TPU slice (devices carry `slice_index`), elsewhere a
  process. `mesh.data`, `mesh.fsdp` and `mesh.tensor` lay out one
  granule's `n_devices / mesh.dcn_data` devices (-1 takes the remaining
  ones); `mesh.dcn_data` repeats that layout across granules along the data
  axis, so only data-parallel gradient reductions cross the slow network.
  The mesh is `(dcn_data * data, fsdp, tensor)`.

  Returns:
    (ici_shape, dcn_shape), both in MESH_AXES order.
  """
  dcn = mesh_config.get('dcn_data', 1)
  check(isinstance(dcn, int) and not isinstance(dcn, bool) and dcn > 0,
        f'mesh.dcn_data={dcn!r} must be a positive integer (the number of '
        'slices; 1: no multislice axis)')
  check(n_devices % dcn == 0,
        f'mesh.dcn_data={dcn} does not divide the {n_devices} devices; set '
        'it to the number of slices (processes where devices have no slice)')
  per = f' per slice (mesh.dcn_data={dcn})' if dcn > 1 else ''
  n_devices //= dcn
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  check(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
        f'config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, '
        'with at most one -1 (the remaining devices)')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    check(n_devices % known == 0,
          f'config.mesh={dict(zip(MESH_AXES, sizes))} does not divide the '
          f'{n_devices} devices{per}; pick sizes whose product divides it')
    sizes[sizes.index(-1)] = n_devices // known
  check(int(np.prod(sizes)) == n_devices,
        f'config.mesh={dict(zip(MESH_AXES, sizes))} needs {np.prod(sizes)} '
        f'devices{per} but {n_devices} are present; set config.mesh.data=-1')
  return tuple(sizes), (dcn, 1, 1)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all).

  `devices` may be another platform's, e.g. a TPU topology's for
  ahead-of-time compilation (compile.py). With `mesh.dcn_data > 1` they are
  laid out by `hybrid_device_array`.
  """
  devices = jax.devices() if devices is None else list(devices)
  ici, dcn = mesh_shapes(mesh_config, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if dcn == (1, 1, 1):
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types,
                         devices=devices)
  return jax.sharding.Mesh(hybrid_device_array(ici, dcn, devices), MESH_AXES,
                           axis_types=axis_types)


def hybrid_device_array(ici: tuple[int, ...], dcn: tuple[int, ...],
                        devices) -> np.ndarray:
  """`devices` as an array of shape `ici * dcn`: grouped into granules,
  each granule laid out as `ici`, the granules stacked along the data axis
  (`mesh_utils.create_hybrid_device_mesh`).

  The granules are TPU slices where the devices name more than one
  `slice_index`, otherwise processes (GPU and CPU devices have no slice, or
  all say slice 0).
  """
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  by_slice = len(slices) > 1
  n_granules = len(slices) if by_slice else len(
      {d.process_index for d in devices})
  what = ('slice' if by_slice else 'process') if n_granules == 1 else (
      'slices' if by_slice else 'processes')
  check(n_granules == dcn[0],
        f'mesh.dcn_data={dcn[0]} but the {len(devices)} devices are in '
        f'{n_granules} {what}; set mesh.dcn_data={n_granules} (1: no '
        'multislice axis)')
  try:
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not by_slice)
  except ValueError as e:
    raise ConfigError(
        f'config.mesh with mesh.dcn_data={dcn[0]}: '
        f'{str(e).strip().splitlines()[0]}; give every slice the same '
        'number of devices') from None


def rules(config) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` as tuples (JSON round trips turn them to lists)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding.rules)


def logical_shardings(logical_specs: Any, mesh, axis_rules) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)


def fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
  """`spec` without the mesh axes that do not divide their dimension.

  Axes are dropped from the end of each dimension's tuple until the product
  of the remaining sizes divides the dimension; a dropped axis means that
  dimension is replicated over it.
  """
  dims = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else (
        (axes,) if isinstance(axes, str) else tuple(axes))
    while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
      axes = axes[:-1]
    dims.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


def state_shardings(logical_specs: Any, abstract: Any, mesh,
                    axis_rules) -> Any:
  """NamedShardings for a tree of arrays (params, optimizer state).

  Args:
    logical_specs: logical PartitionSpecs, a tree matching `abstract`.
    abstract: the arrays or `jax.ShapeDtypeStruct`s (for their shapes).
    mesh: the device mesh.
    axis_rules: logical axis -> mesh axes.

  Returns:
    A tree of NamedShardings; dimensions a mesh axis does not divide are
    replicated over that axis (`fit_spec`).
  """
  mesh_specs = jax.tree.map(
      lambda spec: nn.logical_to_mesh_axes(spec, axis_rules), logical_specs,
      is_leaf=lambda x: isinstance(x, P))
  return jax.tree.map(
      lambda spec, a: NamedSharding(mesh, fit_spec(spec, a.shape, mesh)),
      mesh_specs, abstract, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, axis_rules) -> NamedSharding:
  """[B, T] batches: rows split over the data-parallel axes."""
  return logical_shardings(P('activation_batch', 'activation_length'), mesh,
                           axis_rules)


def batch_shards(mesh, axis_rules) -> int:
  """How many ways `batch_sharding` splits the rows."""
  axes = batch_sharding(mesh, axis_rules).spec[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def process_rows(sharding: jax.sharding.Sharding,
                 global_shape: tuple[int, ...]) -> np.ndarray:
  """The rows of a `global_shape` batch that this process's devices hold,
  ascending: what it reads (data.make_train_dataset).

  Derived from the sharding, not the process index: processes whose
  devices hold replicas of the same rows (a tensor axis across processes)
  get the same rows, and the global batch stays one array whatever the
  process layout.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(global_shape[0])[index[0]])
  return np.asarray(sorted(rows), dtype=np.int64)


def check_batch(batch_size: int, grad_accum_steps: int, mesh,
                axis_rules) -> None:
  """Raises ConfigError unless every micro-batch splits evenly over rows."""
  shards = batch_shards(mesh, axis_rules)
  micro = batch_size // max(grad_accum_steps, 1)
  check(micro % shards == 0,
        f'train.batch_size={batch_size} (micro-batch {micro} with '
        f'train.grad_accum_steps={grad_accum_steps}) does not split over the '
        f'{shards} data-parallel devices (mesh {dict(mesh.shape)}); use a '
        f'batch size that is a multiple of {shards * grad_accum_steps}')


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# -------------------------------------------------------------- multi-host --


def _managed_cluster() -> str | None:
  """The cluster manager that `jax.distributed.initialize()` detects itself
  (no arguments): a multi-process SLURM step, Open MPI, or a Cloud TPU VM."""
  env = os.environ
  if (all(k in env for k in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST',
                             'SLURM_PROCID', 'SLURM_LOCALID'))
      and int(env.get('SLURM_NTASKS', '1')) > 1):
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env:
    return 'open-mpi'
  # TPU chips on this host (v4/v5p: /dev/accel*, v5e/v6e: /dev/vfio/N), as
  # jax itself decides it runs on a Cloud TPU VM.
  if glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'):
    return 'cloud-tpu'
  return None


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> str:
  """Starts multi-process JAX when this process is one of several.

  Call before anything touches a JAX device. Three cases:

  * explicit: all of `coordinator_address` ('host:port' of process 0),
    `num_processes` and `process_id` given (e.g. from ztt-train's flags or
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`);
  * automatic: inside a Cloud TPU VM (every worker of a pod slice), a
    multi-task SLURM step (srun) or Open MPI, with no arguments:
    `jax.distributed.initialize()` reads the cluster;
  * otherwise one process, nothing to do.

  Returns:
    How the processes were found: 'explicit', 'slurm', 'open-mpi',
    'cloud-tpu', 'single' when nothing was started, or 'already' when the
    caller had started it.

  Raises:
    ConfigError: a partial or inconsistent set of arguments, or a cluster
      that does not tell who the other processes are.
  """
  if jax.distributed.is_initialized():
    return 'already'
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      'JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  given = {'--coordinator_address': coordinator_address,
           '--num_processes': num_processes, '--process_id': process_id}
  if any(v is not None for v in given.values()):
    if num_processes == 1 and coordinator_address is None:
      return 'single'
    missing = [k for k, v in given.items() if v is None]
    check(not missing, f'multi-process run: {", ".join(missing)} missing; '
          'pass all of --coordinator_address=HOST:PORT (process 0), '
          '--num_processes=N and --process_id=I (0..N-1), or none of them')
    check(num_processes > 0 and 0 <= process_id < num_processes,
          f'--process_id={process_id} is not in 0..{num_processes - 1} '
          f'(--num_processes={num_processes}); number processes 0..N-1')
    check(':' in coordinator_address,
          f'--coordinator_address={coordinator_address!r} needs a port; '
          'use HOST:PORT, e.g. 127.0.0.1:12355')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return 'explicit'
  cluster = _managed_cluster()
  if cluster is None:
    return 'single'
  try:
    jax.distributed.initialize()
  except ValueError as e:  # The cluster did not name the coordinator etc.
    raise ConfigError(
        f'this looks like a {cluster} job but JAX could not find the other '
        f'processes ({str(e).strip().splitlines()[0]}); pass '
        '--coordinator_address, --num_processes and --process_id') from None
  return cluster
