"""Multi-process start-up and recovery logic, with faked processes.

Two threads stand in for two processes (their collectives are a
threading.Barrier), so the ordering of the shared-workdir check, corpus
preparation by process 0 and checkpoint quarantine is tested without
starting JAX processes (tests/test_multihost.py does that once).
"""

import os
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from ztt_jax import checkpoint
from ztt_jax import data
from ztt_jax import multihost
from ztt_jax import tokenizers
from ztt_jax import train
from ztt_jax.commands import train as train_command
from ztt_jax.errors import ConfigError


class _FakeRun:
  """`n` thread "processes" whose collectives meet at a barrier."""

  def __init__(self, n: int = 2):
    self.n = n
    self._barrier = threading.Barrier(n, timeout=20)
    self._values = [None] * n
    self.events = []  # (process, what), in the order they happened.
    self._lock = threading.Lock()

  def log(self, i, what):
    with self._lock:
      self.events.append((i, what))

  def comms(self, i: int) -> multihost.Comms:
    def exchange(x):
      self._values[i] = x
      self._barrier.wait()
      values = list(self._values)
      self._barrier.wait()
      return values

    def barrier(name):
      self.log(i, f'barrier {name}')
      self._barrier.wait()

    return multihost.Comms(
        i, self.n, barrier, lambda x: exchange(x)[0],
        lambda x: np.asarray(exchange(x)).reshape(-1))

  def run(self, fn):
    """fn(i, comms) on every process; [(result, exception)] per process."""
    out = [None] * self.n

    def target(i):
      try:
        out[i] = (fn(i, self.comms(i)), None)
      except Exception as e:  # pylint: disable=broad-except
        out[i] = (None, e)  # A process that never reaches a collective
        # its peer waits at shows up as BrokenBarrierError (timeout).

    threads = [threading.Thread(target=target, args=(i,))
               for i in range(self.n)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    return out


# ------------------------------------------------------------ shared workdir


def test_shared_workdir_passes_and_leaves_nothing(tmp_path):
  workdir = str(tmp_path / 'run')
  out = _FakeRun(2).run(
      lambda i, c: multihost.check_shared_workdir(workdir, c))
  assert out == [(None, None), (None, None)]
  assert os.listdir(workdir) == []  # The nonce file is removed.


def test_per_host_workdir_fails_on_every_process(tmp_path):
  # Process 1's "workdir" is its own local directory: the nonce never
  # reaches it.
  dirs = [str(tmp_path / 'host0' / 'run'), str(tmp_path / 'host1' / 'run')]
  out = _FakeRun(2).run(
      lambda i, c: multihost.check_shared_workdir(dirs[i], c))
  for _, error in out:
    assert isinstance(error, ConfigError)
    message = str(error)
    assert 'is not shared: process(es) 1 of 2 cannot see' in message
    assert '\n' not in message and 'mount' in message


# ------------------------------------------------------- corpus preparation


def _data_config(corpus, cache):
  config = tiny.get_config('ztt').data
  config.path, config.seq_len, config.cache_dir = corpus, 16, str(cache)
  return config


def test_corpus_is_prepared_by_process_0_then_read(tmp_path, corpus):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  fake = _FakeRun(2)

  def spy(data_config, wd, write=True):
    i = 0 if write else 1
    fake.log(i, f'prepare write={write}')
    result = data.load_corpus(data_config, wd, write=write)
    fake.log(i, 'prepared')
    return result

  def process(i, comms):
    if i == 1:
      # Process 1 reaches the call first; it must still wait for 0.
      fake.log(1, 'start')
    else:
      threading.Event().wait(0.2)
    return multihost.coordinated_corpus(_data_config(corpus, cache),
                                    str(workdir), comms, load=spy)

  out = fake.run(process)
  assert [e for _, e in out] == [None, None]
  prepares = [e for e in fake.events if e[1] != 'start']
  # Process 0 prepares (writes) and finishes before process 1 reads.
  assert prepares[:2] == [(0, 'prepare write=True'), (0, 'prepared')]
  assert prepares[2] == (1, 'prepare write=False')
  (c0, _), (c1, _) = out
  np.testing.assert_array_equal(c0.train_N, c1.train_N)
  assert c0.tokenizer.name == c1.tokenizer.name


def test_read_only_prepare_writes_nothing(tmp_path, corpus):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  # No tokenizer.json yet: the read-only side refuses, and writes nothing.
  with pytest.raises(ConfigError, match='tokenizer.json'):
    data.load_corpus(_data_config(corpus, cache), workdir, write=False)
  assert not workdir.exists() and not cache.exists()
  written = data.load_corpus(_data_config(corpus, cache), workdir)
  # A cache this process cannot see (host-local): tokenized in memory.
  other_cache = tmp_path / 'other_cache'
  before = sorted(os.listdir(workdir))
  read = data.load_corpus(_data_config(corpus, other_cache), workdir,
                      write=False)
  assert not other_cache.exists() and sorted(os.listdir(workdir)) == before
  np.testing.assert_array_equal(read.train_N, written.train_N)
  assert read.train_N.dtype == written.train_N.dtype


def test_a_failure_on_process_0_stops_every_process(tmp_path):
  def broken(data_config, wd, write=True):
    raise ConfigError('data.path: no such file; fix it')

  out = _FakeRun(2).run(lambda i, c: multihost.coordinated_corpus(
      None, str(tmp_path), c, load=broken))
  assert 'no such file' in str(out[0][1])
  assert 'process 0 could not prepare the corpus' in str(out[1][1])


# --------------------------------------------------------------- URL workdir


def test_url_workdir_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = os.path.join(os.path.dirname(__file__), '..', 'configs',
                        'tiny.py')
  with pytest.raises(SystemExit) as e:
    train_command.main([f'--config={config}', '--workdir=gs://bucket/run'])
  assert e.value.code == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('ztt-train: error: --workdir=gs://bucket/run: URL '
                         'workdirs are not supported yet')
  assert '--mount_bucket' in line
  assert os.listdir(tmp_path) == []  # No ./gs:/bucket/run made.
  with pytest.raises(ConfigError, match='URL workdirs'):
    checkpoint.checkpoint_dir('s3://b/run')


# ----------------------------------------------------------------- restore


def _state(value: float):
  params = {'w': jnp.full((4, 2), value), 'b': jnp.arange(3.0) + value}
  return train.TrainState(jnp.asarray(0, jnp.int32), params,
                          {'mu': jax.tree.map(jnp.zeros_like, params)})


def _saved(tmp_path, steps=(2, 4)):
  """A Checkpointer holding tiny checkpoints at `steps`, and a target."""
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', 1, 5,
                                 async_save=False)
  dataset = data.make_train_dataset(np.arange(500, dtype=np.uint16), 8, 4, 0)
  config = ml_collections.ConfigDict({'seed': 0})
  for step in steps:
    iterator = data.make_train_iterator(dataset)
    for _ in range(step):
      next(iterator)
    ckpt.save(step, _state(step).replace(step=jnp.asarray(step)), iterator,
              config, force=True)
  ckpt.wait()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = checkpoint.with_sharding(
      jax.eval_shape(lambda: _state(0)),
      jax.tree.map(lambda _: device, _state(0)))
  return ckpt, target, dataset


