"""Shared plumbing of the console scripts: flags, --help, one-line errors.

A command declares its flags once, as a frozen dataclass whose fields are
`flag(default, help)`; `parse` builds the parser from it, so `--help` lists
every flag with its help and default, and any mistake on the command line
(an unknown or missing flag, a bad value, a missing config file) is one line
`ztt-X: error: <what>; <fix>` on stderr and exit status 2. `run` does the
same for a `ConfigError` raised while the command runs.

Nothing heavy is imported here: --help and flag errors come back before jax
is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import importlib.util
import os
import sys
import typing
from typing import Any, Callable, NoReturn, Sequence, TypeVar

from absl import flags as absl_flags
from absl import logging

from ztt_jax.errors import ConfigError

T = TypeVar('T')

# How a command takes `--config.SECTION.FIELD=VALUE` overrides.
NO_CONFIG = ''
CONFIG_FILE = 'file'  # Of the config file named by --config.
SAVED_CONFIG = 'saved'  # Of the config saved in --workdir's checkpoint.

_METAVARS = {int: 'N', float: 'X', str: 'TEXT', bool: 'BOOL'}
_GOOGLE_PCI_VENDOR = '0x1ae0'
_GVNIC_PCI_DEVICE = '0x0042'  # Google's virtual NIC: not a TPU.
_NVIDIA_DEVICES = ('dev/nvidia0', 'dev/nvidiactl', 'dev/dxg')
_CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin')


def _boolean(text: str) -> bool:
  """true/false (also 1/0, yes/no); a bare `--flag` is true."""
  value = {'true': True, '1': True, 'yes': True, 'false': False, '0': False,
           'no': False}.get(text.lower())
  if value is None:
    raise argparse.ArgumentTypeError(f'{text!r} is not true or false')
  return value

_OVERRIDES_HELP = {
    CONFIG_FILE: """\
config overrides:
  --config.SECTION.FIELD=VALUE sets one field of the config after the config
  file is loaded; repeat it for more fields. VALUE is read as the field's
  type: a number, true/false, text, or a Python tuple. Every field, with its
  default and meaning, is in ztt_jax/configlib.py (base_config); an unknown
  field is an error. Example:
    {prog} --config=configs/tiny.py:ztt {example}--config.train.steps=50 \\
        --config.model.n_cycles=4 --config.data.path='corpus/*.txt'
""",
    SAVED_CONFIG: """\
config overrides:
  --config.SECTION.FIELD=VALUE sets one field of the config saved with the
  checkpoint in --workdir, after loading it (nothing is written back); e.g.
  where the run's data.path does not resolve from here:
    {prog} --workdir=runs/demo --config.data.path=/data/corpus.txt
  VALUE is read as the field's type. Every field: ztt_jax/configlib.py. Of
  config.model only dtype, remat_policy, dropout and attention may change
  (the rest shapes the params).
""",
}


def flag(default: Any, text: str, *, required: bool = False,
         metavar: str = '', choices: Sequence[Any] = ()) -> Any:
  """A dataclass field that is also a flag `--NAME`: its default and help.

  A required flag's default is ignored (the flag must be given). A None
  default means "unset" and is not shown in --help (say what it means in
  `text`).
  """
  return dataclasses.field(default=default, metadata=dict(
      text=text, required=required, metavar=metavar, choices=tuple(choices)))


def config_flag() -> Any:
  """The required `--config=PATH[:ARG]` of the commands that build a run."""
  return flag(None, 'Config file, PATH[:ARG]: get_config(ARG) of that '
              'Python file.', required=True, metavar='PATH[:ARG]')


def step_flag() -> Any:
  """`--step`: which checkpoint of a workdir to read."""
  return flag(None, 'Checkpoint step; unset: the latest.')


def fail(prog: str, message: str) -> NoReturn:
  """Prints `prog: error: message` as one line on stderr; exit status 2."""
  print(f'{prog}: error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block) and exit status 2."""

  def error(self, message: str) -> NoReturn:
    fail(self.prog, f'{message}; see {self.prog} --help')


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Flags shown as --name=VALUE, as they are usually written."""

  def _format_action_invocation(self, action: argparse.Action) -> str:
    if not action.option_strings or action.nargs == 0:
      return super()._format_action_invocation(action)
    metavar = self._metavar_formatter(action, action.dest.upper())(1)[0]
    return f'{action.option_strings[0]}={metavar}'


def _base_type(hint: Any) -> type:
  """int for `int` or `int | None`; the flag's parser."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  kind = args[0] if args else hint
  if kind not in _METAVARS:
    raise TypeError(f'flag type {hint!r}: use int, float, str or bool')
  return kind


def _metavar(options_type: type, field: dataclasses.Field) -> str:
  kind = _base_type(typing.get_type_hints(options_type)[field.name])
  return field.metadata['metavar'] or _METAVARS[kind]


