"""Reading blobs back: ranged, read-ahead streaming (blobstore.reading.stream_path); a blob
found missing or cut short (blobstore.lost.LostBlobError)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import anyio
import pytest

from dicomweb_server.blobstore import reading
from dicomweb_server.blobstore.files import FileSystemBlobStore
from dicomweb_server.blobstore.lost import REPAIR_HINT, LostBlobError
from dicomweb_server.blobstore.reading import (
    READ_CHUNK_BYTES,
    READ_CHUNK_MAX_BYTES,
    stream_path,
    tune_allocator,
)


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * READ_CHUNK_BYTES + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, None),
        (0, READ_CHUNK_BYTES),  # exactly one chunk: no read ahead past it
        (5, READ_CHUNK_BYTES + 1),  # one byte into the second chunk
        (2 * READ_CHUNK_BYTES, None),
        (10, 0),
    ],
)
async def test_stream_path_ranges(
    blob: tuple[Path, bytes], offset: int, length: int | None
) -> None:
    path, data = blob
    chunks = [c async for c in stream_path(path, offset, length)]
    end = len(data) if length is None else offset + length
    assert b"".join(chunks) == data[offset:end]
    assert all(0 < len(c) <= READ_CHUNK_MAX_BYTES for c in chunks)
    if chunks:
        assert len(chunks[0]) == min(READ_CHUNK_BYTES, end - offset)  # a small first read


async def _settled(condition: Callable[[], bool]) -> None:
    """Wait until `condition` holds (5 s at most), then a little longer: reads that should
    not happen would have started by then."""
    for _ in range(500):
        if condition():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert condition()


def _small_chunks(monkeypatch: pytest.MonkeyPatch, **more: float) -> None:
    """Chunks of 1,000 bytes doubling to 4,000, at most 8,000 read ahead per stream, a fresh
    process budget; `more` sets other constants of blobstore.reading."""
    sizes = {"READ_CHUNK_BYTES": 1000, "READ_CHUNK_MAX_BYTES": 4000, "READ_AHEAD_BYTES": 8000}
    for name, value in {**sizes, **more}.items():
        monkeypatch.setattr(reading, name, value)
    monkeypatch.setattr(reading, "_READ_AHEAD", reading._Budget())


def _counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes each read after the first returns, in order."""
    reads: list[int] = []

    def counting_read(fh: BinaryIO, n: int) -> bytes:
        chunk = fh.read(n)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(reading, "_read", counting_read)
    return reads


def _random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def _open_fds(path: Path) -> int:
    """How many of this process's file descriptors are open on `path`."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd) == str(path)
    return count


async def test_stream_path_stopped_early_closes_the_file(blob: tuple[Path, bytes]) -> None:
    """A client that goes away mid-stream: the generator is closed at a yield."""
    path, data = blob
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))  # an async generator
    first = await stream.__anext__()
    assert first == data[:READ_CHUNK_BYTES]
    await stream.aclose()
    for _ in range(50):  # the read-ahead in flight ends, then the file is closed
        if _open_fds(path) == 0:
            break
        await asyncio.sleep(0.01)
    assert _open_fds(path) == 0


async def test_stream_path_cancelled_during_a_read_closes_after_it(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the read-ahead is in a worker thread (a slow disk): the read is not
    cut short and the file is closed once it has ended, not under it."""
    path, data = blob
    reads: list[int] = []

    def slow_read(fh: BinaryIO, n: int) -> bytes:
        time.sleep(0.2)
        chunk = fh.read(n)  # raises if the file was closed under it
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(reading, "_read", slow_read)
    budget_before = reading._READ_AHEAD.used
    got: list[bytes] = []

    async def consume() -> None:
        async for chunk in stream_path(path):
            got.append(chunk)

    task = asyncio.create_task(consume())
    while not got:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the second read is in flight now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)
    assert reads == [2 * READ_CHUNK_BYTES]  # the read in flight finished, on an open file
    assert _open_fds(path) == 0
    assert reading._READ_AHEAD.used == budget_before  # its read-ahead budget given back
    assert got == [data[:READ_CHUNK_BYTES]]


