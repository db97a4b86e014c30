"""Blob storage behind a small Protocol, and its filesystem implementation.

Keys are generated here (never derived from a client's UIDs: no path injection, and storing an
instance again never overwrites the file a reader may be streaming). Every write goes to a
temporary file, is fsynced, then renamed into place and the directory fsynced, so a blob is
either absent or complete after a crash.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import aiofiles
import aiofiles.os
import anyio

from dicomweb_server.media.part10 import FILE_META_MAX_BYTES, file_meta_end

__all__ = [
    "DATA_SET_HASH_VERSION",
    "PADDING_HASH_WINDOW_BYTES",
    "READ_AHEAD_IDLE_S",
    "READ_CHUNK_BYTES",
    "READ_CHUNK_MAX_BYTES",
    "WHOLE_FILE_HASH_VERSION",
    "BlobStore",
    "BlobWriter",
    "DataSetHash",
    "FileSystemBlobStore",
    "data_set_sha256",
    "hash_file",
    "scratch_file",
    "stream_path",
    "tune_allocator",
]

# Size of the chunks blobs are streamed in (fewer, larger writes: 1 MiB chunks retrieve a
# 12.6 MB instance about 40% faster than 256 KiB chunks over loopback).
READ_CHUNK_BYTES = 1024 * 1024
# Later chunks double in size up to this, and a stream reads ahead of its sender until this
# many bytes wait to be sent (see _ReadAhead; measured in docs/benchmarks.md, 2026-12-03).
READ_CHUNK_MAX_BYTES = 4 * 1024 * 1024
READ_AHEAD_BYTES = 8 * 1024 * 1024
# Bytes read ahead (waiting to be sent, or being read) over all the streams of a process: no
# read ahead goes past it; a stream then reads its next chunk only when its sender asks for it,
# so memory stays bounded however many clients download at once (see _ReadAhead).
READ_AHEAD_TOTAL_BYTES = 64 * 1024 * 1024
# A stream whose sender takes no chunk for this long gives its read-ahead back when the
# process's budget is short (the file is read again from there when the sender asks): a
# client that stops reading does not keep budget from the others.
READ_AHEAD_IDLE_S = 5.0
# Threads that read chunks ahead of the senders (_ReadAhead; as many as anyio's default pool,
# which did these reads before: a few reads stuck on failing storage do not hold up the
# others), and how long the event loop waits for one to be inside its read before it goes on.
# A thread needs the GIL to start its read, and the loop keeps the GIL through a sender's
# socket write (uvloop writes without releasing it), so without the wait the next read
# started only once the write was done: reads and writes took turns instead of overlapping.
# With it, a 201 MB retrieve takes 8-14% less time, warm or cold, and 18% less while STOW
# requests are being parsed, at the same STOW rate (docs/benchmarks.md, 2026-12-03d). The
# loop never waits while every thread is busy (the read would queue, not start). The wait
# gives the GIL away: when another thread is running Python, the loop can take up to the
# interpreter's switch interval (5 ms) to get it back, so the stall is bounded by that, not
# by READ_START_WAIT_S.
READ_AHEAD_THREADS = 40
READ_START_WAIT_S = 0.001
# glibc malloc: blocks up to this size come from the heap, not from a fresh mmap each (whose
# pages the kernel faults in and zeroes again for every chunk read, then unmaps: a fifth of a
# large retrieve's CPU), and up to TRIM bytes of freed heap are kept for the next chunks.
# Without it, the 4 MiB chunks retrieve slower than 1 MiB ones. See tune_allocator.
MALLOC_MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024
MALLOC_TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024
# Bytes a spool file buffers in memory before a worker thread writes them out.
SPOOL_BUFFER_BYTES = 256 * 1024
# Consecutive keys of a process share their directory (`ab/cd/`) for this many keys, so that
# creating a directory (a mkdir and two directory fsyncs) is paid once per run of keys, not once
# per blob while the store is young. Each run's directory is random, so blobs stay spread.
KEYS_PER_DIRECTORY_RUN = 32


class BlobWriter(Protocol):
    """A blob being written: a local spool file, hashed as it grows."""

    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...
    def sha256(self, ends_at: int | None = None) -> bytes:
        """Digest of the data set and its transfer syntax (DataSetHash), once written;
        `ends_at`: where its trailing padding starts, if it has some."""
        ...

    @property
    def data_set_at(self) -> int:
        """Where the hash found the data set to begin (DataSetHash), 0 when hashed whole."""
        ...

    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    def close_blocking(self) -> None:
        """`close` for a caller already in a worker thread (saves a thread hop)."""


class BlobStore(Protocol):
    def new_key(self) -> str: ...
    async def open_writer(self) -> BlobWriter: ...
    async def commit(self, writer: BlobWriter, key: str) -> None: ...
    def place_blocking(self, writer: BlobWriter, key: str) -> None:
        """`commit` from a worker thread (the writer closed there too): durable on return."""
        ...

    async def discard(self, writer: BlobWriter) -> None: ...
    def open_range(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...
    async def read_whole(self, blobs: Sequence[tuple[str, int]]) -> list[bytes]:
        """Each (key, recorded size) blob read whole, all in one worker-thread call; OSError
        when one is shorter than its size."""
        ...

    def local_path(self, key: str) -> Path: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...


# The first byte of a DataSetHash digest: a data set's (with its transfer syntax), or a whole
# file's when its meta information could not be walked. Separate, so that no file hashed whole
# can pass for a data set whose bytes are that file's (found by review). Instances stored
# before hold a plain SHA-256 of their whole file (32 bytes, no first byte), compared by
# reading their file (ingest._same_data_set).
DATA_SET_HASH_VERSION = b"\x01"
WHOLE_FILE_HASH_VERSION = b"\x02"
# The last bytes of a file whose hashing waits for the parse: trailing padding that starts
# within them is left out of the hash (DataSetHash.digest); longer padding is hashed.
PADDING_HASH_WINDOW_BYTES = 64 * 1024
# Bytes gathered before the File Meta Information is first walked; a walk that needs more
# waits until twice as many have come (the walk starts over each time).
_FIRST_WALK_BYTES = 1024


class DataSetHash:
    """Digest of a Part-10 file's transfer syntax and data set, fed the whole file in pieces:
    the rest of the File Meta Information is left out, for it describes the file, not the
    instance (PS3.10 7.1). The same instance sent by STOW-RS and by DIMSE (whose meta
    information pynetdicom writes), or by two tools, is then known as the same. Where the meta
    information ends is decided by media.file_meta_end on the first FILE_META_MAX_BYTES
    alone, so that it does not depend on how the file is cut into pieces; a file it cannot
    walk is hashed whole. `data_set_at` is that end (0: hashed whole): a parse that finds
    the data set elsewhere must refuse the file (ingest), or two different data sets could
    hash alike."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._head: bytearray | None = bytearray()  # until the meta's end is known
        self._walk_at = _FIRST_WALK_BYTES
        self._skip = 0  # bytes of meta information still to leave out
        self._tail = bytearray()  # the last bytes fed, not hashed yet (trailing padding)
        self._size = 0  # bytes fed
        self.data_set_at = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._size += len(data)
        if self._head is not None:
            self._head += data
            if len(self._head) < self._walk_at or not self._decide(final=False):
                return
            data, self._head = self._head, None
        if self._skip:
            view = memoryview(data)
            n = min(self._skip, len(view))
            self._skip -= n
            data = view[n:]
        if data:
            self._tail += data
            if len(self._tail) > 2 * PADDING_HASH_WINDOW_BYTES:
                cut = len(self._tail) - PADDING_HASH_WINDOW_BYTES
                self._hash.update(memoryview(self._tail)[:cut])
                del self._tail[:cut]

    def _decide(self, final: bool) -> bool:
        """Whether the meta's end is known now (set up what to leave out); False: more bytes
        are needed and may come."""
        assert self._head is not None
        found = file_meta_end(self._head[:FILE_META_MAX_BYTES])
        if found is None and not final and len(self._head) < FILE_META_MAX_BYTES:
            self._walk_at = 2 * len(self._head)
            return False
        end, syntax = found or (0, b"")
        if end:
            self._hash.update(syntax.rstrip(b"\0 ") + b"\0")
        self._skip = self.data_set_at = end
        return True

    def digest(self, ends_at: int | None = None) -> bytes:
        """The digest; `ends_at`: where the data set's trailing padding starts, when the
        parse found some (PS3.10 7.2: it has no meaning, and tools drop it or add it: dcmtk's
        storescu sends without it). Left out when it lies in the last
        PADDING_HASH_WINDOW_BYTES, the bytes still unhashed."""
        if self._head is not None:  # the file ended before the walk was decided
            self._decide(final=True)
            head, self._head = self._head, None
            self._size -= len(head)
            self.update(head)
        digest = self._hash.copy()
        tail_at = self._size - len(self._tail)
        keep = len(self._tail)
        if ends_at is not None and self.data_set_at and tail_at <= ends_at <= self._size:
            keep = ends_at - tail_at
        digest.update(memoryview(self._tail)[:keep])
        kind = DATA_SET_HASH_VERSION if self.data_set_at else WHOLE_FILE_HASH_VERSION
        return kind + digest.digest()


