"""C-STORE requests refused before the ingest: one that is not a C-STORE of the presentation
context it came on, one without a data set, and one whose data set does not name the
request's SOP Instance; and a data set that never comes (DataSetWaits).

pynetdicom (3.0) chooses the service of a request by its Affected SOP Class UID, not by the
presentation context it came on (Association._serve_request): a C-STORE naming Verification
on a CT Image Storage context was answered with a C-ECHO-RSP, one naming a UID it knows no
service for aborted the association, and one naming MR Image Storage was stored. Every
C-STORE now reaches the Storage service (serve_every_store), whose handler refuses those
(refusal).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from weakref import WeakKeyDictionary

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicomweb_server.dicomfile import sop_uids
from dicomweb_server.dimse.statuses import DATA_SET_DOES_NOT_MATCH, SOP_CLASS_NOT_SUPPORTED, status

__all__ = ["DIMSE_DATA_SET_WAIT_S", "DataSetWaits", "command_mismatch", "serve_every_store"]

log = logging.getLogger(__name__)

# Seconds a C-STORE-RQ that announces a data set (Command Data Set Type other than 0101H,
# PS3.7 E.1) may be followed by none of its fragments, nothing else received meanwhile,
# before it is answered as one with an empty data set (0xA900). Found by review: a peer
# that sent the command and no data set (pynetdicom's send_msg with an empty one does)
# waited for the archive's network timeout, 60 s, and lost the association. A data set
# fragment that comes later is dropped, up to its last one: the association goes on. 20 s,
# not less (review): a network stall that long on a valid sender must not fail its instance
# with a status most senders take as permanent (dcmtk's storescp sets no limit, Orthanc
# aborts after 30 s), and it stays under pynetdicom's default 30 s DIMSE timeout, so such a
# requestor still gets the answer.
DIMSE_DATA_SET_WAIT_S = 20


def serve_every_store(event: Event) -> None:
    """EVT_CONN_OPEN of an accepted association: a C-STORE request goes to the Storage
    service whatever SOP Class UID it names, so that its handler answers it (refusal):
    pynetdicom would pick the service of its Affected SOP Class UID. What _serve_request
    does (pynetdicom 3.0) otherwise: the C-CANCELs received before cleared, the reactor
    paused while it serves, an exception ending the association."""
    assoc = event.assoc
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if (
            not isinstance(msg, C_STORE)
            or context is None  # pynetdicom aborts it
            or assoc._sent_release  # pynetdicom ignores it
            or not msg.is_valid_request
            or uid_to_service_class(str(msg.AffectedSOPClassUID)) is StorageServiceClass
        ):
            serve(msg, context_id)
            return
        assoc.dimse.cancel_req = {}
        assoc._is_paused = True
        try:
            StorageServiceClass(assoc).SCP(msg, context)
        except Exception:
            log.exception("DIMSE: C-STORE of SOP Class %s failed", msg.AffectedSOPClassUID)
            assoc.abort()
            return
        assoc._is_paused = False
        assoc.dimse.cancel_req = {}

    assoc._serve_request = serve_request  # type: ignore[method-assign]


def refusal(event: Event, never_came: bool) -> Dataset | None:
    """The status answering a C-STORE that is not stored, or None to store it.

    - its Affected SOP Class UID is not the abstract syntax of its presentation context, or
      not a storage SOP class: 0x0122, Refused: SOP Class not supported (PS3.7 9.1.1.1.9,
      Annex C). Each SOP Class is used over a presentation context of its own abstract
      syntax (PS3.7 D.3.2; PS3.4 B.3: one per supported Storage SOP Class); pynetdicom 1.x
      answered 0x0122 to the same. dcmtk's storescp stores it.
    - no data set (Command Data Set Type 0101H, where a C-STORE-RQ has one, PS3.7 9.3.1.1),
      an empty one, or none within DIMSE_DATA_SET_WAIT_S (`never_came`): 0xA900, Data Set
      does not match SOP Class (PS3.4 B.2.3).
    - its data set's SOP Class or Instance UID is not the request's: 0xA900 (command_mismatch).
    """
    request = cast(C_STORE, event.request)
    sop_class, context = str(request.AffectedSOPClassUID), event.context
    if sop_class != str(context.abstract_syntax):
        return status(
            SOP_CLASS_NOT_SUPPORTED,
            f"SOP Class {sop_class} not negotiated on context {context.context_id}",
        )
    if uid_to_service_class(sop_class) is not StorageServiceClass:
        return status(SOP_CLASS_NOT_SUPPORTED, f"{sop_class} is not a storage SOP Class")
    path: Path | None = event.dataset_path
    if path is None:
        return status(DATA_SET_DOES_NOT_MATCH, "no data set: Command Data Set Type 0101H")
    if never_came:
        return status(
            DATA_SET_DOES_NOT_MATCH,
            f"no data set within {DIMSE_DATA_SET_WAIT_S} s of the command",
        )
    try:
        _meta, offset = split_dataset(path)
        empty = path.stat().st_size <= offset
    except Exception:  # unreadable: the ingest says why
        empty = False
    if empty:
        return status(DATA_SET_DOES_NOT_MATCH, "the data set is empty (0 bytes)")
    mismatch = command_mismatch(path, request)
    return status(DATA_SET_DOES_NOT_MATCH, mismatch) if mismatch else None


def command_mismatch(path: Path, request: C_STORE) -> str | None:
    """Why the data set's SOP Class/Instance UIDs differ from the C-STORE request's Affected
    ones (PS3.7 9.1.1.1; PS3.3 C.12.1.1.1: they shall be equal), or None. The stored file's
    meta header is built from the request, so a mismatch would make an inconsistent Part-10
    file. Unreadable headers are left to the ingest, which reports them."""
    try:
        sent = sop_uids(path)  # a Deflated data set not inflated whole (found by review)
    except Exception:
        return None
    expected = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
    for name, got, want in zip(("SOPClassUID", "SOPInstanceUID"), sent, expected, strict=True):
        if got and got != want:
            return f"{name} {got} is not the Affected {name} of the request ({want})"
    return None


@dataclass
class _Wait:
    """One association's C-STORE-RQ awaiting its data set. Read and written in its DUL
    thread only, but for `never_came`, under `lock`, which the handler reads."""

    command_at: float | None = None  # when the last command fragment came, no data since
    dropping: bool = False  # the data set given up on: its fragments dropped
    never_came: set[Path] = field(default_factory=set)  # spool files completed empty here
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class DataSetWaits:
    """A C-STORE-RQ whose data set does not begin within DIMSE_DATA_SET_WAIT_S is completed
    with an empty data set, in the DUL thread that decodes what the peer sends (as a last
    data set fragment of no bytes would, PS3.8 E.2), and refused (refusal, `never_came`)."""

    _waits: WeakKeyDictionary[Any, _Wait] = field(default_factory=WeakKeyDictionary)

    def bindings(self) -> list[EventHandlerType]:
        """Before connections.Connections.limit_data_set: what is dropped is not counted."""
        return [(evt.EVT_CONN_OPEN, self.watch), (evt.EVT_PDU_RECV, self.received)]

    def never_came(self, event: Event) -> bool:
        """Whether this C-STORE's data set was completed empty here (once)."""
        wait = self._waits.get(event.assoc)
        if wait is None or event.dataset_path is None:
            return False
        with wait.lock:
            if event.dataset_path not in wait.never_came:
                return False
            wait.never_came.discard(event.dataset_path)
            return True

    def watch(self, event: Event) -> None:
        """EVT_CONN_OPEN: the DUL thread looks at the wait each time it finds nothing to
        read (DULServiceProvider._is_transport_event, pynetdicom 3.0, every turn of its
        loop)."""
        wait = self._waits[event.assoc] = _Wait()
        dul = event.assoc.dul
        transport_event = dul._is_transport_event

        def is_transport_event() -> bool:
            if transport_event():
                return True
            if wait.command_at is not None and (
                time.monotonic() - wait.command_at >= DIMSE_DATA_SET_WAIT_S
            ):
                wait.command_at = None
                _complete_empty(dul, wait)
            return False

        dul._is_transport_event = is_transport_event  # type: ignore[method-assign]

    def received(self, event: Event) -> None:
        """EVT_PDU_RECV, in the DUL thread, before the PDU is decoded: when a command ends
        (its data set, if any, comes next), when a data set fragment comes; the fragments of
        a data set given up on dropped."""
        pdu = event.pdu
        wait = self._waits.get(event.assoc)
        if not isinstance(pdu, P_DATA_TF) or wait is None:
            return
        items = pdu.presentation_data_value_items
        kept = []
        for pdv in items:
            header = (pdv.presentation_data_value or b"\x00")[0]
            if header & 1:  # a command fragment: a new message
                wait.dropping = False
                wait.command_at = time.monotonic() if header & 2 else None
                kept.append(pdv)
            elif wait.dropping:  # the data set answered as never come
                wait.dropping = not header & 2
            else:
                wait.command_at = None
                kept.append(pdv)
        if len(kept) != len(items):
            items[:] = kept


def _complete_empty(dul: Any, wait: _Wait) -> None:
    """In the DUL thread: the C-STORE-RQ being received, if its data set has not begun,
    completed with a last data set fragment of no bytes, as if the peer had sent it, so
    that it is served (and refused); what the peer sends of its data set later is dropped."""
    message = getattr(dul.assoc.dimse, "message", None)
    spool = getattr(message, "_data_set_path", None)
    if (
        not isinstance(message, C_STORE_RQ)
        or spool is None
        or dul.state_machine.current_state != "Sta6"
        or message.context_id is None
    ):
        return
    log.warning(
        "DIMSE: no data set within %s s of the C-STORE-RQ of %s: answered as empty",
        DIMSE_DATA_SET_WAIT_S,
        message.command_set.get("AffectedSOPInstanceUID", ""),
    )
    with wait.lock:
        wait.never_came.add(Path(spool))
    wait.dropping = True
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((message.context_id, b"\x02"))
    dul.assoc.dimse.receive_primitive(primitive)