@pytest.mark.parametrize("offset", [0, 2 * READ_CHUNK_BYTES])
async def test_stream_path_short_file_is_an_error_before_the_first_chunk(
    blob: tuple[Path, bytes], offset: int
) -> None:
    """Found when the file is opened (its size), not once the stream has run dry: a
    response can still answer an error status."""
    path, data = blob
    got = []
    with pytest.raises(OSError, match="shorter than the recorded range"):
        async for chunk in stream_path(path, offset, len(data) - offset + 1):
            got.append(chunk)
    assert got == []
    assert _open_fds(path) == 0


async def test_stream_path_reads_ahead_of_a_slow_sender_up_to_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads go on while the sender is busy, chunk sizes double up to the maximum, and no
    more than READ_AHEAD_BYTES wait to be sent."""
    _small_chunks(monkeypatch)
    path = tmp_path / "blob"
    data = _random_file(path, 50_000)
    reads = _counted_reads(monkeypatch)
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))
    got = [await stream.__anext__()]
    # A slow sender: the reader runs ahead meanwhile, then stops.
    await _settled(lambda: len(reads) == 2)
    assert reads == [2000, 4000]  # another 4,000 would pass the 8,000 of READ_AHEAD_BYTES
    got += [c async for c in stream]
    assert b"".join(got) == data
    assert [len(c) for c in got[:4]] == [1000, 2000, 4000, 4000]
    assert _open_fds(path) == 0


async def test_stream_path_read_error_reaches_the_sender(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = blob

    def failing_read(fh: BinaryIO, n: int) -> bytes:
        raise OSError("disk gone")

    monkeypatch.setattr(reading, "_read", failing_read)
    got: list[bytes] = []
    with pytest.raises(OSError, match="disk gone"):
        async for chunk in stream_path(path):
            got.append(chunk)
    assert got == [data[:READ_CHUNK_BYTES]]
    assert _open_fds(path) == 0


def test_tune_allocator_sets_glibc_thresholds() -> None:
    assert tune_allocator()  # these machines run glibc: mallopt accepted both settings


async def test_read_ahead_is_bounded_over_all_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past READ_AHEAD_TOTAL_BYTES (over every stream of the process) a stream reads only
    when its sender asks, and still delivers every byte; the budget is given back."""
    _small_chunks(monkeypatch, READ_AHEAD_TOTAL_BYTES=3000)
    data = {name: os.urandom(20_000) for name in ("a", "b")}
    for name, content in data.items():
        (tmp_path / name).write_bytes(content)
    reads: dict[str, list[int]] = {"a": [], "b": []}

    def counting_read(fh: BinaryIO, n: int) -> bytes:
        reads[Path(str(fh.name)).name].append(n)
        return fh.read(n)

    monkeypatch.setattr(reading, "_read", counting_read)
    a = cast(AsyncGenerator[bytes, None], stream_path(tmp_path / "a"))
    b = cast(AsyncGenerator[bytes, None], stream_path(tmp_path / "b"))
    got = {"a": [await a.__anext__()], "b": []}
    await _settled(lambda: reading._READ_AHEAD.used == 2000)
    assert reads["a"] == [2000]  # another 4,000 would pass the 3,000 of the process
    got["b"].append(await b.__anext__())
    await asyncio.sleep(0.1)
    assert reads["b"] == []  # over budget: nothing read ahead
    got["b"].append(await b.__anext__())  # asked: read then
    assert reads["b"] == [2000]
    got["a"] += [c async for c in a]
    got["b"] += [c async for c in b]
    assert {name: b"".join(chunks) for name, chunks in got.items()} == data
    assert reading._READ_AHEAD.used == 0