def hash_file(path: Path) -> DataSetHash:
    """A DataSetHash fed a whole file on disk (a worker thread)."""
    digest = DataSetHash()
    with path.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest


def data_set_sha256(path: Path, ends_at: int | None = None) -> bytes:
    """DataSetHash of a file on disk (a worker thread)."""
    return hash_file(path).digest(ends_at)


class _FileWriter:
    """A spool file written in worker threads: bytes are buffered up to SPOOL_BUFFER_BYTES, so a
    small part costs one thread hop (create, write and close at `close`), not one per call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fh: BinaryIO | None = None
        self._buf = bytearray()
        self._size = 0
        self._hash = DataSetHash()
        self.closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def sha256(self, ends_at: int | None = None) -> bytes:
        return self._hash.digest(ends_at)

    @property
    def data_set_at(self) -> int:
        return self._hash.data_set_at

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._size += len(data)
        self._buf += data
        if len(self._buf) >= SPOOL_BUFFER_BYTES:
            chunk, self._buf = bytes(self._buf), bytearray()
            await anyio.to_thread.run_sync(self._write_out, chunk, False)

    async def close(self) -> None:
        """Write out and close the spool file (idempotent); its bytes are then at `path`.
        Shielded: a cancelled caller must not leave the worker thread writing behind it."""
        if not self.closed:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.close_blocking)

    def close_blocking(self) -> None:
        if not self.closed:
            self.closed = True
            chunk, self._buf = bytes(self._buf), bytearray()
            self._write_out(chunk, True)

    async def abandon(self) -> None:
        """Close without writing out the buffer and remove the spool file (idempotent)."""
        self.closed = True
        self._buf = bytearray()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._remove)

    def _remove(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):  # e.g. ENOSPC flushing: the file goes anyway
                self._fh.close()
        _unlink(self._path)

    def _write_out(self, chunk: bytes, last: bool) -> None:
        if self._fh is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)  # recreated if removed
            self._fh = self._path.open("xb")
        try:
            self._fh.write(chunk)
        finally:
            if last:
                self._fh.close()


class FileSystemBlobStore:
    """Blobs as files under `root/ab/cd/<key>`; spool files under `root/tmp/<owner>/`."""

    def __init__(self, root: Path, owner: int) -> None:
        self.root = root
        self.owner = owner
        self.tmp_root = root / "tmp"
        self.tmp_dir = self.tmp_root / str(owner)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._run_prefix = ""
        self._run_left = 0

    def new_key(self) -> str:
        """32 hex digits: a random UUID whose first four share a directory with the run."""
        if self._run_left == 0:
            self._run_prefix, self._run_left = uuid.uuid4().hex[:4], KEYS_PER_DIRECTORY_RUN
        self._run_left -= 1
        return self._run_prefix + uuid.uuid4().hex[4:]

    @staticmethod
    def is_key(key: str) -> bool:
        """Whether `key` is one new_key could have made (32 lower-case hex digits)."""
        return len(key) == 32 and all(c in "0123456789abcdef" for c in key)

    def local_path(self, key: str) -> Path:
        if not self.is_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:4] / key

    async def open_writer(self) -> BlobWriter:
        return _FileWriter(self.tmp_dir / uuid.uuid4().hex)  # the file is created by a write

    async def commit(self, writer: BlobWriter, key: str) -> None:
        # Shielded: a cancelled request must not return while the rename may still happen in
        # the worker thread, or the caller's view of "placed" would be wrong.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.place_blocking, writer, key)

    def place_blocking(self, writer: BlobWriter, key: str) -> None:
        writer.close_blocking()
        _place(writer.path, self.local_path(key))

    async def discard(self, writer: BlobWriter) -> None:
        if isinstance(writer, _FileWriter):
            await writer.abandon()
            return
        try:
            await writer.close()
        finally:
            await aiofiles.os.wrap(_unlink)(writer.path)

    def open_range(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        return stream_path(self.local_path(key), offset, length)

    async def read_whole(self, blobs: Sequence[tuple[str, int]]) -> list[bytes]:
        paths = [(self.local_path(key), size) for key, size in blobs]
        return await anyio.to_thread.run_sync(_read_files, paths)

    async def exists(self, key: str) -> bool:
        return await aiofiles.os.path.exists(self.local_path(key))

    async def delete(self, key: str) -> None:
        await aiofiles.os.wrap(_unlink)(self.local_path(key))

    def stale_tmp_owners(self) -> list[int]:
        """Owners (process boot ids) that have spool directories, other than us."""
        owners = []
        for entry in self.tmp_root.iterdir():
            if entry.is_dir() and entry.name.isdigit() and int(entry.name) != self.owner:
                owners.append(int(entry.name))
        return owners

    def remove_tmp_of(self, owner: int) -> None:
        shutil.rmtree(self.tmp_root / str(owner), ignore_errors=True)


def scratch_file(directory: Path, suffix: str) -> Path:
    """A new empty file in this process's spool directory (a converted instance, a STOW-RS
    instance assembled from JSON), the directory made again when it is gone: a process
    starting while this one's lock connection is down (a database restart) takes it for
    dead and removes it (app.recover), and every conversion failed from then on."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(fd)
    return Path(name)


