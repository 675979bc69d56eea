"""The seven console scripts: --help, one-line user errors, flags = library.

Each case is a fresh process, as a user runs it. Flag errors and --help
return before jax is imported (a fraction of a second); the cases that load
a config file import it (a few seconds each), so there are few of them.
"""

import dataclasses
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from ztt_jax import convert
from ztt_jax import evaluate
from ztt_jax import generate
from ztt_jax.commands import bench as bench_command
from ztt_jax.commands import common
from ztt_jax.commands import compile as compile_command
from ztt_jax.commands import convert as convert_command
from ztt_jax.commands import evaluate as evaluate_command
from ztt_jax.commands import generate as generate_command
from ztt_jax.commands import prepare as prepare_command
from ztt_jax.commands import train as train_command

REPO = pathlib.Path(__file__).resolve().parents[1]
# Command -> (entry module, whether it takes --config.FIELD=VALUE).
COMMANDS = {
    'ztt-train': (train_command, True),
    'ztt-generate': (generate_command, True),
    'ztt-eval': (evaluate_command, True),
    'ztt-bench': (bench_command, True),
    'ztt-compile': (compile_command, True),
    'ztt-convert': (convert_command, False),
    'ztt-prepare': (prepare_command, True),
}


def run(command: str, *args: str) -> subprocess.CompletedProcess:
  module = COMMANDS[command][0].__name__
  return subprocess.run([sys.executable, '-m', module, *args],
                        capture_output=True, text=True, cwd=REPO, timeout=120,
                        env={**os.environ, 'PYTHONPATH': str(REPO)})


@pytest.mark.parametrize('command, help_flag', [
    *[(c, '--help') for c in COMMANDS], ('ztt-eval', '-h')])
def test_help_lists_the_flags_and_exits_0(command, help_flag):
  result = run(command, help_flag)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ''
  out = result.stdout
  assert out.startswith(f'usage: {command} ')
  for field in dataclasses.fields(COMMANDS[command][0].Options):
    assert f'--{field.name}=' in out
    first_words = ' '.join(field.metadata['text'].split()[:3])
    assert first_words in ' '.join(out.split()), field.name
  takes_overrides = COMMANDS[command][1]
  assert ('--config.SECTION.FIELD=VALUE' in out) == takes_overrides
  if takes_overrides:
    assert f'{command} --' in out.split('config overrides:')[1]  # Example.


@pytest.mark.parametrize('command, args, expected', [
    ('ztt-train', ['--config=configs/nope.py', '--workdir=runs/x'],
     "'configs/nope.py' is not a file"),
    ('ztt-train', ['--config=configs/budget.py:2b', '--workdir=runs/x'],
     'configs/budget.py:2b: the argument is SIZE[,VARIANT]'),
    ('ztt-train', ['--config=configs/tiny.py', '--workdir=runs/x',
                   '--config.model.nope=1'], '--config.model.nope: no such'),
    ('ztt-compile', ['--config=configs/tiny.py', '--topology=v5e:2x2',
                     '--config.train.steps=many'],
     "--config.train.steps='many' is not an integer"),
    ('ztt-generate', ['--workdir=runs/x', '--prompt=a', '--max_tokens=5'],
     'unknown flag --max_tokens; did you mean --max_new_tokens?'),
    ('ztt-bench', ['--config=configs/tiny.py', '--workdir=x'],
     'unknown flag --workdir'),
    ('ztt-bench', ['--config=configs/tiny.py', '--steps=many'],
     "argument --steps: invalid int value: 'many'"),
    ('ztt-eval', ['--step=2'], '--workdir is required'),
    ('ztt-train', ['--workdir=runs/x'], '--config is required'),
    ('ztt-convert', ['--hf_dir=x', '--workdir=y', '--config.model.gate=none'],
     'unknown flag --config.model.gate; ztt-convert takes no --config'),
])
def test_user_error_is_one_line_and_exit_2(command, args, expected):
  result = run(command, *args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f'{command}: error: ') and '; ' in lines[0]
  assert expected in lines[0]
  assert result.stdout == ''
  assert not (REPO / 'runs' / 'x').exists()


