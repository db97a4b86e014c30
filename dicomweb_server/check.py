"""`dicomweb-server check`: the index checked against the blob store, no file parsed.

Two walks, each in bounded memory, reading only (nothing is changed, deleted or audited):

- the stored instances, a page of rows at a time (keyset pagination on the row key), one
  stat of each one's blob: a blob that is gone, or whose size is not the size recorded when
  it was stored, is reported with the instance's study, series and SOP Instance UIDs (the
  instance is acknowledged and cannot be served: a re-send of it repairs it, ingest._repair);
- with no study named, the blob directory (os.scandir, blobstore.files.placed_files), a batch
  of files at a time looked up in the index: a file that no instance row and no blob
  reservation holds is reported as an orphan (space nothing will ever serve or free).

A server may store meanwhile on the same database and data directory; what it does is not
taken for damage. A blob is placed only after its key's reservation is committed, a commit
moves the key from the reservation to the instance row in one transaction, and a store that
fails deletes its blob before its reservation's removal commits (index.store.releasing): so
a file listed, then found held by nothing, is an orphan only if it is still there once the
lookup has answered (a failed store's is gone by then). A damaged instance is read and
stat'ed again before it is reported: a re-send may have repaired it meanwhile (its row then
names another blob). Files a reservation holds are never orphans: those of a store in
progress, and those a crashed process left, which the next start's recovery deletes
(app.recover); the spool and scratch directory `tmp/` is not looked into.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from dicomweb_server.blobstore.files import blob_file, placed_files
from dicomweb_server.index.database import Index

__all__ = ["CHECK_LOOKUP_FILES", "CHECK_PAGE_ROWS", "CheckReport", "check_archive"]

T = TypeVar("T")
U = TypeVar("U")

# Instance rows read per round trip of the first walk (their blobs stat'ed in one worker
# thread call).
CHECK_PAGE_ROWS = 2000
# Blob files listed, then looked up in the index, per round trip of the second walk.
CHECK_LOOKUP_FILES = 2000


@dataclass
class CheckReport:
    instances: int = 0
    # Damaged instances by kind: "missing", "size" (not the size recorded), "unreadable".
    damaged: Counter[str] = field(default_factory=Counter)
    files: int | None = None  # blob files listed; None: the directory was not walked
    orphans: int = 0
    orphan_bytes: int = 0

    @property
    def clean(self) -> bool:
        return not (sum(self.damaged.values()) or self.orphans)

    def summary(self) -> str:
        d = self.damaged
        text = (
            f"checked {self.instances} instances: {d['missing']} missing, {d['size']} of"
            f" another size than recorded, {d['unreadable']} unreadable"
        )
        if self.files is None:
            return text + "; orphan files not looked for (--study)"
        return text + (
            f"; {self.files} blob files: {self.orphans} orphans ({self.orphan_bytes} bytes)"
        )


async def check_archive(
    index: Index,
    blob_root: Path,
    studies: Sequence[str] | None,
    say: Callable[[str], object],
) -> CheckReport:
    """Check the stored instances (of `studies` only, when given) against the blob store
    under `blob_root`, and, with no studies named, the blob store against the index. Each
    problem is told to `say` as one line as it is found."""
    report = CheckReport()
    root = os.fspath(blob_root)
    await _check_instances(index, root, studies, say, report)
    if studies is None:
        report.files = 0
        await _check_files(index, root, say, report)
    return report


async def _check_instances(
    index: Index,
    root: str,
    studies: Sequence[str] | None,
    say: Callable[[str], object],
    report: CheckReport,
) -> None:
    """A page of (row key, blob key, size) stat'ed in a worker thread while the next page is
    read; the rows of the few found damaged read whole (their UIDs) and stat'ed again."""
    page = await index.blob_sizes(0, CHECK_PAGE_ROWS, studies)
    while page:
        ahead = await _meanwhile(
            anyio.to_thread.run_sync(_damaged, root, page),
            index.blob_sizes(page[-1][0], CHECK_PAGE_ROWS, studies)
            if len(page) == CHECK_PAGE_ROWS  # else the last page
            else None,
        )
        damaged, page, count = ahead[0], ahead[1] or [], len(page)
        report.instances += count
        if not damaged:
            continue
        # As they are now: a re-sent copy may have become the blob of one meanwhile.
        rows = await index.instances_by_key([pk for pk, _key, _size in damaged])
        sizes = [(row.pk, row.blob_key, row.size_bytes) for row in rows.values()]
        for (pk, key, _size), kind, why in await anyio.to_thread.run_sync(_why, root, sizes):
            row = rows[pk]
            report.damaged[kind] += 1
            say(
                f"study {row.study_uid} series {row.series_uid} instance"
                f" {row.sop_instance_uid} blob {key}: {why}"
            )


