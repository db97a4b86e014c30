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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from dicomweb_server.blobstore.files import blob_path, placed_files
from dicomweb_server.index.database import Index
from dicomweb_server.index.rows import StoredBlob

__all__ = ["CHECK_LOOKUP_FILES", "CHECK_PAGE_ROWS", "CheckReport", "check_archive"]

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
    await _check_instances(index, blob_root, studies, say, report)
    if studies is None:
        report.files = 0
        await _check_files(index, blob_root, say, report)
    return report


async def _check_instances(
    index: Index,
    blob_root: Path,
    studies: Sequence[str] | None,
    say: Callable[[str], object],
    report: CheckReport,
) -> None:
    after = 0
    while rows := await index.stored_instances(after, CHECK_PAGE_ROWS, studies):
        after = rows[-1].pk
        report.instances += len(rows)
        damaged = await anyio.to_thread.run_sync(_damaged, blob_root, rows)
        if damaged:
            # As they are now: a re-sent copy may have become the blob of one meanwhile.
            now = await index.instances_by_key([row.pk for row, _kind, _why in damaged])
            damaged = await anyio.to_thread.run_sync(_damaged, blob_root, list(now.values()))
        for row, kind, why in sorted(damaged, key=lambda d: d[0].pk):
            report.damaged[kind] += 1
            say(
                f"study {row.study_uid} series {row.series_uid} instance"
                f" {row.sop_instance_uid} blob {row.blob_key}: {why}"
            )
        if len(rows) < CHECK_PAGE_ROWS:
            break


def _damaged(blob_root: Path, rows: Sequence[StoredBlob]) -> list[tuple[StoredBlob, str, str]]:
    """Of `rows`, those whose blob is not whole: (row, kind, what is wrong). One stat each."""
    out = []
    for row in rows:
        try:
            size = os.stat(blob_path(blob_root, row.blob_key)).st_size
        except ValueError:
            out.append((row, "unreadable", "not a blob key"))
            continue
        except FileNotFoundError:
            out.append((row, "missing", "missing"))
            continue
        except OSError as exc:  # a directory unreadable, a file in place of one
            out.append((row, "unreadable", f"cannot be read ({exc.strerror})"))
            continue
        if size != row.size_bytes:
            out.append((row, "size", f"{size} bytes, not {row.size_bytes}"))
    return out


async def _check_files(
    index: Index, blob_root: Path, say: Callable[[str], object], report: CheckReport
) -> None:
    assert report.files is not None
    listing = placed_files(blob_root)
    while batch := await anyio.to_thread.run_sync(_next_files, listing):
        report.files += len(batch)
        keys = [key for _path, key in batch if key is not None]
        held = await index.referenced_keys(keys) if keys else set()
        loose = [(path, key) for path, key in batch if key not in held]  # stray: key None
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


def _next_files(listing: Iterator[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    return list(itertools.islice(listing, CHECK_LOOKUP_FILES))


def _still_there(
    files: Sequence[tuple[Path, str | None]],
) -> list[tuple[Path, str | None, int]]:
    """Those of `files` still there, with their size."""
    out = []
    for path, key in files:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile
            out.append((path, key, path.stat().st_size))
    return out
