"""The WADO-RS pipelines: which bytes answer a retrieve request, as multipart parts.

Stored bytes are streamed by ranged reads of the blob (frame offsets recorded at ingest, so a
frame read never parses the file); conversions run in worker threads (transcode.py).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import re
import struct
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from pydicom.uid import UID

from dicomweb_server.blobstore.files import scratch_file
from dicomweb_server.blobstore.reading import READ_CHUNK_BYTES, stream_path
from dicomweb_server.dicomfile import PIXEL_DATA_TAGS, bulk_element, element_value
from dicomweb_server.errors import BadRequestError, NotAcceptableError, NotFoundError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media import (
    APPLICATION_DICOM,
    APPLICATION_OCTET_STREAM,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MULTIPART_RELATED,
    STORED,
    frame_media_type,
    negotiate_frames,
    negotiate_instances,
    parse_accept,
)
from dicomweb_server.metadata import not_found, pixel_info, targets_of
from dicomweb_server.multipart import close_all
from dicomweb_server.transcode import (
    NATIVE,
    PixelInfo,
    TranscodeError,
    convert_codestream,
    decodable,
    decode_frames,
    decode_item_pixels,
    encode_frames,
    missing_codec,
    one_bit_pixel_data,
    stored_frames,
    to_transfer_syntax,
)

__all__ = [
    "AS_FRAMES",
    "DECODED",
    "MAX_FRAMES_PER_REQUEST",
    "SMALL_RUN_BYTES",
    "STORED_FRAMES",
    "Part",
    "PartLength",
    "Sized",
    "bulk_value",
    "decoded_pixel_data",
    "encapsulated_pixels",
    "frame_media",
    "frame_parts",
    "frame_value",
    "instance_parts",
    "locate",
    "parse_frame_list",
    "pixel_data_plan",
    "slice_stream",
    "stored_bulk_value",
]

Part = tuple[dict[str, str], AsyncIterable[bytes]]
# A part's headers and the length of its body, when known before the response starts.
PartLength = tuple[dict[str, str], int]
# Most frame numbers one request may list.
MAX_FRAMES_PER_REQUEST = 10_000
# Consecutive instances sent as stored whose blobs hold at most this many bytes between them
# are read in one worker-thread call, not one call each (see _small_run). As large as the
# first chunk of a stream (READ_CHUNK_BYTES), which is outside the read-ahead budget too: a
# response holds no more memory unaccounted than one streaming a single instance.
SMALL_RUN_BYTES = READ_CHUNK_BYTES
_LE_NATIVE = {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN}


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
            ts = inst.transfer_syntax_uid
            run = _small_run(instances, targets, i)
            if len(run) > 1:
                datas = await svc.blobs.read_whole([(r.blob_key, r.size_bytes) for r in run])
                for k, r in enumerate(run):
                    data, datas[k] = datas[k], b""  # what was sent is not kept
                    yield {"Content-Type": _dicom_type(r.transfer_syntax_uid)}, _once(data)
                sent_ahead = len(run) - 1
                continue
            if target in (STORED, ts):
                # Bounded by the recorded size, which the Content-Length promised: a blob
                # that is shorter fails with a clear error rather than a short body.
                body = svc.blobs.open_range(inst.blob_key, 0, inst.size_bytes)
                yield {"Content-Type": _dicom_type(ts)}, body
                continue
            if i == first and prepared is not None:
                path, prepared = prepared, None
                yield {"Content-Type": _dicom_type(target)}, _StreamAndRemove(path)
                continue
            # Converted before its part starts, so that a decoder failing on it can still
            # send it as the client accepts otherwise (as stored for `*/*`): the stream
            # broke off there (found by interop review: curl of a study with no Accept).
            target, made = await _converted(svc, inst, target, accept)
            if made is None:
                body = svc.blobs.open_range(inst.blob_key, 0, inst.size_bytes)
                yield {"Content-Type": _dicom_type(ts)}, body
            else:
                yield {"Content-Type": _dicom_type(target)}, _StreamAndRemove(made)
    finally:
        if prepared is not None:  # the response ended before its turn
            with contextlib.suppress(OSError):
                prepared.unlink()


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


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _transcode_to_file(svc: Services, inst: StoredInstance, target: str) -> Path:
    """The instance converted into a scratch file (removed again if the conversion fails)."""
    tmp = scratch_file(svc.scratch_dir, ".dcm")
    try:
        src = svc.blobs.local_path(inst.blob_key)
        await anyio.to_thread.run_sync(to_transfer_syntax, src, tmp, target, limiter=svc.limiter)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


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


def parse_frame_list(text: str) -> list[int]:
    """`1,3,5` -> [1, 3, 5] (PS3.18 8.3.1.4 frame list); 400 when malformed.

    ASCII digits only, nothing around them: Python's `\\d` and int() also take the digits of
    other scripts (U+0661, Arabic-Indic one, is 1) and whitespace, other spellings of a frame."""
    if not re.fullmatch(r"[0-9]{1,9}(,[0-9]{1,9})*", text):
        raise BadRequestError(f"malformed frame list {text!r}: expected numbers like 1,3,5")
    frames = [int(x) for x in text.split(",")]
    if len(frames) > MAX_FRAMES_PER_REQUEST:
        raise BadRequestError(f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    if any(n < 1 for n in frames):
        raise BadRequestError("frame numbers start at 1")
    return frames


def _farthest(frames: Sequence[int]) -> int:
    """The highest frame number of `frames`: of a range (every frame of an instance, in
    order), its last, without counting through it as max() does."""
    return frames[-1] if isinstance(frames, range) else max(frames)


def _check_frames(inst: StoredInstance, frames: Sequence[int]) -> None:
    """404 for an instance without frames, or a frame past its last."""
    if inst.number_of_frames == 0:
        raise NotFoundError("the instance has no pixel data")
    if _farthest(frames) > inst.number_of_frames:
        missing = next(n for n in frames if n > inst.number_of_frames)
        raise NotFoundError(
            f"frame {missing} does not exist: the instance has {inst.number_of_frames}"
        )


def _frame_plan(
    inst: StoredInstance, accept: str | None, failed: frozenset[str] = frozenset()
) -> tuple[str, str, str]:
    """(part media type, part Content-Type, target) of a frames request; target STORED means
    the stored bytes are sent as they are. 406 raised here, before anything is sent.
    `failed`: targets a decoder or encoder already failed on for this instance."""
    ts = inst.transfer_syntax_uid
    why = "" if decodable(ts) else missing_codec(ts)
    targets = [t for t in targets_of(inst) if t not in failed]
    target = negotiate_frames(accept, ts, targets, why)
    if target == STORED:
        media = frame_media_type(ts)
        # Encapsulated frames with no image type of their own (Deflated Image Frame
        # Compression, a private syntax) are sent as they are, octet-stream with their
        # transfer syntax: "as stored" must never need a decoder (field notes 3).
        if media != APPLICATION_OCTET_STREAM or (inst.encapsulated and inst.frame_offsets):
            return media, f"{media}; transfer-syntax={ts}", STORED
        # Native: as stored is uncompressed, i.e. Explicit VR Little Endian frames (big
        # endian, deflated and bit-packed frames not on byte boundaries are decoded).
        target = EXPLICIT_VR_LITTLE_ENDIAN
    if target == EXPLICIT_VR_LITTLE_ENDIAN:
        ctype = f"{APPLICATION_OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
        if ts in _LE_NATIVE and inst.frame_offsets is not None:
            return APPLICATION_OCTET_STREAM, ctype, STORED
        return APPLICATION_OCTET_STREAM, ctype, target
    media = frame_media_type(target)
    return media, f"{media}; transfer-syntax={target}", target


def frame_media(inst: StoredInstance, accept: str | None) -> str:
    """The media type frames of the instance are sent in for this Accept; 404/406 raised."""
    _check_frames(inst, [1])
    return _frame_plan(inst, accept)[0]


async def frame_parts(
    svc: Services, inst: StoredInstance, frames: Sequence[int], accept: str | None
) -> tuple[str, AsyncIterator[Part]]:
    """(part media type, parts) for a frames request (`frames` a list, or a range for every
    frame of the instance: a list of them all would hold one int per frame, and Number of
    Frames may say 2^31 - 1); 404/406 raised before anything is sent."""
    _check_frames(inst, frames)
    # Frames whose places ingest recorded are all in the file; others may not be (_first_frame).
    last = _farthest(frames) if inst.frame_offsets is None else None
    media, ctype, target, first = await _first_frame(svc, inst, frames[0], accept, last)
    if first is None:
        return media, _stored_frames(svc, inst, frames, ctype)
    return media, _converted_rest(svc, inst, first, frames[1:], target, ctype)


async def _first_frame(
    svc: Services, inst: StoredInstance, n: int, accept: str | None, last: int | None = None
) -> tuple[str, str, str, bytes | None]:
    """_frame_plan, and frame n converted as it says (None: sent as stored), before the
    response starts, so that a codec failing on this instance is a 406 rather than a broken
    stream. A decoder may fail on data its transfer syntax promised it (a 12-bit JPEG
    Extended that libjpeg refuses): the Accept is then negotiated again without that target,
    and a request naming no type (none, `*/*`) gets the frames as stored (field notes 3), as
    it does when no decoder exists. The conversion's error when nothing else is acceptable.

    `last`, the farthest frame the response will hold, is converted up front too (into the
    frame cache, where its turn finds it), for frames whose places ingest could not record:
    Pixel Data that holds fewer frames than Number of Frames says (a native value cut short,
    a Number of Frames of 2^31 - 1 over one frame) lacks its last frames, and a request for
    several frames broke off mid-body there, after its first ones were sent. A decoder
    failing on a frame in between (a damaged codestream) is only found when that frame's
    turn comes, and ends the response there."""
    failed: frozenset[str] = frozenset()
    error: TranscodeError | None = None
    while True:
        try:
            media, ctype, target = _frame_plan(inst, accept, failed)
        except NotAcceptableError:
            if error is None:
                raise
            raise error from None
        if target == STORED:
            return media, ctype, target, None
        if target in failed:  # native frames are decoded even "as stored"
            assert error is not None
            raise error
        try:
            made = await _convert_frame(svc, inst, n, target)
            if last is not None and last != n:
                await _convert_frame(svc, inst, last, target)
            return media, ctype, target, made
        except TranscodeError as exc:
            error, failed = exc, failed | {target}


@dataclass(frozen=True)
class Sized:
    """One frame or bulk data value whose length is known before it is sent, readable by byte
    range (HTTP Range on frame and bulk data URLs, field notes 6)."""

    headers: dict[str, str]
    length: int
    read: Callable[[int, int], AsyncIterator[bytes]]  # bytes [start, stop)
    # What only the server knows of the value (the blob's key, drawn at random when it was
    # stored): it goes into the boundary a response derives from the value, which an
    # uploader, who chose the value's bytes, therefore cannot put into them.
    secret: str


async def frame_value(
    svc: Services, inst: StoredInstance, n: int, accept: str | None, whole: bool = False
) -> tuple[str, Sized]:
    """(part media type, value) of frame n as the client accepts it; 404/406 raised here.
    `whole`: no byte range will be asked of it, so a stored encapsulated frame of at most
    SMALL_RUN_BYTES is read in one worker-thread call, item headers stripped, rather than
    mapped item by item first (a thread call more)."""
    _check_frames(inst, [n])
    media, ctype, _, converted = await _first_frame(svc, inst, n, accept)
    headers = {"Content-Type": ctype}
    key = inst.blob_key
    if converted is not None:
        return media, _sized_bytes(headers, converted, key)
    if inst.frame_offsets is None or inst.frame_lengths is None:
        path = svc.blobs.local_path(key)
        (data,) = await anyio.to_thread.run_sync(stored_frames, path, [n], limiter=svc.limiter)
        return media, _sized_bytes(headers, data, key)
    offset, length = inst.frame_offsets[n - 1], inst.frame_lengths[n - 1]
    if whole and inst.encapsulated and length <= SMALL_RUN_BYTES:
        return media, _sized_bytes(headers, await _stored_codestream(svc, inst, n), key)
    return media, await _sized_range(svc, inst.blob_key, offset, length, inst.encapsulated, headers)


def _sized_bytes(headers: dict[str, str], data: bytes, key: str) -> Sized:
    """`data`, a value of the blob `key` (its secret)."""
    return Sized(headers, len(data), lambda start, stop: _one(data[start:stop]), key)


async def _sized_range(
    svc: Services, key: str, offset: int, length: int, encapsulated: bool, headers: dict[str, str]
) -> Sized:
    """The value stored at [offset, offset + length) of a blob; of encapsulated items, the
    concatenated item values (their lengths read from the item headers, values unread). A
    range of those starts reading at the item that holds its first byte, so a suffix range
    of a large multi-fragment value does not read the value from its start."""
    if not encapsulated:
        return Sized(
            headers,
            length,
            lambda start, stop: svc.blobs.open_range(key, offset + start, stop - start),
            key,
        )
    path = svc.blobs.local_path(key)
    items = await anyio.to_thread.run_sync(_item_map, path, offset, length, limiter=svc.limiter)
    ends = list(itertools.accumulate(n for _, n in items))  # value bytes up to each item's end
    end = offset + length

    def read(start: int, stop: int) -> AsyncIterator[bytes]:
        i = bisect.bisect_right(ends, start)  # the item holding value byte `start`
        before = ends[i - 1] if i else 0
        pos = items[i][0] if i < len(items) else end
        chunks = strip_items(svc.blobs.open_range(key, pos, end - pos))
        return slice_stream(chunks, start - before, stop - before)

    return Sized(headers, ends[-1] if ends else 0, read, key)


def _item_map(path: Path, offset: int, length: int) -> list[tuple[int, int]]:
    """(file position of its header, value bytes counted) of each encapsulated item at
    [offset, offset + length); a value running past the end counts up to it, as strip_items
    stops there."""
    items = []
    end = offset + length
    with path.open("rb") as fh:
        pos = offset
        while pos < end:
            fh.seek(pos)
            header = fh.read(8)
            if len(header) < 8:
                raise OSError(f"{path.name} is shorter than the recorded range")
            (n,) = struct.unpack("<I", header[4:])
            items.append((pos, max(0, min(n, end - pos - 8))))
            pos += 8 + n
    return items


async def slice_stream(chunks: AsyncIterable[bytes], start: int, stop: int) -> AsyncIterator[bytes]:
    """Bytes [start, stop) of a stream of chunks; reading stops once `stop` is reached, and
    the stream is closed then (its file with it), not when it is garbage-collected."""
    pos = 0
    try:
        async for chunk in chunks:
            end = pos + len(chunk)
            if end > start:
                yield chunk[max(0, start - pos) : min(len(chunk), stop - pos)]
            pos = end
            if pos >= stop:
                break
    finally:
        await close_all(chunks)


async def _stored_frames(
    svc: Services, inst: StoredInstance, frames: Sequence[int], ctype: str
) -> AsyncIterator[Part]:
    if inst.frame_offsets is None or inst.frame_lengths is None:
        path = svc.blobs.local_path(inst.blob_key)
        data = await anyio.to_thread.run_sync(stored_frames, path, frames, limiter=svc.limiter)
        for blob in data:
            yield {"Content-Type": ctype}, _one(blob)
        return
    for n in frames:
        chunks = svc.blobs.open_range(
            inst.blob_key, inst.frame_offsets[n - 1], inst.frame_lengths[n - 1]
        )
        yield {"Content-Type": ctype}, strip_items(chunks) if inst.encapsulated else chunks


async def _convert_frame(svc: Services, inst: StoredInstance, n: int, target: str) -> bytes:
    """Frame n decoded (Explicit VR Little Endian) or re-encoded, through the frame cache
    (keyed by the row's revision too: decoded by the row's pixel description)."""
    key = (inst.blob_key, inst.revision, n, target)
    cached = svc.frames.get(key)
    if cached is not None:
        return cached
    path = svc.blobs.local_path(inst.blob_key)
    info = pixel_info(inst)
    if inst.encapsulated and inst.frame_offsets and inst.frame_lengths and info and info.rows:
        # Read just this frame's fragments by the offsets recorded at ingest; decode them.
        codestream = await _stored_codestream(svc, inst, n)
        data = await anyio.to_thread.run_sync(
            convert_codestream, codestream, inst.transfer_syntax_uid, info, target,
            limiter=svc.limiter,
        )  # fmt: skip
    elif target == EXPLICIT_VR_LITTLE_ENDIAN:
        (data,) = await anyio.to_thread.run_sync(decode_frames, path, [n], limiter=svc.limiter)
    else:
        (data,) = await anyio.to_thread.run_sync(
            encode_frames, path, [n], target, limiter=svc.limiter
        )
    svc.frames.put(key, data)
    return data


async def _stored_codestream(svc: Services, inst: StoredInstance, n: int) -> bytes:
    """Frame n of an encapsulated instance as stored: its fragments, read by the offsets
    recorded at ingest, their values joined (item headers stripped)."""
    assert inst.frame_offsets is not None and inst.frame_lengths is not None
    offset, length = inst.frame_offsets[n - 1], inst.frame_lengths[n - 1]
    chunks = svc.blobs.open_range(inst.blob_key, offset, length)
    return b"".join([c async for c in strip_items(chunks)])


async def _converted_rest(
    svc: Services,
    inst: StoredInstance,
    first: bytes,
    frames: Sequence[int],
    target: str,
    ctype: str,
) -> AsyncIterator[Part]:
    yield {"Content-Type": ctype}, _one(first)
    for n in frames:
        # One frame at a time: memory stays at one converted frame per request.
        yield {"Content-Type": ctype}, _one(await _convert_frame(svc, inst, n, target))


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def strip_items(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Item values of a run of encapsulated items (PS3.5 A.4), item headers removed."""
    header = b""
    remaining = 0
    try:
        async for chunk in chunks:
            pos = 0
            while pos < len(chunk):
                if remaining:
                    take = min(remaining, len(chunk) - pos)
                    yield chunk[pos : pos + take]
                    pos += take
                    remaining -= take
                    continue
                need = 8 - len(header)
                header += chunk[pos : pos + need]
                pos += need
                if len(header) == 8:
                    (remaining,) = struct.unpack("<I", header[4:])
                    header = b""
    finally:
        await close_all(chunks)


