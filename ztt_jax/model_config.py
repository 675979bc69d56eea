"""`ModelConfig`: every model setting, grouped by what it is, checked once.

Sections (the order of the fields below):

  architecture  sizes, layer split, embeddings, norms, biases
  ztt           the paper's parts and our readings of it (docs/DESIGN.md)
  execution     how the same maths runs: dtype, scan, remat, attention path
  loss          the training objective over the exit heads
  init          initial values only

Each field also declares its `effect`, the one answer to "may this change
between a checkpoint and the run that reads it?":

  params    shapes the param tree (names, shapes, dtypes): never.
  layout    same params in another layout (`params.convert_params`):
            loading and fine-tuning convert; a resume keeps the saved one.
  function  same params, another function or objective: loading
            (`ztt_jax.load`, ztt-generate, ztt-eval) and fine-tuning may
            change it; a resume may not (it would change the run).
  none      same function computed another way, or init only: anywhere.

`changed(saved, new, effects)` lists the fields that differ; resume,
`init_from`, `ztt_jax.load`, ztt-convert and the commands' `--help` all ask
it (or `fields_with_effect`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax.numpy as jnp
import ml_collections

from ztt_jax.errors import check

VARIANTS = ('vanilla', 'basic_cycle', 'head_tail_cycle', 'ztt')
ZERO_POOLS = ('none', 'cycle_layer', 'cycle', 'layer')
ZERO_KEYS = ('key_space', 'projected')
GATES = ('none', 'scalar', 'token')
EXIT_LOSSES = ('none', 'last', 'uniform', 'linear', 'final_heavy')
GATE_INPUTS = ('output', 'input')
EXIT_GRADS = ('full', 'detach')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
POSITIONS = ('rope', 'learned')
NORMS = ('rmsnorm', 'layernorm')
MLPS = ('swiglu', 'gelu')
ATTENTIONS = ('xla', 'dot_product')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}
SECTIONS = ('architecture', 'ztt', 'execution', 'loss', 'init')
EFFECTS = ('params', 'layout', 'function', 'none')
# What may differ, by reader: a resume continues the same run; a load or a
# fine-tune may read the same params another way.
RESUME_FIXED = ('params', 'layout', 'function')
LOAD_FIXED = ('params',)
# What 'auto' means for ztt (every other variant: 'none').
_AUTO = {'zero_pool': 'cycle_layer', 'gate': 'token', 'exit_loss': 'linear'}


def _f(default, section: str, effect: str):
  return dataclasses.field(default=default,
                           metadata={'section': section, 'effect': effect})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Validated, hashable model settings (built from `config.model`).

  `zero_pool`, `gate` and `exit_loss` may be 'auto' in the ConfigDict: for
  `ztt` that means `cycle_layer`, `token`, `linear`; for the other variants
  `none`. The defaults of the import switches (positions .. mlp_bias) are
  the native architecture; `ztt_jax.hf` sets them for GPT-2 (learned
  positions, LayerNorm, biases, GELU) and Llama (grouped-query attention,
  RMSNorm epsilon, untied head).
  """
  # -- architecture ---------------------------------------------------------
  variant: str = _f('ztt', 'architecture', 'params')
  vocab_size: int = _f(256, 'architecture', 'params')
  d_model: int = _f(128, 'architecture', 'params')
  n_heads: int = _f(4, 'architecture', 'params')
  head_dim: int = _f(0, 'architecture', 'params')  # 0: d_model // n_heads.
  # 0: n_heads. Fewer: grouped-query attention.
  n_kv_heads: int = _f(0, 'architecture', 'params')
  # 0: a multiple of 32 near 8/3 * d_model (SwiGLU) or 4x.
  d_ff: int = _f(0, 'architecture', 'params')
  mlp: str = _f('swiglu', 'architecture', 'params')  # swiglu | gelu.
  n_head_layers: int = _f(1, 'architecture', 'params')
  n_mid_layers: int = _f(2, 'architecture', 'params')
  n_tail_layers: int = _f(1, 'architecture', 'params')
  tie_embeddings: bool = _f(True, 'architecture', 'params')
  positions: str = _f('rope', 'architecture', 'params')  # rope | learned.
  max_seq_len: int = _f(0, 'architecture', 'params')  # Learned table rows.
  rope_theta: float = _f(10_000.0, 'architecture', 'function')
  norm: str = _f('rmsnorm', 'architecture', 'params')  # Or layernorm.
  # Epsilon of every norm but the gate's.
  norm_eps: float = _f(1e-6, 'architecture', 'function')
  qkv_bias: bool = _f(False, 'architecture', 'params')  # On q, k, v.
  out_bias: bool = _f(False, 'architecture', 'params')  # On attention out.
  mlp_bias: bool = _f(False, 'architecture', 'params')  # On every MLP proj.
  param_dtype: str = _f('float32', 'architecture', 'params')
  # -- ztt: the paper's parts and our readings ------------------------------
  n_cycles: int = _f(2, 'ztt', 'params')
  zero_pool: str = _f('cycle_layer', 'ztt', 'params')
  # key_space: the pool holds keys [.., H, K] used as they are
  # (docs/DESIGN.md). projected: the pool holds zero-token vectors [.., D],
  # keyed by each layer's own key projection (an ablation of that reading).
  zero_key: str = _f('key_space', 'ztt', 'params')
  gate: str = _f('token', 'ztt', 'params')
  # What the token gate reads: the cycle's output y (`output`) or its input
  # h (`input`, the prose of docs/DESIGN.md).
  gate_input: str = _f('output', 'ztt', 'function')
  # -- execution: the same maths, run another way ---------------------------
  dtype: str = _f('float32', 'execution', 'none')
  scan_layers: bool = _f(True, 'execution', 'layout')
  remat_policy: str = _f('none', 'execution', 'none')
  # xla: explicit float32 logits (attention.zero_token_attention), every
  # statistic; dot_product: jax.nn.dot_product_attention, cuDNN's fused
  # kernel on NVIDIA GPUs in bfloat16/float16; no zero_margin (the kernel
  # hides the max logit). Same params, same outputs and zero-token mass.
  attention: str = _f('xla', 'execution', 'none')
  # -- loss: the training objective (the model is the same) -----------------
  exit_loss: str = _f('linear', 'loss', 'function')
  # `detach`: exit heads before the last read the cycle state through
  # stop_gradient, so early exit losses train only the tail, final norm and
  # LM head, never the cycled stack, the pool or the gates.
  exit_grad: str = _f('full', 'loss', 'function')
  # The exit heads before the last score a random subset of this fraction
  # of the positions, drawn per step and shared by those heads; the last
  # head scores every position.
  exit_loss_fraction: float = _f(1.0, 'loss', 'function')
  # > 0 computes the exit heads' cross-entropy over chunks of this many
  # positions, each chunk's float32 logits recomputed in the backward
  # pass, so no [B, T, V] logits are held; 0: whole. Same loss value.
  ce_chunk_len: int = _f(0, 'loss', 'none')
  dropout: float = _f(0.0, 'loss', 'none')
  # -- init ------------------------------------------------------------------
  init_std: float = _f(0.02, 'init', 'none')
  zero_key_init_std: float = _f(0.02, 'init', 'none')
  gate_bias_init: float = _f(3.0, 'init', 'none')

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | dict | ModelConfig
                  ) -> ModelConfig:
    """Checks every field and resolves 'auto' settings; raises ConfigError."""
    if isinstance(cfg, ModelConfig):
      return cfg._validated()
    values = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    check(not unknown, f'config.model has unknown field(s) {unknown}; '
          f'valid fields are {sorted(known)}')
    variant = values.get('variant', 'ztt')
    check(variant in VARIANTS, f'model.variant={variant!r} is not one of '
          f'{VARIANTS}; pick one of them')
    for name, auto in _AUTO.items():
      if values.get(name, 'auto') == 'auto':
        values[name] = auto if variant == 'ztt' else 'none'
    return cls(**values)._validated()

  def _validated(self) -> ModelConfig:
    def integer(name, low):
      value = getattr(self, name)
      check(isinstance(value, int) and value >= low,
            f'model.{name}={value!r} must be '
            + ('a positive integer' if low else 'an integer >= 0'))
    for name in ('vocab_size', 'd_model', 'n_heads', 'n_mid_layers',
                 'n_cycles'):
      integer(name, 1)
    for name in ('n_head_layers', 'n_tail_layers', 'head_dim', 'd_ff',
                 'n_kv_heads', 'max_seq_len', 'ce_chunk_len'):
      integer(name, 0)
    check(isinstance(self.exit_loss_fraction, (int, float))
          and 0 < self.exit_loss_fraction <= 1,
          f'model.exit_loss_fraction={self.exit_loss_fraction!r} must be in '
          '(0, 1]; 1 scores every position with every exit head')
    for name, allowed in (('zero_pool', ZERO_POOLS), ('gate', GATES),
                          ('zero_key', ZERO_KEYS),
                          ('exit_loss', EXIT_LOSSES),
                          ('gate_input', GATE_INPUTS),
                          ('exit_grad', EXIT_GRADS),
                          ('remat_policy', REMAT_POLICIES),
                          ('mlp', MLPS), ('dtype', tuple(DTYPES)),
                          ('param_dtype', tuple(DTYPES)),
                          ('positions', POSITIONS), ('norm', NORMS)):
      check(getattr(self, name) in allowed,
            f'model.{name}={getattr(self, name)!r} is not one of {allowed}')
    check(self.attention in ATTENTIONS,
          f'model.attention={self.attention!r} is not one of {ATTENTIONS}: '
          'xla (explicit logits, every statistic) or dot_product '
          '(jax.nn.dot_product_attention, cuDNN on NVIDIA GPUs)')
    if self.variant != 'ztt':
      for name in ('zero_pool', 'gate'):
        check(getattr(self, name) == 'none',
              f'model.{name}={getattr(self, name)!r} needs model.variant='
              f"'ztt' (got {self.variant!r}); set model.{name}=auto or none")
    if not self.head_dim:
      check(self.d_model % self.n_heads == 0,
            f'model.n_heads={self.n_heads} does not divide model.d_model='
            f'{self.d_model}; change one of them or set model.head_dim')
    check(self.positions != 'rope' or self.resolved_head_dim % 2 == 0,
          f'head dim {self.resolved_head_dim} must be even for rotary '
          'positions; change model.d_model, model.n_heads or model.head_dim')
    check(0.0 <= self.dropout < 1.0,
          f'model.dropout={self.dropout} must be in [0, 1)')
    check(self.n_heads % self.resolved_kv_heads == 0,
          f'model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads='
          f'{self.n_heads}; pick a divisor of n_heads (0: n_heads)')
    check(self.positions != 'learned' or self.max_seq_len > 0,
          "model.positions='learned' needs model.max_seq_len > 0 (the rows of "
          'the position table); set --config.model.max_seq_len')
    check(self.norm_eps > 0,
          f'model.norm_eps={self.norm_eps} must be positive')
    for name in ('qkv_bias', 'out_bias', 'mlp_bias'):
      check(isinstance(getattr(self, name), bool),
            f'model.{name}={getattr(self, name)!r} must be True or False')
    return self

  # Layer structure, after the variant is applied.
  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def resolved_d_ff(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.mlp == 'swiglu':
      return 32 * -(-int(8 * self.d_model / 3) // 32)
    return 4 * self.d_model

  @property
  def head_layers(self) -> int:
    return 0 if self.variant == 'basic_cycle' else self.n_head_layers

  @property
  def tail_layers(self) -> int:
    return 0 if self.variant == 'basic_cycle' else self.n_tail_layers

  @property
  def mid_layers(self) -> int:
    if self.variant == 'basic_cycle':
      return self.n_head_layers + self.n_mid_layers + self.n_tail_layers
    return self.n_mid_layers

  @property
  def cycles(self) -> int:
    return 1 if self.variant == 'vanilla' else self.n_cycles

  @property
  def exit_heads(self) -> bool:
    """Whether an exit head runs after every cycle."""
    return self.variant != 'vanilla' and self.exit_loss != 'none'

  @property
  def loss_from_features(self) -> bool:
    """Whether the training loss runs the LM head itself (on exit-head
    features; `exits.feature_losses`) instead of reading full logits."""
    return self.exit_loss_fraction < 1 or self.ce_chunk_len > 0

  @property
  def executed_layers(self) -> int:
    return self.head_layers + self.cycles * self.mid_layers + self.tail_layers


def effect(name: str) -> str:
  """What changing field `name` changes (one of EFFECTS)."""
  return ModelConfig.__dataclass_fields__[name].metadata['effect']


def fields_with_effect(*effects: str) -> tuple[str, ...]:
  """The fields whose effect is one of `effects`, in declaration order."""
  return tuple(f.name for f in dataclasses.fields(ModelConfig)
               if f.metadata['effect'] in effects)


def changed(saved: Any, new: Any, effects: Iterable[str]
            ) -> list[tuple[str, Any, Any]]:
  """`(field, saved value, new value)` for each field with one of `effects`
  that differs. Either side may be a `ModelConfig`, a ConfigDict or a dict;
  'auto' is resolved, and fields an older saved config lacks take their
  defaults. Nothing is validated (a vocab_size of 0 compares as it is)."""
  a, b = _resolved(saved), _resolved(new)
  return [(name, a[name], b[name])
          for name in fields_with_effect(*tuple(effects))
          if a[name] != b[name]]


def describe(changes: list[tuple[str, Any, Any]]) -> str:
  """'field: old -> new, ...' for `changed`'s result."""
  return ', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in changes)


def _resolved(cfg: Any) -> dict[str, Any]:
  if isinstance(cfg, ModelConfig):
    return dataclasses.asdict(cfg)
  values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  values.update(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  for name, auto in _AUTO.items():
    if values[name] == 'auto':
      values[name] = auto if values['variant'] == 'ztt' else 'none'
  return values