def _parser(options_type: type, prog: str, doc: str,
            overrides: str) -> _Parser:
  hints = typing.get_type_hints(options_type)
  fields = dataclasses.fields(options_type)
  usage = ' '.join(
      [prog] + [f'--{f.name}={_metavar(options_type, f)}'
                for f in fields if f.metadata['required']] + ['[flags]'])
  if overrides:
    usage += ' [--config.SECTION.FIELD=VALUE ...]'
  example = ''.join(f'--{f.name}={_metavar(options_type, f)} '
                    for f in fields
                    if f.metadata['required'] and f.name != 'config')
  parser = _Parser(
      prog=prog, usage=usage, description=doc, formatter_class=_Formatter,
      allow_abbrev=False,
      epilog=_OVERRIDES_HELP[overrides].format(prog=prog, example=example)
      if overrides else None)
  for f in fields:
    kind = _base_type(hints[f.name])
    text = f.metadata['text']
    if f.metadata['required']:
      text += ' (required)'
    elif f.default is not None:
      text += f' (default: {f.default!r})'
    boolean = dict(type=_boolean, nargs='?', const=True) if kind is bool else (
        dict(type=kind))
    parser.add_argument(
        f'--{f.name}', default=None if f.metadata['required']
        else f.default, choices=f.metadata['choices'] or None,
        metavar=_metavar(options_type, f), help=text, **boolean)
  return parser


def parse(options_type: type[T], argv: Sequence[str] | None, prog: str,
          doc: str, overrides: str = NO_CONFIG) -> tuple[T, dict[str, str]]:
  """`(options, config overrides)` from the command line (`sys.argv[1:]`
  when `argv` is None); prints --help and exits 0, or exits 2 with one line
  on any mistake.

  `overrides` says whether `--config.SECTION.FIELD=VALUE` flags are taken
  (CONFIG_FILE, SAVED_CONFIG) or not (NO_CONFIG); they come back as
  {'SECTION.FIELD': 'VALUE'}, in order.
  """
  parser = _parser(options_type, prog, doc, overrides)
  args, extras = parser.parse_known_args(
      sys.argv[1:] if argv is None else list(argv))
  names = [f.name for f in dataclasses.fields(options_type)]
  config_overrides = {}
  extras = list(extras)
  while extras:
    arg = extras.pop(0)
    name, has_value, value = arg.partition('=')
    if overrides and name.startswith('--config.') and len(name) > 9:
      if not has_value:
        if not extras or extras[0].startswith('--'):
          fail(prog, f'{arg} has no value; write {arg}=VALUE')
        value = extras.pop(0)
      config_overrides[name[len('--config.'):]] = value
    elif not name.startswith('-'):
      fail(prog, f'unexpected argument {arg!r}; every flag is --NAME=VALUE '
           f'(see {prog} --help)')
    else:
      close = difflib.get_close_matches(name.lstrip('-'), names, n=1)
      fix = f'did you mean --{close[0]}?' if close else (
          f'{prog} --help lists the flags')
      if name.startswith('--config.'):
        fix = f'{prog} takes no --config overrides'
      fail(prog, f'unknown flag {name}; {fix}')
  for f in dataclasses.fields(options_type):
    if f.metadata['required'] and getattr(args, f.name) is None:
      fail(prog, f'--{f.name} is required ({f.metadata["text"].rstrip(".")})'
           f'; pass --{f.name}={_metavar(options_type, f)}')
  config = getattr(args, 'config', None)
  if 'config' in names and not os.path.isfile(config.partition(':')[0]):
    fail(prog, f'--config={config}: {config.partition(":")[0]!r} is not a '
         'file; pass a config file as PATH[:ARG], e.g. '
         '--config=configs/tiny.py')
  return options_type(**vars(args)), config_overrides


def _tpu_attached(root: str) -> bool:
  """Whether this host may have a TPU: a TPU device file, or a Google PCI
  device other than its virtual NIC (new TPU generations included)."""
  if (glob.glob(os.path.join(root, 'dev/accel[0-9]*'))
      or glob.glob(os.path.join(root, 'dev/vfio/[0-9]*'))):
    return True
  for vendor in glob.glob(os.path.join(root, 'sys/bus/pci/devices/*/vendor')):
    try:
      with open(vendor, encoding='ascii') as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), 'device'),
                encoding='ascii') as f:
        if f.read().strip() != _GVNIC_PCI_DEVICE:
          return True
    except OSError:
      return True  # Unreadable: assume a TPU, change nothing.
  return False


def default_jax_platforms(environ=os.environ, root: str = '/') -> str:
  """Sets JAX_PLATFORMS in `environ` to the platforms this host has when
  libtpu is installed but no TPU is attached; returns what it set ('' for
  nothing).

  JAX otherwise starts libtpu on every host it is installed on (the dev
  extra brings it, for ztt-compile), and libtpu prints errors before the
  command's own output when it finds no TPU or another process holds it.
  A JAX_PLATFORMS already set is kept; on a TPU host nothing changes.
  Call it before jax is imported.
  """
  if environ.get('JAX_PLATFORMS') or importlib.util.find_spec(
      'libtpu') is None or _tpu_attached(root):
    return ''
  gpu = any(os.path.exists(os.path.join(root, d)) for d in _NVIDIA_DEVICES)
  cuda = gpu and any(importlib.util.find_spec(m) for m in _CUDA_PLUGINS)
  environ['JAX_PLATFORMS'] = 'cuda,cpu' if cuda else 'cpu'
  return environ['JAX_PLATFORMS']


def run(prog: str, fn: Callable[[], T]) -> T:
  """`fn()`, with quiet logs; a ConfigError becomes `prog: error: ...` on
  stderr and exit status 2. JAX_PLATFORMS defaults to this host's
  platforms (see `default_jax_platforms`)."""
  if 'jax' not in sys.modules:  # Read when jax is imported.
    default_jax_platforms()
  absl_flags.FLAGS.mark_as_parsed()  # Libraries may read absl flags.
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  try:
    return fn()
  except ConfigError as e:
    fail(prog, str(e))
