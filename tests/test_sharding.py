"""Meshes and sharding: 8 forced CPU devices train like 1, params sharded."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from ztt_jax import configlib
from ztt_jax import params as params_lib
from ztt_jax import sharding
from ztt_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = ('8,1,1', '2,2,2', '1,4,2')

# Runs in a subprocess with 8 forced CPU devices: the train step of
# Setup.jit_train_step (what train.train runs) for 5 steps on 1 device and on
# each mesh; prints the losses and, for (2,2,2), the sharding of an MLP kernel
# and its Adam moments after training.
_SCRIPT = r'''
import json, sys
import jax
from configs import tiny
from ztt_jax import data, train
from ztt_jax import params as params_lib

def run(mesh, devices, corpus, workdir, init=None):
  config = tiny.get_config('ztt')
  config.data.path = corpus
  config.data.seq_len = 16
  config.train.batch_size = 16
  config.model.vocab_size = 159  # Odd: tensor=2 cannot split it.
  config.mesh.update(dict(zip(('data', 'fsdp', 'tensor'), mesh)))
  setup = train.Setup(config, workdir, devices=devices)
  step_fn, _, shardings, batch_sharding = setup.jit_train_step()
  dataset = data.make_train_dataset(setup.corpus.train_N, 16, 16, config.seed)
  losses = []
  with setup.context():
    if init is None:  # (What train.train does.)
      state = setup.jit_init()(jax.random.key(config.seed))
      init = jax.device_get(state)
    else:  # The same initial state, placed on this mesh (no re-init compile).
      state = jax.device_put(init, shardings)
    for step in range(5):
      state, metrics = step_fn(
          state, data.to_global_batch(dataset[step], batch_sharding))
      losses.append(float(metrics['loss']))
  return state, losses, init

corpus, workdir = sys.argv[1:]
assert len(jax.devices()) == 8, jax.devices()
out = {}
_, out['1'], init = run((1, 1, 1), jax.devices()[:1], corpus, workdir)
for mesh in ('8,1,1', '2,2,2', '1,4,2'):
  state, out[mesh], _ = run(tuple(map(int, mesh.split(','))), None, corpus,
                            workdir, init)
  if mesh == '2,2,2':
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      name = jax.tree_util.keystr(path)
      if name.endswith("['mlp']['up']['kernel']") or name.endswith(
          "['embed']['embedding']"):
        kind = 'param' if name.startswith('.params') else (
            'mu' if '.mu' in name else 'nu' if '.nu' in name else None)
        if kind:
          key = kind + ('_embed' if 'embedding' in name else '_mlp')
          specs[key] = {'spec': [a for a in leaf.sharding.spec],
                        'shape': list(leaf.shape),
                        'shard': list(leaf.addressable_shards[0].data.shape)}
    out['specs'] = specs
print('RESULT ' + json.dumps(out))
'''


def forced_cpu_env(n_devices: int, tmp_path) -> dict[str, str]:
  """Environment for a subprocess with `n_devices` CPU devices."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={n_devices} '
                       + os.environ['ZTT_TEST_XLA_FLAGS'],
          'ZTT_CACHE_DIR': str(tmp_path / 'cache'),
          'PYTHONPATH': str(REPO),
          'JAX_COMPILATION_CACHE_DIR': os.environ['ZTT_TEST_XLA_CACHE']}


