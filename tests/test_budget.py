"""The memory of download chunks bounded over a process (blobstore.budget): the sizes at the
edges of DOWNLOAD_BUFFER_BUDGET_BYTES, and stream_path's chunks within it however many
downloads are in flight and stalled, while one or a few downloads keep the largest chunks."""

from __future__ import annotations

import asyncio
import os
import sys
import tracemalloc
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO, cast

import anyio
import pytest

from dicomweb_server.blobstore import budget, reading
from dicomweb_server.blobstore.budget import (
    DOWNLOAD_BUFFER_BUDGET_BYTES,
    DOWNLOAD_CHUNK_MIN_BYTES,
    DownloadBudget,
)
from dicomweb_server.blobstore.reading import READ_CHUNK_BYTES, READ_CHUNK_MAX_BYTES, stream_path

MIB = 1024 * 1024


def test_budget_constants() -> None:
    assert DOWNLOAD_BUFFER_BUDGET_BYTES == 256 * MIB
    assert DOWNLOAD_CHUNK_MIN_BYTES == 64 * 1024
    assert READ_CHUNK_MAX_BYTES % DOWNLOAD_CHUNK_MIN_BYTES == 0


def test_share_at_the_edge_of_the_budget() -> None:
    """As many downloads as the budget holds largest chunks (64) each still read the largest;
    one more and every one reads less. Never below the least."""
    edge = DOWNLOAD_BUFFER_BUDGET_BYTES // READ_CHUNK_MAX_BYTES
    assert DownloadBudget(active=edge).share() == READ_CHUNK_MAX_BYTES
    assert DownloadBudget(active=edge).asked(READ_CHUNK_MAX_BYTES) == READ_CHUNK_MAX_BYTES
    assert (
        DownloadBudget(active=edge + 1).share() == READ_CHUNK_MAX_BYTES - DOWNLOAD_CHUNK_MIN_BYTES
    )
    assert DownloadBudget(active=1).share() == DOWNLOAD_BUFFER_BUDGET_BYTES
    assert DownloadBudget(active=0).share() == DOWNLOAD_BUFFER_BUDGET_BYTES
    many = DOWNLOAD_BUFFER_BUDGET_BYTES // DOWNLOAD_CHUNK_MIN_BYTES
    assert DownloadBudget(active=many).share() == DOWNLOAD_CHUNK_MIN_BYTES
    assert DownloadBudget(active=10 * many).share() == DOWNLOAD_CHUNK_MIN_BYTES


def test_read_ahead_at_the_edge_of_the_budget() -> None:
    """A chunk is read ahead when it fits in the budget, to the byte; not a byte past it."""
    fits = DownloadBudget(active=1, held=DOWNLOAD_BUFFER_BUDGET_BYTES - READ_CHUNK_MAX_BYTES)
    assert fits.ahead(READ_CHUNK_MAX_BYTES) == READ_CHUNK_MAX_BYTES
    fits.held += 1
    assert fits.ahead(READ_CHUNK_MAX_BYTES) == 0
    assert fits.ahead(READ_CHUNK_MAX_BYTES - 1) == READ_CHUNK_MAX_BYTES - 1


def test_asked_chunk_at_the_edge_of_the_budget() -> None:
    """A chunk a sender waits for takes what the budget has left (in whole multiples of the
    least), and the least when nothing is left: it is never refused, nor waited for."""
    room = DownloadBudget(active=2, held=DOWNLOAD_BUFFER_BUDGET_BYTES - READ_CHUNK_MAX_BYTES)
    assert room.asked(READ_CHUNK_MAX_BYTES) == READ_CHUNK_MAX_BYTES
    room.held += 1
    assert room.asked(READ_CHUNK_MAX_BYTES) == READ_CHUNK_MAX_BYTES - DOWNLOAD_CHUNK_MIN_BYTES
    spent = DownloadBudget(active=2, held=DOWNLOAD_BUFFER_BUDGET_BYTES)
    assert spent.asked(READ_CHUNK_MAX_BYTES) == DOWNLOAD_CHUNK_MIN_BYTES
    spent.held += 10 * DOWNLOAD_CHUNK_MIN_BYTES  # past it (others' least chunks)
    assert spent.asked(READ_CHUNK_MAX_BYTES) == DOWNLOAD_CHUNK_MIN_BYTES
    assert spent.asked(100) == 100  # a smaller want (the end of a file) as it is


def _file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def _fresh(monkeypatch: pytest.MonkeyPatch, downloads: DownloadBudget) -> DownloadBudget:
    monkeypatch.setattr(budget, "DOWNLOADS", downloads)
    monkeypatch.setattr(reading, "_READ_AHEAD", reading._Budget())
    return downloads


