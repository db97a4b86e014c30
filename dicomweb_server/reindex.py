"""`dicomweb-server reindex`: each stored instance's index rows rebuilt from its file.

What the index holds of an instance (its searchable columns, its DICOM JSON, its frame and
bulk data layout) is derived from the file when the instance is stored. A release that derives
something better (a value read right where it was read wrong, JSON closer to PS3.18 Annex F)
changes new instances only; `reindex` parses every stored file again, as STOW would, and
rewrites the rows that come out different. The files are never touched.

- An instance's series and study rows are rewritten from the instance whose commit made them
  (its first), as at STOW; the study's aggregates are recomputed.
- An instance whose file the parser now refuses, or which now names another study or
  series, keeps its rows, and is reported: reindex never moves or removes an instance.
- The duplicate-check hash of instances stored before that hash left the File Meta
  Information out (theirs is a SHA-256 of the whole file) is recomputed, so that their
  duplicates no longer need a file read.
- It can run beside a serving server: each instance is rewritten in one transaction under
  its study's row lock, as a commit is, and a rewritten series gets a new version
  (schema.sql's `series.revision`), which every process's metadata cache compares and its
  frame and rendering caches are keyed by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from dicomweb_server.blobstore.hashing import hash_file
from dicomweb_server.dicomfile import InvalidInstanceError, parse_file
from dicomweb_server.errors import DicomWebError
from dicomweb_server.index.rows import StoredBlob
from dicomweb_server.ingest import Services, hashed_as_parsed, record_of
from dicomweb_server.record import InstanceRecord

__all__ = ["REINDEX_IN_FLIGHT", "REINDEX_PAGE_ROWS", "ReindexReport", "reindex"]

# Instance rows listed per round trip of the walk (keyset pagination on the row key).
REINDEX_PAGE_ROWS = 500
# Instances parsed and rewritten at once: the parse runs in worker threads (svc.limiter), so a
# few in flight keep the threads and the database busy without holding many headers.
REINDEX_IN_FLIGHT = 4


@dataclass
class ReindexReport:
    updated: int = 0
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)  # "SOP Instance UID: why"


async def reindex(
    svc: Services,
    studies: Sequence[str] | None = None,
    progress: Callable[[int], object] | None = None,
) -> ReindexReport:
    """Re-derive the index rows of every stored instance (of `studies` only, when given) from
    its file. `progress` is told how many instances each page held once they are done."""
    report = ReindexReport()
    slots = anyio.Semaphore(REINDEX_IN_FLIGHT)

    async def one(row: StoredBlob) -> None:
        async with slots:
            outcome = await _reindex_one(svc, row)
        if outcome == "updated":
            report.updated += 1
        elif outcome == "unchanged":
            report.unchanged += 1
        else:
            report.failed.append(f"{row.sop_instance_uid}: {outcome}")

    after = 0
    while rows := await svc.index.stored_instances(after, REINDEX_PAGE_ROWS, studies):
        after = rows[-1].pk
        try:
            async with anyio.create_task_group() as tg:
                for row in rows:
                    tg.start_soon(one, row)
        except BaseExceptionGroup as group:
            # The error that stopped the run (the database gone: a 503), not the task
            # group's wrapping of it (found by review: the CLI printed an ExceptionGroup
            # traceback, and audited "stopped: unhandled errors in a TaskGroup").
            raise _first(group) from None
        if progress is not None:
            progress(len(rows))
    return report


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error a task group's tasks raised, a DicomWebError (the database gone) before
    any other: the others in flight then meet what follows from it (asyncpg's
    InternalClientError on a connection the shutdown left half-used)."""
    unavailable, _rest = group.split(DicomWebError)
    leaf: BaseException = unavailable or group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def _reindex_one(svc: Services, row: StoredBlob) -> str:
    """'updated', 'unchanged', or why the instance's rows were left as they were."""
    path = svc.blobs.local_path(row.blob_key)
    try:
        rec = await anyio.to_thread.run_sync(_record_of, path, row, limiter=svc.limiter)
    except OSError as exc:
        return f"its file cannot be read ({exc.strerror}); rows left as they were"
    except InvalidInstanceError as exc:
        return f"its file is refused now ({exc.message}); rows left as they were"
    except _MovedError as exc:
        return f"{exc}; rows left as they were (reindex does not move instances)"
    outcome = await svc.index.reindex_instance(rec)
    if outcome == "missing":
        return "deleted, or moved to another series, while being reindexed"
    return outcome


class _MovedError(Exception):
    """The file now names another study or series than the rows it has."""


def _record_of(path: Path, row: StoredBlob) -> InstanceRecord:
    """The index rows of a stored file, parsed as STOW parses it (a worker thread)."""
    size = path.stat().st_size  # a missing file is an OSError, not a refused one
    parsed = parse_file(path)
    _sop_class, sop, study, series = parsed.uids
    if (sop, study, series) != (row.sop_instance_uid, row.study_uid, row.series_uid):
        raise _MovedError(
            f"its file names SOP Instance {sop}, study {study}, series {series},"
            f" not the {row.sop_instance_uid}, {row.study_uid}, {row.series_uid} of its rows"
        )
    sha256 = row.sha256
    if len(sha256) == hashlib.sha256().digest_size:  # a whole-file hash of an older release
        digest = hash_file(path)
        value = digest.digest(parsed.data_set_end)  # decides data_set_at for a small file
        if hashed_as_parsed(digest.data_set_at, parsed):
            sha256 = value
    return record_of(parsed, row.blob_key, size, sha256)
