"""Pixel Data written into a converted file a frame or a chunk at a time (transcode.convert):
native values of defined length, copied or byte-swapped in chunks, and encapsulated frames with
their Basic Offset Table; the converted file opened to be written, bounded and watched."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast

import numpy as np

from dicomweb_server.transcode.codecs import PixelInfo

__all__ = [
    "CONVERT_COPY_BYTES",
    "NATIVE_PIXEL_MAX_BYTES",
    "Watch",
    "as_bytes",
    "bounded_writer",
    "copied",
    "prepended",
    "word_width",
    "write_encapsulated",
    "write_native",
]

# Native Pixel Data is copied (or swapped, from big endian) in reads of this size.
CONVERT_COPY_BYTES = 1024 * 1024
# The longest uncompressed Pixel Data written: the largest even 32-bit defined length
# (PS3.5 7.1.1, 7.1.2). A conversion that would write more fails before the frame (chunk)
# that would pass it is written: the check came once all were written, and 10,000 frames of
# 8 MB would have gone on to 80 GB of scratch file first.
NATIVE_PIXEL_MAX_BYTES = 2**32 - 2


def as_bytes(arrays: Iterator[np.ndarray]) -> Iterator[bytes | memoryview]:
    """Each array's bytes in C order (as tobytes() gives them), without a copy when it is
    contiguous: a decoded frame is held a few times over while it is written (the decoder's
    output, pydicom's processing of it), one copy fewer this way."""
    for arr in arrays:
        yield arr.data.cast("B") if arr.flags.c_contiguous else arr.tobytes()


def word_width(info: PixelInfo, vr: str) -> int:
    """The width of the words by which big endian Pixel Data is swapped (PS3.5 A.3): Bits
    Allocated, and 16 bits for OW, 8-bit pixels too."""
    width = info.bits_allocated // 8
    return 2 if width <= 1 and vr == "OW" else max(1, width)


def copied(f: BinaryIO, length: int, width: int) -> Iterator[bytearray]:
    """`length` bytes of `f` in chunks of CONVERT_COPY_BYTES, each `width`-byte word
    byte-swapped in place when `width` is over 1 (big endian to little): one chunk held, not
    three (read, swapped, its bytes)."""
    left = length
    while left > 0:
        chunk = bytearray(min(CONVERT_COPY_BYTES, left))
        got = cast(io.BufferedReader, f).readinto(chunk)  # a file, or a BytesIO
        if not got:
            raise EOFError(f"the Pixel Data ends {left} bytes early")
        del chunk[got:]
        left -= got
        if width > 1:
            np.frombuffer(chunk, f"<u{width}").byteswap(inplace=True)
        yield chunk


_T = TypeVar("_T")


def prepended(first: list[_T], rest: Iterator[_T]) -> Iterator[_T]:
    """The item in `first`, then those of `rest`; `first` let go of once given (an
    itertools.chain keeps its arguments, and so a frame, to its end)."""
    while first:
        yield first.pop()
    yield from rest


def write_native(
    out: BinaryIO,
    vr: str | None,
    chunks: Iterator[bytearray] | Iterator[bytes | memoryview],
    frames: int | None,
    length: int = 0,
    tag: int = 0x7FE00010,
) -> None:
    """Pixel Data (`tag`: or Float, Double Float Pixel Data) of defined length (PS3.5 7.1.2),
    padded to even (7.1.1): `length` bytes given, or `frames` frames of the first one's
    length; its length is written once known. `vr` None: implicit VR (PS3.5 7.1.3). The
    length the value will have is written first (`length`, or the first frame's times
    `frames`), then again once known, the same when it is written whole: a DIMSE peer is
    sent the file while it is written (dimse/streaming.py), its first bytes before the last
    frame is decoded."""
    start = out.tell()
    first = next(chunks, None)
    head = [] if first is None else [first]
    expected = length if frames is None else len(first or b"") * frames
    del first  # given once, not held to the end
    expected = min(expected + expected % 2, 0xFFFFFFFE)  # wrong only where it fails below
    if vr is None:
        out.write(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, expected))
    else:
        out.write(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, expected))
    written, count, size = 0, 0, None
    for chunk in prepended(head, chunks):
        if frames is not None:
            size = len(chunk) if size is None else size
            if len(chunk) != size:
                raise ValueError(f"frame {count + 1} decoded to {len(chunk)} bytes, not {size}")
            count += 1
        if written + len(chunk) > NATIVE_PIXEL_MAX_BYTES:
            raise ValueError(
                f"the uncompressed Pixel Data would be more than {NATIVE_PIXEL_MAX_BYTES}"
                " bytes, the most a 32-bit length holds (PS3.5 7.1.2)"
            )
        out.write(chunk)
        written += len(chunk)
    if frames is not None and count != frames:
        raise ValueError(f"{count} frames decoded, not the {frames} of Number of Frames")
    if frames is None and written != length:
        raise EOFError(f"the Pixel Data ends {length - written} bytes early")
    if written % 2:
        out.write(b"\0")
    end = out.tell()
    out.seek(start + (4 if vr is None else 8))
    out.write(struct.pack("<I", written + written % 2))
    out.seek(end)