async def stream_path(
    path: Path, offset: int = 0, length: int | None = None
) -> AsyncIterator[bytes]:
    """Read `length` bytes of a file from `offset` (to the end when None) in chunks.

    The file is opened and its first chunk read in one worker-thread call (closed there too
    when that chunk is all of it: a small instance costs one thread hop). A file shorter than
    the range fails there, before the first chunk: a damaged blob is an error before the
    response starts, not a body that breaks off. After that the reads run ahead of the sender
    (see _ReadAhead), so the disk and the socket work at the same time; memory stays bounded
    by READ_AHEAD_BYTES plus the chunk being sent.
    """
    n = READ_CHUNK_BYTES if length is None else min(READ_CHUNK_BYTES, length)
    if n == 0:
        return
    end = None if length is None else offset + length
    fh, chunk = await anyio.to_thread.run_sync(_open_and_read, path, offset, n, end)
    remaining = None if length is None else length - len(chunk)
    if fh is None:
        if chunk:
            yield chunk
    else:
        try:
            reader = _ReadAhead(fh, remaining, len(chunk) == n)
        except BaseException:
            fh.close()
            raise
        try:
            yield chunk
            while (more := await reader.next()) is not None:
                yield more
        finally:
            reader.close()
        remaining = reader.remaining
    if remaining:
        raise OSError(f"{path.name} is shorter than the recorded range")