def _chunk_sizes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The size of each read after the first, per file name."""
    reads: dict[str, list[int]] = {}

    def counting_read(fh: BinaryIO, n: int) -> bytes:
        reads.setdefault(Path(str(fh.name)).name, []).append(n)
        return fh.read(n)

    monkeypatch.setattr(reading, "_read", counting_read)
    return reads


async def _settle(downloads: DownloadBudget) -> None:
    """Until no read is under way (reads ahead stop once the budget is spent)."""
    last = -1
    for _ in range(200):
        await asyncio.sleep(0.02)
        if downloads.held == last and reading._READERS.busy == 0:
            return
        last = downloads.held
    raise AssertionError("reads went on")


async def test_one_or_four_downloads_read_the_largest_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case is as before: a download alone, or four at once, read chunks doubling
    from READ_CHUNK_BYTES to READ_CHUNK_MAX_BYTES, and the budget is all given back."""
    downloads = _fresh(monkeypatch, DownloadBudget())
    reads = _chunk_sizes(monkeypatch)
    size = 6 * READ_CHUNK_MAX_BYTES
    data = {name: _file(tmp_path / name, size) for name in "abcd"}
    whole = b"".join([c async for c in stream_path(tmp_path / "a")])
    assert whole == data["a"]
    largest = [2 * MIB, *[4 * MIB] * 6]  # the last one asked for 4 MiB, found 1
    assert reads["a"] == largest
    reads.clear()

    async def read(name: str) -> bytes:
        return b"".join([c async for c in stream_path(tmp_path / name)])

    got = await asyncio.gather(*(read(name) for name in "abcd"))
    assert dict(zip("abcd", got, strict=True)) == data
    assert all(sizes == largest for sizes in reads.values()), reads
    assert downloads.held == 0 and downloads.active == 0


# The budget of the stalled-download tests: small, so that what the streams hold is counted
# exactly against it (tracemalloc) at little cost.
LIMIT = 2 * MIB
LEAST = 16 * 1024
STALLED = 48


async def _stall(path: Path, taken: int) -> tuple[AsyncGenerator[bytes, None], bytes]:
    """A download that took `taken` chunks and holds the last one (a client that stopped
    reading: the server's transport keeps the chunk it was writing)."""
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))
    chunk = b""
    for _ in range(taken):
        chunk = await stream.__anext__()
    return stream, chunk


async def test_stalled_downloads_hold_at_most_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """48 downloads whose clients stopped, each holding the chunk it was sending, with what
    was read ahead for them: the bytes they hold, counted by tracemalloc (every chunk read,
    whoever holds it), stay within the budget plus the least chunk each. Each held a chunk of
    up to READ_CHUNK_MAX_BYTES whatever their number (here 48 x 1 MiB, and the read-ahead)."""
    downloads = _fresh(monkeypatch, DownloadBudget(limit=LIMIT, least=LEAST))
    monkeypatch.setattr(reading, "READ_AHEAD_TOTAL_BYTES", LIMIT // 2)
    paths = [tmp_path / f"f{i}" for i in range(STALLED)]
    for path in paths:
        _file(path, 8 * MIB)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        stalled = [await _stall(path, 2 + i % 3) for i, path in enumerate(paths)]
        await _settle(downloads)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    bound = LIMIT + STALLED * LEAST
    # the streams' own state besides their chunks (generators, tasks, a file buffer of 8 KiB)
    assert held < bound + STALLED * 16 * 1024, f"{held / MIB:.1f} MiB held"
    sent = sum(len(chunk) for _, chunk in stalled)
    assert sent <= downloads.held <= bound, (sent, downloads.held)
    for stream, _ in stalled:
        await stream.aclose()
    assert downloads.held == 0 and downloads.active == 0


async def test_a_download_among_stalled_ones_goes_on_and_then_gets_the_largest_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the budget spent by stalled downloads, a new one still reads every byte at once
    (no waiting for the stalled ones), in chunks of the least; once they are gone, the next
    one reads the largest chunks again."""
    downloads = _fresh(monkeypatch, DownloadBudget(limit=LIMIT, least=LEAST))
    reads = _chunk_sizes(monkeypatch)
    for i in range(STALLED):
        _file(tmp_path / f"f{i}", 4 * MIB)
    data = _file(tmp_path / "fast", 3 * MIB)
    stalled = [await _stall(tmp_path / f"f{i}", 2) for i in range(STALLED)]
    await _settle(downloads)
    assert downloads.held + LEAST > LIMIT  # spent
    with anyio.fail_after(10):
        got = [c async for c in stream_path(tmp_path / "fast")]
    assert b"".join(got) == data
    assert len(got[0]) == LEAST and set(reads["fast"]) == {LEAST}
    for stream, _ in stalled:
        await stream.aclose()
    assert downloads.held == 0 and downloads.active == 0
    reads.clear()
    got = [c async for c in stream_path(tmp_path / "fast")]
    assert b"".join(got) == data
    assert [len(c) for c in got] == [READ_CHUNK_BYTES, 2 * MIB]


async def test_a_chunk_sent_is_held_by_its_sender_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream holds no chunk it has yielded: a layer above may send a copy made from it
    (a value cut out of its items, a range of it, its words swapped from big endian) and let
    it go. The stream held each until the next was asked for, so a stalled download held
    the chunk and the copy, one of them outside the budget."""
    _fresh(monkeypatch, DownloadBudget())
    for size, chunks in ((6 * MIB, 3), (1000, 1)):  # read ahead; and one read, file closed
        path = tmp_path / f"f{size}"
        _file(path, size)
        stream = cast(AsyncGenerator[bytes, None], stream_path(path))
        try:
            for _ in range(chunks):
                chunk = await anext(stream)
                await asyncio.sleep(0.05)  # the worker thread that read it lets go of it
                assert sys.getrefcount(chunk) == 2, "held by the stream"  # `chunk`, the argument
                del chunk
        finally:
            await stream.aclose()