async def test_idle_stream_gives_its_read_ahead_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that takes nothing for READ_AHEAD_IDLE_S (its client stopped reading) while
    the budget is short: the chunks read ahead for it go back to the budget, and when it asks
    again the file is read from where it left off, every byte once, in order."""
    # The budget is short once 6,000 bytes wait.
    _small_chunks(monkeypatch, READ_AHEAD_IDLE_S=0.6, READ_AHEAD_TOTAL_BYTES=8000)
    path = tmp_path / "blob"
    data = _random_file(path, 50_000)
    reads = _counted_reads(monkeypatch)
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))
    got = [await stream.__anext__()]
    await _settled(lambda: reading._READ_AHEAD.used == 6000)  # 2,000 + 4,000 read ahead
    await _settled(lambda: reading._READ_AHEAD.used == 0)  # idle: given back
    await asyncio.sleep(0.3)
    assert reads == [2000, 4000]  # and nothing read ahead while idle
    got.append(await stream.__anext__())  # asked again: read then, from the first dropped byte
    assert got[1] == data[1000:5000] and reads[2] == 4000
    got += [c async for c in stream]
    assert b"".join(got) == data
    assert reading._READ_AHEAD.used == 0
    assert _open_fds(path) == 0


async def test_idle_stream_of_a_range_rewinds_within_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a byte range of the file, read ahead to its end before the sender went
    idle: what was given back is read again, and the stream still ends at the range's end."""
    # The budget is short once 8,000 bytes wait.
    _small_chunks(monkeypatch, READ_AHEAD_IDLE_S=0.3, READ_AHEAD_TOTAL_BYTES=9000)
    path = tmp_path / "blob"
    data = _random_file(path, 30_000)
    stream = cast(AsyncGenerator[bytes, None], stream_path(path, 500, 9000))
    got = [await stream.__anext__()]
    for _ in range(500):  # all the rest of the range read ahead: 2,000 + 4,000 + 2,000
        if reading._READ_AHEAD.used == 8000:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("nothing was read ahead")
    await _settled(lambda: reading._READ_AHEAD.used == 0)
    got += [c async for c in stream]
    assert b"".join(got) == data[500:9500]
    assert _open_fds(path) == 0


@dataclass(frozen=True)
class _Row:
    """What the index records of a blob (blobstore.lost.RecordedBlob)."""

    blob_key: str
    size_bytes: int
    sop_instance_uid: str = "1.2.826.0.1.3680043.8.498.1"


def _placed(store: FileSystemBlobStore, data: bytes) -> _Row:
    key = store.new_key()
    store.local_path(key).parent.mkdir(parents=True, exist_ok=True)
    store.local_path(key).write_bytes(data)
    return _Row(key, len(data))


def _check_lost(
    error: LostBlobError, row: _Row, store: FileSystemBlobStore, found: int | None
) -> None:
    """The client's message names the instance and the repair, not the server's path; the
    operator's names the blob's key and path too."""
    path = str(store.local_path(row.blob_key))
    state = (
        "is missing" if found is None else f"is {found} bytes, not the {row.size_bytes} recorded"
    )
    assert error.status == 500 and error.found == found
    assert (
        error.message
        == f"the stored file of instance {row.sop_instance_uid} {state}; {REPAIR_HINT}"
    )
    assert path not in error.message
    assert row.blob_key in error.log_message and path in error.log_message
    assert row.sop_instance_uid in error.log_message and state in error.log_message


async def test_read_whole_reads_each_blob_and_refuses_a_lost_one(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path / "blobs", owner=1)
    rows = [_placed(store, bytes([n]) * (100 + n)) for n in range(3)]
    got = await store.read_whole(rows)
    assert got == [bytes([n]) * (100 + n) for n in range(3)]
    longer = _Row(rows[1].blob_key, 102)
    with pytest.raises(LostBlobError) as caught:
        await store.read_whole([rows[0], longer])
    _check_lost(caught.value, longer, store, 101)
    store.local_path(rows[2].blob_key).unlink()
    with pytest.raises(LostBlobError) as caught:
        await store.read_whole(rows)
    _check_lost(caught.value, rows[2], store, None)


