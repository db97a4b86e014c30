"""Reading blobs back: ranged, read-ahead streaming (blobstore.stream_path)."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import cast

import pytest

from dicomweb_server.blobstore import READ_CHUNK_BYTES, stream_path


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
    assert all(0 < len(c) <= READ_CHUNK_BYTES for c in chunks)


async def test_stream_path_stopped_early_waits_for_its_read_ahead(
    blob: tuple[Path, bytes],
) -> None:
    """A client that goes away mid-stream: the generator closes while a read is in flight."""
    path, data = blob
    stream = cast(AsyncGenerator[bytes, None], stream_path(path))  # an async generator
    first = await stream.__anext__()
    assert first == data[:READ_CHUNK_BYTES]
    await stream.aclose()  # neither raises nor leaves the read behind


async def test_stream_path_short_file_is_an_error(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    with pytest.raises(OSError, match="shorter than the recorded range"):
        async for _ in stream_path(path, 0, len(data) + 1):
            pass
