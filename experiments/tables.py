"""Markdown table pieces the reports share."""

from __future__ import annotations

from experiments import records


def header(*cells: str) -> list[str]:
  """A table's header line and its rule."""
  return ['| ' + ' | '.join(cells) + ' |', '|' + '---|' * len(cells)]


def numbers(xs, fmt: str = '.3f') -> str:
  """`xs` comma-separated in `fmt`; 'n/a' when there are none."""
  return ', '.join(f'{x:{fmt}}' for x in xs) if xs else 'n/a'


def dynamics_table(columns: tuple[str, str, str, str],
                   entries) -> str:
  """Each exit head's val loss (from a final eval row), the last logged
  gate and zero-token mass per cycle, one line per `(name, final eval row,
  metrics rows)` of `entries`."""
  lines = header(*columns)
  for name, last, rows in entries:
    lines.append(f'| `{name}` | {numbers(last.get("val_loss_cycle"))} | '
                 f'{numbers(records.last_value(rows, "gate"))} | '
                 f'{numbers(records.last_value(rows, "zero_attention"))} |')
  return '\n'.join(lines)
