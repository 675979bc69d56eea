"""Matplotlib, headless, for the reports' figures."""

from __future__ import annotations


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save(fig, path: str) -> None:
  """Lays out `fig`, writes it to `path` and closes it."""
  fig.tight_layout()
  fig.savefig(path)
  pyplot().close(fig)
