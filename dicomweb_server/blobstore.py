"""Blob storage behind a small Protocol, and its filesystem implementation.

Keys are generated here (never derived from a client's UIDs: no path injection, and storing an
instance again never overwrites the file a reader may be streaming). Every write goes to a
temporary file, is fsynced, then renamed into place and the directory fsynced, so a blob is
either absent or complete after a crash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import aiofiles
import aiofiles.os
import anyio
from aiofiles.threadpool.binary import AsyncBufferedIOBase

__all__ = [
    "READ_CHUNK_BYTES",
    "BlobStore",
    "BlobWriter",
    "FileSystemBlobStore",
    "stream_path",
]

# Size of the chunks blobs are streamed in.
READ_CHUNK_BYTES = 256 * 1024


class BlobWriter(Protocol):
    """A blob being written: a local spool file, hashed as it grows."""

    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...
    def sha256(self) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


class BlobStore(Protocol):
    def new_key(self) -> str: ...
    async def open_writer(self) -> BlobWriter: ...
    async def commit(self, writer: BlobWriter, key: str) -> None: ...
    async def discard(self, writer: BlobWriter) -> None: ...
    def open_range(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...
    def local_path(self, key: str) -> Path: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...


class _FileWriter:
    def __init__(self, path: Path, fh: AsyncBufferedIOBase) -> None:
        self._path = path
        self._fh = fh
        self._size = 0
        self._hash = hashlib.sha256()
        self.closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def sha256(self) -> bytes:
        return self._hash.digest()

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._size += len(data)
        await self._fh.write(data)

    async def close(self) -> None:
        """Flush and close the spool file (idempotent); its bytes are then readable at `path`."""
        if not self.closed:
            self.closed = True
            await self._fh.close()


class FileSystemBlobStore:
    """Blobs as files under `root/ab/cd/<key>`; spool files under `root/tmp/<owner>/`."""

    def __init__(self, root: Path, owner: int) -> None:
        self.root = root
        self.owner = owner
        self.tmp_root = root / "tmp"
        self.tmp_dir = self.tmp_root / str(owner)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def new_key(self) -> str:
        return uuid.uuid4().hex

    def local_path(self, key: str) -> Path:
        if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:4] / key

    async def open_writer(self) -> BlobWriter:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)  # recreated if it was removed
        path = self.tmp_dir / uuid.uuid4().hex
        fh = await aiofiles.open(path, "xb")
        return _FileWriter(path, fh)

    async def commit(self, writer: BlobWriter, key: str) -> None:
        await writer.close()
        dest = self.local_path(key)
        # Shielded: a cancelled request must not return while the rename may still happen in
        # the worker thread, or the caller's view of "placed" would be wrong.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_place, writer.path, dest)

    async def discard(self, writer: BlobWriter) -> None:
        await writer.close()
        await aiofiles.os.wrap(_unlink)(writer.path)

    def open_range(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        return stream_path(self.local_path(key), offset, length)

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


async def stream_path(
    path: Path, offset: int = 0, length: int | None = None
) -> AsyncIterator[bytes]:
    """Read `length` bytes of a file from `offset` (to the end when None) in chunks."""
    remaining = length
    async with aiofiles.open(path, "rb") as fh:
        await fh.seek(offset)
        while remaining is None or remaining > 0:
            n = READ_CHUNK_BYTES if remaining is None else min(READ_CHUNK_BYTES, remaining)
            chunk = await fh.read(n)
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
    if remaining:
        raise OSError(f"{path.name} is shorter than the recorded range")


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
