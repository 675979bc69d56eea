"""Synthetic tasks with known difficulty: answers checked by independent
solvers, the stream's determinism and resume, the loss mask through train
and eval, and ztt-eval's scores by difficulty."""

import dataclasses
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ztt_jax import data
from ztt_jax import difficulty
from ztt_jax import evaluate
from ztt_jax import exits
from ztt_jax import model as model_lib
from ztt_jax import synthetic
from ztt_jax import train
from ztt_jax import ztt
from ztt_jax.errors import ConfigError


def solve_hops(context: str, start: str, k: int) -> str | None:
  """k-hop induction by string search: from the end of `context` with
  letter `start`, jump to the letter after the latest earlier occurrence
  of the current letter (not the one right before it)."""
  pos, letter = len(context), start
  for _ in range(k):
    j = context.rfind(letter, 0, pos)
    while j != -1 and (j + 1 == pos or j + 1 >= len(context)):
      j = context.rfind(letter, 0, j)
    if j == -1:
      return None
    pos = j + 1
    letter = context[pos]
  return letter


def solve_vars(program: str, name: str) -> tuple[str, int]:
  """The digit a variable holds and the chain's length, by evaluating the
  statements."""
  binding = dict(s.split('=') for s in program.strip().split(';') if s)
  depth, value = 1, binding[name]
  while not value.isdigit():
    depth, value = depth + 1, binding[value]
  return value, depth


def test_hops_answers_match_an_independent_solver():
  task = synthetic.parse('synthetic:hops')
  seen = set()
  for i in range(40):
    e = synthetic.draw(task, 3, synthetic.TRAIN, i, 0, 65)
    assert len(e.text) == 65
    context, queries = e.text.split('|')
    assert set(context) <= set('abcd') and len(queries) % 3 == 0
    answers = np.flatnonzero(e.difficulty_W)
    assert len(answers) == len(queries) // 3
    for n, pos in enumerate(answers):
      k, start, answer = queries[3 * n: 3 * n + 3]
      assert pos == len(context) + 1 + 3 * n + 2
      assert e.text[pos] == answer == solve_hops(context, start, int(k))
      assert e.difficulty_W[pos] == int(k)
      seen.add(int(k))
  assert seen == {1, 2, 3, 4}  # Difficulty varies within the stream.


def test_vars_answers_match_an_independent_solver():
  task = synthetic.parse('synthetic:vars:5')
  seen = set()
  for i in range(40):
    e = synthetic.draw(task, 0, synthetic.EVAL, i, 1, 65)
    assert len(e.text) == 65
    program, *queries = e.text.split('?')
    for q, pos in zip(queries, np.flatnonzero(e.difficulty_W)):
      name, value = q.split('=')
      assert e.text[pos] == value
      assert solve_vars(program, name) == (value, e.difficulty_W[pos])
      seen.add(int(e.difficulty_W[pos]))
  assert seen == {1, 2, 3, 4, 5}


def test_examples_are_a_function_of_seed_stream_index_and_row():
  task = synthetic.parse('synthetic:hops')
  draw = lambda *a: synthetic.draw(task, *a, 33).text
  assert draw(0, 0, 5, 2) == draw(0, 0, 5, 2)
  others = {draw(1, 0, 5, 2), draw(0, 1, 5, 2), draw(0, 0, 6, 2),
            draw(0, 0, 5, 3)}
  assert draw(0, 0, 5, 2) not in others and len(others) == 4


@pytest.mark.parametrize('path, match', [
    ('synthetic:nope', 'no synthetic task'),
    ('synthetic:hops:x', 'whole number'),
    ('synthetic:hops:12', '1 to 9'),
])
def test_bad_task_names_are_one_line(path, match):
  with pytest.raises(ConfigError, match=match) as e:
    synthetic.parse(path)
  assert '\n' not in str(e.value)


def synthetic_config(path='synthetic:hops', **train_overrides):
  config = tiny.get_config('ztt')
  config.data.update(path=path, seq_len=32)
  config.train.update(**train_overrides)
  config.sample.max_new_tokens = 0
  config.checkpoint.async_save = False
  return config


