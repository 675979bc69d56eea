"""Fixed-budget configs: every variant of every size spends its budget."""

import re

import pytest

from configs import budget
from ztt_jax import model
from ztt_jax import model_config
from ztt_jax import params as params_lib
from ztt_jax.errors import ConfigError

SIZES = tuple(budget.SIZES)


def count(config) -> int:
  """Distinct parameters, from shapes only (jax.eval_shape)."""
  return params_lib.count_params(params_lib.abstract_params(model.build(config.model)))


@pytest.mark.parametrize('size', SIZES)
def test_every_variant_is_within_3_percent_of_the_budget(size):
  target = budget.SIZES[size][0]
  counts = {}
  for variant in model_config.VARIANTS:
    config = budget.get_config(f'{size},{variant}')
    assert config.model.variant == variant
    counts[variant] = count(config)
    assert abs(counts[variant] / target - 1) < 0.03, (size, variant,
                                                      counts[variant])
  # The baselines share every weight layout; ztt adds only its pool and gate.
  assert counts['vanilla'] == counts['basic_cycle'] == counts[
      'head_tail_cycle']
  assert 0 < counts['ztt'] - counts['vanilla'] < 1e-3 * target


@pytest.mark.parametrize('size', SIZES)
def test_variants_spend_the_budget_on_different_compute(size):
  layers, flops = {}, {}
  for variant in model_config.VARIANTS:
    cfg = model_config.ModelConfig.from_config(
        budget.get_config(f'{size},{variant}').model)
    layers[variant] = cfg.executed_layers
    flops[variant] = params_lib.flops_per_token(cfg, budget.SEQ_LEN)
  head, mid, tail = budget.SIZES[size][4]
  assert layers == {'vanilla': head + mid + tail,
                    'basic_cycle': 2 * (head + mid + tail),
                    'head_tail_cycle': head + 2 * mid + tail,
                    'ztt': head + 2 * mid + tail}
  assert flops['vanilla'] < flops['head_tail_cycle'] < flops['basic_cycle']
  # The docstring's table states the same layer counts.
  row = re.search(rf'^\| {size} \|.*$', budget.__doc__, re.M).group(0)
  assert f"{layers['vanilla']} / {layers['basic_cycle']} / {layers['ztt']}" in row


def test_shared_settings():
  config = budget.get_config('125m')
  assert config.model.variant == 'ztt'
  assert config.model.vocab_size == config.data.vocab_size == 32768
  assert config.data.tokenizer == 'sentencepiece'
  assert config.mesh.fsdp == -1
  assert config.train.batch_size % 256 == 0


@pytest.mark.parametrize('arg', ['2b', '125m,deep', '125m,ztt,x', ''])
def test_bad_argument_is_a_one_line_error(arg):
  with pytest.raises(ConfigError, match='configs/budget.py') as e:
    budget.get_config(arg)
  assert '\n' not in str(e.value)