@dataclass
class _Budget:
    """Bytes read ahead by all the streams of this process (READ_AHEAD_TOTAL_BYTES)."""

    used: int = 0


_READ_AHEAD = _Budget()


class _ReadAhead:
    """The chunks after the first, read one at a time in a worker thread but without waiting
    for the sender to ask: a read starts as soon as the previous one ends, as long as the
    stream's waiting chunks stay within READ_AHEAD_BYTES and the process's read-ahead within
    READ_AHEAD_TOTAL_BYTES. Past either, a read starts only when the sender asks for a chunk
    (one chunk, whatever the budget: a stream never stalls), so memory is at most the
    budget plus one chunk per stream, plus the chunk each sender is sending. A stream whose
    sender takes nothing for READ_AHEAD_IDLE_S (a client that stopped reading) while the
    budget is short drops what it read ahead and rewinds its file, and reads again only when
    asked, so stalled clients do not hold the budget from the others (a slow client with the
    budget to spare keeps its read-ahead). Read sequentially, so the kernel's read-ahead
    sees one stream; the thread is held for a read only, never while the client is slow.
    Chunk sizes double from READ_CHUNK_BYTES up to READ_CHUNK_MAX_BYTES (fewer thread hops
    and socket writes for large files, a small first read for small ones)."""

    def __init__(self, fh: BinaryIO, remaining: int | None, more: bool) -> None:
        self._fh = fh
        self.remaining = remaining  # bytes still to read, None: to the end of the file
        self._size = READ_CHUNK_BYTES
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading = False
        self._ended = not more or remaining == 0
        self._error: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False
        self._parked = False  # idle: read only when asked, until the sender takes a chunk
        self._idle: asyncio.TimerHandle | None = None
        self._start()

    def _start(self, asked: bool = False) -> None:
        if self._reading or self._ended or self._closed or (self._parked and not asked):
            return
        size = min(2 * self._size, READ_CHUNK_MAX_BYTES)
        n = size if self.remaining is None else min(size, self.remaining)
        over = (
            self._buffered + n > READ_AHEAD_BYTES or _READ_AHEAD.used + n > READ_AHEAD_TOTAL_BYTES
        )
        if over and not asked:
            return
        try:
            task = _READERS.start(self._fh, n)
        except Exception as exc:  # no thread to read in (e.g. none can be started)
            self._error, self._ended = exc, True  # the sender gets it at its next chunk
            return
        self._size = size
        self._reading = True
        _READ_AHEAD.used += n
        task.add_done_callback(functools.partial(self._read_done, n))

    def _read_done(self, n: int, task: asyncio.Future[bytes]) -> None:
        self._reading = False
        _READ_AHEAD.used -= n
        error = OSError("read cancelled") if task.cancelled() else task.exception()
        if self._closed:  # the sender stopped during this read: close the file after it
            self._fh.close()
            return
        if error is not None:
            self._error, self._ended = error, True
        else:
            chunk = task.result()
            if chunk:
                self._chunks.append(chunk)
                self._buffered += len(chunk)
                _READ_AHEAD.used += len(chunk)
                self._watch_idle()
            if self.remaining is not None:
                self.remaining -= len(chunk)
            self._ended = len(chunk) < n or self.remaining == 0
        self._start()  # before the sender wakes: the read is under way while it writes
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def next(self) -> bytes | None:
        """The next chunk, None at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._start(asked=True)
            if self._reading:  # else the read could not start: _error says why
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        _READ_AHEAD.used -= len(chunk)
        self._parked = False
        self._unwatch_idle()
        self._watch_idle()
        self._start()
        return chunk

    def _drop_chunks(self) -> None:
        """The chunks waiting to be sent go, and their bytes back to the process budget."""
        self._chunks.clear()
        _READ_AHEAD.used -= self._buffered
        self._buffered = 0

    def _unwatch_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _watch_idle(self) -> None:
        if self._idle is None and self._chunks:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(READ_AHEAD_IDLE_S, self._on_idle)

    def _on_idle(self) -> None:
        """The sender took nothing for READ_AHEAD_IDLE_S: if the budget is short (another
        stream could not read a largest chunk ahead), give the chunks waiting for it back and
        rewind the file to the first of them. Not while a read runs (the file is in the
        worker thread's hands): then, and while the budget is not short, look again after
        another READ_AHEAD_IDLE_S."""
        self._idle = None
        if self._closed or self._error is not None or not self._chunks:
            return
        short = _READ_AHEAD.used + READ_CHUNK_MAX_BYTES > READ_AHEAD_TOTAL_BYTES
        if self._reading or not short:
            self._watch_idle()
            return
        try:
            self._fh.seek(-self._buffered, os.SEEK_CUR)
        except OSError:  # cannot rewind: keep the chunks (the budget holds them, as before)
            return
        if self.remaining is not None:
            self.remaining += self._buffered
        self._drop_chunks()
        self._ended = False
        self._parked = True

    def close(self) -> None:
        """Stop reading; the file is closed now, or when the read in flight ends (a
        worker-thread read cannot be interrupted, and must not see its file closed)."""
        self._unwatch_idle()
        self._closed = True
        self._drop_chunks()
        if not self._reading:
            self._fh.close()


class _Readers:
    """The READ_AHEAD_THREADS threads of _ReadAhead's reads (created when first needed)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.busy = 0  # reads handed over whose completion the loop has not yet seen

    def start(self, fh: BinaryIO, n: int) -> asyncio.Future[bytes]:
        """Hand the read of `n` bytes to a thread; return once the thread is in it (at most
        READ_START_WAIT_S later), or at once when every thread is busy."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(READ_AHEAD_THREADS, "blob-read")
        started = threading.Event()
        wait = self.busy < READ_AHEAD_THREADS
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(self._pool, _read_started, fh, n, started)
        self.busy += 1
        task.add_done_callback(self._done)
        if wait:
            _wait_started(started)
        return task

    def _done(self, _task: asyncio.Future[bytes]) -> None:
        self.busy -= 1


_READERS = _Readers()


def _read_started(fh: BinaryIO, n: int, started: threading.Event) -> bytes:
    started.set()
    return _read(fh, n)


def _wait_started(started: threading.Event) -> None:
    """Block the loop until a reader thread is in its read (it holds the GIL only to get
    there, then releases it in the read itself): tens of microseconds as a rule."""
    started.wait(READ_START_WAIT_S)


def tune_allocator() -> bool:
    """Set MALLOC_MMAP_THRESHOLD_BYTES and MALLOC_TRIM_THRESHOLD_BYTES in this process (a
    serving process calls it once). False where the C library is not glibc: nothing is set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(
        mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD_BYTES)
        and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD_BYTES)
    )