_UNCOMPRESSED = f'multipart/related; type="{APPLICATION_OCTET_STREAM}"'
# What the Pixel Data of an encapsulated instance may be sent as, by pixel_data_plan.
DECODED = "decoded"  # its uncompressed value (decoded_pixel_data)
STORED_FRAMES = f"{_UNCOMPRESSED}; transfer-syntax=*"  # its frames as stored, one part each
AS_FRAMES = "frames"  # its frames as the frames resource negotiates the request's Accept


def encapsulated_pixels(inst: StoredInstance) -> bool:
    """Whether the instance has Pixel Data in encapsulated (compressed) frames: recorded at
    ingest when its frames could be mapped, else told by its transfer syntax (frames without
    an offset table in more fragments than frames are not mapped, and still compressed)."""
    if inst.number_of_frames == 0:
        return False
    return inst.encapsulated or inst.transfer_syntax_uid not in NATIVE


def pixel_data_plan(inst: StoredInstance, accept: str | None) -> list[str]:
    """What the Pixel Data bulk value of an encapsulated instance can be sent as, in the
    order the client prefers (each tried in turn: a decoder may still fail on the first
    frame), or a 406. Octet-stream without a transfer syntax, or naming Explicit VR Little
    Endian, is its uncompressed value (PS3.18 8.7.3.3); `transfer-syntax=*` its frames as
    stored; an image type its frames in that type. A range naming no type (`*/*`) takes the
    uncompressed value when it can be made, else the frames as stored (field notes 3)."""
    info = pixel_info(inst)
    can_decode = decodable(inst.transfer_syntax_uid) and _uncompressed_form(info) is None
    plans: list[str] = []
    why = ""
    for rng in parse_accept(accept):
        if rng.essence not in ("*/*", "multipart/*", MULTIPART_RELATED):
            continue
        if not rng.matches(MULTIPART_RELATED):  # a wildcard of a header refusing multipart
            continue
        part = rng.params.get("type", APPLICATION_OCTET_STREAM).lower()
        ts = rng.params.get("transfer-syntax")
        if part in ("*/*", "application/*", APPLICATION_OCTET_STREAM):
            open_type = rng.essence == "*/*" or part != APPLICATION_OCTET_STREAM
            if ts in (None, EXPLICIT_VR_LITTLE_ENDIAN) and can_decode:
                plans.append(DECODED)
            elif ts in (STORED, inst.transfer_syntax_uid) or (ts is None and open_type):
                plans.append(STORED_FRAMES)
            elif ts in (None, EXPLICIT_VR_LITTLE_ENDIAN):
                why = (
                    missing_codec(inst.transfer_syntax_uid)
                    if not decodable(inst.transfer_syntax_uid)
                    else str(_uncompressed_form(info))
                )
            if open_type and ts is None:
                plans.append(STORED_FRAMES)
        elif rng.essence == MULTIPART_RELATED:
            plans.append(AS_FRAMES)  # an image type: the frames resource's negotiation
    plans = list(dict.fromkeys(plans))
    if not plans:
        raise TranscodeError(
            'acceptable: multipart/related; type="application/octet-stream" (the Pixel Data '
            "uncompressed), with transfer-syntax=* (its frames as stored), or an image type"
            + (f"; the Pixel Data cannot be decoded: {why}" if why else "")
        )
    return plans


