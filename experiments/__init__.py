"""The studies, benchmarks and reports behind docs/RESULTS.md and
docs/results/.

Run a script by path or as a module, from the repository root:
`python experiments/run_all.py --study=fair` or
`python -m experiments.run_all --study=fair` (by path needs the project
installed, `pip install -e .`, which makes this package importable).

How the package is laid out (no import cycles, none hidden in a function:
tests/test_experiments.py checks):

* study.py: `Run` and `Study`, the one description of a study's runs;
  grid.py (the first grid), fair.py (the fair grid) and regime.py (the
  regime search) are each a `Study`.
* runner.py: the one resumable runner (ztt-train and ztt-eval jobs, a few
  at a time, each pinned to a core).
* records.py, tables.py, plots.py: the report library: reading a run's
  metrics rows, sweeps, wall times and model numbers; markdown tables;
  matplotlib figures.
* summary.py (docs/results/summary.json), fair_report.py (docs/RESULTS.md),
  report.py (docs/results/shakespeare.md), regime_report.py
  (docs/results/regime*.json|md): the reports.
* run_all.py, regime.py, exit_heads.py: commands that train a study and
  write its report; bench.py, profile_step.py, exit_head_memory.py,
  data_bench.py, position.py, roofline.py: measurements.
"""
