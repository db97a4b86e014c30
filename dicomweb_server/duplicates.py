"""A SOP Instance stored again (ingest._commit): whether it is the same data set as the
stored copy (same_data_set), and the stored copy's blob, lost or cut short, replaced by the
one just received (repair_lost_blob). Split off ingest.py; it takes the index, the blob store
and the worker threads that ingest.Services holds."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import anyio

from dicomweb_server.blobstore.files import BlobStore, BlobWriter
from dicomweb_server.blobstore.hashing import data_set_sha256
from dicomweb_server.dicomfile import InvalidInstanceError, ParsedFile, parse_file
from dicomweb_server.index.database import Index
from dicomweb_server.index.rows import CommitResult
from dicomweb_server.record import InstanceRecord

__all__ = ["repair_lost_blob", "same_data_set"]

log = logging.getLogger(__name__)


async def repair_lost_blob(
    index: Index, blobs: BlobStore, record: InstanceRecord, result: CommitResult
) -> str | None:
    """A duplicate of a stored instance whose blob is gone, or not of the size the index
    recorded (a data directory cleaned or replaced under a kept database, a file lost or cut
    short): the copy just received becomes its blob (Index.replace_blob), else the archive
    would acknowledge an instance it cannot serve, and a re-send, the natural repair, would
    do nothing. One stat per duplicate. 'replaced', 'reservation-lost', or None (the stored
    blob is whole, or another store repaired it first: ours is deleted as a duplicate's)."""
    assert result.existing_study_uid and result.existing_series_uid
    sop = record.instance["sop_instance_uid"]
    stored = await index.locate(result.existing_study_uid, result.existing_series_uid, sop)
    if len(stored) != 1:
        return None
    old = stored[0]
    size = await blobs.size_of(old.blob_key)
    if size == old.size_bytes:
        return None
    outcome = await index.replace_blob(old.blob_key, record)
    if outcome != "replaced":
        return None if outcome == "moved" else outcome
    log.warning(
        "SOP Instance %s: its blob %s was %s; the copy received again replaces it (as %s)",
        sop, old.blob_key, "missing" if size is None else f"{size} bytes, not {old.size_bytes}",
        record.instance["blob_key"],
    )  # fmt: skip
    # What is left under the old key (a damaged file) goes while its reservation, taken in
    # the same transaction, is dropped: a crash in between leaves it to `recover`.
    try:
        async with index.releasing(old.blob_key) as ours:
            if ours:
                await blobs.delete(old.blob_key)
    except Exception:  # the instance is whole again: what is left is `recover`'s (as in _undo)
        log.exception("could not delete the replaced blob %s", old.blob_key)
    return outcome


async def same_data_set(
    index: Index,
    blobs: BlobStore,
    limiter: anyio.CapacityLimiter,
    parsed: ParsedFile,
    writer: BlobWriter,
    existing: bytes | None,
) -> bool:
    """Whether the stored copy of a SOP Instance UID whose recorded hash differs holds the
    same data set after all: instances stored before the hash left the File Meta
    Information out have a plain SHA-256 of their whole file (32 bytes, no
    DATA_SET_HASH_VERSION), and only theirs are read to tell."""
    if existing is None or len(existing) != hashlib.sha256().digest_size:
        return False
    _sop_class, sop, study, series = parsed.uids
    stored = await index.locate(study, series, sop)
    if len(stored) != 1:
        return False
    path = blobs.local_path(stored[0].blob_key)
    try:
        digest = await anyio.to_thread.run_sync(_stored_digest, path, limiter=limiter)
    except (OSError, InvalidInstanceError):
        return False
    return digest == writer.sha256(parsed.data_set_end)


def _stored_digest(path: Path) -> bytes:
    """DataSetHash of a stored file, its trailing padding left out as at STOW."""
    return data_set_sha256(path, parse_file(path).data_set_end)
