"""A small least-recently-used cache of built values (compiled programs)."""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable


class LRU:
  """The last `size` values built, by key: `get(key, build)` returns the
  value built for `key` before, or calls `build()` and keeps its result,
  dropping the least recently used one beyond `size`."""

  def __init__(self, size: int):
    self.size = size
    self._items: collections.OrderedDict = collections.OrderedDict()

  def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
    if key not in self._items:
      self._items[key] = build()
      while len(self._items) > self.size:
        self._items.popitem(last=False)
    self._items.move_to_end(key)
    return self._items[key]

  def __len__(self) -> int:
    return len(self._items)
