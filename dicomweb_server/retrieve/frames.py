"""Frame retrieval (WADO-RS): the frames of an instance as stored, by the offsets recorded
at ingest (so a frame read never parses the file), or converted one at a time through the
frame cache; Sized, a frame or bulk data value readable by byte range, and the readers of
stored ranges (encapsulated items' headers stripped).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import re
import struct
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from dicomweb_server.blobstore.files import BlobStore, scratch_space
from dicomweb_server.departure import stopped_if_gone
from dicomweb_server.errors import BadRequestError, NotAcceptableError, NotFoundError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import (
    APPLICATION_OCTET_STREAM,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STORED,
    VIDEO_TRANSFER_SYNTAXES,
)
from dicomweb_server.media.negotiate import frame_media_type, negotiate_frames
from dicomweb_server.metadata import pixel_info, targets_of
from dicomweb_server.multipart import close_all
from dicomweb_server.retrieve import instances
from dicomweb_server.retrieve.instances import Part, once
from dicomweb_server.transcode.codecs import NATIVE, TranscodeError, decodable, missing_codec
from dicomweb_server.transcode.fragments import frame_map, stored_frames
from dicomweb_server.transcode.frames import convert_codestream, decode_frames, encode_frames
from dicomweb_server.transcode.inflated import Hold, hold

__all__ = [
    "MAX_FRAMES_PER_REQUEST",
    "Sized",
    "frame_media",
    "frame_parts",
    "frame_value",
    "parse_frame_list",
    "sized_bytes",
    "sized_range",
    "slice_stream",
    "strip_items",
]

# Most frame numbers one request may list.
MAX_FRAMES_PER_REQUEST = 10_000
_LE_NATIVE = {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN}


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
    seen: set[int] = set()
    for n in frames:
        # "one or more non duplicate frame numbers" (PS3.18 2017b 6.5.4): `1,1,1,...` made one
        # request send a frame 10,000 times over (a 5 GB body from a 512 x 512 frame).
        if n in seen:
            raise BadRequestError(f"frame {n} is listed twice: a frame list names each frame once")
        seen.add(n)
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
    inst = await _placed(svc, inst)
    # Frames whose places ingest recorded are all in the file; others may not be (_first_frame).
    last = _farthest(frames) if inst.frame_offsets is None else None
    # A Deflated file's inflated copy is held from its first frame to its last: inflated once
    # for the request, whatever other requests inflate meanwhile (transcode.inflated).
    kept = hold(svc.blobs.local_path(inst.blob_key)) if _inflated(inst) else None
    try:
        media, ctype, target, first = await _first_frame(svc, inst, frames[0], accept, last)
    except BaseException:
        if kept is not None:
            kept.release()
        raise
    if first is None:
        if kept is not None:
            kept.release()
        return media, _stored_frames(svc, inst, frames, ctype)
    return media, _converted_rest(svc, inst, first, frames[1:], target, ctype, kept)


def _inflated(inst: StoredInstance) -> bool:
    """Whether the instance's frames are read from an inflated copy of its file."""
    return inst.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN


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