@pytest.mark.parametrize("damage", ["missing", "short"])
async def test_open_range_and_checked_path_refuse_a_lost_blob(tmp_path: Path, damage: str) -> None:
    """A blob missing, or shorter than recorded, is a LostBlobError when opened, even for a
    range within what is left of it: the file is not the one the index describes."""
    store = FileSystemBlobStore(tmp_path / "blobs", owner=1)
    data = os.urandom(2 * READ_CHUNK_BYTES)
    row = _placed(store, data)
    assert b"".join([c async for c in store.open_range(row, 5, 10)]) == data[5:15]
    assert b"".join([c async for c in store.open_range(row, 7)]) == data[7:]
    assert await store.checked_path(row) == store.local_path(row.blob_key)
    path = store.local_path(row.blob_key)
    if damage == "missing":
        path.unlink()
    else:
        os.truncate(path, len(data) - 1)
    found = None if damage == "missing" else len(data) - 1
    with pytest.raises(LostBlobError) as caught:
        _ = [c async for c in store.open_range(row, 0, 10)]
    _check_lost(caught.value, row, store, found)
    with pytest.raises(LostBlobError) as caught:
        await store.checked_path(row)
    _check_lost(caught.value, row, store, found)
    with pytest.raises(LostBlobError) as caught:
        store.checked_path_blocking(row)
    _check_lost(caught.value, row, store, found)


async def test_a_blob_cut_short_while_it_is_streamed_is_lost_where_it_ends(tmp_path: Path) -> None:
    """Cut past what was read ahead of the sender: the stream fails where the file now ends."""
    store = FileSystemBlobStore(tmp_path / "blobs", owner=1)
    data = os.urandom(24 * READ_CHUNK_BYTES)
    row = _placed(store, data)
    cut = 16 * READ_CHUNK_BYTES  # past the first chunk and READ_AHEAD_BYTES after it
    stream = cast(AsyncGenerator[bytes, None], store.open_range(row))
    got = [await anext(stream)]
    os.truncate(store.local_path(row.blob_key), cut)
    with pytest.raises(LostBlobError) as caught:
        got += [c async for c in stream]
    _check_lost(caught.value, row, store, cut)
    assert b"".join(got) == data[: len(b"".join(got))]


async def test_idle_stream_keeps_its_read_ahead_while_the_budget_is_not_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow client (idle past READ_AHEAD_IDLE_S) with the budget to spare keeps what was
    read for it: nothing is read twice."""
    _small_chunks(monkeypatch, READ_AHEAD_IDLE_S=0.1)  # a budget of 64 MiB: plenty
    path = tmp_path / "blob"
    data = _random_file(path, 50_000)
    reads = _counted_reads(monkeypatch)
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))
    got = [await stream.__anext__()]
    await _settled(lambda: reading._READ_AHEAD.used == 6000)
    await asyncio.sleep(0.5)  # idle five times over
    assert reading._READ_AHEAD.used == 6000 and reads == [2000, 4000]
    got += [c async for c in stream]
    assert b"".join(got) == data
    assert sum(reads) == len(data) - 1000  # every byte read once
    assert reading._READ_AHEAD.used == 0


def _entered_reads(monkeypatch: pytest.MonkeyPatch, release: threading.Event) -> list[int]:
    """The sizes of the reads after the first, in the order their threads entered them; each
    read waits for `release` once entered."""
    entered: list[int] = []

    def gated_read(fh: BinaryIO, n: int) -> bytes:
        entered.append(n)
        release.wait(5)
        return fh.read(n)

    monkeypatch.setattr(reading, "_read", gated_read)
    return entered


async def test_next_read_is_under_way_before_the_sender_gets_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader thread is inside the next read before the sender has the chunk to write: the
    loop keeps the GIL through a socket write, so a read merely scheduled would start only
    after it (reads and writes taking turns)."""
    _small_chunks(monkeypatch)
    path = tmp_path / "blob"
    data = _random_file(path, 30_000)
    release = threading.Event()
    entered = _entered_reads(monkeypatch, release)
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))
    got = [await stream.__anext__()]
    assert entered == [2000]  # before the first chunk reached the sender
    release.set()
    got.append(await stream.__anext__())
    await _settled(lambda: len(entered) == 3)
    got += [c async for c in stream]
    assert b"".join(got) == data
    assert reading._READERS.busy == 0


