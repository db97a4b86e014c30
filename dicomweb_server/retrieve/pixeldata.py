"""Bulk data values (WADO-RS): the Pixel Data of an encapsulated instance, as its
uncompressed value (decoded frame by frame as it is sent) or its frames, and the value of
one bulk data element, by the byte range recorded at ingest or by parsing the file.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import anyio
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomweb_server.blobstore.files import scratch_file, scratch_space
from dicomweb_server.blobstore.reading import stream_path
from dicomweb_server.bulkvalue import element_range, element_value, placed_element
from dicomweb_server.departure import stopped_if_gone
from dicomweb_server.dicomfile import PIXEL_DATA_TAGS
from dicomweb_server.errors import NotFoundError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import (
    APPLICATION_OCTET_STREAM,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    MULTIPART_RELATED,
    STORED,
    parse_accept,
)
from dicomweb_server.media.negotiate import frame_media_type, refused_to
from dicomweb_server.metadata import pixel_info
from dicomweb_server.multipart import close_all
from dicomweb_server.retrieve.frames import (
    Sized,
    frame_value,
    sized_bytes,
    sized_range,
    slice_stream,
)
from dicomweb_server.retrieve.instances import locate
from dicomweb_server.transcode.codecs import (
    NATIVE,
    PixelInfo,
    TranscodeError,
    decodable,
    missing_codec,
)
from dicomweb_server.transcode.convert import one_bit_pixel_data
from dicomweb_server.transcode.frames import decode_item_pixels, too_deep_to_read
from dicomweb_server.transcode.inflated import Hold, hold, inflated
from dicomweb_server.vr import WORD_WIDTHS, swapped_words

__all__ = [
    "AS_FRAMES",
    "DECODED",
    "HELD_VALUE_MAX_BYTES",
    "INFLATED_PLACES_KEPT",
    "STORED_FRAMES",
    "bulk_value",
    "decoded_pixel_data",
    "encapsulated_pixels",
    "pixel_data_plan",
    "stored_bulk_value",
]

_UNCOMPRESSED = f'multipart/related; type="{APPLICATION_OCTET_STREAM}"'
# A bulk data value read by parsing the file (a nested value, an icon's Pixel Data decoded;
# a Deflated file's, before they were read from its inflated copy) of more bytes than this
# is written to a scratch file in the worker thread that read it, and sent from there: the
# response held it in memory (twice) until its client had read it, and eight clients
# reading the 60 MB Pixel Data of a Deflated instance slowly took the server from 236 MB to
# 1.2 GB.
HELD_VALUE_MAX_BYTES = 1024 * 1024
# Places of bulk data values in the inflated copies of Deflated files (transcode.inflated)
# kept per process, least recently used forgotten first: a Range request, or the next
# request, for a value reads it from the copy without parsing the copy again. An entry is a
# few hundred bytes.
INFLATED_PLACES_KEPT = 4096
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
    uncompressed value when it can be made, else the frames as stored (field notes 3), what
    a q=0 range of the same Accept refuses left out (RFC 9110 12.5.1, refused_to)."""
    info = pixel_info(inst)
    stored = inst.transfer_syntax_uid
    info_why = _uncompressed_form(info)
    can_decode = decodable(stored) and info_why is None
    plans: list[str] = []
    why = ""
    refused: dict[str, None] = {}  # the plans a q=0 range refused, each once
    for rng in parse_accept(accept):
        if rng.essence not in ("*/*", "multipart/*", MULTIPART_RELATED):
            continue
        if not rng.matches(MULTIPART_RELATED):  # a wildcard of a header refusing multipart
            continue
        part = rng.params.get("type", APPLICATION_OCTET_STREAM).lower()
        ts = rng.params.get("transfer-syntax")
        if part in ("*/*", "application/*", APPLICATION_OCTET_STREAM):
            open_type = rng.essence == "*/*" or part != APPLICATION_OCTET_STREAM
            wants_decoded = ts in (None, EXPLICIT_VR_LITTLE_ENDIAN)
            wants_stored = ts in (STORED, stored) or (ts is None and open_type)
            if wants_decoded and not can_decode and not wants_stored:
                why = missing_codec(stored) if not decodable(stored) else f"{info_why}"
            offered = [DECODED] * (wants_decoded and can_decode) + [STORED_FRAMES] * wants_stored
            for plan in offered:
                if refused_to(rng, *_sent_as(plan, stored), stored):
                    refused[plan] = None
                else:
                    plans.append(plan)
        elif rng.essence == MULTIPART_RELATED:
            plans.append(AS_FRAMES)  # an image type: the frames resource's negotiation
    plans = list(dict.fromkeys(plans))
    if not plans:
        raise _no_plan(why, refused)
    return plans


