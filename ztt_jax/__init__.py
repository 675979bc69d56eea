"""ztt_jax: the Zero Token Transformer (Li et al., 2025) in JAX/Flax."""

from __future__ import annotations

from typing import Any, Mapping

from ztt_jax.errors import ConfigError, check

__all__ = ['ConfigError', 'load']

# Model fields an override may change when loading a checkpoint: how the
# maths runs, not the shape of the params.
LOAD_MODEL_OVERRIDES = ('dtype', 'remat_policy', 'dropout', 'attention')


def load(workdir, step: int | None = None,
         overrides: Mapping[str, Any] | None = None):
  """`(module, params, config)` from a training workdir's checkpoint.

  `step=None` takes the latest. `overrides` ({'data.path': 'other.txt'})
  are set on the saved config as `--config.data.path=other.txt` sets them
  (`configlib.override`); of `model`, only `LOAD_MODEL_OVERRIDES`. Params
  are placed on the default device.
  """
  # Imported here so `import ztt_jax` stays light.
  # pylint: disable=g-import-not-at-top
  import jax
  from ztt_jax import checkpoint, configlib, model
  from ztt_jax import params as params_lib
  # pylint: enable=g-import-not-at-top
  config, step = checkpoint.read_config(workdir, step)
  config = configlib.override(config, overrides or {})
  fixed = [k for k in overrides or () if k.startswith('model.')
           and k.split('.')[1] not in LOAD_MODEL_OVERRIDES]
  check(not fixed, f'--config.{fixed[0] if fixed else ""}: the model comes '
        f'from the checkpoint in {workdir}; of config.model only '
        f'{", ".join(LOAD_MODEL_OVERRIDES)} can be overridden')
  module = model.build(config.model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      params_lib.abstract_params(module))
  return module, checkpoint.restore_params(workdir, step, abstract), config
