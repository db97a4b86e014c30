"""A least-recently-used cache bounded in bytes, not entries. Pure."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["ByteLRU"]


class ByteLRU:
    """Values are bytes; the sum of their lengths stays at or under `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: bytes) -> None:
        old = self._items.pop(key, None)
        if old is not None:  # a value put again replaces the old one, even when not kept
            self.size -= len(old)
        if len(value) > self.max_bytes:
            return  # would evict everything and still not fit
        self._items[key] = value
        self.size += len(value)
        while self.size > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.size -= len(evicted)

    def __len__(self) -> int:
        return len(self._items)
