"""A stored file found missing, or shorter than the size the index recorded (a data directory
cleaned or replaced under a kept database, a file lost or cut short): LostBlobError, raised
where the blob store opens or checks an instance's file, and RecordedBlob, what it is told
of the file (the index row: key, size, SOP Instance UID).

The archive's fault, not the client's: a 500 (RFC 9110 15.6.1) whose reason says which
instance and how to repair it. A re-send of the instance (STOW-RS or C-STORE) replaces the
file (ingest._repair). The operator's log gets one error line naming the file as well
(`log_message`), written where the error is answered (app.py, dimse/handlers.py), no
traceback: it is a state of the data directory, not a bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from dicomweb_server.errors import DicomWebError

__all__ = ["REPAIR_HINT", "LostBlobError", "RecordedBlob"]

# What the client and the operator are told to do about it.
REPAIR_HINT = "re-send the instance (STOW-RS or C-STORE) to repair it"


class RecordedBlob(Protocol):
    """What the index recorded of an instance's blob (index.rows.StoredInstance has it)."""

    @property
    def blob_key(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def sop_instance_uid(self) -> str: ...


class LostBlobError(DicomWebError):
    """The stored file of an instance is missing (`found` None) or holds `found` bytes, fewer
    than the `recorded` ones. `message` is the client's (no server path in it);
    `log_message` the operator's, with the blob's key and path."""

    status = 500

    def __init__(self, blob: RecordedBlob, path: Path, found: int | None) -> None:
        self.instance = blob.sop_instance_uid
        self.key = blob.blob_key
        self.path = path
        self.recorded = blob.size_bytes
        self.found = found
        state = (
            "is missing" if found is None else f"is {found} bytes, not the {self.recorded} recorded"
        )
        super().__init__(f"the stored file of instance {self.instance} {state}; {REPAIR_HINT}")
        self.log_message = (
            f"the stored file of instance {self.instance} (blob {self.key}, {path}) {state};"
            f" {REPAIR_HINT}"
        )
