"""Reading blobs back: a file streamed in chunks from a range (stream_path), the reads after
the first running ahead of the sender within a per-stream and a per-process budget
(_ReadAhead, in the threads of _Readers), every chunk sized within the process's download
budget (budget.DOWNLOADS), and glibc's allocator tuned for those chunks (tune_allocator)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import functools
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio

from dicomweb_server.blobstore import budget
from dicomweb_server.blobstore.budget import DownloadBudget
from dicomweb_server.blobstore.lost import LostBlobError, RecordedBlob

__all__ = [
    "READ_AHEAD_IDLE_S",
    "READ_CHUNK_BYTES",
    "READ_CHUNK_MAX_BYTES",
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


async def stream_path(
    path: Path, offset: int = 0, length: int | None = None, *, blob: RecordedBlob | None = None
) -> AsyncIterator[bytes]:
    """Read `length` bytes of a file from `offset` (to the end when None) in chunks.
    `blob`: the file is that instance's blob, which must hold the size the index recorded:
    a file missing or shorter is a LostBlobError (at its first chunk, or where a file cut
    short meanwhile ends), not an OSError.

    The file is opened and its first chunk read in one worker-thread call (closed there too
    when that chunk is all of it: a small instance costs one thread hop). A file shorter than
    the range fails there, before the first chunk: a damaged blob is an error before the
    response starts, not a body that breaks off. After that the reads run ahead of the sender
    (see _ReadAhead), so the disk and the socket work at the same time; memory stays bounded
    by READ_AHEAD_BYTES plus one chunk: the one being sent, or the one read when the sender
    asks for it. A chunk is dropped once yielded, before the next is asked for; each layer
    that passes chunks on does the same (multipart.encode_parts, StreamedResponse), so that a
    sent chunk and its successor are never held together.

    The stream counts as a download in flight of budget.DOWNLOADS from its first read to its
    end, and each of its chunks, the first included, is sized by it and counted in it from
    its read until the sender asks for the next one: however many downloads are in flight
    (stalled clients hold theirs until SEND_STALL_TIMEOUT_S), their chunks hold at most
    DOWNLOAD_BUFFER_BUDGET_BYTES plus DOWNLOAD_CHUNK_MIN_BYTES each.
    """
    want = READ_CHUNK_BYTES if length is None else min(READ_CHUNK_BYTES, length)
    if want == 0:
        return
    end = None if length is None else offset + length
    downloads = budget.DOWNLOADS
    downloads.active += 1
    out = n = downloads.asked(want)  # bytes counted for the chunk read, then being sent
    downloads.held += n
    try:
        fh, chunk = await anyio.to_thread.run_sync(_open_and_read, path, offset, n, end, blob)
        downloads.held -= n - len(chunk)
        out = len(chunk)
        remaining = None if length is None else length - len(chunk)
        # Each chunk is yielded out of `box`, not from a variable: this frame holds none while
        # its sender has it. A layer above may send a copy made from it (a value cut out of
        # its items, a range of it, its words swapped) and let it go, which this frame held
        # beside the copy until the next one was asked for: two chunks a stalled download
        # held, one of them outside the budget.
        box = [chunk]
        del chunk
        if fh is None:
            if box[0]:
                yield box.pop()
        else:
            try:
                reader = _ReadAhead(fh, remaining, out == n, downloads)
            except BaseException:
                fh.close()
                raise
            try:
                yield box.pop()
                downloads.held -= out  # sent: its sender asks for the next
                out = 0
                while (more := await reader.next()) is not None:
                    box.append(more)
                    del more
                    yield box.pop()
            finally:
                reader.close()
            remaining = reader.remaining
        if remaining:
            if blob is not None and end is not None:  # cut short while it was read: it ends here
                raise LostBlobError(blob, path, end - remaining)
            raise OSError(f"{path.name} is shorter than the recorded range")
    finally:
        downloads.held -= out
        downloads.active -= 1


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
    budget plus one chunk per stream, plus the chunk each sender is sending. Every chunk is
    sized and counted by the process's download budget too (budget.DownloadBudget: smaller
    as more downloads are in flight, read ahead only within it), from its read until the
    sender asks for the next one or the stream closes. A stream whose sender takes nothing
    for READ_AHEAD_IDLE_S (a client that stopped reading) while a budget is short drops
    what it read ahead and rewinds its file, and reads again only when asked, so stalled
    clients do not hold the budget from the others (a slow client with the budget to spare
    keeps its read-ahead). Read sequentially, so the kernel's read-ahead sees one stream;
    the thread is held for a read only, never while the client is slow. Chunk sizes double
    from READ_CHUNK_BYTES up to READ_CHUNK_MAX_BYTES (fewer thread hops and socket writes
    for large files, a small first read for small ones)."""

    def __init__(
        self, fh: BinaryIO, remaining: int | None, more: bool, downloads: DownloadBudget
    ) -> None:
        self._fh = fh
        self._downloads = downloads
        self._out = 0  # bytes of the chunk the sender has, counted until it asks again
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
        want = size if self.remaining is None else min(size, self.remaining)
        n = self._downloads.asked(want) if asked else self._downloads.ahead(want)
        over = (
            n == 0
            or self._buffered + n > READ_AHEAD_BYTES
            or _READ_AHEAD.used + n > READ_AHEAD_TOTAL_BYTES
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
        self._downloads.held += n
        task.add_done_callback(functools.partial(self._read_done, n))

    def _read_done(self, n: int, task: asyncio.Future[list[bytes]]) -> None:
        self._reading = False
        _READ_AHEAD.used -= n
        self._downloads.held -= n
        error = OSError("read cancelled") if task.cancelled() else task.exception()
        if self._closed:  # the sender stopped during this read: close the file after it
            self._fh.close()
            return
        if error is not None:
            self._error, self._ended = error, True
        else:
            chunk = task.result().pop()  # the future no longer holds it (_read_started)
            if chunk:
                self._chunks.append(chunk)
                self._buffered += len(chunk)
                _READ_AHEAD.used += len(chunk)
                self._downloads.held += len(chunk)
                self._watch_idle()
            if self.remaining is not None:
                self.remaining -= len(chunk)
            self._ended = len(chunk) < n or self.remaining == 0
        self._start()  # before the sender wakes: the read is under way while it writes
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def next(self) -> bytes | None:
        """The next chunk, None at the end. The one before it has been sent."""
        self._downloads.held -= self._out
        self._out = 0
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
        self._out = len(chunk)  # still counted in the download budget while it is sent
        self._parked = False
        self._unwatch_idle()
        self._watch_idle()
        self._start()
        return chunk

    def _drop_chunks(self) -> None:
        """The chunks waiting to be sent go, and their bytes back to the process budgets."""
        self._chunks.clear()
        _READ_AHEAD.used -= self._buffered
        self._downloads.held -= self._buffered
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
        """The sender took nothing for READ_AHEAD_IDLE_S: if a budget is short (another
        stream could not read a largest chunk ahead: the read-ahead's, or the downloads'),
        give the chunks waiting for it back and rewind the file to the first of them. Not
        while a read runs (the file is in the worker thread's hands): then, and while the
        budgets are not short, look again after another READ_AHEAD_IDLE_S."""
        self._idle = None
        if self._closed or self._error is not None or not self._chunks:
            return
        downloads = self._downloads
        short = (
            _READ_AHEAD.used + READ_CHUNK_MAX_BYTES > READ_AHEAD_TOTAL_BYTES
            or downloads.held + min(READ_CHUNK_MAX_BYTES, downloads.share()) > downloads.limit
        )
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
        self._downloads.held -= self._out
        self._out = 0
        if not self._reading:
            self._fh.close()


class _Readers:
    """The READ_AHEAD_THREADS threads of _ReadAhead's reads (created when first needed)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.busy = 0  # reads handed over whose completion the loop has not yet seen

    def start(self, fh: BinaryIO, n: int) -> asyncio.Future[list[bytes]]:
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

    def _done(self, _task: asyncio.Future[list[bytes]]) -> None:
        self.busy -= 1


_READERS = _Readers()


def _read_started(fh: BinaryIO, n: int, started: threading.Event) -> list[bytes]:
    """The chunk read, in a list the event loop empties (_ReadAhead._read_done): the
    executor's future and its worker thread keep their result until the thread next gets
    the GIL, and a chunk returned as is stayed held by them after it was sent, while the
    next was read (two chunks per download, not one)."""
    started.set()
    return [_read(fh, n)]


def _wait_started(started: threading.Event) -> None:
    """Block the loop until a reader thread is in its read (it holds the GIL only to get
    there, then releases it in the read itself): tens of microseconds as a rule."""
    started.wait(READ_START_WAIT_S)


def tune_allocator(arena_max: int = 0) -> bool:
    """Set MALLOC_MMAP_THRESHOLD_BYTES and MALLOC_TRIM_THRESHOLD_BYTES in this process, and
    at most `arena_max` malloc arenas (0: glibc's default; config.MALLOC_ARENA_MAX says why).
    A serving process calls it once, first thing: glibc fixes its arena limit once more than
    8 arenas exist, and an arena a thread already has stays in use. False where the C library
    is not glibc: nothing is set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    return bool(
        mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD_BYTES)
        and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD_BYTES)
        and (arena_max == 0 or mallopt(m_arena_max, arena_max))
    )


def _open_and_read(
    path: Path, offset: int, n: int, end: int | None, blob: RecordedBlob | None = None
) -> tuple[BinaryIO | None, bytes]:
    """The file opened at `offset` and its first `n` bytes; the file is closed (None) when
    those are the last bytes wanted (up to `end`, None: the file's end) or the file ended.
    A file shorter than `end` raises OSError; an instance's blob (`blob`) missing or
    shorter than its recorded size, LostBlobError."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        if blob is None:
            raise
        raise LostBlobError(blob, path, None) from None
    try:
        size = os.fstat(fh.fileno()).st_size if end is not None or blob is not None else 0
        if blob is not None and size < blob.size_bytes:
            raise LostBlobError(blob, path, size)
        if end is not None and size < end:
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


def _read(fh: BinaryIO, n: int) -> bytes:
    return fh.read(n)
