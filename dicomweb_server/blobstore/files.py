"""Blob storage behind a small Protocol, and its filesystem implementation.

Keys are generated here (never derived from a client's UIDs: no path injection, and storing an
instance again never overwrites the file a reader may be streaming). Every write goes to a
temporary file, is fsynced, then renamed into place and the directory fsynced, so a blob is
either absent or complete after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import aiofiles
import aiofiles.os
import anyio

from dicomweb_server.blobstore.hashing import DataSetHash
from dicomweb_server.blobstore.lost import LostBlobError, RecordedBlob
from dicomweb_server.blobstore.reading import stream_path
from dicomweb_server.errors import ServiceUnavailableError, original_os_error

__all__ = [
    "SCRATCH_FULL_MESSAGE",
    "SCRATCH_FULL_RETRY_S",
    "BlobStore",
    "BlobWriter",
    "FileSystemBlobStore",
    "blob_file",
    "blob_path",
    "is_blob_key",
    "out_of_space",
    "placed_files",
    "scratch_file",
    "scratch_space",
]

log = logging.getLogger(__name__)

# Bytes a spool file buffers in memory before a worker thread writes them out.
SPOOL_BUFFER_BYTES = 256 * 1024
# Consecutive keys of a process share their directory (`ab/cd/`) for this many keys, so that
# creating a directory (a mkdir and two directory fsyncs) is paid once per run of keys, not once
# per blob while the store is young. Each run's directory is random, so blobs stay spread.
KEYS_PER_DIRECTORY_RUN = 32
# Retry-After of the 503 answered when a scratch file cannot be written for want of space
# (scratch_space), seconds: other requests' scratch files go as their responses end, and
# kept inflated copies are removed past INFLATED_KEEP_BYTES, but a filesystem filled by
# the blobs themselves needs an operator. Longer than the database's (index.pool): a full
# disk rarely comes back within seconds, and each retry may convert again before it fails.
SCRATCH_FULL_RETRY_S = 30
# The reason a client is told: that the server's scratch space is full, not where it is.
SCRATCH_FULL_MESSAGE = "the server's scratch space is full; try again later"


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
    async def open_writer(self, hashed: bool = True) -> BlobWriter:
        """A new spool file; `hashed`: its DataSetHash kept as it grows (an instance's),
        else none (a STOW-RS bulk data part, which keeps no bytes of its own in memory)."""
        ...

    async def commit(self, writer: BlobWriter, key: str) -> None: ...
    def place_blocking(self, writer: BlobWriter, key: str) -> None:
        """`commit` from a worker thread (the writer closed there too): durable on return."""
        ...

    async def discard(self, writer: BlobWriter) -> None: ...
    def open_range(
        self, blob: RecordedBlob, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes of an instance's blob from `offset` (`length` of them, None: to its recorded
        end), in chunks. LostBlobError at the first chunk when the file is missing or
        shorter than its recorded size (lost.py)."""
        ...

    async def read_whole(self, blobs: Sequence[RecordedBlob]) -> list[bytes]:
        """Each blob read whole (its recorded size), all in one worker-thread call;
        LostBlobError for the first one missing or shorter than its size."""
        ...

    async def checked_path(self, blob: RecordedBlob) -> Path:
        """The local path of an instance's blob, for a reader that parses the file itself
        (a conversion, a rendering): one stat, LostBlobError when it is missing or shorter
        than its recorded size."""
        ...

    def checked_path_blocking(self, blob: RecordedBlob) -> Path:
        """`checked_path` for a caller in a worker thread (a DIMSE sub-operation)."""
        ...

    def local_path(self, key: str) -> Path: ...
    async def exists(self, key: str) -> bool: ...
    async def size_of(self, key: str) -> int | None:
        """The size of a blob, None when there is none under the key (one stat)."""
        ...

    async def delete(self, key: str) -> None: ...


class _FileWriter:
    """A spool file written in worker threads: bytes are buffered up to SPOOL_BUFFER_BYTES, so a
    small part costs one thread hop (create, write and close at `close`), not one per call."""

    def __init__(self, path: Path, hashed: bool = True) -> None:
        self._path = path
        self._fh: BinaryIO | None = None
        self._buf = bytearray()
        self._size = 0
        # None: not hashed. A DataSetHash holds up to 2 * PADDING_HASH_WINDOW_BYTES of the
        # file's last bytes until its digest is taken: a STOW-RS of 10,000 bulk data parts,
        # all open until the request's end, held 83 KB of each (830 MB).
        self._hash = DataSetHash() if hashed else None
        self.closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def sha256(self, ends_at: int | None = None) -> bytes:
        if self._hash is None:
            raise ValueError("a spool file opened without its hash")
        return self._hash.digest(ends_at)

    @property
    def data_set_at(self) -> int:
        return 0 if self._hash is None else self._hash.data_set_at

    async def write(self, data: bytes) -> None:
        if self._hash is not None:
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
        return is_blob_key(key)

    def local_path(self, key: str) -> Path:
        return blob_path(self.root, key)

    async def open_writer(self, hashed: bool = True) -> BlobWriter:
        # the file is created by a write
        return _FileWriter(self.tmp_dir / uuid.uuid4().hex, hashed)

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
        self, blob: RecordedBlob, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        if length is None:
            length = max(0, blob.size_bytes - offset)
        return stream_path(self.local_path(blob.blob_key), offset, length, blob=blob)

    async def read_whole(self, blobs: Sequence[RecordedBlob]) -> list[bytes]:
        paths = [(self.local_path(blob.blob_key), blob) for blob in blobs]
        return await anyio.to_thread.run_sync(_read_files, paths)

    async def checked_path(self, blob: RecordedBlob) -> Path:
        return await anyio.to_thread.run_sync(self.checked_path_blocking, blob)

    def checked_path_blocking(self, blob: RecordedBlob) -> Path:
        path = self.local_path(blob.blob_key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise LostBlobError(blob, path, None) from None
        if size < blob.size_bytes:
            raise LostBlobError(blob, path, size)
        return path

    async def exists(self, key: str) -> bool:
        return await aiofiles.os.path.exists(self.local_path(key))

    async def size_of(self, key: str) -> int | None:
        try:
            return (await aiofiles.os.stat(self.local_path(key))).st_size
        except FileNotFoundError:
            return None

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


def is_blob_key(key: str) -> bool:
    """Whether `key` is one FileSystemBlobStore.new_key could have made (32 lower-case hex
    digits)."""
    return _KEY.fullmatch(key) is not None


def blob_path(root: Path, key: str) -> Path:
    """Where the blob of `key` lies under the blob root `root`: `root/ab/cd/<key>`."""
    return Path(blob_file(os.fspath(root), key))


def blob_file(root: str, key: str) -> str:
    """blob_path as a string: `check` asks a million times, and a pathlib.Path (or
    os.path.join) made each time cost more than the stat of the file."""
    if not is_blob_key(key):
        raise ValueError(f"not a blob key: {key!r}")
    return f"{root}{os.sep}{key[:2]}{os.sep}{key[2:4]}{os.sep}{key}"


def placed_files(root: str) -> Iterator[tuple[str, str | None]]:
    """Every file in the `ab/cd/` directories of blob_path under the blob root `root` (and
    any file directly in them or in `root`): its path, and its blob key, or None when it does
    not lie where blob_path puts a key (a stray file, a file moved by hand). Other
    directories are not entered: the spool directory `tmp/` (FileSystemBlobStore), a
    filesystem's `lost+found`. Read with os.scandir, one directory listing at a time and no
    stat (the entry's type comes with the listing on Linux); a directory gone meanwhile is
    passed over. Paths are strings: a pathlib.Path per file tripled the time of a walk of a
    million."""
    for first in _entries(root):
        if first.is_file():
            yield first.path, None
        elif _SHARD.fullmatch(first.name) and first.is_dir():
            for second in _entries(first.path):
                if second.is_file():
                    yield second.path, None
                elif _SHARD.fullmatch(second.name) and second.is_dir():
                    shard = first.name + second.name
                    for leaf in _entries(second.path):
                        if leaf.is_file():
                            name = leaf.name
                            ok = name.startswith(shard) and _KEY.fullmatch(name) is not None
                            yield leaf.path, name if ok else None


_KEY = re.compile(r"[0-9a-f]{32}")
_SHARD = re.compile(r"[0-9a-f]{2}")  # a directory level of blob_path


def _entries(directory: str) -> list[os.DirEntry[str]]:
    """The entries of `directory`, none when it is gone (or not a directory)."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def scratch_file(directory: Path, suffix: str) -> Path:
    """A new empty file in this process's spool directory (a converted instance, a STOW-RS
    instance assembled from JSON), the directory made again when it is gone: a process
    starting while this one's lock connection is down (a database restart) takes it for
    dead and removes it (app.recover), and every conversion failed from then on."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(fd)
    return Path(name)


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a write refused for want of space: the filesystem full (ENOSPC) or
    the owner's quota spent (EDQUOT)."""
    return _space_error(exc) is not None


def _space_error(exc: BaseException | None) -> OSError | None:
    """The OSError of out_of_space: `exc`, or the OSError it was raised from
    (errors.original_os_error: pydicom's writer re-raises one without an errno). The scratch
    space full while pydicom wrote a converted instance (a Deflated one, a header with a
    large value) was a 500."""
    refused = original_os_error(exc)
    if refused is None or refused.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return refused


@contextlib.contextmanager
def scratch_space(directory: Path) -> Iterator[None]:
    """Scratch files written to `directory` for an HTTP request (a conversion, an inflated
    copy, a value spooled): a write refused for want of space (out_of_space) is a 503 with
    Retry-After (RFC 9110 15.6.4, 10.2.3), the request's to repeat once space is back,
    not a 500. The writer has removed its partial file already; nothing stored is written
    here. The operator's log names the directory, once per request (an error, not a
    traceback); the client is told only that the scratch space is full (SCRATCH_FULL_MESSAGE).
    Any other error passes through as it is."""
    try:
        yield
    except OSError as exc:
        refused = _space_error(exc)
        if refused is None:
            raise
        log.error("cannot write a scratch file in %s: %s", directory, refused.strerror)
        raise ServiceUnavailableError(
            SCRATCH_FULL_MESSAGE, headers={"Retry-After": str(SCRATCH_FULL_RETRY_S)}
        ) from exc


def _read_files(paths: Sequence[tuple[Path, RecordedBlob]]) -> list[bytes]:
    out = []
    for path, blob in paths:
        try:
            with path.open("rb") as fh:
                data = fh.read(blob.size_bytes)
        except FileNotFoundError:
            raise LostBlobError(blob, path, None) from None
        if len(data) < blob.size_bytes:
            raise LostBlobError(blob, path, len(data))
        out.append(data)
    return out


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
