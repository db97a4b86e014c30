"""The duplicate check's digest of a stored instance: DataSetHash, fed a Part-10 file in
pieces, leaves out its File Meta Information (but for the transfer syntax) and its trailing
padding; hash_file and data_set_sha256 hash a file on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dicomweb_server.blobstore.reading import READ_CHUNK_BYTES
from dicomweb_server.media.part10 import FILE_META_MAX_BYTES, file_meta_end

__all__ = [
    "DATA_SET_HASH_VERSION",
    "PADDING_HASH_WINDOW_BYTES",
    "WHOLE_FILE_HASH_VERSION",
    "DataSetHash",
    "data_set_sha256",
    "hash_file",
]

# The first byte of a DataSetHash digest: a data set's (with its transfer syntax), or a whole
# file's when its meta information could not be walked. Separate, so that no file hashed whole
# can pass for a data set whose bytes are that file's (found by review). Instances stored
# before hold a plain SHA-256 of their whole file (32 bytes, no first byte), compared by
# reading their file (duplicates.same_data_set).
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
