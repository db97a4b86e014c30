"""Frames of encapsulated pixel data whose places ingest could not record (no offset table,
more fragments than frames): found from the items' headers (frame_map) or split by pydicom
(stored_frames)."""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from pathlib import Path

from pydicom.encaps import generate_frames

from dicomweb_server.errors import NotFoundError
from dicomweb_server.transcode.frames import read_stored
from dicomweb_server.transcode.plugins import DECODE_ERRORS
from dicomweb_server.vr import frame_count

__all__ = ["FRAME_MAP_FILES", "frame_map", "stored_frames"]

# Files whose frames frame_map found are kept, at most this many (a map is two integers a
# frame: a 10,000-frame file's is under 1 MB).
FRAME_MAP_FILES = 16
# Bytes at the end of a fragment searched for a JPEG EOI / JPEG 2000 EOC marker, as pydicom
# does (pydicom.encaps.generate_fragmented_frames): a frame ends with the fragment holding one.
_EOI_SEARCH_BYTES = 10
_ITEM_TAG = 0xE000FFFE
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_SEQUENCE_DELIMITER_TAG = 0xE0DDFFFE


def frame_map(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offset, length) of each frame's run of items in an encapsulated file whose frames
    ingest could not place (no offset table, more fragments than frames), found as pydicom
    finds them (a frame ends with the fragment whose last bytes hold an EOI marker), from
    the items' headers and last bytes alone; None unless that finds Number of Frames frames.
    Kept per file (FRAME_MAP_FILES): pydicom counts every fragment, then reads the frames
    before frame k, for each frame decoded (the 1,000 frames of a JPEG file without an offset
    table took 25 s in one request); blobs never change under their key, and the file's size
    and time are part of the key all the same."""
    st = path.stat()
    return _frame_map_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=FRAME_MAP_FILES)
def _frame_map_of(
    name: str, size: int, _mtime_ns: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    with open(name, "rb") as fp:
        ds = read_stored(fp, stop_before_pixels=True)  # leaves fp at the pixel tag
        nframes = frame_count(ds.get("NumberOfFrames"))
        if nframes < 2 or "ExtendedOffsetTable" in ds:
            return None
        at = fp.tell()
        header = fp.read(12)
        # An explicit VR header (tag, VR, 2 reserved bytes, length) or an implicit one (tag,
        # length) when written so in an explicit file (PS3.5 7.1.2, as stored_frames reads).
        explicit = header[4:6].isalpha()
        length = header[8:12] if explicit else header[4:8]
        if header[:4] != _PIXEL_DATA_TAG or length != b"\xff\xff\xff\xff":
            return None
        pos = at + (12 if explicit else 8)
        fp.seek(pos)
        tag, bot = struct.unpack("<II", fp.read(8).ljust(8, b"\0"))
        if tag != _ITEM_TAG or bot:  # an offset table ingest did not use: pydicom's way
            return None
        pos += 8
        offsets: list[int] = []
        lengths: list[int] = []
        start = None  # where the frame being found starts
        while True:
            fp.seek(pos)
            tag, n = struct.unpack("<II", fp.read(8).ljust(8, b"\0"))
            if tag == _SEQUENCE_DELIMITER_TAG:
                break
            if tag != _ITEM_TAG or pos + 8 + n > size:
                return None
            start = pos if start is None else start
            fp.seek(pos + 8 + max(0, n - _EOI_SEARCH_BYTES))
            pos += 8 + n
            if b"\xff\xd9" in fp.read(min(n, _EOI_SEARCH_BYTES)):
                offsets.append(start)
                lengths.append(pos - start)
                start = None
                if len(offsets) > nframes:
                    return None
    if start is not None or len(offsets) != nframes:
        return None
    return tuple(offsets), tuple(lengths)


def stored_frames(path: Path, frames: Sequence[int]) -> list[bytes]:
    """Frames of encapsulated pixel data as stored, for files whose fragment-to-frame mapping
    could not be recorded at ingest (no offset table and fragments != frames). pydicom splits
    them (by JPEG markers) reading the open file, up to the farthest frame asked for; memory
    holds the frames asked for, not the Pixel Data (the file was read whole, and every frame
    of it kept, for each request: 19 MB for one 15 KB frame of a 9 MB value)."""
    wanted, last = set(frames), max(frames)
    found: dict[int, bytes] = {}
    count = 0
    with path.open("rb") as fp:
        ds = read_stored(fp, stop_before_pixels=True)  # leaves fp at the pixel tag
        nframes = frame_count(ds.get("NumberOfFrames"))
        # The element's header: tag, VR, 2 reserved bytes, the length (PS3.5 7.1.2); or tag
        # and length when written implicitly in an explicit file (pydicom reads that too).
        if fp.read(8)[4:6].isalpha():
            fp.read(4)
        try:
            for count, frame in enumerate(generate_frames(fp, number_of_frames=nframes), 1):
                if count in wanted:
                    found[count] = frame
                if count >= last:
                    break
        except DECODE_ERRORS as exc:  # fewer fragments than frames, a damaged offset table
            raise NotFoundError(
                f"the stored pixel data does not hold the frames asked for: {exc}"
            ) from None
    if last > count:
        raise NotFoundError(f"the stored pixel data holds {count} frames")
    return [found[n] for n in frames]