def _uncompressed_form(info: PixelInfo | None) -> str | None:
    """Why encapsulated Pixel Data so described has no uncompressed value to send frame by
    frame, or None when it has one: its frames must be of whole bytes (1-bit Pixel Data is
    made whole instead), and not empty (a Rows, Columns, Samples per Pixel or Bits Allocated
    of 0 made frames of 0 bytes, and the frame arithmetic divided by that: a 500)."""
    if info is None:
        return "the Image Pixel attributes are missing"
    if info.bits_allocated % 8 and info.bits_allocated != 1:
        return "Bits Allocated is neither 1 nor a multiple of 8"
    if min(info.rows, info.columns, info.samples_per_pixel, info.bits_allocated) <= 0:
        return "Rows, Columns, Samples per Pixel or Bits Allocated is 0"
    return None


async def decoded_pixel_data(svc: Services, inst: StoredInstance) -> Sized:
    """The Pixel Data of an encapsulated instance as its uncompressed value, Explicit VR
    Little Endian (PS3.18 8.7.3.3: without a transfer syntax, bulk data is uncompressed),
    decoded frame by frame as it is sent (through the frame cache), so a range of it decodes
    only the frames it covers and memory holds one frame at a time. 1-bit Pixel Data is made
    whole (_one_bit_pixel_data)."""
    info = pixel_info(inst)
    why = _uncompressed_form(info)
    if why is not None or info is None:
        raise TranscodeError(f"{why}: ask for transfer-syntax=* for its frames as stored")
    if info.bits_allocated == 1:
        return await _one_bit_pixel_data(svc, inst, info)
    size = info.rows * info.columns * info.samples_per_pixel * info.bits_allocated // 8
    frames = size * inst.number_of_frames

    async def decoded(n: int) -> bytes:
        _, frame = await frame_value(svc, inst, n, _UNCOMPRESSED, whole=True)
        data = b"".join([chunk async for chunk in frame.read(0, frame.length)])
        if len(data) != size:
            raise TranscodeError(f"frame {n} decoded to {len(data)} bytes, not {size}")
        return data

    async def read(start: int, stop: int) -> AsyncIterator[bytes]:
        end = min(stop, frames)
        covered = range(start // size, (end - 1) // size + 1 if end > start else 0)
        if inst.frame_offsets is None and len(covered) > 1:
            # Frames whose places ingest could not record may not all be there (as in
            # frame_parts): the last one read is decoded (into the frame cache) first, so
            # that its failure comes before the first bytes, and the response, start.
            await decoded(covered[-1] + 1)
        for k in covered:
            data = await decoded(k + 1)
            yield data[max(start - k * size, 0) : min(end - k * size, size)]
        if stop > frames >= start:
            yield b"\0"  # the padding byte of an odd length

    ctype = f"{APPLICATION_OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    # PS3.5 7.1.1: a value has an even length, an odd one padded (as the instance converted
    # to Explicit VR Little Endian holds it).
    return Sized({"Content-Type": ctype}, frames + frames % 2, read, inst.blob_key)


async def _one_bit_pixel_data(svc: Services, inst: StoredInstance, info: PixelInfo) -> Sized:
    """The uncompressed value of 1-bit Pixel Data stored compressed: its frames are one
    bit-packed run (PS3.5 8.1.1), so a frame need not start on a byte and the value cannot be
    made frame by frame; it is decoded whole in a worker thread (as the conversion of the
    instance to Explicit VR Little Endian is) when the first bytes are read, which is before
    anything is sent. Its length is known without decoding (a HEAD decodes nothing): a bit
    per sample, padded to an even length (PS3.5 7.1.1)."""
    bits = info.rows * info.columns * info.samples_per_pixel * inst.number_of_frames
    total = (bits + 15) // 16 * 2
    path = svc.blobs.local_path(inst.blob_key)

    async def read(start: int, stop: int) -> AsyncIterator[bytes]:
        if stop <= start:
            return
        data = await anyio.to_thread.run_sync(one_bit_pixel_data, path, limiter=svc.limiter)
        if len(data) != total:
            raise TranscodeError(f"1-bit Pixel Data decoded to {len(data)} bytes, not {total}")
        yield data[start:stop]

    ctype = f"{APPLICATION_OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    return Sized({"Content-Type": ctype}, total, read, inst.blob_key)


async def bulk_value(svc: Services, study: str, series: str, sop: str, path: str) -> Sized:
    """The value of one bulk data element (PS3.18 8.4.1.3); 404 when there is none: a path
    that is malformed, walks into an element that is not a sequence or an item that does not
    exist, or ends at an element whose value is not bulk data (read_bulk_value)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}(/\d{1,6}/[0-9A-Fa-f]{8})*", path):
        raise NotFoundError(
            f"no bulk data at {path!r}: a bulk data path is a tag (8 hex digits), then "
            "/item/tag for each sequence it enters"
        )
    entry = await svc.index.bulk_range(study, series, sop, path.upper())
    if entry is None:
        raise NotFoundError("no such instance in the archive")
    (inst,) = await locate(svc, study, series, sop)
    return await stored_bulk_value(svc, inst, path.upper(), entry)


async def stored_bulk_value(
    svc: Services, inst: StoredInstance, path: str, entry: list[Any] | None
) -> Sized:
    """The value at tag path `path` (upper case) of an instance: by the byte range recorded at
    ingest (`entry`: offset, length, VR, encapsulated), else by parsing the file (values in
    sequences, big endian and deflated files); 404 when the path names no bulk data value."""
    headers = {"Content-Type": APPLICATION_OCTET_STREAM}
    if entry:
        offset, length, _vr, encapsulated = entry
        return await _sized_range(svc, inst.blob_key, offset, length, encapsulated, headers)
    file = svc.blobs.local_path(inst.blob_key)
    value = await anyio.to_thread.run_sync(_parsed_bulk_value, file, path, limiter=svc.limiter)
    if value is None:
        raise NotFoundError(f"no bulk data at {path!r}: the path names no bulk data value")
    return _sized_bytes(headers, value, inst.blob_key)


def _parsed_bulk_value(path: Path, tag_path: str) -> bytes | None:
    """A value found by parsing the file (dicomfile.read_bulk_value), little endian; nested
    encapsulated Pixel Data (a compressed icon) decoded, as octet-stream bulk data is sent
    uncompressed (PS3.18 8.7.3.3). Runs in a worker thread."""
    found = bulk_element(path, tag_path)
    if found is None:
        return None
    ds, node, tag = found
    element = node[tag]
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if tag in PIXEL_DATA_TAGS and element.is_undefined_length and ts.is_compressed:
        return decode_item_pixels(node, ts)
    value = element_value(ds, element)
    return None if value is None else value[0]