async def test_read_start_does_not_wait_while_every_reader_thread_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every reader thread in a read, a new read queues: the loop does not wait for it
    to start (that would stall every other request for READ_START_WAIT_S)."""
    _small_chunks(monkeypatch, READ_AHEAD_THREADS=1)
    monkeypatch.setattr(reading, "_READERS", reading._Readers())
    waits: list[bool] = []
    real_wait = reading._wait_started

    def counted_wait(started: threading.Event) -> None:
        real_wait(started)
        waits.append(started.is_set())

    monkeypatch.setattr(reading, "_wait_started", counted_wait)
    release = threading.Event()
    entered = _entered_reads(monkeypatch, release)
    data = {name: _random_file(tmp_path / name, 9000) for name in ("a", "b")}
    a = cast(AsyncGenerator[bytes, None], stream_path(tmp_path / "a"))
    b = cast(AsyncGenerator[bytes, None], stream_path(tmp_path / "b"))
    got = {"a": [await a.__anext__()], "b": [await b.__anext__()]}
    assert waits == [True]  # a's read started in the one thread; b's queued behind it
    assert entered == [2000] and reading._READERS.busy == 2
    release.set()
    got["a"] += [c async for c in a]
    got["b"] += [c async for c in b]
    assert {name: b"".join(chunks) for name, chunks in got.items()} == data
    assert reading._READERS.busy == 0


class _NoThreadAfterTheFirst(concurrent.futures.ThreadPoolExecutor):
    """A pool that cannot start another thread after its first read (a process or container
    at its thread limit)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submits = 0

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.submits += 1
        if self.submits > 1:
            raise RuntimeError("can't start new thread")
        return super().submit(*args, **kwargs)


async def test_read_that_cannot_be_handed_over_fails_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread to read in: the stream fails (the response breaks off, or never starts),
    rather than hanging with its file open and its bytes held in the budget."""
    _small_chunks(monkeypatch)
    readers = reading._Readers()
    readers._pool = _NoThreadAfterTheFirst()
    monkeypatch.setattr(reading, "_READERS", readers)
    path = tmp_path / "blob"
    _random_file(path, 30_000)
    got = []
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="can't start new thread"):
        async for chunk in stream_path(path):
            got.append(chunk)
    assert [len(c) for c in got] == [1000, 2000]  # the first chunk, and the one read ahead
    assert _open_fds(path) == 0
    assert reading._READ_AHEAD.used == 0 and readers.busy == 0


async def test_reads_stuck_on_failing_storage_do_not_hold_up_another_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight streams whose reads hang (a failing disk, a hung network mount): another stream
    of a healthy file still gets every chunk."""
    _small_chunks(monkeypatch)
    monkeypatch.setattr(reading, "_READERS", reading._Readers())
    release = threading.Event()

    def read(fh: BinaryIO, n: int) -> bytes:
        if Path(str(fh.name)).name.startswith("stuck"):
            release.wait(10)
        return fh.read(n)

    monkeypatch.setattr(reading, "_read", read)
    stuck = []
    try:
        for i in range(8):
            _random_file(tmp_path / f"stuck{i}", 30_000)
            stream = cast(AsyncGenerator[bytes, None], stream_path(tmp_path / f"stuck{i}"))
            await stream.__anext__()  # its read-ahead now holds a reader thread
            stuck.append(stream)
        data = _random_file(tmp_path / "healthy", 30_000)
        with anyio.fail_after(5):
            got = [c async for c in stream_path(tmp_path / "healthy")]
        assert b"".join(got) == data
    finally:
        release.set()
        for stream in stuck:
            await stream.aclose()
