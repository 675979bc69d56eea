"""How a study is described: its runs, seeds, flags and early-exit sweeps.

A `Study` is data, no training: the first grid (grid.py), the fair grid
(fair.py) and the regime search (regime.py) are each one `Study`, which the
runner (runner.py) trains and the reports read. A `Run` is a name and the
config overrides that make it; `model_run` builds the usual one (a variant,
its cycles, other model fields).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained configuration, at any seed."""
  name: str  # Also its directory under the study's output: NAME/seedS.
  group: str  # 'main' (the equal-budget grid) or 'ablation'.
  label: str  # What the tables call it.
  overrides: tuple[tuple[str, object], ...]  # ('section.field', value).
  steps: int | None = None  # None: the study's steps.

  def flags(self, seed: int) -> list[str]:
    """ztt-train's flags for this run at `seed`."""
    return [f'--config.{k}={v}' for k, v in self.overrides] + [
        f'--config.seed={seed}']

  def get(self, key: str, default=None):
    """The value this run gives config field `key`, or `default`."""
    return dict(self.overrides).get(key, default)


def model_run(name: str, group: str, label: str, variant: str,
              cycles: int | None = None, **model) -> Run:
  """A run that sets `model.variant`, `model.n_cycles` (when given) and
  the other `model` fields named."""
  overrides = [('model.variant', variant)]
  if cycles is not None:
    overrides.append(('model.n_cycles', cycles))
  overrides += [(f'model.{k}', v) for k, v in model.items()]
  return Run(name, group, label, tuple(overrides))


@dataclasses.dataclass(frozen=True)
class Study:
  """A set of runs trained alike: one config file, the same step flags."""
  name: str  # run_all.py --study=NAME.
  config: str  # ztt-train --config.
  steps: int
  step_flags: tuple[str, ...]  # ztt-train flags every run shares.
  main: tuple[Run, ...]
  seeds: tuple[int, ...]
  ablations: tuple[Run, ...] = ()
  ablation_seeds: tuple[int, ...] = ()
  ablation_base: str = ''  # The run each ablation changes one thing of.
  # run name -> ztt-eval criteria of its sweeps on the first seed ('' is
  # ztt-eval's default criterion, written to eval/early_exit.json).
  early_exit: Mapping[str, tuple[str, ...]] = dataclasses.field(
      default_factory=dict)
  eval_batches: int = 0  # ztt-eval --batches of the sweeps.
  early_exit_flags: tuple[str, ...] = ()  # Other ztt-eval flags.
  out: str = ''  # Default output directory.
  data: str = ''  # Default --config.data.path; '' keeps the config's.

  @property
  def runs(self) -> tuple[Run, ...]:
    return self.main + self.ablations

  def by_name(self, name: str) -> Run:
    for run in self.runs:
      if run.name == name:
        return run
    raise KeyError(f'{self.name}: no run {name!r}')

  def steps_of(self, run: Run) -> int:
    return run.steps or self.steps

  def schedule(self, seeds=None, names=None, ablation_seeds=None
               ) -> list[tuple[Run, int]]:
    """(run, seed) pairs in training order: the main runs seed by seed (a
    stopped study still pairs its runs), then the ablations; only `names`
    when given; seeds default to the study's."""
    seeds = self.seeds if seeds is None else seeds
    ablation_seeds = (self.ablation_seeds if ablation_seeds is None
                      else ablation_seeds)
    keep = lambda runs: [r for r in runs if names is None or r.name in names]
    return ([(r, s) for s in seeds for r in keep(self.main)] +
            [(r, s) for s in ablation_seeds for r in keep(self.ablations)])

  def early_exit_sweeps(self) -> list[tuple[str, str]]:
    """(run name, criterion) of every early-exit sweep."""
    return [(name, c) for name, cs in self.early_exit.items() for c in cs]
