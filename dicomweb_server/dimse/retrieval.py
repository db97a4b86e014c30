"""One C-MOVE or C-GET as it goes: what the peer accepted and answered to each C-STORE
sub-operation, and so the final status, for the audit trail.

pynetdicom sends the sub-operations and the responses itself; it tells the handler neither
what each C-STORE-RSP said nor what it answered at the end. This tally listens to the
C-STORE-RSPs (EVT_DIMSE_RECV on the association they arrive on: the C-MOVE sub-association,
or the C-GET association itself) and reaches the final status as pynetdicom's Query/Retrieve
SCP does (PS3.4 C.4.2.1.5, C.4.3.1.4).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.events import Event
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

from dicomweb_server.dimse.release import release_requested
from dicomweb_server.dimse.statuses import CANCEL, CANNOT_PERFORM, SOME_FAILED, UNFINISHED

__all__ = ["BytesSent", "Retrieval"]


@dataclass
class BytesSent:
    """The data set bytes of the DIMSE messages an association sent while an operation ran
    (EVT_DIMSE_SENT, in the operation's thread as each message is handed on: C-FIND
    identifiers, C-STORE sub-operations' data sets): the audit trail's count of what a
    C-FIND, C-MOVE or C-GET disclosed, as a response body's for HTTP (found by audit
    review: every one was recorded with 0 bytes, whatever it sent). Not EVT_DATA_SENT: the
    socket writes lag behind in the DUL thread, and a C-FIND's were all still queued when
    it ended."""

    total: int = 0

    def on_sent(self, event: Event) -> None:
        streamed = getattr(event.message, "streamed_bytes", None)  # sending.send_growing
        if isinstance(streamed, int):
            self.total += streamed
            return
        data = getattr(event.message, "data_set", None)
        if isinstance(data, BytesIO):
            self.total += data.getbuffer().nbytes
        # An instance sent as stored, from its file (sending.StoredFile): pynetdicom 3.0 keeps
        # (path, where the data set begins) and reads it a PDU at a time.
        stored = getattr(event.message, "_data_set_path", None)
        if isinstance(stored, tuple) and len(stored) == 2:
            with contextlib.suppress(OSError):
                self.total += os.stat(stored[0]).st_size - int(stored[1])


@dataclass
class Retrieval:
    accepted: set[tuple[str, str]] = field(default_factory=set)  # (SOP Class, syntax) to send
    reached: bool = False  # a C-MOVE sub-association was established (a C-GET's always is)
    responses: list[int] = field(default_factory=list)  # C-STORE-RSP statuses, in order
    sent: list[str] = field(default_factory=list)  # study/series/instance stored by the peer
    nbytes: BytesSent = field(default_factory=BytesSent)  # on the (sub-)association
    completed: int = 0
    warning: int = 0
    failed: int = 0
    # Of those failed, the ones the archive could not read or convert (not the peer's doing).
    unsent: int = 0
    final: int | None = None  # a final status the handler answered itself (failure, cancel)
    finished: bool = False  # every sub-operation done
    # The association the C-STOREs go over (the C-MOVE sub-association once established, the
    # C-GET association), for `lost`.
    association: Any = None

    def lost(self) -> bool:
        """Whether the association the C-STOREs go over can carry no more: aborted (a DIMSE
        timeout), or its connection gone (a send the peer stopped taking, or a cut: PS3.8
        Sta1, which pynetdicom's association thread may not have seen yet). Each remaining
        sub-operation then fails at once, its instance not read (PS3.4 C.4.2.3, C.4.3.2:
        counted failed, listed in the Failed SOP Instance UID List). Found by review: the
        next C-STORE, queued before the association's thread saw the loss, waited the whole
        DIMSE timeout for a response that could not come. So once the peer has asked to
        release it (release.py): no C-STORE-RSP can come any more (PS3.8 7.2.2)."""
        assoc = self.association
        if assoc is None:
            return False
        state = getattr(getattr(assoc.dul, "state_machine", None), "current_state", "Sta6")
        return not assoc.is_established or state != "Sta6" or release_requested(assoc)

    def on_response(self, event: Event) -> None:
        """EVT_DIMSE_RECV (in the thread that receives; each C-STORE-RSP before pynetdicom's
        send_c_store returns it)."""
        if isinstance(event.message, C_STORE_RSP):
            self.responses.append(int(event.message.command_set.Status))

    def count(self, path: str, answered: list[int]) -> None:
        """One sub-operation done: `answered` holds the C-STORE-RSP received for it, none when
        it failed before it was sent. Statuses as pynetdicom classes them (PS3.4 B.2.3)."""
        kind = STORAGE_SERVICE_CLASS_STATUS.get(answered[-1], ("",))[0] if answered else ""
        if kind == STATUS_SUCCESS:
            self.completed += 1
            self.sent.append(path)
        elif kind == STATUS_WARNING:
            self.warning += 1
            self.sent.append(path)
        else:
            self.failed += 1

    def cancel(self) -> None:
        self.final = CANCEL

    def outcome(self, total: int) -> int:
        if self.final is not None:
            return self.final
        if not self.finished:
            return UNFINISHED
        if not self.failed and not self.warning:
            return 0x0000
        # PS3.4 C.4.2.1.5 / C.4.3.1.4: every sub-operation failed, else some failed or warned.
        return CANNOT_PERFORM if self.failed == total else SOME_FAILED

    def summary(self, total: int) -> str:
        text = (
            f"matched={total} completed={self.completed} warning={self.warning}"
            f" failed={self.failed}"
        )
        return text if self.reached or not total else f"{text} destination not reached"
