"""Appending to the audit trail without slowing requests down.

A request hands its event to a bounded queue and goes on; one task per process appends what
has queued up, in batches, to the hash chain (`Index.append_audit`). While the database is
away, events wait in the queue (and a full queue makes requests wait: nothing is dropped).
Events still queued when a process is killed are lost; those of a clean shutdown are written.

The writer also names the patients of a retrieve's event (PS3.15 A.5.3.7: the Patient
participant object), from the index, for the whole batch in one query: the routes that
serve a retrieve do not all read the study's patient (metadata and frames come from caches),
and a query per request would cost each its own round trip. They are recorded with the
event, in its hashed content, so a later deletion of the study takes nothing from the trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from dicomweb_server.audit import AuditEvent, patient_studies
from dicomweb_server.index.database import Index

__all__ = ["AUDIT_BATCH_MAX", "AUDIT_QUEUE_MAX", "AuditLog", "running_audit_log"]

log = logging.getLogger(__name__)

# Events waiting to be written, at most; past it, requests wait for the writer.
AUDIT_QUEUE_MAX = 10_000
# Events appended in one transaction, at most.
AUDIT_BATCH_MAX = 500
# Seconds the writer lets events gather after the first one of a batch: an append is a
# transaction of its own (advisory lock, last hash, insert, WAL flush), and one per request
# cost a single-instance STOW about a sixth of its time. Events reach the table this much
# later; a killed process loses what is queued either way.
AUDIT_LINGER_S = 0.05
# Seconds between attempts while the database is unavailable.
AUDIT_RETRY_S = 1.0
# Seconds a clean shutdown waits for queued events to be written.
AUDIT_DRAIN_S = 10.0


class AuditLog:
    def __init__(self, index: Index) -> None:
        self._index = index
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(AUDIT_QUEUE_MAX)
        self._in_batch = 0  # taken from the queue, being appended
        self.written = 0

    @property
    def unwritten(self) -> int:
        """Events recorded and not yet in the database: queued, or in the batch being
        appended (a batch waiting for the database has left the queue)."""
        return self._queue.qsize() + self._in_batch

    async def record(self, event: AuditEvent) -> None:
        await self._queue.put(event)

    async def flush(self) -> None:
        """Wait until every event recorded so far is in the database."""
        await self._queue.join()

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._in_batch = 1  # held through the linger
            if self._queue.qsize() < AUDIT_BATCH_MAX - 1:  # else a full batch is waiting
                await asyncio.sleep(AUDIT_LINGER_S)
            while len(batch) < AUDIT_BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_batch = len(batch)
            await self._append(batch)
            self._in_batch = 0
            for _ in batch:
                self._queue.task_done()

    async def _append(self, batch: list[AuditEvent]) -> None:
        while True:
            try:
                batch = await self._with_patients(batch)
                await self._index.append_audit(batch)
                self.written += len(batch)
                return
            except ValueError:  # a value the database refuses: find it, write the others
                if len(batch) > 1:
                    for event in batch:
                        await self._append([event])
                    return
                log.error("audit trail: the database refused this event: %r", batch[0])
                return
            except Exception as exc:  # the database is away or failing: keep them, retry
                log.warning("audit trail: %d events wait for the database (%s)", len(batch), exc)
                await asyncio.sleep(AUDIT_RETRY_S)

    async def _with_patients(self, batch: list[AuditEvent]) -> list[AuditEvent]:
        """The events, those that touched stored studies and name no patient yet with the
        patients of those studies (one query for the batch; none when no event needs it).
        A study not stored (a retrieve answered 404) names none."""
        wanted = [patient_studies(event) for event in batch]
        studies = sorted({study for some in wanted for study in some})
        if not studies:
            return batch
        found = await self._index.audit_patients(studies)
        return [
            dataclasses.replace(event, patients=tuple((*found[s], s) for s in some if s in found))
            if some else event
            for event, some in zip(batch, wanted, strict=True)
        ]  # fmt: skip


@contextlib.asynccontextmanager
async def running_audit_log(index: Index) -> AsyncIterator[AuditLog]:
    """An AuditLog with its writer task; on exit, queued events are written (bounded wait)."""
    audit = AuditLog(index)
    task = asyncio.create_task(audit.run(), name="audit-writer")
    try:
        yield audit
    finally:
        try:
            await asyncio.wait_for(audit.flush(), AUDIT_DRAIN_S)
        except TimeoutError:
            log.error("audit trail: shutdown with %d events unwritten", audit.unwritten)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
