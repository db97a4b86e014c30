"""The STOW pipeline: one multipart part -> one stored instance (or a failure reason).

Per part: spool into the blob store's temp file (hashing as it goes) -> parse and validate the
header in a worker thread -> take a reserved blob key from the index -> fsync and place the blob
-> commit the index rows. A failure at any step discards what was written, so a failed part
leaves neither a row nor a file (STYLE.md rule 11). The parts of one request are stored
concurrently (a few at a time), their outcomes reported in request order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from dicomweb_server.blobstore.files import BlobStore, BlobWriter, out_of_space
from dicomweb_server.cache import ByteLRU
from dicomweb_server.commit_order import CommitOrder
from dicomweb_server.dicomfile import InvalidInstanceError, ParsedFile, parse_file
from dicomweb_server.duplicates import repair_lost_blob, same_data_set
from dicomweb_server.errors import DicomWebError, FailureReason, original_os_error
from dicomweb_server.index.database import Index
from dicomweb_server.media.mediatypes import APPLICATION_DICOM, parse_content_type
from dicomweb_server.multipart import Event, PartBegin, PartData, PartEnd
from dicomweb_server.record import InstanceRecord, build_record
from dicomweb_server.response_json import InstanceOutcome

__all__ = [
    "COPY_CHUNK_BYTES",
    "Services",
    "StoreInterruptedError",
    "hashed_as_parsed",
    "instance_path",
    "record_of",
    "refusal",
    "storage_failure",
    "store_file",
    "store_parts",
    "store_path",
    "stow_status",
]

log = logging.getLogger(__name__)

# Bytes per read when a local file (`load`, a DIMSE C-STORE) is copied into the blob store.
COPY_CHUNK_BYTES = 1024 * 1024
# Parts of one STOW request stored concurrently. Each holds a spool file (on disk) and its
# parsed header, so memory stays bounded; more than a few only queue for the worker threads.
PARTS_IN_FLIGHT = 4


class StoreInterruptedError(DicomWebError):
    """A STOW-RS body that broke off (malformed: 400; too large: 413) after parts before it
    were stored: the error's status and reason, and the outcomes of those parts, so that the
    response can say what was stored (a client told only "413" would think nothing was)."""

    def __init__(self, cause: DicomWebError, outcomes: list[InstanceOutcome]) -> None:
        super().__init__(cause.message, headers=cause.headers)
        self.status = cause.status
        self.outcomes = outcomes


@dataclass(frozen=True)
class Services:
    """What the STOW and WADO pipelines work with; built once by app.create_app."""

    index: Index
    blobs: BlobStore
    limiter: anyio.CapacityLimiter  # worker threads for parsing and codecs
    scratch_dir: Path  # temporary files of transcoded responses
    images: ByteLRU  # rendered images and thumbnails
    frames: ByteLRU  # decoded and re-encoded frames, keyed (blob, revision, frame, syntax)
    # Series metadata keyed ("series", Series Instance UID), its version in the first
    # 8 bytes of the value, and gzip-compressed metadata responses keyed ("gzip", ETag).
    metadata: ByteLRU
    # Worker threads of whole-instance conversions (retrieve.instances), each taking `limiter`
    # a frame at a time (WADO_CONVERSIONS_AT_ONCE).
    converting: anyio.CapacityLimiter


def instance_path(study: str, series: str, sop: str) -> str:
    return f"/studies/{study}/series/{series}/instances/{sop}"


async def store_parts(
    events: AsyncIterator[Event],
    ctx: Services,
    expected_study: str | None,
    known: list[InstanceOutcome] | None = None,
) -> list[InstanceOutcome]:
    """Store every part of a STOW-RS body; outcomes come back in the order of the parts.

    A part is spooled as it arrives, then stored in its own task while the next parts are
    spooled: up to PARTS_IN_FLIGHT parts at once, so that one part's parse (a worker thread),
    fsync and index round trips overlap with the others'. Each part's store is independent and
    complete in itself (store_file), so a failure of one never fails another; parts with the
    same SOP Instance UID commit in request order (CommitOrder). A stream error (400/413)
    discards the open part, lets the parts already received finish, and is raised.

    Each outcome is also appended to `known` as it is known (in any order): what a request
    that then fails in another way (its client gone, the database away) stored all the
    same, for the audit trail to name.
    """
    stream_error: Exception | None = None
    async with anyio.create_task_group() as tg:
        parts = _PartsInFlight(tg, ctx, expected_study, [] if known is None else known)
        try:
            count = await _spool_parts(events, ctx, parts.failed, parts.start)
        except Exception as exc:  # raised once the parts in flight are done
            stream_error = exc
    if parts.errors:  # a server error (503: the database went away) first: the client retries
        raise parts.errors[min(parts.errors)]
    if stream_error is not None:
        done = [parts.outcomes[n] for n in sorted(parts.outcomes)]
        if isinstance(stream_error, DicomWebError) and any(o.retrieve_path for o in done):
            raise StoreInterruptedError(stream_error, done) from stream_error
        raise stream_error
    return [parts.outcomes[n] for n in range(count)]


class _PartsInFlight:
    """The parts of one STOW request being stored: each in a task of `tg` of its own once one
    of PARTS_IN_FLIGHT slots is free, committing in CommitOrder. Holds their outcomes, and
    the errors some met instead, by part number."""

    def __init__(
        self,
        tg: TaskGroup,
        ctx: Services,
        expected_study: str | None,
        known: list[InstanceOutcome],
    ) -> None:
        self.outcomes: dict[int, InstanceOutcome] = {}
        self.known = known  # every outcome too, as it is known (store_parts)
        self.errors: dict[int, Exception] = {}
        self._slots = anyio.Semaphore(PARTS_IN_FLIGHT)
        self._order = CommitOrder()
        self._tg, self._ctx, self._expected_study = tg, ctx, expected_study

    async def start(self, n: int, writer: BlobWriter, part_type: str | None) -> None:
        """Store spooled part `n` in a task of its own, once a slot is free."""
        try:
            await self._slots.acquire()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _discard_quietly(self._ctx, writer)
            raise
        self._tg.start_soon(self._finish, n, writer, part_type)

    def failed(self, n: int, outcome: InstanceOutcome) -> None:
        """Part `n` could not be spooled: `outcome` says why."""
        self.outcomes[n] = outcome
        self.known.append(outcome)
        self._order.over(n)

    async def _finish(self, n: int, writer: BlobWriter, part_type: str | None) -> None:
        try:
            turn = functools.partial(self._order.turn, n)
            self.outcomes[n] = await _finish_part(
                writer, part_type, self._ctx, self._expected_study, turn
            )
            self.known.append(self.outcomes[n])
        except Exception as exc:  # e.g. 503: raised for the request after the others finish
            self.errors[n] = exc
        finally:
            self._order.over(n)
            self._slots.release()


async def _spool_parts(
    events: AsyncIterator[Event],
    ctx: Services,
    failed: Callable[[int, InstanceOutcome], None],
    start: Callable[[int, BlobWriter, str | None], Awaitable[None]],
) -> int:
    """Spool each part into a blob writer and hand it to `start` (or its failure to `failed`);
    returns the part count."""
    count = 0
    writer: BlobWriter | None = None
    part_type: str | None = None
    spool_error: OSError | None = None  # the part could not be spooled: drain it, report it
    try:
        async for event in events:
            if isinstance(event, PartBegin):
                part_type, spool_error = event.headers.get("content-type"), None
                try:
                    writer = await ctx.blobs.open_writer()
                except OSError as exc:
                    spool_error = exc
            elif isinstance(event, PartData) and writer is not None:
                try:
                    await writer.write(event.data)
                except OSError as exc:
                    spool_error = exc
                    await _discard_quietly(ctx, writer)
                    writer = None
            elif isinstance(event, PartEnd):
                if spool_error is not None:
                    failed(count, storage_failure(spool_error))
                elif writer is not None:
                    w, writer = writer, None
                    await start(count, w, part_type)
                count += 1
    finally:
        if writer is not None:
            with anyio.CancelScope(shield=True):
                await _discard_quietly(ctx, writer)
    return count


def _out_of_resources(exc: OSError) -> FailureReason:
    if out_of_space(exc):
        return FailureReason.OUT_OF_RESOURCES
    return FailureReason.PROCESSING_FAILURE


def storage_failure(exc: OSError, doing: str = "could not spool a STOW part") -> InstanceOutcome:
    """The outcome of a part whose bytes could not be written: 0xA700 (out of resources) for
    a full disk or quota, 0x0110 (processing failure) for any other I/O error."""
    log.error("%s: %s", doing, exc)
    return InstanceOutcome(None, None, _out_of_resources(exc), reason=f"storage: {_why(exc)}")


def _why(exc: OSError) -> str:
    """What an I/O error was, for a failure reason: its strerror, or that of the OSError it
    was raised from (errors.original_os_error: pydicom re-raises one without errno or
    strerror; the reason read "None"). Else the message's first line (pydicom's carries its
    traceback)."""
    original = original_os_error(exc)
    if original is not None and original.strerror:
        return original.strerror
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


async def _discard_quietly(ctx: Services, writer: BlobWriter) -> None:
    try:
        await ctx.blobs.discard(writer)
    except OSError:  # e.g. the disk is full: the spool file is removed at the next start
        log.exception("could not discard a spool file")


def _part_type_problem(part_type: str | None) -> str | None:
    if part_type is None:
        return None  # PS3.18 8.6.1.2: the type parameter of the request names it
    try:
        essence = parse_content_type(part_type).essence
    except DicomWebError:
        return f"part Content-Type {part_type!r} is malformed"
    if essence != APPLICATION_DICOM:
        return f"part Content-Type {essence} is not application/dicom"
    return None


async def _finish_part(
    writer: BlobWriter,
    part_type: str | None,
    ctx: Services,
    expected_study: str | None,
    turn: Callable[[str], Awaitable[None]],
) -> InstanceOutcome:
    problem = _part_type_problem(part_type)
    if problem:
        await ctx.blobs.discard(writer)
        return InstanceOutcome(None, None, FailureReason.CANNOT_UNDERSTAND, reason=problem)
    return await store_file(writer, ctx, expected_study, turn)


async def store_file(
    writer: BlobWriter,
    ctx: Services,
    expected_study: str | None,
    turn: Callable[[str], Awaitable[None]] | None = None,
) -> InstanceOutcome:
    """Store a fully spooled file (used by STOW and by `load`). Consumes the writer.

    A blob key is reserved first (from the process's spares: no round trip as a rule), then
    one worker-thread call closes, parses, checks and places the file (_parse_and_place): one
    thread hop per instance, not one to parse and another to place. A file refused before
    it was placed releases its reservation. `turn`, given the SOP Instance UID, returns when
    the instance may commit (a STOW request's CommitOrder).
    """
    key: str | None = None
    placed = False
    uids: tuple[str | None, str | None] = (None, None)
    try:
        key = await ctx.index.reserve_key(ctx.blobs.new_key)
        try:
            parsed = await anyio.to_thread.run_sync(
                _parse_and_place, writer, ctx.blobs, key, expected_study, limiter=ctx.limiter
            )
        except (_SpoolError, InvalidInstanceError) as exc:
            return await _refused_outcome(ctx, writer, key, exc)
        except _PlaceError as exc:
            # Placed or not (an fsync may fail after the rename): both copies go, in _undo.
            placed, uids = True, (exc.sop_class, exc.sop)
            await _discard_quietly(ctx, writer)
            raise exc.error from None
        placed, uids = True, (parsed.uids[0], parsed.uids[1])
        if turn is not None:
            await turn(parsed.uids[1])
        return await _commit(parsed, writer, key, ctx)
    except OSError as exc:
        return await _storage_error(ctx, writer, key, placed, uids, exc)
    except BaseException:  # cancelled, or the index unavailable (503): nothing may leak
        with anyio.CancelScope(shield=True):
            await _undo(ctx, writer, key, placed)
        raise


async def _storage_error(
    ctx: Services,
    writer: BlobWriter,
    key: str | None,
    placed: bool,
    uids: tuple[str | None, str | None],
    exc: OSError,
) -> InstanceOutcome:
    """The outcome of a store that met an I/O error (store_file, in its `except`: logged with
    the traceback), rolled back: 0xA700 for a full disk or quota, else 0x0110."""
    log.exception("storing %s failed", uids[1] or writer.path.name)
    await _undo(ctx, writer, key, placed)
    reason = _out_of_resources(exc)
    return InstanceOutcome(*uids, reason, reason=f"storage error: {_why(exc)}")


async def _refused_outcome(
    ctx: Services, writer: BlobWriter, key: str, exc: _SpoolError | InvalidInstanceError
) -> InstanceOutcome:
    """The outcome of a file refused before it was placed. Nothing was placed under the key:
    the writer goes and the reservation with it (a refused file costs a round trip; its key
    could not safely rejoin the spares, which a database restart may have dropped meanwhile)."""
    await _undo(ctx, writer, key, False)
    if isinstance(exc, _SpoolError):
        return storage_failure(exc.error)
    return refusal(exc)


def refusal(exc: InvalidInstanceError) -> InstanceOutcome:
    """The outcome of a file the archive refuses (its content, or a limit it passed)."""
    return InstanceOutcome(
        exc.sop_class, exc.sop, exc.reason, reason=exc.message, over_limit=exc.over_limit
    )


async def store_path(
    ctx: Services, path: Path, expected_study: str | None = None
) -> InstanceOutcome:
    """Store a Part-10 file found on local disk (`load`, DIMSE C-STORE, a STOW-RS instance
    assembled from metadata and bulk data): it is copied into a blob spool file, then stored
    exactly as a STOW part is (store_file)."""
    writer = await ctx.blobs.open_writer()
    try:
        async with await anyio.open_file(path, "rb") as fh:
            while chunk := await fh.read(COPY_CHUNK_BYTES):
                await writer.write(chunk)
    except OSError as exc:
        await _discard_quietly(ctx, writer)
        return storage_failure(exc)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _discard_quietly(ctx, writer)
        raise
    return await store_file(writer, ctx, expected_study)


class _SpoolError(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _PlaceError(Exception):
    """Placing a parsed file failed (e.g. ENOSPC on an fsync): a storage error of that SOP."""

    def __init__(self, error: OSError, sop_class: str, sop: str) -> None:
        super().__init__(str(error))
        self.error, self.sop_class, self.sop = error, sop_class, sop


def _parse_and_place(
    writer: BlobWriter, blobs: BlobStore, key: str, expected_study: str | None
) -> ParsedFile:
    """In one worker thread: close the spool file (its buffered bytes reach the disk here, so
    ENOSPC may surface now), parse it, check its study, and place it under `key` (durable
    once this returns). A file that cannot be stored raises before it is placed."""
    try:
        writer.close_blocking()
    except OSError as exc:
        raise _SpoolError(exc) from exc
    parsed = parse_file(writer.path)
    sop_class, sop, study, _series = parsed.uids
    if not hashed_as_parsed(writer.data_set_at, parsed):
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            "the File Meta Information cannot be read one way only (PS3.10 7.1)",
            sop_class=sop_class,
            sop=sop,
        )
    if expected_study is not None and study != expected_study:
        raise InvalidInstanceError(
            FailureReason.STUDY_INSTANCE_UID_MISMATCH,
            f"StudyInstanceUID {study} is not the study of the request ({expected_study})",
            sop_class=sop_class,
            sop=sop,
        )
    try:
        blobs.place_blocking(writer, key)
    except OSError as exc:
        raise _PlaceError(exc, sop_class, sop) from exc
    return parsed


def record_of(parsed: ParsedFile, blob_key: str, size_bytes: int, sha256: bytes) -> InstanceRecord:
    """The index rows of a parsed file stored under `blob_key` (STOW, and `reindex`)."""
    return build_record(
        parsed.meta,
        transfer_syntax_uid=parsed.transfer_syntax_uid,
        blob_key=blob_key,
        size_bytes=size_bytes,
        sha256=sha256,
        number_of_frames=parsed.number_of_frames,
        frames=parsed.frames,
        bulk_ranges=parsed.bulk_ranges,
    )


def hashed_as_parsed(hashed_at: int, parsed: ParsedFile) -> bool:
    """Whether the duplicate-check hash (blobstore.hashing.DataSetHash), which left out what it
    took for the File Meta Information up to `hashed_at` (0: hashed whole), found the data set
    where pydicom did. If not, a different instance could pass for this one: STOW refuses such
    a file, and `reindex` keeps its older hash."""
    return not hashed_at or hashed_at == parsed.data_set_at


async def _undo(ctx: Services, writer: BlobWriter, key: str | None, placed: bool) -> None:
    """Roll back a store that failed. A placed blob is deleted only when its reservation was
    still there: if the commit reached the database after all (an error or a cancellation
    after COMMIT), the reservation is gone and the blob belongs to a stored instance. Deleted
    while the reservation is being dropped (Index.releasing): should the delete fail or the
    process die, the reservation stays and `recover` finds the blob, never left unowned."""
    try:
        if not placed:
            await ctx.blobs.discard(writer)
        if key is not None:
            async with ctx.index.releasing(key) as ours:
                if ours and placed:
                    await ctx.blobs.delete(key)
    except Exception:  # database unreachable: blob and reservation are left to `recover`
        log.exception("could not undo blob %s", key)


async def _commit(
    parsed: ParsedFile, writer: BlobWriter, key: str, ctx: Services
) -> InstanceOutcome:
    sop_class, sop, study, series = parsed.uids
    record = record_of(parsed, key, writer.size, writer.sha256(parsed.data_set_end))
    result = await ctx.index.commit_instance(record)
    patient = _patient_of(record)
    if result.stored:
        path = instance_path(study, series, sop)
        return InstanceOutcome(sop_class, sop, retrieve_path=path, patient=patient)
    same = result.existing_sha256 is not None and (
        result.existing_sha256 == record.instance["sha256"]
        or await same_data_set(
            ctx.index, ctx.blobs, ctx.limiter, parsed, writer, result.existing_sha256
        )
    )
    repair = await repair_lost_blob(ctx.index, ctx.blobs, record, result) if same else None
    if repair == "replaced":
        assert result.existing_study_uid and result.existing_series_uid
        path = instance_path(result.existing_study_uid, result.existing_series_uid, sop)
        return InstanceOutcome(sop_class, sop, retrieve_path=path, patient=patient)
    # Not committed: the blob is ours to delete, and its reservation, if still there, goes
    # when it is deleted (as in _undo).
    lost = result.reservation_lost or repair == "reservation-lost"
    async with ctx.index.releasing(key) as ours:
        if ours or lost:
            await ctx.blobs.delete(key)
    if result.failed or lost:
        reason = (
            FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
            if result.invalid
            else FailureReason.PROCESSING_FAILURE
        )
        why = result.failed or "the blob reservation was rolled back by another process"
        return InstanceOutcome(sop_class, sop, reason, reason=why)
    if result.conflict:
        return InstanceOutcome(
            sop_class, sop, FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, reason=result.conflict
        )
    if same:
        # The same data set again: success, one copy (PS3.18 10.5.3 leaves duplicates to the
        # server). Its File Meta Information may differ (blobstore.hashing.DataSetHash).
        assert result.existing_study_uid and result.existing_series_uid
        path = instance_path(result.existing_study_uid, result.existing_series_uid, sop)
        return InstanceOutcome(sop_class, sop, retrieve_path=path, duplicate=True, patient=patient)
    return InstanceOutcome(
        sop_class, sop, FailureReason.DUPLICATE_SOP_INSTANCE,
        reason=f"SOPInstanceUID {sop} is already stored with different content",
    )  # fmt: skip


def _patient_of(record: InstanceRecord) -> tuple[str, str, str]:
    """(Patient ID, Issuer of Patient ID, Patient's Name) of an instance's patient row, for
    the audit trail: the patient a STOW or C-STORE stored data of."""
    row = record.patient
    return (row["patient_id"], row["issuer_of_patient_id"], row["patient_name"] or "")


def stow_status(outcomes: list[InstanceOutcome]) -> int:
    """HTTP status of a STOW-RS response, PS3.18 Table 10.5.3-1 / 10.5.3.1.

    200: all stored (warnings allowed); 202: some stored, some failed, or stored with warnings;
    409: none stored; 400: the request had no instance at all.
    """
    if not outcomes:
        return 400
    failed = sum(o.failure is not None for o in outcomes)
    if failed == len(outcomes):
        return 409
    if failed or any(o.warning is not None for o in outcomes):
        return 202
    return 200
