"""Deflated files (PS3.5 A.5) inflated into a scratch copy, Explicit VR Little Endian, whose
frames are then read by offset as those of any native file are: a deflate stream has no
random access, and its frames were decoded from the file decoded whole (kept one file per
process, up to 64 MiB: two clients reading two Deflated instances took the place from each
other, and each frame decoded the whole file again). A copy is made once per file and kept
across requests (OHIF asks each frame in a request of its own), least recently used removed
past INFLATED_KEEP_BYTES; a copy in use (inflated, a request's hold) is never removed, so a
request inflates a file at most once, whatever other requests do. Memory holds a frame, not
the file: the copy is written as it is inflated."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import weakref
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
)

__all__ = [
    "INFLATED_KEEP_BYTES",
    "INFLATED_MAX_BYTES",
    "Hold",
    "hold",
    "inflated",
]

# Bytes of inflated copies kept on disk for their next frame, per process, least recently
# used removed first; copies in use are kept beyond it until they are released. Four times
# the most a Deflated instance inflates to at ingest (dicomfile.MAX_INFLATED_BYTES, 64 MiB).
INFLATED_KEEP_BYTES = 256 * 1024 * 1024
# The most bytes a copy is inflated to (a file stored before ingest bounded its inflated
# size); past it the frame is a ValueError (a 406 with the reason). As DECODE_MAX_BYTES.
INFLATED_MAX_BYTES = 1024**3
# Compressed bytes read, and most bytes inflated, at a time.
_STEP_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _Copy:
    path: Path  # the inflated copy
    source: tuple[int, int]  # (st_mtime_ns, st_size) of the stored file it was made from
    size: int  # bytes of the copy on disk


_lock = threading.RLock()  # re-entrant: a Hold's finalizer may run while it is held (GC)
_copies: OrderedDict[str, _Copy] = OrderedDict()  # by stored file, least recently used first
_pins: Counter[str] = Counter()  # holds and frames being read, by stored file
_making: dict[str, threading.Event] = {}  # copies being inflated, by stored file


class Hold:
    """A stored file's copy kept while this is held (made when its first frame is read):
    what a request holds over its frames. Released by release(), leaving a `with`, or when
    garbage (a response whose body was never read)."""

    def __init__(self, path: Path) -> None:
        self._name = str(path)
        with _lock:
            _pins[self._name] += 1
        self._unpin = weakref.finalize(self, _unpin, self._name)

    def release(self) -> None:
        if self._unpin.alive:
            self._unpin()
            with _lock:
                _evict()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(path: Path) -> Hold:
    """A Hold on the inflated copy of `path` (a request reading several of its frames)."""
    return Hold(path)


def _unpin(name: str) -> None:
    with _lock:
        _pins[name] -= 1
        if _pins[name] <= 0:
            del _pins[name]


@contextlib.contextmanager
def inflated(path: Path, scratch: Path | None = None) -> Iterator[Path]:
    """The inflated copy of the Deflated file `path` (Explicit VR Little Endian, a preamble
    and its File Meta Information saying so), made in `scratch` (the server's scratch
    directory; the system's temporary one when None) unless one is kept, and kept while in
    use. ValueError when it inflates past INFLATED_MAX_BYTES or is not a deflate stream."""
    with Hold(path):
        yield _copy_of(path, scratch).path


def _copy_of(path: Path, scratch: Path | None) -> _Copy:
    name = str(path)
    st = path.stat()
    source = (st.st_mtime_ns, st.st_size)
    while True:
        with _lock:
            found = _copies.get(name)
            if found is not None and found.source == source and found.path.exists():
                _copies.move_to_end(name)
                return found
            if found is not None:  # its copy removed (the scratch directory cleared)
                _drop(name)
            making = _making.get(name)
            if making is None:
                making = _making[name] = threading.Event()
                break
        making.wait()  # another thread is inflating it: take its copy
    try:
        made = _inflate(path, source, scratch)
        with _lock:
            _copies[name] = made
            _evict()
        return made
    finally:
        with _lock:
            del _making[name]
        making.set()


def _drop(name: str) -> None:
    copy = _copies.pop(name)
    with contextlib.suppress(OSError):
        copy.path.unlink()


def _evict() -> None:
    """Removes copies not in use, least recently used first, until the rest take at most
    INFLATED_KEEP_BYTES (copies in use count, and are kept)."""
    total = sum(c.size for c in _copies.values())
    for name in list(_copies):
        if total <= INFLATED_KEEP_BYTES:
            return
        if name not in _pins:
            total -= _copies[name].size
            _drop(name)


def _inflate(path: Path, source: tuple[int, int], scratch: Path | None) -> _Copy:
    """A scratch copy of a Deflated file, inflated: the data set of Deflated Explicit VR
    Little Endian is Explicit VR Little Endian deflated (PS3.5 A.5)."""
    directory = scratch if scratch is not None else Path(tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    fd, made = tempfile.mkstemp(dir=directory, suffix=".inflated.dcm")
    out = Path(made)
    try:
        with os.fdopen(fd, "wb") as dst, path.open("rb") as src:
            read_preamble(src, True)
            meta = _read_file_meta_info(src)
            if meta.get("TransferSyntaxUID") != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                raise ValueError("the stored file is not Deflated Explicit VR Little Endian")
            meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
            head = DicomBytesIO()
            write_file_meta_info(head, meta, enforce_standard=False)
            preamble = b"\0" * 128 + b"DICM" + head.getvalue()
            dst.write(preamble)
            size = len(preamble) + _inflate_stream(src, dst)
        return _Copy(out, source, size)
    except BaseException:
        with contextlib.suppress(OSError):
            out.unlink()
        raise


def _inflate_stream(fin: BinaryIO, fout: BinaryIO) -> int:
    """Inflates the raw deflate stream read from `fin` into `fout`, a step at a time; the
    bytes written. What follows the stream's end is ignored, as pydicom ignores it; a stream
    cut short is a ValueError, as it is pydicom's zlib.error."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    tail = b""
    while not inflater.eof:
        if not tail:
            tail = fin.read(_STEP_BYTES)
            if not tail:
                raise ValueError("its Deflated data set is cut short (the deflate stream ends)")
        try:
            data = inflater.decompress(tail, _STEP_BYTES)
        except zlib.error as exc:
            raise ValueError(f"its Deflated data set is not a deflate stream: {exc}") from None
        tail = inflater.unconsumed_tail
        total += len(data)
        if total > INFLATED_MAX_BYTES:
            raise ValueError(
                f"its Deflated data set inflates to more than {INFLATED_MAX_BYTES} bytes,"
                " the most this archive inflates"
            )
        fout.write(data)
    return total
