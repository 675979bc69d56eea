"""ztt_jax: the Zero Token Transformer (Li et al., 2025) in JAX/Flax."""

from __future__ import annotations

from ztt_jax.errors import ConfigError

__all__ = ['ConfigError', 'load']


def load(workdir, step: int | None = None):
  """`(module, params, config)` from a training workdir's checkpoint.

  `step=None` takes the latest. Params are placed on the default device.
  """
  # Imported here so `import ztt_jax` stays light.
  import jax  # pylint: disable=g-import-not-at-top
  from ztt_jax import checkpoint, model  # pylint: disable=g-import-not-at-top
  config, step = checkpoint.read_config(workdir, step)
  module = model.build(config.model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      model.abstract_params(module))
  return module, checkpoint.restore_params(workdir, step, abstract), config
