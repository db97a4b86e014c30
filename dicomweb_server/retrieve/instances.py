"""Study, series and instance retrieval (WADO-RS): the instances located, each sent as
stored, by ranged reads of its blob, or converted to another transfer syntax into a scratch
file in a worker thread (transcode.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path

import anyio

from dicomweb_server.blobstore import budget
from dicomweb_server.blobstore.files import scratch_file, scratch_space
from dicomweb_server.blobstore.reading import READ_CHUNK_BYTES, stream_path
from dicomweb_server.departure import stopped_if_gone
from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import APPLICATION_DICOM, STORED
from dicomweb_server.media.negotiate import negotiate_instances
from dicomweb_server.metadata import not_found, targets_of
from dicomweb_server.multipart import close_all
from dicomweb_server.transcode.codecs import TranscodeError, decodable, missing_codec
from dicomweb_server.transcode.convert import to_transfer_syntax

__all__ = [
    "SMALL_RUN_BYTES",
    "WADO_CONVERSIONS_AT_ONCE",
    "Part",
    "PartLength",
    "instance_parts",
    "locate",
    "once",
]

Part = tuple[dict[str, str], AsyncIterable[bytes]]
# A part's headers and the length of its body, when known before the response starts.
PartLength = tuple[dict[str, str], int]
# Consecutive instances sent as stored whose blobs hold at most this many bytes between them
# are read in one worker-thread call, not one call each (see _small_run). As large as the
# first chunk of a stream (READ_CHUNK_BYTES), which is outside the read-ahead budget too: a
# response holds no more memory than one streaming a single instance. Held within the
# process's download budget until its last instance is sent (budget.DOWNLOADS); without room
# there, each instance is streamed instead.
SMALL_RUN_BYTES = READ_CHUNK_BYTES
# Whole-instance conversions under way at once in a process (retrieve of an instance, series
# or study in a transfer syntax it is not stored in): each holds a few decoded frames, and
# one of the shared worker threads only while it decodes one.
WADO_CONVERSIONS_AT_ONCE = 2


async def locate(
    svc: Services, study: str, series: str | None = None, sop: str | None = None
) -> list[StoredInstance]:
    found = await svc.index.locate(study, series, sop)
    if not found:
        raise not_found(series, sop)
    return found


async def instance_parts(
    svc: Services, instances: list[StoredInstance], accept: str | None
) -> tuple[AsyncIterator[Part], list[PartLength] | None]:
    """Parts of a study/series/instance retrieval, and their lengths when every instance is
    sent as stored. Raised before anything is sent: 406 when no acceptable transfer syntax
    exists, and when the first instance that must be converted cannot be (W1: it is converted
    up front, as frames are, so that a codec failing on this data is a 406 rather than a 200
    whose stream breaks off)."""
    chosen = []
    for inst in instances:
        ts = inst.transfer_syntax_uid
        why = "" if decodable(ts) else missing_codec(ts)
        chosen.append(negotiate_instances(accept, ts, targets_of(inst), why))
    for first, inst in enumerate(instances):
        if chosen[first] in (STORED, inst.transfer_syntax_uid):
            continue
        chosen[first], prepared = await _converted(svc, inst, chosen[first], accept)
        if prepared is not None:
            return _instance_parts(svc, instances, chosen, first, prepared, accept), None
    lengths = [({"Content-Type": _dicom_type(i.transfer_syntax_uid)}, i.size_bytes)
               for i in instances]  # fmt: skip
    return _instance_parts(svc, instances, chosen, None, None, accept), lengths


async def _converted(
    svc: Services, inst: StoredInstance, target: str, accept: str | None
) -> tuple[str, Path | None]:
    """(target, scratch file of the instance converted to it). A decoder may still fail on
    this data although its transfer syntax has one (a 12-bit JPEG Extended that libjpeg
    refuses): the Accept is then negotiated again without that target, and a request that
    names no type (none, `*/*`) gets the instance as stored, (STORED, None), as it does when
    no decoder exists (field notes 3: 406 only when nothing acceptable can be made). The
    conversion's error is raised when nothing else is acceptable."""
    failed: set[str] = set()
    while True:
        try:
            return target, await _transcode_to_file(svc, inst, target)
        except TranscodeError as exc:
            failed.add(target)
            others = [t for t in targets_of(inst) if t not in failed]
            try:
                target = negotiate_instances(accept, inst.transfer_syntax_uid, others, str(exc))
            except NotAcceptableError:
                raise exc from None
            if target in (STORED, inst.transfer_syntax_uid):
                return STORED, None


def _dicom_type(ts: str) -> str:
    return f"{APPLICATION_DICOM}; transfer-syntax={ts}"


async def _instance_parts(
    svc: Services,
    instances: list[StoredInstance],
    targets: list[str],
    first: int | None,
    prepared: Path | None,
    accept: str | None,
) -> AsyncIterator[Part]:
    try:
        sent_ahead = 0  # instances after this one already sent with it, read in one go
        for i, (inst, target) in enumerate(zip(instances, targets, strict=True)):
            if sent_ahead:
                sent_ahead -= 1
                continue
            run = _small_run(instances, targets, i)
            downloads, held = budget.DOWNLOADS, sum(r.size_bytes for r in run)
            if len(run) > 1 and downloads.hold(held):
                try:
                    datas = await svc.blobs.read_whole(run)
                    for k, r in enumerate(run):
                        data, datas[k] = datas[k], b""  # what was sent is not kept
                        yield {"Content-Type": _dicom_type(r.transfer_syntax_uid)}, once(data)
                        del data
                finally:
                    downloads.release(held)  # all sent (the next part is asked for), or failed
                sent_ahead = len(run) - 1
                continue
            if target in (STORED, inst.transfer_syntax_uid):
                yield _as_stored(svc, inst)
                continue
            if i == first and prepared is not None:
                path, prepared = prepared, None
                yield {"Content-Type": _dicom_type(target)}, _StreamAndRemove(path)
                continue
            yield await _converted_part(svc, inst, target, accept)
    finally:
        if prepared is not None:  # the response ended before its turn
            with contextlib.suppress(OSError):
                prepared.unlink()


