"""Reservations: bytes of memory reserved by work running in worker threads, at most a
limit between them; a reservation waits, first come first served, until it fits, and one
larger than the limit runs alone. Shared by the header parses (headersize) and DIMSE
conversions (dimse.conversion). Blocking: taken in a worker thread, never on the event
loop."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Reservations"]


class Reservations:
    """At most `limit` bytes reserved at once (one reservation over it runs alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self.held = 0

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                self._cond.wait_for(
                    lambda: (
                        self._queue[0] is me and (self.held == 0 or self.held + size <= self.limit)
                    )
                )
            finally:  # an exception while waiting leaves no place that blocks the rest
                self._queue.remove(me)
                self._cond.notify_all()  # the next in the queue may fit too
            self.held += size
        try:
            yield
        finally:
            with self._cond:
                self.held -= size
                self._cond.notify_all()