def _sent_as(plan: str, stored_ts: str) -> tuple[str, str]:
    """The part media type and transfer syntax of Pixel Data sent by `plan` (DECODED or
    STORED_FRAMES): octet-stream uncompressed, or its frames as stored in their media type
    (PS3.18 Table 8.7.3-2)."""
    if plan == DECODED:
        return APPLICATION_OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN
    return frame_media_type(stored_ts), stored_ts


def _no_plan(why: str, refused: Iterable[str]) -> TranscodeError:
    """The 406 of pixel_data_plan: what is acceptable, why the Pixel Data could not be
    decoded when that left out its uncompressed value, and what a wildcard range would have
    taken that a q=0 range refused (`refused`: plans)."""
    names = {DECODED: "the Pixel Data uncompressed", STORED_FRAMES: "its frames as stored"}
    refusal = " and ".join(names[plan] for plan in refused)
    return TranscodeError(
        'acceptable: multipart/related; type="application/octet-stream" (the Pixel Data '
        "uncompressed), with transfer-syntax=* (its frames as stored), or an image type"
        + (f"; the Pixel Data cannot be decoded: {why}" if why else "")
        + (f"; the Accept refuses (q=0) {refusal}" if refusal else "")
    )


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

    async def read(start: int, stop: int) -> AsyncIterator[bytes]:
        if stop <= start:
            return
        path = await svc.blobs.checked_path(inst)  # LostBlobError, not a decoder's failure
        async with stopped_if_gone():  # the whole value at once: not begun for a client gone
            data = await anyio.to_thread.run_sync(one_bit_pixel_data, path, limiter=svc.limiter)
        if len(data) != total:
            raise TranscodeError(f"1-bit Pixel Data decoded to {len(data)} bytes, not {total}")
        yield data[start:stop]

    ctype = f"{APPLICATION_OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    return Sized({"Content-Type": ctype}, total, read, inst.blob_key)