@pytest.mark.slow(25)
def test_meshes_train_like_one_device_with_sharded_state(tmp_path, corpus):
  result = subprocess.run(
      [sys.executable, '-c', _SCRIPT, corpus, str(tmp_path / 'run')],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env=forced_cpu_env(8, tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')]
  out = json.loads(line[-1][len('RESULT '):])
  # Same losses on every mesh (float32; only reduction order differs).
  assert len(out['1']) == 5 and len(set(out['1'])) > 1
  for mesh in MESHES:
    np.testing.assert_allclose(out[mesh], out['1'], rtol=1e-4,
                               err_msg=f'mesh {mesh}')
  # (2,2,2): MLP kernels [layers, D, F] split D over fsdp and F over tensor,
  # params and both Adam moments alike; each device holds a quarter.
  specs = out['specs']
  for kind in ('param', 'mu', 'nu'):
    mlp = specs[f'{kind}_mlp']
    assert mlp['spec'] == [None, 'fsdp', 'tensor'], (kind, mlp)
    layers, d, f = mlp['shape']
    assert mlp['shard'] == [layers, d // 2, f // 2], (kind, mlp)
  # The embedding [159, D]: tensor=2 does not divide the vocabulary, so that
  # dimension is replicated instead; D is still split over fsdp.
  embed = specs['param_embed']
  assert embed['shape'][0] == 159 and embed['spec'] == [None, 'fsdp'], embed
  assert embed['shard'] == [159, embed['shape'][1] // 2], embed
  assert specs['mu_embed']['spec'] == embed['spec']


def test_default_rules_are_fsdp_plus_tensor_parallel():
  rules = dict(sharding.rules(configlib.base_config()))
  assert rules['activation_batch'] == ('data', 'fsdp')
  assert rules['embed'] == 'fsdp'
  for name in ('heads', 'mlp', 'vocab', 'activation_mlp'):
    assert rules[name] == 'tensor', name
  for name in ('kv', 'layers', 'cycles', 'activation_length',
               'activation_embed'):
    assert rules[name] is None, name
  # Every logical axis the model uses on a parameter has a rule.
  from ztt_jax import model  # pylint: disable=g-import-not-at-top
  boxed = params_lib.abstract_params(model.build(tiny.get_config().model.to_dict()
                                            | {'vocab_size': 64}), boxed=True)
  used = set()
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, 'names')):
    used.update(n for n in leaf.names if n)
  assert used <= set(rules), used - set(rules)


class _Mesh:
  shape = {'data': 2, 'fsdp': 4, 'tensor': 2}


@pytest.mark.parametrize('spec, shape, expected', [
    (P('fsdp', 'tensor'), (8, 6), P('fsdp', 'tensor')),
    (P('fsdp', 'tensor'), (8, 5), P('fsdp')),
    (P('tensor', 'fsdp'), (65, 32), P(None, 'fsdp')),
    (P(('data', 'fsdp')), (16,), P(('data', 'fsdp'))),
    (P(('data', 'fsdp')), (6,), P('data')),
    (P(None, None), (3, 3), P()),
])
def test_fit_spec_drops_axes_that_do_not_divide(spec, shape, expected):
  assert sharding.fit_spec(spec, shape, _Mesh()) == expected


def test_batch_must_split_over_data_parallel_devices():
  rules = sharding.rules(configlib.base_config())
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  assert sharding.batch_shards(mesh, rules) == 4  # data x fsdp.
  sharding.check_batch(8, 2, mesh, rules)  # Micro-batches of 4 rows.
  for batch_size, accum in ((8, 4), (6, 1)):
    with pytest.raises(ConfigError, match='train.batch_size') as e:
      sharding.check_batch(batch_size, accum, mesh, rules)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('args, message', [
    (('127.0.0.1:1234', None, None), '--num_processes, --process_id missing'),
    ((None, 2, 0), '--coordinator_address missing'),
    (('127.0.0.1:1234', 2, 2), 'not in 0..1'),
    (('127.0.0.1', 2, 0), 'needs a port'),
])
def test_partial_distributed_flags_are_one_line_errors(monkeypatch, args,
                                                       message):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(ConfigError, match=message) as e:
    sharding.maybe_initialize_distributed(*args)
  assert '\n' not in str(e.value)


def test_no_cluster_means_one_process(monkeypatch):
  for var in list(os.environ):
    if var.startswith(('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'JAX_COORD',
                       'JAX_NUM_PROC', 'JAX_PROCESS')):
      monkeypatch.delenv(var)
  monkeypatch.setattr(sharding.glob, 'glob', lambda pattern: [])
  assert sharding.maybe_initialize_distributed() == 'single'
  assert sharding.maybe_initialize_distributed(None, 1, None) == 'single'
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[01-02]')
  monkeypatch.setenv('SLURM_PROCID', '0')
  monkeypatch.setenv('SLURM_LOCALID', '0')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert sharding._managed_cluster() is None  # One task: nothing to join.
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert sharding._managed_cluster() == 'slurm'


def test_cluster_without_coordinator_is_a_one_line_error(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(sharding.glob, 'glob', lambda pattern: (
      ['/dev/vfio/0'] if pattern == '/dev/vfio/[0-9]*' else []))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)

  def initialize():
    raise ValueError('coordinator_address should be defined.')

  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  with pytest.raises(ConfigError, match='cloud-tpu job.*--coordinator_address'
                     ) as e:
    sharding.maybe_initialize_distributed()
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('mesh, n_devices, ici, dcn', [
    ({'data': -1, 'fsdp': 1, 'tensor': 1}, 8, (8, 1, 1), (1, 1, 1)),
    ({'data': -1, 'fsdp': 2, 'tensor': 2, 'dcn_data': 2}, 16, (2, 2, 2),
     (2, 1, 1)),
    ({'data': 1, 'fsdp': -1, 'tensor': 4, 'dcn_data': 4}, 64, (1, 4, 4),
     (4, 1, 1)),
])
def test_dcn_data_repeats_the_slice_layout_along_data(mesh, n_devices, ici,
                                                      dcn):
  assert sharding.mesh_shapes(mesh, n_devices) == (ici, dcn)


@pytest.mark.parametrize('mesh, message', [
    ({'dcn_data': 0}, 'mesh.dcn_data=0 must be a positive integer'),
    ({'dcn_data': 3}, 'mesh.dcn_data=3 does not divide the 16 devices'),
    ({'data': 4, 'dcn_data': 2},
     'needs 4 devices per slice (mesh.dcn_data=2) but 8 are present'),
])
def test_bad_dcn_mesh_is_one_line(mesh, message):
  mesh = {'data': -1, 'fsdp': 1, 'tensor': 1, **mesh}
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(
      ')', r'\)')) as e:
    sharding.mesh_shapes(mesh, 16)
  assert '\n' not in str(e.value)


class _FakeDevice:
  """A CPU-platform device that says which slice or process it is in."""
  platform = device_kind = 'cpu'

  def __init__(self, id_, **granule):
    self.id = id_
    self.__dict__.update(granule)

  def __repr__(self):
    return f'D{self.id}'


@pytest.mark.parametrize('granule', ['slice_index', 'process_index'])
def test_hybrid_mesh_stacks_slices_along_data(granule):
  # Two slices (or processes, where every device says slice 0) of four
  # devices, listed interleaved: the grouping is by granule, not by order.
  devices = [_FakeDevice(i, **{'slice_index': 0, 'process_index': 0,
                               granule: i % 2}) for i in range(8)]
  ici, dcn = sharding.mesh_shapes(
      {'data': 1, 'fsdp': 2, 'tensor': 2, 'dcn_data': 2}, 8)
  array = sharding.hybrid_device_array(ici, dcn, devices)
  assert array.shape == (2, 2, 2)
  for data_index in range(2):
    assert {getattr(d, granule) for d in array[data_index].flat} == {
        data_index}
  with pytest.raises(ConfigError, match='mesh.dcn_data=4 but the 8 devices '
                     'are in 2 (slices|processes); set mesh.dcn_data=2'):
    sharding.hybrid_device_array((2, 1, 1), (4, 1, 1), devices)


def test_dcn_data_on_one_process_is_refused_in_one_line():
  config = configlib.base_config()
  config.mesh.update(data=-1, dcn_data=2)
  with pytest.raises(ConfigError, match='in 1 process;') as e:
    sharding.make_mesh(config.mesh, [_FakeDevice(i, process_index=0)
                                     for i in range(2)])
  assert '\n' not in str(e.value)
