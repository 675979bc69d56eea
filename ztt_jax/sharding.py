"""The device mesh, logical-axis rules, and sharded initialisation.

Parameters carry logical axis names (`nn.with_logical_partitioning` in
model.py); `config.sharding.rules` maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. Nothing else in the code names a mesh axis.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ztt_jax.errors import check

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, ...]:
  """Resolves -1 in `config.mesh` to the remaining devices."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  check(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
        f'config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, '
        'with at most one -1 (the remaining devices)')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    check(n_devices % known == 0,
          f'config.mesh={dict(zip(MESH_AXES, sizes))} does not divide the '
          f'{n_devices} devices; pick sizes whose product divides it')
    sizes[sizes.index(-1)] = n_devices // known
  check(int(np.prod(sizes)) == n_devices,
        f'config.mesh={dict(zip(MESH_AXES, sizes))} needs {np.prod(sizes)} '
        f'devices but {n_devices} are present; set config.mesh.data=-1')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def rules(config) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` as tuples (JSON round trips turn them to lists)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding.rules)


def logical_shardings(logical_specs: Any, mesh, axis_rules) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)


def batch_sharding(mesh, axis_rules) -> NamedSharding:
  """[B, T] batches: rows split over the data-parallel axes."""
  return logical_shardings(P('activation_batch', 'activation_length'), mesh,
                           axis_rules)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