def _as_stored(svc: Services, inst: StoredInstance) -> Part:
    """The instance as stored. Bounded by the recorded size, which the Content-Length
    promised: a blob that is missing or shorter fails with a clear error (LostBlobError)
    rather than a short body."""
    body = svc.blobs.open_range(inst, 0, inst.size_bytes)
    return {"Content-Type": _dicom_type(inst.transfer_syntax_uid)}, body


async def _converted_part(
    svc: Services, inst: StoredInstance, target: str, accept: str | None
) -> Part:
    """The instance converted to `target`, or as stored when it cannot be and the Accept
    allows that (_converted)."""
    # Converted before its part starts, so that a decoder failing on it can still
    # send it as the client accepts otherwise (as stored for `*/*`): the stream
    # broke off there (found by interop review: curl of a study with no Accept).
    target, made = await _converted(svc, inst, target, accept)
    if made is None:
        return _as_stored(svc, inst)
    return {"Content-Type": _dicom_type(target)}, _StreamAndRemove(made)


def _small_run(instances: list[StoredInstance], targets: list[str], i: int) -> list[StoredInstance]:
    """Instances i, i+1, ... that are sent as stored and hold at most SMALL_RUN_BYTES between
    them: read in one worker-thread call rather than one each (a thread hop costs about as
    much CPU as sending a small instance). Empty when instance i alone is over the bound."""
    run: list[StoredInstance] = []
    total = 0
    for k in range(i, len(instances)):
        inst, target = instances[k], targets[k]
        total += inst.size_bytes
        if target not in (STORED, inst.transfer_syntax_uid) or total > SMALL_RUN_BYTES:
            break
        run.append(inst)
    return run


async def once(data: bytes) -> AsyncIterator[bytes]:
    """A body of one chunk."""
    yield data


async def _transcode_to_file(svc: Services, inst: StoredInstance, target: str) -> Path:
    """The instance converted into a scratch file (removed again if the conversion fails), in
    a thread of `svc.converting` that takes one of the shared worker threads (`svc.limiter`)
    a frame at a time (to_transfer_syntax's `step`): a conversion of minutes (a gigabyte of
    JPEG 2000 decodes at about 2.6 MiB/s here) held a shared thread throughout, and two of
    them held all of them, STOW parsing and frame decoding waiting behind. The scratch
    filesystem full is a 503 (scratch_space), before the response starts or, for a later
    instance of a study, cutting its body short as any later failure does.

    For a client that went away it never begins, waiting for its turn or not, and one under
    way stops at its next frame (departure.stopped_if_gone: ClientGone). hypercorn does not
    cancel a handler whose client left before the response started: a conversion of minutes
    ran to its end, its turn held, and the one queued behind it for a client gone too began
    after it."""
    with scratch_space(svc.scratch_dir):
        tmp = scratch_file(svc.scratch_dir, ".dcm")
        try:
            src = await svc.blobs.checked_path(inst)  # LostBlobError, not a codec's failure
            step = functools.partial(_shared_turn, svc.limiter)
            async with stopped_if_gone():
                await anyio.to_thread.run_sync(
                    functools.partial(to_transfer_syntax, src, tmp, target, step=step),
                    limiter=svc.converting,
                )
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return tmp


@contextlib.contextmanager
def _shared_turn(limiter: anyio.CapacityLimiter) -> Iterator[None]:
    """One of the shared worker threads held by a conversion's thread while it decodes a frame
    (called from that thread). A cancelled request (its client gone while a later instance of
    a study converts) stops its conversion here, before the next frame; the token is awaited
    shielded: anyio's from_thread.run in the cancelled scope of the awaiting task never
    returned, the thread waiting for ever with its turns held and the event loop spinning.
    Cancelled while it waited for the token (every shared thread busy), it stops once it has
    it, without decoding the frame."""
    anyio.from_thread.check_cancelled()
    token = object()
    anyio.from_thread.run(_acquired, limiter, token)
    try:
        anyio.from_thread.check_cancelled()
        yield
    finally:
        anyio.from_thread.run_sync(limiter.release_on_behalf_of, token)


async def _acquired(limiter: anyio.CapacityLimiter, token: object) -> None:
    with anyio.CancelScope(shield=True):
        await limiter.acquire_on_behalf_of(token)


class _StreamAndRemove:
    """The chunks of a scratch file, which is removed once they are all read or the stream
    is closed, even before its first chunk: an async generator closed before it started
    runs no cleanup, and a part whose body is closed unread (a response cut after the
    part's headers, a range that skips it) left its file behind."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._chunks = stream_path(path)

    def __aiter__(self) -> _StreamAndRemove:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            await close_all(self._chunks)
        finally:
            with contextlib.suppress(OSError):
                self._path.unlink()