def write_encapsulated(out: BinaryIO, codestreams: Iterator[bytes], frames: int) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): one fragment per frame, padded to even, and a
    Basic Offset Table, filled in once the fragments are written (as pydicom's encapsulate
    with has_bot=True makes it)."""
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    table = out.tell() + 8
    out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * frames) + b"\0" * (4 * frames))
    offsets: list[int] = []
    position = 0
    for data in codestreams:
        if len(offsets) == frames:
            raise ValueError(f"more frames than the {frames} of Number of Frames")
        data = data + b"\0" if len(data) % 2 else data
        offsets.append(position)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)))
        out.write(data)
        position += 8 + len(data)
        if position > 0xFFFFFFFF:
            raise ValueError("the frames are too long for a Basic Offset Table")
    if len(offsets) != frames:
        raise ValueError(f"{len(offsets)} frames decoded, not the {frames} of Number of Frames")
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    end = out.tell()
    out.seek(table)
    out.write(struct.pack(f"<{frames}I", *offsets))
    out.seek(end)


class Watch(Protocol):
    """Told of each write into a conversion's `dst` as it reaches the file (to_transfer_syntax
    `watch`): the DIMSE sender reads the file while it is written (dimse/streaming.py). Each
    may raise to stop the conversion."""

    def opening(self) -> None:
        """`dst` is about to be opened, emptied: first, or again when a decoder is retried."""

    def write(self, position: int, data: memoryview, write: Callable[[memoryview], int]) -> int:
        """`data` written at `position` by `write` (before the end: a value filled in)."""


class _BoundedFile(io.FileIO):
    """A file written to at most `limit` bytes (None: any): a write that would pass it is a
    ValueError, before anything of it is written; each write told to `watch`."""

    def __init__(self, path: Path, limit: int | None, watch: Watch | None = None) -> None:
        if watch is not None:
            watch.opening()
        super().__init__(path, "wb")
        self.limit, self.watch = limit, watch

    def write(self, b: Any) -> int:
        size = memoryview(b).nbytes
        position = self.tell()
        if self.limit is not None and position + size > self.limit:
            raise ValueError(
                f"converted, it would be more than {self.limit} bytes, the most written for it"
            )
        if self.watch is None:
            return cast(int, super().write(b))
        return self.watch.write(position, memoryview(b).cast("B"), super().write)


def bounded_writer(dst: Path, max_bytes: int | None, watch: Watch | None = None) -> BinaryIO:
    """`dst` opened to be written (buffered), to at most `max_bytes` bytes when given, each
    write as it reaches the file told to `watch` when given."""
    if max_bytes is None and watch is None:
        return open(dst, "wb")
    return cast(BinaryIO, io.BufferedWriter(_BoundedFile(dst, max_bytes, watch)))