async def _placed(svc: Services, inst: StoredInstance) -> StoredInstance:
    """The instance with the places of its frames, when ingest could not record them (an
    encapsulated file without an offset table, in more fragments than frames) and they can
    be found from its items (frame_map): its frames are then read and decoded by range as
    those of other instances are, not found again by pydicom from the first fragment for
    each one (quadratic in the frames of a request)."""
    ts = inst.transfer_syntax_uid
    if (
        inst.frame_offsets is not None
        or inst.number_of_frames < 2
        or ts in NATIVE
        or ts in VIDEO_TRANSFER_SYNTAXES
    ):
        return inst
    path = await svc.blobs.checked_path(inst)
    found = await anyio.to_thread.run_sync(frame_map, path, limiter=svc.limiter)
    if found is None or len(found[0]) != inst.number_of_frames:
        return inst
    offsets, lengths = found
    return replace(
        inst, frame_offsets=list(offsets), frame_lengths=list(lengths), encapsulated=True
    )


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
    instances.SMALL_RUN_BYTES is read in one worker-thread call, item headers stripped, rather
    than mapped item by item first (a thread call more). The limit is read from `instances` at
    call time, its one binding, so that patching it there changes it here too."""
    _check_frames(inst, [n])
    inst = await _placed(svc, inst)
    media, ctype, _, converted = await _first_frame(svc, inst, n, accept)
    headers = {"Content-Type": ctype}
    key = inst.blob_key
    if converted is not None:
        return media, sized_bytes(headers, converted, key)
    if inst.frame_offsets is None or inst.frame_lengths is None:
        path = await svc.blobs.checked_path(inst)
        (data,) = await anyio.to_thread.run_sync(stored_frames, path, [n], limiter=svc.limiter)
        return media, sized_bytes(headers, data, key)
    offset, length = inst.frame_offsets[n - 1], inst.frame_lengths[n - 1]
    if whole and inst.encapsulated and length <= instances.SMALL_RUN_BYTES:
        return media, sized_bytes(headers, await _stored_codestream(svc, inst, n), key)
    return media, await sized_range(svc, inst, offset, length, inst.encapsulated, headers)


def sized_bytes(headers: dict[str, str], data: bytes, key: str) -> Sized:
    """`data`, a value of the blob `key` (its secret)."""
    return Sized(headers, len(data), lambda start, stop: once(data[start:stop]), key)


async def sized_range(
    svc: Services,
    inst: StoredInstance,
    offset: int,
    length: int,
    encapsulated: bool,
    headers: dict[str, str],
) -> Sized:
    """The value stored at [offset, offset + length) of an instance's blob; of encapsulated
    items, the concatenated item values (their lengths read from the item headers, values
    unread). A range of those starts reading at the item that holds its first byte, so a
    suffix range of a large multi-fragment value does not read the value from its start."""
    key = inst.blob_key
    if not encapsulated:
        return Sized(
            headers,
            length,
            lambda start, stop: svc.blobs.open_range(inst, offset + start, stop - start),
            key,
        )
    # The file's size checked (LostBlobError) in the call that maps its items: a Range of an
    # encapsulated frame (Cornerstone's progressive loading, one per frame) took a worker
    # thread call more for the check alone.
    items = await anyio.to_thread.run_sync(
        _checked_item_map, svc.blobs, inst, offset, length, limiter=svc.limiter
    )
    ends = list(itertools.accumulate(n for _, n in items))  # value bytes up to each item's end
    end = offset + length

    def read(start: int, stop: int) -> AsyncIterator[bytes]:
        i = bisect.bisect_right(ends, start)  # the item holding value byte `start`
        before = ends[i - 1] if i else 0
        pos = items[i][0] if i < len(items) else end
        chunks = strip_items(svc.blobs.open_range(inst, pos, end - pos))
        return slice_stream(chunks, start - before, stop - before)

    return Sized(headers, ends[-1] if ends else 0, read, key)


def _checked_item_map(
    blobs: BlobStore, inst: StoredInstance, offset: int, length: int
) -> list[tuple[int, int]]:
    """_item_map of an instance's blob, its size checked first (BlobStore.checked_path_blocking:
    LostBlobError when it is missing or shorter than recorded), in one worker-thread call."""
    return _item_map(blobs.checked_path_blocking(inst), offset, length)


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
            piece = (
                chunk[max(0, start - pos) : min(len(chunk), stop - pos)] if end > start else None
            )
            del chunk  # not held while the next one is read (the piece may be all of it)
            if piece is not None:
                yield piece
                del piece
            pos = end
            if pos >= stop:
                break
    finally:
        await close_all(chunks)


async def _stored_frames(
    svc: Services, inst: StoredInstance, frames: Sequence[int], ctype: str
) -> AsyncIterator[Part]:
    if inst.frame_offsets is None or inst.frame_lengths is None:
        path = await svc.blobs.checked_path(inst)
        data = await anyio.to_thread.run_sync(stored_frames, path, frames, limiter=svc.limiter)
        for blob in data:
            yield {"Content-Type": ctype}, once(blob)
        return
    for n in frames:
        chunks = svc.blobs.open_range(inst, inst.frame_offsets[n - 1], inst.frame_lengths[n - 1])
        yield {"Content-Type": ctype}, strip_items(chunks) if inst.encapsulated else chunks


async def _convert_frame(svc: Services, inst: StoredInstance, n: int, target: str) -> bytes:
    """Frame n decoded (Explicit VR Little Endian) or re-encoded, through the frame cache
    (keyed by the row's revision too: decoded by the row's pixel description)."""
    key = (inst.blob_key, inst.revision, n, target)
    cached = svc.frames.get(key)
    if cached is not None:
        return cached
    info = pixel_info(inst)
    if inst.encapsulated and inst.frame_offsets and inst.frame_lengths and info and info.rows:
        # Read just this frame's fragments by the offsets recorded at ingest; decode them.
        codestream = await _stored_codestream(svc, inst, n)
        # Not begun for a client that went away while it waited for a worker thread
        # (departure.py); one decoding ends with its frame, kept in the cache.
        async with stopped_if_gone():
            data = await anyio.to_thread.run_sync(
                convert_codestream, codestream, inst.transfer_syntax_uid, info, target,
                limiter=svc.limiter,
            )  # fmt: skip
    elif target == EXPLICIT_VR_LITTLE_ENDIAN:
        path = await svc.blobs.checked_path(inst)  # LostBlobError, not a decoder's failure
        async with stopped_if_gone():
            with scratch_space(svc.scratch_dir):  # a Deflated file inflated there
                (data,) = await anyio.to_thread.run_sync(
                    decode_frames, path, [n], svc.scratch_dir, limiter=svc.limiter
                )
    else:
        path = await svc.blobs.checked_path(inst)
        async with stopped_if_gone():
            with scratch_space(svc.scratch_dir):
                (data,) = await anyio.to_thread.run_sync(
                    encode_frames, path, [n], target, svc.scratch_dir, limiter=svc.limiter
                )
    svc.frames.put(key, data)
    return data


async def _stored_codestream(svc: Services, inst: StoredInstance, n: int) -> bytes:
    """Frame n of an encapsulated instance as stored: its fragments, read by the offsets
    recorded at ingest, their values joined (item headers stripped)."""
    assert inst.frame_offsets is not None and inst.frame_lengths is not None
    offset, length = inst.frame_offsets[n - 1], inst.frame_lengths[n - 1]
    chunks = svc.blobs.open_range(inst, offset, length)
    return b"".join([c async for c in strip_items(chunks)])


async def _converted_rest(
    svc: Services,
    inst: StoredInstance,
    first: bytes,
    frames: Sequence[int],
    target: str,
    ctype: str,
    kept: Hold | None,
) -> AsyncIterator[Part]:
    """The converted frames after the first; `kept` (a Deflated file's copy held over the
    request) released at the end, or when a body never read is dropped (Hold)."""
    try:
        yield {"Content-Type": ctype}, once(first)
        for n in frames:
            # One frame at a time: memory stays at one converted frame per request.
            yield {"Content-Type": ctype}, once(await _convert_frame(svc, inst, n, target))
    finally:
        if kept is not None:
            kept.release()


async def strip_items(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Item values of a run of encapsulated items (PS3.5 A.4), item headers removed. A chunk
    is cut into the values it holds before the first of them is sent, and let go of then:
    a value sent from the middle of a chunk is a copy, and the chunk held beside it (until
    its last value was sent) was up to a chunk more than the download budget counts
    (blobstore.budget: a stalled download of a frame of several fragments held both)."""
    header = b""
    remaining = 0
    try:
        async for chunk in chunks:
            pieces, header, remaining = _item_values(chunk, header, remaining)
            del chunk  # its values are the pieces now (the last may be all of it)
            while pieces:
                piece = pieces.popleft()
                yield piece
                del piece  # sent: not held while the next one is read
    finally:
        await close_all(chunks)


def _item_values(
    chunk: bytes, header: bytes, remaining: int
) -> tuple[collections.deque[bytes], bytes, int]:
    """The item values in `chunk`, given the part of an item header before it (`header`) and
    the bytes of a value still to come (`remaining`): (the values, the part of a header and
    the bytes of a value still to come after it)."""
    pieces: collections.deque[bytes] = collections.deque()
    pos = 0
    while pos < len(chunk):
        if remaining:
            take = min(remaining, len(chunk) - pos)
            pieces.append(chunk[pos : pos + take])  # all of it: the chunk itself, uncopied
            pos += take
            remaining -= take
            continue
        need = 8 - len(header)
        header += chunk[pos : pos + need]
        pos += need
        if len(header) == 8:
            (remaining,) = struct.unpack("<I", header[4:])
            header = b""
    return pieces, header, remaining