def _as_if_written_by_two_processes(ckpt, step):
  data_dir = os.path.join(ckpt.directory, str(step), 'data')
  os.rename(os.path.join(data_dir, 'process_0-of-1.json'),
            os.path.join(data_dir, 'process_0-of-2.json'))
  with open(os.path.join(data_dir, 'process_1-of-2.json'), 'w') as f:
    f.write('{"next_index": 999}')


def test_a_non_corruption_error_is_raised_and_moves_nothing(tmp_path):
  ckpt, target, dataset = _saved(tmp_path)

  def out_of_memory(step, *args):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to '
                       'allocate 17179869184 bytes')

  ckpt.restore = out_of_memory
  with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
    ckpt.restore_latest_good(target, data.make_train_iterator(dataset),
                             comms=multihost.Comms.single())
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  ckpt.close()


def test_corruption_is_moved_by_process_0_only(tmp_path):
  ckpt, target, dataset = _saved(tmp_path)
  for step in (2, 4):  # Written by the two processes restoring it.
    _as_if_written_by_two_processes(ckpt, step)
  real_restore = ckpt.restore

  def damaged_4(step, *args):
    if step == 4:
      raise Exception('Encountered error while reading array') from (
          ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database:'
                     ' Requested byte range [10, 99) is not valid'))
    return real_restore(step, *args)

  ckpt.restore = damaged_4
  for index in (1, 0):  # Process 1 first: it must not move anything.
    barriers = []
    comms = multihost.Comms(index, 2, barriers.append, lambda x: x,
                            lambda x: np.asarray([x, x]))
    warnings = []
    state, step = ckpt.restore_latest_good(
        target, data.make_train_iterator(dataset), warnings.append, comms)
    assert step == 2 and barriers == ['ztt_quarantine_4']
    np.testing.assert_allclose(state.params['w'], 2.0)
    assert 'warning: checkpoint 4 is unreadable (Exception: Encountered' in (
        warnings[0])
    if index == 1:
      assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  [kept] = os.listdir(tmp_path / 'checkpoints_corrupt')
  assert kept.startswith('4-')
  ckpt.close()


def test_another_process_count_restores_and_recomputes_the_data(tmp_path):
  ckpt, target, dataset = _saved(tmp_path)
  _as_if_written_by_two_processes(ckpt, 4)
  assert ckpt.saved_process_count(4) == 2
  iterator = data.make_train_iterator(dataset)
  state, step = ckpt.restore_latest_good(target, iterator,
                                         comms=multihost.Comms.single())
  assert step == 4 and int(state.step) == 4
  np.testing.assert_allclose(state.params['w'], 4.0)
  np.testing.assert_array_equal(next(iterator)['inputs'],
                                dataset[4]['inputs'])
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  ckpt.close()


def test_another_process_count_that_fails_is_refused_not_moved(tmp_path):
  ckpt, target, dataset = _saved(tmp_path)
  _as_if_written_by_two_processes(ckpt, 4)

  def mismatch(*args, **kwargs):
    raise ValueError('Sharding of the saved array does not match: '
                     'NOT_FOUND: process_1 shard')

  ckpt.manager.restore = mismatch
  with pytest.raises(ConfigError) as e:
    ckpt.restore_latest_good(target, data.make_train_iterator(dataset),
                             comms=multihost.Comms.single())
  message = str(e.value)
  assert '\n' not in message
  assert 'written by 2 processes' in message
  assert 'resume with 2 processes' in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  ckpt.close()


@pytest.mark.parametrize('error, corrupt', [
    (ValueError('DATA_LOSS: Error reading "w" in OCDBT database'), True),
    (FileNotFoundError('params/_METADATA'), True),
    (ValueError('File data/process_0-of-1.json does not exist.'), True),
    (MemoryError(), False),
    (RuntimeError('RESOURCE_EXHAUSTED: out of memory'), False),
    (TypeError('unsupported operand'), False),
])
def test_is_corruption(error, corrupt):
  assert checkpoint.is_corruption(error) == corrupt