def test_help_and_flag_errors_do_not_import_jax():
  code = textwrap.dedent("""
      import sys
      from ztt_jax.commands import (bench, compile, convert, evaluate,
                                    generate, prepare, train)
      for command, argv in ((train, ['--help']), (generate, ['--nope=1']),
                            (evaluate, ['--help']), (bench, ['--steps=x']),
                            (compile, ['--help']), (convert, []),
                            (prepare, ['--help'])):
        try:
          command.main(argv)
        except SystemExit:
          pass
      print('jax' in sys.modules)
  """)
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
  assert result.stdout.strip().splitlines()[-1] == 'False', result.stderr


@pytest.mark.parametrize('options, library_fn', [
    (generate_command.Options, generate.run_generate),
    (evaluate_command.Options, evaluate.run_eval),
    (convert_command.Options, convert.convert),
])
def test_flags_are_the_library_parameters(options, library_fn):
  # These commands pass their options straight on: same names, defaults.
  parameters = inspect.signature(library_fn).parameters
  for field in dataclasses.fields(options):
    default = (inspect.Parameter.empty if field.metadata['required']
               else field.default)
    assert parameters[field.name].default == default, field.name


def test_project_scripts_are_the_command_mains():
  tomllib = pytest.importorskip('tomllib')
  with open(REPO / 'pyproject.toml', 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert set(scripts) == set(COMMANDS)
  for command, target in scripts.items():
    module, function = target.split(':')
    assert (module, function) == (COMMANDS[command][0].__name__, 'main')


def _host(tmp_path, *files: tuple[str, str]) -> str:
  """A fake root: `files` are (path below it, content)."""
  for name, content in files:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
  return str(tmp_path)


@pytest.mark.parametrize('files, expected', [
    ((), 'cpu'),  # A CPU host: libtpu is never started.
    ((('sys/bus/pci/devices/0/vendor', '0x1ae0\n'),
      ('sys/bus/pci/devices/0/device', '0x0042\n')), 'cpu'),  # gVNIC only.
    ((('dev/accel0', ''),), ''),  # A TPU VM: left to JAX.
    ((('dev/vfio/0', ''),), ''),
    ((('sys/bus/pci/devices/0/vendor', '0x1ae0\n'),
      ('sys/bus/pci/devices/0/device', '0x0063\n')), ''),  # v5e.
])
def test_jax_platforms_default_without_a_tpu(tmp_path, monkeypatch, files,
                                              expected):
  monkeypatch.setattr(common.importlib.util, 'find_spec',
                      lambda name: object() if name == 'libtpu' else None)
  environ = {}
  assert common.default_jax_platforms(environ, _host(tmp_path, *files)) == (
      expected)
  assert environ.get('JAX_PLATFORMS', '') == expected
  mine = {'JAX_PLATFORMS': 'tpu'}  # Set by the user: kept.
  assert common.default_jax_platforms(mine, _host(tmp_path)) == ''
  assert mine == {'JAX_PLATFORMS': 'tpu'}


def test_jax_platforms_untouched_without_libtpu(tmp_path, monkeypatch):
  monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: None)
  environ = {}
  assert common.default_jax_platforms(environ, str(tmp_path)) == ''
  assert not environ


def test_cpu_commands_print_no_libtpu_lines(tmp_path):
  # ztt-generate as a user runs it (no JAX_PLATFORMS): only its own lines.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run(
      [sys.executable, '-c', 'from ztt_jax.commands import common; '
       'import os; common.run("x", lambda: None); import jax; '
       'print(os.environ.get("JAX_PLATFORMS"), jax.devices()[0].platform)'],
      capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
  assert result.returncode == 0 and result.stderr == '', result.stderr
  has_tpu = any(pathlib.Path('/dev').glob('accel[0-9]*'))
  if not has_tpu:
    assert result.stdout.split()[-1] in ('cpu', 'gpu', 'cuda'), result.stdout