def test_the_stream_reads_only_its_rows_and_resumes(tmp_path):
  corpus = data.load_corpus(synthetic_config().data, tmp_path)
  full = data.train_dataset(corpus, 32, 4, seed=7)
  part = data.train_dataset(corpus, 32, 4, seed=7, rows_R=[1, 3])
  for key in ('inputs', 'targets', 'mask', 'difficulty'):
    np.testing.assert_array_equal(full[5][key][[1, 3]], part[5][key])
  b = full[0]
  # The mask marks the answers: the targets at positions with a difficulty.
  np.testing.assert_array_equal(b['mask'] > 0, b['difficulty'] > 0)
  np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
  it = data.make_train_iterator(full)
  next(it), next(it)
  state = it.get_state()
  expected = next(it)
  resumed = data.make_train_iterator(full)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['inputs'], expected['inputs'])
  # The tokenizer is the task's alphabet, saved like any other.
  assert corpus.tokenizer.vocab_size == len(corpus.task.alphabet)
  with pytest.raises(ConfigError, match='data.tokenizer=char'):
    cfg = synthetic_config().data
    cfg.tokenizer = 'byte'
    data.load_corpus(cfg, tmp_path / 'other')


def test_the_loss_mask_scores_only_marked_targets(tmp_path):
  config = synthetic_config()
  corpus = data.load_corpus(config.data, tmp_path)
  batch = jax.tree.map(jnp.asarray, data.eval_set(corpus, 32, 4, 1)[0])
  config.model.vocab_size = corpus.tokenizer.vocab_size
  module = model_lib.build(config.model)
  params = module.init(jax.random.key(0), batch['inputs'])['params']
  cfg = module.cfg
  loss, aux = train.loss_fn(module, cfg, params, batch, jax.random.key(1),
                            deterministic=True)
  out = module.apply({'params': params}, batch['inputs'])
  ce_CxBxT = np.asarray(exits.head_losses(out, batch['targets']))
  m = np.asarray(batch['mask']) > 0
  by_hand_C = np.array([ce[m].mean() for ce in ce_CxBxT])
  np.testing.assert_allclose(aux['ce_cycle'], by_hand_C, rtol=1e-6)
  np.testing.assert_allclose(
      loss, np.sum(np.asarray(ztt.exit_weights(cfg)) * by_hand_C),
      rtol=1e-6)
  # The features path (chunked cross-entropy) scores the same targets.
  chunked = dataclasses.replace(cfg, ce_chunk_len=8)
  logits_fn = lambda h: module.apply(
      {'params': params}, h, method=model_lib.Transformer.lm_logits)
  features = module.apply({'params': params}, batch['inputs'],
                          logits=False).features
  np.testing.assert_allclose(exits.feature_losses(
      chunked, logits_fn, features, batch['targets'], jax.random.key(0),
      batch['mask']), by_hand_C, rtol=1e-5)
  # Eval sums over the same targets.
  outs = [jax.device_get(evaluate.eval_outputs(module, params, batch))]
  summary = evaluate.summarize_outputs(outs, cfg.exit_heads)
  np.testing.assert_allclose(summary['val_loss_cycle'], by_hand_C, rtol=1e-6)
  hits = np.argmax(np.asarray(out.cycle_logits[-1]), -1) == np.asarray(
      batch['targets'])
  assert summary['val_accuracy'] == pytest.approx(hits[m].mean())


def test_rank_correlation():
  np.testing.assert_array_equal(difficulty.rank([10, 20, 20, 5]),
                                [2, 3.5, 3.5, 1])
  assert difficulty.spearman([1, 2, 3, 4], [1, 3, 5, 9]) == pytest.approx(1)
  assert difficulty.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
  assert difficulty.spearman([1, 1, 1], [1, 2, 3]) is None


@pytest.mark.slow(20)
def test_a_synthetic_run_trains_and_evaluates_by_difficulty(tmp_path):
  config = synthetic_config(steps=4, eval_every_steps=2, eval_batches=1,
                            log_every_steps=2)
  train.train(config, str(tmp_path / 'run'))
  rows = [json.loads(line) for line in open(tmp_path / 'run' /
                                            'metrics.jsonl')]
  assert 0 <= rows[-1]['val_accuracy'] <= 1 and 'val_loss' in rows[-1]
  out = io.StringIO()
  result = evaluate.run_eval(str(tmp_path / 'run'), per='token',
                             n_thresholds=2, stream=out)
  n_answers = 8 * 2  # Batch 8, two queries in a window of 33.
  for r in result:
    assert sum(b['n'] for b in r['by_difficulty']) == n_answers
    assert r['val_accuracy'] == pytest.approx(sum(
        b['accuracy'] * b['n'] for b in r['by_difficulty']) / n_answers)
  fixed = [r for r in result if r['criterion'] == 'fixed']
  for k, r in enumerate(fixed, 1):
    assert all(b['mean_cycles'] == k for b in r['by_difficulty'])
    assert r['cycles_difficulty_spearman'] is None
  md = (tmp_path / 'run' / 'eval' / 'early_exit.md').read_text()
  assert re.search(r'acc\. / cycles at 1', md)
  assert (tmp_path / 'run' / 'eval' / 'early_exit_difficulty.png').exists()
  assert 'by difficulty' in out.getvalue()
