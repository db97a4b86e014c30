"""The order in which the parts of one STOW-RS request commit (ingest.store_parts): parts
with the same SOP Instance UID in request order, whatever order their parses end in, so that
the first is stored and a later one is its duplicate; parts with other UIDs not held up."""

from __future__ import annotations

import bisect

import anyio

__all__ = ["CommitOrder"]


class CommitOrder:
    """Parts of one request that carry the same SOP Instance UID commit in request order: the
    first is stored and a later one is its duplicate (the same bytes: a success, one copy;
    other bytes: 0x0111), as when they come in requests one after another, and as Orthanc and
    dcm4chee, which store a request's parts one by one, answer. A part commits once every
    earlier part's UID is known (parsed, or the part is over) and the earlier parts with its
    UID are over; parts with other UIDs still commit concurrently. Every part must reach
    `over`, whatever becomes of it, or the later ones would wait for it."""

    def __init__(self) -> None:
        self._learned: set[int] = set()  # parts whose UID is known, or that are over
        self._parts_of: dict[str, list[int]] = {}  # UID -> its parts, in request order
        self._over: set[int] = set()
        # Events are made only for a part that waits (rarely): a request of one part makes none.
        self._waits: dict[int, anyio.Event] = {}  # part -> set when it is over
        self._changed: anyio.Event | None = None  # set when a part's UID becomes known
        self._known = 0  # parts 0 .. _known - 1 are all learned

    def _learn(self, n: int, sop: str | None) -> None:
        if n in self._learned:
            return
        self._learned.add(n)
        if sop is not None:
            bisect.insort(self._parts_of.setdefault(sop, []), n)
        while self._known in self._learned:
            self._known += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def turn(self, n: int, sop: str) -> None:
        """Wait until part `n` (parsed: its UID is `sop`) may commit."""
        self._learn(n, sop)
        while self._known < n:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        # The latest earlier part with this UID (all are known by now): it commits only once
        # the one before it is over, and so on, so waiting for it is waiting for them all.
        parts = self._parts_of[sop]
        i = bisect.bisect_left(parts, n)
        if i and (m := parts[i - 1]) not in self._over:
            await self._waits.setdefault(m, anyio.Event()).wait()

    def over(self, n: int) -> None:
        """Part `n` is stored, failed or gone."""
        self._learn(n, None)
        self._over.add(n)
        if (event := self._waits.pop(n, None)) is not None:
            event.set()
