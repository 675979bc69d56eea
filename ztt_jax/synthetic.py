"""Built-in tasks whose per-token difficulty is known (`data.path=synthetic:*`).

Each example is a string of single characters (read with a char tokenizer
over the task's alphabet, so samples print as text), of which only the
answer tokens carry loss; each answer's difficulty travels with it.

* `synthetic:hops` (k-hop induction, Sanford et al. 2024): a context of
  random letters, then queries `k s a`: starting at the context's end with
  letter s, one hop moves to the letter after the previous occurrence of
  the current letter (an occurrence right before it, which would lead back
  to where it stands, is passed over); `a` is the letter k hops on. k (1..`max_hops`,
  default 4) is drawn per query, so difficulty varies within a sequence.
  `synthetic:hops:6` sets `max_hops` to 6.
* `synthetic:vars` (variable-binding chains): statements `b=7;`, `c=b;`
  in a shuffled order, then queries `?c=7`: the answer is the digit at the
  end of the chain of assignments that reaches the queried variable; its
  difficulty is the chain's length (1: bound to a digit directly, up to
  `max_depth`, default 4: `synthetic:vars:6`).

Example `i` of stream `stream` (0: training, 1: evaluation) is a pure
function of (seed, stream, i, row): any process draws any row of any step
without drawing the others, and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import numpy as np

from ztt_jax.errors import check

PREFIX = 'synthetic:'
TRAIN, EVAL = 0, 1


@dataclasses.dataclass(frozen=True)
class Example:
  """One window of `seq_len + 1` characters and its answers:
  `difficulty_W[i]` is the difficulty of the answer at position i (0: no
  answer there)."""
  text: str
  difficulty_W: np.ndarray


class Task:
  """A task: its alphabet, and how it draws an example of a given length."""

  name: str
  alphabet: str
  max_difficulty: int

  def example(self, rng: np.random.Generator, width: int) -> Example:
    raise NotImplementedError


class Hops(Task):
  """k-hop induction over a few letters (see the module docstring)."""

  name = 'hops'
  LETTERS = 'abcd'
  QUERY_TOKENS = 3  # k, s, answer.

  def __init__(self, max_hops: int = 4):
    check(1 <= max_hops <= 9, f'synthetic:hops:{max_hops}: the number of hops '
          'must be 1 to 9 (one digit)')
    self.max_difficulty = max_hops
    self.alphabet = self.LETTERS + '|' + string.digits[1:max_hops + 1]

  def queries(self, width: int) -> int:
    return max(1, width // (4 * self.QUERY_TOKENS))

  def example(self, rng: np.random.Generator, width: int) -> Example:
    q = self.queries(width)
    n_context = width - 1 - self.QUERY_TOKENS * q
    check(n_context >= 8, f'synthetic:hops needs data.seq_len >= '
          f'{8 + self.QUERY_TOKENS * q} for {q} queries')
    while True:
      context = rng.integers(len(self.LETTERS), size=n_context)
      answers = [self._query(rng, context) for _ in range(q)]
      if all(a is not None for a in answers):
        break
    text = ''.join(self.LETTERS[i] for i in context) + '|'
    difficulty_W = np.zeros(width, np.int32)
    for k, start, answer in answers:
      text += str(k) + self.LETTERS[start] + self.LETTERS[answer]
      difficulty_W[len(text) - 1] = k
    return Example(text, difficulty_W)

  def _query(self, rng, context_N):
    """(k, start letter, answer letter), redrawn a few times if a hop
    finds no previous occurrence; None if none works."""
    for _ in range(8):
      k = int(rng.integers(1, self.max_difficulty + 1))
      start = int(rng.integers(len(self.LETTERS)))
      answer = hop(context_N, start, k)
      if answer is not None:
        return k, start, answer
    return None


def hop(context_N: Sequence[int], start: int, k: int) -> int | None:
  """The letter k hops on from the end of `context_N` with letter `start`:
  each hop goes to the position after the latest earlier occurrence of the
  current letter; None when there is no such occurrence."""
  context_N = list(context_N)
  p, letter = len(context_N), start
  for _ in range(k):
    earlier = [j for j in range(p - 1, -1, -1) if context_N[j] == letter]
    # The position after an occurrence must be inside the context (and not
    # the current one, which would go nowhere).
    earlier = [j for j in earlier if j + 1 < len(context_N) and j + 1 != p]
    if not earlier:
      return None
    p = earlier[0] + 1
    letter = context_N[p]
  return letter


class Vars(Task):
  """Variable-binding chains (see the module docstring)."""

  name = 'vars'
  NAMES = string.ascii_lowercase
  STATEMENT, QUERY = 4, 4  # `b=c;` and `?c=7`.

  def __init__(self, max_depth: int = 4):
    check(1 <= max_depth <= 8, f'synthetic:vars:{max_depth}: the chain depth '
          'must be 1 to 8')
    self.max_difficulty = max_depth
    self.alphabet = ' ;=?' + string.digits + self.NAMES

  def example(self, rng: np.random.Generator, width: int) -> Example:
    # As many queried chains as fit at the deepest depth; the rest of the
    # window is unqueried chains (distractors) and leading spaces.
    q = max(1, width // (self.STATEMENT * self.max_difficulty + self.QUERY
                         + self.STATEMENT))
    budget = (width - self.QUERY * q) // self.STATEMENT
    check(budget >= q * self.max_difficulty,
          f'synthetic:vars:{self.max_difficulty} needs data.seq_len >= '
          f'{q * (self.STATEMENT * self.max_difficulty + self.QUERY) - 1}')
    depths = [int(d) for d in rng.integers(1, self.max_difficulty + 1, q)]
    names = iter(rng.permutation(len(self.NAMES)))
    chains, used = [], sum(depths)
    for depth in depths + [0] * budget:
      if depth == 0:  # A distractor, as long as the budget allows.
        if used >= budget or len(chains) >= len(self.NAMES) // 2:
          break
        depth = int(rng.integers(1, min(self.max_difficulty,
                                        budget - used) + 1))
        used += depth
      chains.append([self.NAMES[next(names)] for _ in range(depth)])
    statements, values = [], []
    for chain in chains:
      value = str(int(rng.integers(10)))
      values.append(value)
      sources = [value] + chain[:-1]
      statements += [(i, f'{name}={src};')
                     for i, (name, src) in enumerate(zip(chain, sources))]
    # Interleaved at random, each chain's own statements in order (a
    # binding comes before its use, as in a program).
    text = ''.join(s for _, s in _ordered(statements, rng))
    text = ' ' * (width - len(text) - self.QUERY * q) + text
    difficulty_W = np.zeros(width, np.int32)
    for depth, chain, value in zip(depths, chains, values):
      text += f'?{chain[-1]}={value}'
      difficulty_W[len(text) - 1] = depth
    return Example(text, difficulty_W)


def _ordered(statements, rng):
  """Interleaves the chains' statements at random, each chain in order."""
  chains = []
  for depth_index, s in statements:
    if depth_index == 0:
      chains.append([])
    chains[-1].append((depth_index, s))
  out = []
  while any(chains):
    live = [c for c in chains if c]
    pick = live[int(rng.integers(len(live)))]
    out.append(pick.pop(0))
  return out


TASKS = {'hops': Hops, 'vars': Vars}


def is_synthetic(path: str) -> bool:
  return isinstance(path, str) and path.startswith(PREFIX)


def parse(path: str) -> Task:
  """The task `data.path` names: `synthetic:NAME` or `synthetic:NAME:N`."""
  name, _, arg = path[len(PREFIX):].partition(':')
  check(name in TASKS, f'data.path={path!r}: no synthetic task {name!r}; '
        f'use one of {", ".join(PREFIX + t for t in TASKS)}')
  check(arg == '' or arg.isdigit(), f'data.path={path!r}: after the task '
        f'name comes a whole number (synthetic:{name}:4)')
  return TASKS[name]() if arg == '' else TASKS[name](int(arg))


def draw(task: Task, seed: int, stream: int, index: int, row: int,
         width: int) -> Example:
  """Example `row` of element `index` of a stream: a pure function of its
  arguments."""
  rng = np.random.default_rng([seed, stream, index, row])
  example = task.example(rng, width)
  assert len(example.text) == width, (task.name, len(example.text), width)
  return example