def _damaged(root: str, page: Sequence[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    """Of (row key, blob key, recorded size), those whose blob is not whole. One stat each."""
    out = []
    for entry in page:
        try:
            if os.stat(blob_file(root, entry[1])).st_size == entry[2]:
                continue
        except (ValueError, OSError):  # not a blob key; missing, unreadable
            pass
        out.append(entry)
    return out


def _why(
    root: str, entries: Sequence[tuple[int, str, int]]
) -> list[tuple[tuple[int, str, int], str, str]]:
    """Of (row key, blob key, recorded size), in row-key order, those whose blob is not whole,
    with the kind of damage and what is wrong."""
    out = []
    for entry in sorted(entries):
        _pk, key, recorded = entry
        try:
            size = os.stat(blob_file(root, key)).st_size
        except ValueError:
            out.append((entry, "unreadable", "not a blob key"))
        except FileNotFoundError:
            out.append((entry, "missing", "missing"))
        except OSError as exc:  # a directory unreadable, a file in place of one
            out.append((entry, "unreadable", f"cannot be read ({exc.strerror})"))
        else:
            if size != recorded:
                out.append((entry, "size", f"{size} bytes, not {recorded}"))
    return out


async def _check_files(
    index: Index, root: str, say: Callable[[str], object], report: CheckReport
) -> None:
    """A batch of files looked up in the index while the next batch is listed."""
    assert report.files is not None
    listing = placed_files(root)
    batch = await anyio.to_thread.run_sync(_next_files, listing)
    while batch:
        keys = [key for _path, key in batch if key is not None]
        held, ahead = await _meanwhile(
            index.referenced_keys(keys),
            anyio.to_thread.run_sync(_next_files, listing)
            if len(batch) == CHECK_LOOKUP_FILES  # else the last batch
            else None,
        )
        report.files += len(batch)
        loose = [(path, key) for path, key in batch if key not in held]  # stray: key None
        batch = ahead or []
        if not loose:
            continue
        # Stat'ed after the lookup: a failed store's blob is deleted before its reservation
        # is dropped, so one listed before and held by nothing now is gone now.
        for path, key, size in await anyio.to_thread.run_sync(_still_there, loose):
            report.orphans += 1
            report.orphan_bytes += size
            why = "held by no instance and no reservation"
            if key is None:
                why = "not named and placed as a blob key"
            say(f"orphan {path}: {size} bytes, {why}")


async def _meanwhile(first: Awaitable[T], second: Awaitable[U] | None) -> tuple[T, U | None]:
    """`first` and `second` awaited at once (the database and the filesystem both busy). An
    error of either is raised as itself, not in the task group's ExceptionGroup: run_check
    says a database gone (DicomWebError) or a directory unreadable (OSError) in a line (found
    by review: after the first page, either ended the check in a traceback)."""
    out: list[Any] = [None, None]

    async def run(i: int, step: Awaitable[Any]) -> None:
        out[i] = await step

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 0, first)
            if second is not None:
                tg.start_soon(run, 1, second)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None
    return out[0], out[1]


def _next_files(listing: Iterator[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    return list(itertools.islice(listing, CHECK_LOOKUP_FILES))


def _still_there(files: Sequence[tuple[str, str | None]]) -> list[tuple[str, str | None, int]]:
    """Those of `files` still there, with their size."""
    out = []
    for path, key in files:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile
            out.append((path, key, os.stat(path).st_size))
    return out