def _open_and_read(
    path: Path, offset: int, n: int, end: int | None
) -> tuple[BinaryIO | None, bytes]:
    """The file opened at `offset` and its first `n` bytes; the file is closed (None) when
    those are the last bytes wanted (up to `end`, None: the file's end) or the file ended.
    A file shorter than `end` raises OSError."""
    fh = path.open("rb")
    try:
        if end is not None and os.fstat(fh.fileno()).st_size < end:
            raise OSError(f"{path.name} is shorter than the recorded range")
        fh.seek(offset)
        chunk = fh.read(n)
    except BaseException:
        fh.close()
        raise
    if offset + n == end or len(chunk) < n:
        fh.close()
        return None, chunk
    return fh, chunk


def _read_files(paths: Sequence[tuple[Path, int]]) -> list[bytes]:
    out = []
    for path, size in paths:
        with path.open("rb") as fh:
            data = fh.read(size)
        if len(data) < size:
            raise OSError(f"{path.name} is shorter than the recorded range")
        out.append(data)
    return out


def _read(fh: BinaryIO, n: int) -> bytes:
    return fh.read(n)


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(src: Path, dest: Path) -> None:
    """fsync the file, rename it into place, fsync the directory: durable once this returns."""
    _fsync_path(src)
    if not dest.parent.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fsync_path(dest.parent.parent)
        _fsync_path(dest.parent.parent.parent)
    os.replace(src, dest)
    _fsync_path(dest.parent)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