async def bulk_value(
    svc: Services, study: str, series: str, sop: str, path: str, *, head: bool = False
) -> Sized:
    """The value of one bulk data element (PS3.18 8.4.1.3); 404 when there is none: a path
    that is malformed, walks into an element that is not a sequence or an item that does not
    exist, or ends at an element whose value is not bulk data (read_bulk_value). `head`: for
    a HEAD (stored_bulk_value)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}(/\d{1,6}/[0-9A-Fa-f]{8})*", path):
        raise NotFoundError(
            f"no bulk data at {path!r}: a bulk data path is a tag (8 hex digits), then "
            "/item/tag for each sequence it enters"
        )
    entry = await svc.index.bulk_range(study, series, sop, path.upper())
    if entry is None:
        raise NotFoundError("no such instance in the archive")
    (inst,) = await locate(svc, study, series, sop)
    return await stored_bulk_value(svc, inst, path.upper(), entry, head=head)


async def stored_bulk_value(
    svc: Services,
    inst: StoredInstance,
    path: str,
    entry: list[Any] | None,
    *,
    head: bool = False,
) -> Sized:
    """The value at tag path `path` (upper case) of an instance: by the byte range recorded at
    ingest (`entry`: offset, length, VR, encapsulated), else by parsing the file (values in
    sequences, big endian and deflated files); 404 when the path names no bulk data value.
    `head`: for a HEAD, which reads nothing: a Deflated file's Pixel Data whose length ingest
    recorded (offset None) is not inflated to find its place (the HEAD of a 60 MB instance
    made the whole inflated copy), its value read only if it is read."""
    headers = {"Content-Type": APPLICATION_OCTET_STREAM}
    if entry and entry[0] is not None:
        offset, length, _vr, encapsulated = entry
        return await sized_range(svc, inst, offset, length, encapsulated, headers)
    deflated = inst.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    if deflated and head and entry:
        unread = _UnreadInflated(svc.blobs.local_path(inst.blob_key), path, entry[1], svc)
        return Sized(headers, entry[1], unread.read, inst.blob_key)
    # Parsed here: a file missing or cut short is said so (LostBlobError), not taken for a
    # data set that does not inflate or parse (a 406).
    file = await svc.blobs.checked_path(inst)
    if deflated:
        return await _inflated_bulk_value(svc, inst, file, path, headers)
    with scratch_space(svc.scratch_dir):  # a value over HELD_VALUE_MAX_BYTES spooled there
        value = await anyio.to_thread.run_sync(
            _parsed_bulk_value, file, path, svc.scratch_dir, limiter=svc.limiter
        )
    if value is None:
        raise NotFoundError(f"no bulk data at {path!r}: the path names no bulk data value")
    if isinstance(value, tuple):
        offset, length, swap = value
        if swap is None:
            return await sized_range(svc, inst, offset, length, False, headers)
        return _swapped_range(svc, inst, offset, length, swap, headers)
    if isinstance(value, _Spooled):
        return Sized(headers, value.size, value.read, inst.blob_key)
    return sized_bytes(headers, value, inst.blob_key)


async def _inflated_bulk_value(
    svc: Services, inst: StoredInstance, file: Path, path: str, headers: dict[str, str]
) -> Sized:
    """The value at `path` of a Deflated file, read by byte range from its inflated copy
    (transcode.inflated), which is held until the value has been read (or the value is
    dropped unread). Parsing the stored file inflated it whole in memory for every request,
    a Range request too (OHIF's), and a value over HELD_VALUE_MAX_BYTES was then written to
    a scratch file of its own: now the file is inflated once, into the copy frames are read
    from too, and the value's place in the copy is kept (INFLATED_PLACES_KEPT). A data set
    that does not inflate is a 406 with the reason, as its frames are."""
    kept = hold(file)
    try:
        with scratch_space(svc.scratch_dir):
            value = await anyio.to_thread.run_sync(
                _inflated_place, file, path, svc.scratch_dir, limiter=svc.limiter
            )
    except BaseException:
        kept.release()
        raise
    if not isinstance(value, tuple):
        kept.release()  # a value held in memory or spooled: the copy is no longer needed
        if value is None:
            raise NotFoundError(f"no bulk data at {path!r}: the path names no bulk data value")
        if isinstance(value, _Spooled):
            return Sized(headers, value.size, value.read, inst.blob_key)
        return sized_bytes(headers, value, inst.blob_key)
    copy, offset, length = value
    placed = _InflatedRange(kept, file, copy, offset, svc)
    return Sized(headers, length, placed.read, inst.blob_key)


class _InflatedRange:
    """A value at `offset` of the inflated copy `copy` of the Deflated file `file`, whose
    Hold `kept` is released when the first read of it ends (sent, failed or closed), or when
    this is garbage unread (a HEAD; transcode.inflated.Hold). A read after that holds the
    copy again for itself (made again if it was removed meanwhile)."""

    def __init__(self, kept: Hold, file: Path, copy: Path, offset: int, svc: Services) -> None:
        self._kept: Hold | None = kept
        self._file, self._copy, self._offset, self._svc = file, copy, offset, svc

    async def read(self, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes [start, stop) of the value, a chunk at a time."""
        kept, self._kept = self._kept, None
        again = kept is None
        if kept is None:
            kept = hold(self._file)
        try:
            copy = self._copy
            if again:  # a read after the first: the copy found again (or made again)
                scratch = self._svc.scratch_dir
                with scratch_space(scratch):
                    copy = await anyio.to_thread.run_sync(
                        _inflated_copy, self._file, scratch, limiter=self._svc.limiter
                    )
            async for chunk in stream_path(copy, self._offset + start, max(0, stop - start)):
                yield chunk
                del chunk  # sent: not held while the next one is read
        finally:
            kept.release()


class _UnreadInflated:
    """A value of a Deflated file whose length ingest recorded, not looked for until it is
    read (stored_bulk_value for a HEAD): a read finds it in the inflated copy (made unless
    kept) as _inflated_bulk_value does, holding the copy while it runs."""

    def __init__(self, file: Path, path: str, length: int, svc: Services) -> None:
        self._file, self._path, self._length, self._svc = file, path, length, svc

    async def read(self, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes [start, stop) of the value, a chunk at a time."""
        kept = hold(self._file)
        try:
            scratch = self._svc.scratch_dir
            with scratch_space(scratch):
                value = await anyio.to_thread.run_sync(
                    _inflated_place, self._file, self._path, scratch, limiter=self._svc.limiter
                )
            if not isinstance(value, tuple) or value[2] != self._length:
                raise TranscodeError(f"the value at {self._path} is not as ingest recorded it")
            copy, offset, _ = value
            async for chunk in stream_path(copy, offset + start, max(0, stop - start)):
                yield chunk
                del chunk  # sent: not held while the next one is read
        finally:
            kept.release()


# (stored file, its st_mtime_ns and st_size, tag path) -> (offset, length) of the value in
# the file's inflated copy; the same in any copy of the same file (made the same way).
_places: OrderedDict[tuple[str, int, int, str], tuple[int, int]] = OrderedDict()
_places_lock = threading.Lock()


def _inflated_copy(file: Path, scratch_dir: Path) -> Path:
    """The inflated copy of `file` (made unless kept; the caller holds it): its path. A data
    set that does not inflate, or inflates past INFLATED_MAX_BYTES, is a TranscodeError."""
    try:
        with inflated(file, scratch_dir) as copy:
            return copy
    except ValueError as exc:
        raise TranscodeError(f"cannot read the Deflated data set: {exc}") from None


def _inflated_place(
    file: Path, tag_path: str, scratch_dir: Path
) -> bytes | _Spooled | tuple[Path, int, int] | None:
    """The value at `tag_path` of a Deflated file, from its inflated copy (made unless kept;
    the caller holds it): (the copy, offset, length) of a value that can be read by range
    there, else the value as _parsed_bulk_value reads it from the copy; None for none. A
    place found is kept (INFLATED_PLACES_KEPT): the next request parses nothing. Runs in a
    worker thread."""
    st = file.stat()
    key = (str(file), st.st_mtime_ns, st.st_size, tag_path)
    copy = _inflated_copy(file, scratch_dir)
    with _places_lock:
        place = _places.get(key)
        if place is not None:
            _places.move_to_end(key)
            return copy, *place
    value = _parsed_bulk_value(copy, tag_path, scratch_dir, copy=True)
    if not isinstance(value, tuple):
        return value
    offset, length, _ = value  # the copy is little endian: nothing to swap
    with _places_lock:
        _places[key] = (offset, length)
        while len(_places) > INFLATED_PLACES_KEPT:
            _places.popitem(last=False)
    return copy, offset, length


class _Spooled:
    """A value found by parsing the file, written to a scratch file (HELD_VALUE_MAX_BYTES),
    which is removed once nothing holds this object: the Sized value sent, or a stream of it
    still being read."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        weakref.finalize(self, _remove, path)

    async def read(self, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes [start, stop) of the value (the generator holds the file while it runs)."""
        async for chunk in stream_path(self.path, start, max(0, stop - start)):
            yield chunk
            del chunk  # sent: not held while the next one is read


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _held(data: bytes, scratch_dir: Path) -> bytes | _Spooled:
    """`data`, or a scratch file of it when it is over HELD_VALUE_MAX_BYTES (a worker
    thread)."""
    if len(data) <= HELD_VALUE_MAX_BYTES:
        return data
    spool = scratch_file(scratch_dir, ".bulk")
    try:
        spool.write_bytes(data)
    except BaseException:
        _remove(spool)
        raise
    return _Spooled(spool, len(data))


def _swapped_range(
    svc: Services, inst: StoredInstance, offset: int, length: int, vr: str, headers: dict[str, str]
) -> Sized:
    """The value of a big endian file at [offset, offset + length), little endian: read by
    range, the words of its VR swapped a chunk at a time (bulkvalue.element_range). A
    range of it starts and ends reading on word boundaries; an odd tail is sent as it is
    (vr.swapped_words)."""

    width = WORD_WIDTHS[vr]

    def read(start: int, stop: int) -> AsyncIterator[bytes]:
        begin = start - start % width
        end = min(length, stop + -stop % width)
        chunks = svc.blobs.open_range(inst, offset + begin, end - begin)
        return slice_stream(_swap_words(chunks, vr), start - begin, stop - begin)

    return Sized(headers, length, read, inst.blob_key)


async def _swap_words(chunks: AsyncIterator[bytes], vr: str) -> AsyncIterator[bytes]:
    """Chunks with the words of `vr` swapped (vr.swapped_words), a word split between two
    chunks carried to the next; what remains at the end (less than a word) is sent as it is."""
    width = WORD_WIDTHS[vr]
    carry = b""
    try:
        async for chunk in chunks:
            data = carry + chunk if carry else chunk
            del chunk
            whole = len(data) - len(data) % width
            carry = data[whole:]
            swapped = swapped_words(data[:whole], vr) if whole else None
            del data  # only the swapped copy is held while it is sent
            if swapped is not None:
                yield swapped
                del swapped
        if carry:
            yield carry
    finally:
        await close_all(chunks)


def _parsed_bulk_value(
    path: Path, tag_path: str, scratch_dir: Path, *, copy: bool = False
) -> bytes | _Spooled | tuple[int, int, str | None] | None:
    """A value found by parsing the file (dicomfile.read_bulk_value), little endian; nested
    encapsulated Pixel Data (a compressed icon) decoded, as octet-stream bulk data is sent
    uncompressed (PS3.18 8.7.3.3). A value pydicom left unread in the file is not read here:
    its (offset, length, VR to swap the words of) is returned, for a read by range
    (bulkvalue.element_range). A file too deep for pydicom to read (stored before the
    ingest limited the depth of sequences) is a TranscodeError: it was a 500. Runs in a
    worker thread.

    `copy`: `path` is the inflated copy of a Deflated file (Explicit VR Little Endian, so
    nothing to swap): a value pydicom read (in a sequence) is located too, from its base
    (bulkvalue.placed_element), and returned by range once the bytes at its place are found
    to be it."""
    try:
        found = placed_element(path, tag_path)
    except RecursionError:  # pydicom reads items of undefined length recursively
        raise too_deep_to_read() from None
    if found is None:
        return None
    ds, node, tag, base = found
    located = element_range(ds, node, tag, path.stat().st_size, base if copy else None)
    if located is not None and (not copy or _is_read_value(path, node, tag, located)):
        return located
    return _value_read(ds, node, tag, scratch_dir)


def _is_read_value(
    path: Path, node: Dataset, tag: int, located: tuple[int, int, str | None]
) -> bool:
    """Whether the bytes at `located` in `path` are the value pydicom read of element `tag`
    of `node` (true when it read none)."""
    offset, length, _ = located
    read = node.get_item(tag, keep_deferred=True).value
    return read is None or _bytes_at(path, offset, length) == read


def _value_read(ds: Dataset, node: Dataset, tag: int, scratch_dir: Path) -> bytes | _Spooled | None:
    """The value of element `tag` of `node` as _parsed_bulk_value reads it."""
    element = node[tag]
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if tag in PIXEL_DATA_TAGS and element.is_undefined_length and ts.is_compressed:
        return _held(decode_item_pixels(node, ts), scratch_dir)
    value = element_value(ds, element)
    return None if value is None else _held(value[0], scratch_dir)


def _bytes_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(length)
