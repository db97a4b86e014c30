"""The Application Entity: its presentation contexts, limits and lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    register_uid,
    uid_to_service_class,
)
from pynetdicom.transport import AssociationServer, AssociationSocket

from dicomweb_server.auditlog import AuditLog
from dicomweb_server.config import DICOMWEB_ROOT, Settings
from dicomweb_server.dimse.admission import Admission, PduLate, recv_before
from dicomweb_server.dimse.association import bound_socket_waits, idle_both_ways, never_idle
from dicomweb_server.dimse.handlers import QUERY_RETRIEVE_SOP_CLASSES, Handlers
from dicomweb_server.dimse.peers import load_peers
from dicomweb_server.dimse.sending import send_stored_files
from dicomweb_server.ingest import Services

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "DIMSE_CONNECTION_TIMEOUT_S",
    "DIMSE_DIMSE_TIMEOUT_S",
    "DIMSE_MAX_PDU_BYTES",
    "DIMSE_NETWORK_TIMEOUT_S",
    "BoundedSocket",
    "DimseServer",
    "UnreachableDestination",
    "abort_undecodable",
    "bound_pdu_length",
    "drop_data_after_the_end",
    "end_with_the_connection",
    "serve_dimse",
]

log = logging.getLogger(__name__)

# Seconds without any traffic, sent or received, after which an association is aborted
# (idle_both_ways; never a C-MOVE sub-association's: never_idle); and
# the longest a socket send or a PDU's read may make no progress (bound_socket_waits): a
# peer that stops reading, a C-MOVE destination or a C-GET requestor, or stops sending
# halfway through a PDU.
DIMSE_NETWORK_TIMEOUT_S = 60
# Seconds to wait for a DIMSE message (e.g. the C-STORE-RSP of a move destination).
DIMSE_DIMSE_TIMEOUT_S = 120
# Seconds to wait for an A-ASSOCIATE/A-RELEASE answer.
DIMSE_ACSE_TIMEOUT_S = 30
# Seconds a C-MOVE sub-association's TCP connection may take to be set up: pynetdicom's
# default is none, and a destination host that drops the SYNs (down, firewalled, its
# listen queue full) held the C-MOVE for the system's SYN retries (127 s on Linux).
DIMSE_CONNECTION_TIMEOUT_S = 10
# Bytes of the longest PDU read: a longer one closes the connection before its body is read.
# pynetdicom reads a PDU whole into memory, whatever length its header announces; ours is
# far above what peers send (the archive announces a Maximum Length of 16382 bytes, PS3.8
# D.1; dcmtk's largest is 131072), so that a peer that ignores it is still served.
DIMSE_MAX_PDU_BYTES = 4 * 1024 * 1024
# Seconds between two looks at whether an association's DUL thread still runs, while the
# association's own thread waits for the association request (end_with_the_connection).
DUL_ENDED_POLL_S = 0.05


# Transfer syntaxes accepted for storage, in order of preference: pynetdicom, as acceptor, picks
# the first of this list that the requestor proposed in a presentation context (PS3.8 9.3.3.2
# leaves the choice to the acceptor). Explicit VR first, then lossless compression (kept as
# received, never decoded), then the rest of what pynetdicom knows (implicit VR, deflated,
# big endian, lossy and video syntaxes), so that a context offering several gets the data
# the most faithfully and nothing is refused for its transfer syntax.
PREFERRED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
)
ACCEPTED_TRANSFER_SYNTAXES = tuple(
    dict.fromkeys((*PREFERRED_TRANSFER_SYNTAXES, *ALL_TRANSFER_SYNTAXES))
)


class PduRefused(OSError):
    """A PDU longer than DIMSE_MAX_PDU_BYTES announced: BoundedSocket read no further."""


class _QuietRefusals(logging.Filter):
    """pynetdicom's DUL logs a recv that raised as an ERROR ("Connection closed before the
    entire PDU was received") and then its traceback. For a PDU the archive refused that said
    nothing BoundedSocket's one WARNING had not, in 8 lines per connection, so a peer could
    fill the log with them. Those two records are dropped: the message only when the DUL's
    thread has just been refused (a TCP cut mid-PDU still logs it), the traceback when its
    exception is PduRefused."""

    def __init__(self) -> None:
        super().__init__()
        self._refused = threading.local()

    def refusing(self) -> None:
        self._refused.now = True

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self._refused, "now", False):
            return True
        if record.exc_info is not None and isinstance(record.exc_info[1], PduRefused):
            self._refused.now = False
            return False
        return record.getMessage() != "Connection closed before the entire PDU was received"


_QUIET = _QuietRefusals()


class BoundedSocket(AssociationSocket):
    """An acceptor's socket that refuses to read a PDU longer than DIMSE_MAX_PDU_BYTES.

    pynetdicom's DUL reads a PDU's 6-byte header, then `recv(length)` of the length it
    announces, into one buffer. Found by review: a peer announcing an A-ASSOCIATE-RQ of 2 GiB
    and sending 300 MiB grew the server by 310 MB, before the calling AE title was even read.
    The error makes the DUL treat the connection as closed (PS3.8 Evt17); `refused` says why,
    for the audit trail (connections.py).

    While `pdu_deadline` is set (the PDU being read, admission.Admission.pdu_deadline), a
    read still waiting at that time (time.monotonic()) fails the same way, `late` set."""

    refused: str | None = None
    pdu_deadline: float | None = None
    pdu_deadline_s: float = 0.0  # the seconds the deadline gives a PDU (for `refused`)
    late: bool = False

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > DIMSE_MAX_PDU_BYTES:
            log.warning("DIMSE: a PDU of %d bytes announced; connection closed", nr_bytes)
            self.refused = (
                f"a PDU of {nr_bytes} bytes announced, more than DIMSE_MAX_PDU_BYTES"
                f" ({DIMSE_MAX_PDU_BYTES})"
            )
            _QUIET.refusing()
            raise PduRefused(self.refused)
        if self.pdu_deadline is None or self.socket is None:
            return super().recv(nr_bytes)
        try:
            return recv_before(self.socket, nr_bytes, self.pdu_deadline)
        except PduLate:
            self.late = True
            self.refused = (
                f"a PDU not received whole within {self.pdu_deadline_s:g} s of its first byte"
                " (DIMSE_PDU_DEADLINE_S)"
            )
            _QUIET.refusing()
            raise PduRefused(self.refused) from None


def bound_pdu_length(event: Event) -> None:
    """EVT_CONN_OPEN of an accepted connection, before the first PDU is read: its socket
    becomes a BoundedSocket (the same object, only recv guarded)."""
    sock = event.assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = BoundedSocket


def abort_undecodable(event: Event) -> None:
    """EVT_CONN_OPEN of an accepted connection: a P-DATA-TF whose message pynetdicom cannot
    decode is an invalid PDU (PS3.8 9.2, Evt19: A-ABORT, AA-8), as for one it cannot parse.

    pynetdicom decodes a message's command as its fragments arrive, in the state machine's
    action for a P-DATA-TF (DT-2). A command it cannot take (a Command Field it does not
    know, a C-STORE on a presentation context ID never accepted) raised out of that action
    and ended the DUL thread: no A-ABORT, no EVT_CONN_CLOSE, the connection closed by the
    association's thread. Found by review: such an association left no audit row
    (connections.py writes it on EVT_CONN_CLOSE) and its C-STORE's spool file stayed in the
    temporary directory. Now the DUL goes on as for Evt19, and the association ends as any
    other the archive aborts."""
    dul = event.assoc.dul
    machine = dul.state_machine
    act = machine.do_action

    def do_action(fsm_event: str) -> None:
        try:
            act(fsm_event)
        except Exception:
            if fsm_event != "Evt10":  # only DT-2 decodes what the peer sent
                raise
            log.warning("DIMSE: a P-DATA-TF it could not decode: association aborted",
                        exc_info=True)  # fmt: skip
            dul._kill_thread = False  # do_action stopped the reactor before re-raising
            act("Evt19")

    machine.do_action = do_action  # type: ignore[method-assign,assignment]


def drop_data_after_the_end(event: Event) -> None:
    """EVT_CONN_OPEN of an accepted connection: a P-DATA request (PS3.8 Evt9, a message the
    association's thread sends) that comes to the DUL once the association no longer exists
    (Sta13, the archive's A-ABORT sent; Sta1, the connection closed) is dropped, as nothing
    can carry it.

    The archive aborts an association for a limit from a thread of its own
    (connections.Connections._abort_too_large), and the association's thread may be serving
    a request meanwhile: its answer came to the DUL after the A-ABORT, in Sta13, which the
    state table has no P-DATA request for, and pynetdicom (3.0) raised InvalidEventError out
    of the DUL thread, which ended there: no EVT_CONN_CLOSE (the abort never audited, the
    connection never closed by the archive). Found chasing a flaky test: a peer flooding
    C-ECHO-RQs, still sending when the archive aborted it (pynetdicom reads on in Sta13
    while there is something to read, and closes the connection after)."""
    dul = event.assoc.dul
    machine = dul.state_machine
    act = machine.do_action

    def do_action(fsm_event: str) -> None:
        if fsm_event == "Evt9" and (fsm_event, machine.current_state) not in TRANSITION_TABLE:
            # What the action for it would have taken: the primitive at the queue's head
            # (DULServiceProvider._process_recv_primitive reads it there).
            with contextlib.suppress(queue.Empty):
                dul.to_provider_queue.get(block=False)
            log.info("DIMSE: a message to send after the association ended: dropped")
            return
        act(fsm_event)

    machine.do_action = do_action  # type: ignore[method-assign,assignment]


def end_with_the_connection(event: Event) -> None:
    """EVT_CONN_OPEN of an accepted connection, before its association's thread starts: that
    thread stops waiting for the association request once the connection has closed.

    The association's thread waits for the A-ASSOCIATE indication up to the ACSE timeout
    (30 s; Association.run_reactor, pynetdicom 3.0), and only the DUL thread, which reads the
    connection, can give it one. When the connection closes first, the DUL ends without a
    word to it: a close awaiting the request (PS3.8 Sta2 + Evt17, AA-5: a first PDU over
    DIMSE_MAX_PDU_BYTES, a port probe), an A-ABORT received or an unreadable first PDU
    answered with one (AA-2, AA-1 then AR-5), a request refused by the DUL itself (AE-6, an
    unsupported protocol version). The thread still counts as an association, and so held
    one of DIMSE_MAX_ASSOCIATIONS for 30 s after the connection was gone (found by review:
    two peers each sending a PDU header over the limit kept a modality out for 30 s with a
    limit of 2). Here the wait ends as the ACSE timeout would, with nothing received, as
    soon as the DUL thread has ended with nothing queued for it: nothing can come after.
    That path (kill, the socket shut) audits nothing; the connection was audited when it
    closed (connections.py). The wait is taken in slices of DUL_ENDED_POLL_S; the ACSE
    timeout still bounds it (a connection open and silent is closed at 30 s)."""
    dul = event.assoc.dul
    receive = dul.receive_pdu

    def receive_pdu(wait: bool = False, timeout: float | None = None) -> Any:
        if not wait:
            return receive(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Read before the queue: what the DUL queued before it ended is then there.
            ended = dul.ident is not None and not dul.is_alive()
            left = DUL_ENDED_POLL_S
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
            if ended or left <= 0:
                return receive(wait=False)
            primitive = receive(wait=True, timeout=left)
            if primitive is not None:
                return primitive

    dul.receive_pdu = receive_pdu  # type: ignore[method-assign]


class _ArchiveAE(AE):
    """The archive's Application Entity. Its only outgoing associations are C-MOVE
    sub-associations, which pynetdicom's Move SCP opens with this method: their socket's
    waits bounded as an accepted one's (bound_socket_waits), and a message to send once the
    connection is gone dropped (drop_data_after_the_end: the destination's connection lost
    while a C-STORE was being queued, pynetdicom's DUL raised InvalidEventError on the rest
    of it and its thread ended with a traceback)."""

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["evt_handlers"] = [
            *kwargs.get("evt_handlers", ()),
            (evt.EVT_CONN_OPEN, bound_socket_waits),
            (evt.EVT_CONN_OPEN, drop_data_after_the_end),
        ]
        assoc = super().associate(*args, **kwargs)
        if not assoc.is_established:
            return UnreachableDestination(assoc)
        never_idle(assoc)
        send_stored_files(assoc)
        return assoc


class UnreachableDestination:
    """Stands in for a C-MOVE sub-association that could not be established: the destination
    rejected it, accepted none of its presentation contexts, or could not be reached.

    pynetdicom's Move SCP answers any of these 0xA801, Move Destination Unknown, with no
    counts, and before the identifier was even read (a refused one got 0xA801 too). The
    destination is known, though: handed this stand-in, pynetdicom goes on, every C-STORE
    sub-operation fails here before sending anything, and the answer is 0xA702 (Unable to
    perform sub-operations, PS3.4 C.4.2.1.5) with each one counted failed and listed in the
    Failed SOP Instance UID List, which is what dcmtk's dcmqrscp answers. Found by review."""

    is_established = True  # to pynetdicom, which then sends each sub-operation here

    def __init__(self, failed: Association) -> None:
        self._failed = failed
        if failed.is_rejected:
            self.reason = "rejected the association"
        elif failed.rejected_contexts and not failed.accepted_contexts:
            self.reason = "accepted none of the presentation contexts"  # pynetdicom aborted
        else:
            self.reason = "could not be reached"

    def send_c_store(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ConnectionError(f"the C-MOVE destination {self.reason}")

    def release(self) -> None:
        """What pynetdicom does with an association that failed: close its socket (the raw
        one too, which AssociationSocket.close leaves open when it never connected; after a
        refused connection pynetdicom has already dropped it, unclosed)."""
        sock = self._failed.dul.socket
        raw = getattr(sock, "socket", None)
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.close()
            if raw is not None:
                raw.close()


@dataclass(frozen=True)
class DimseServer:
    ae: AE
    port: int  # the port bound (useful when 0 asked for any free one)
    server: AssociationServer  # the listener: its bind() reaches every association it accepts


# Storage SOP classes of patient objects pynetdicom's AllStoragePresentationContexts leaves
# out (pynetdicom 3.0), accepted too: retired ones older modalities still send (PS3.6 Table
# A-1 marks them retired), and newer ones (DICOS, DICONDE). Found by comparing with STOW-RS,
# which stores any SOP class: an Ultrasound Image Storage (retired) instance was refused over
# DIMSE (no presentation context). Registered with pynetdicom's Storage service (it aborts
# an association whose C-STORE names a SOP class it has no service for). Not the non-patient
# objects (Hanging Protocol, Color Palette, implant templates, protocols, inventories: no
# Study Instance UID to file them under, PS3.4 GG), DICOMDIR (Media Storage Directory, a
# file format) nor Storage Commitment (N-ACTION, not C-STORE).
EXTRA_STORAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.1.27",  # Stored Print Storage (retired)
    "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image Storage (retired)
    "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.8",  # Standalone Overlay Storage (retired)
    "1.2.840.10008.5.1.4.1.1.9",  # Standalone Curve Storage (retired)
    "1.2.840.10008.5.1.4.1.1.9.1",  # Waveform Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.10",  # Standalone Modality LUT Storage (retired)
    "1.2.840.10008.5.1.4.1.1.11",  # Standalone VOI LUT Storage (retired)
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.88.1",  # Text SR Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.88.2",  # Audio SR Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.88.3",  # Detail SR Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.88.4",  # Comprehensive SR Storage - Trial (retired)
    "1.2.840.10008.5.1.4.1.1.129",  # Standalone PET Curve Storage (retired)
    "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image Storage
    "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.501.3",  # DICOS Threat Detection Report Storage
    "1.2.840.10008.5.1.4.1.1.501.4",  # DICOS 2D AIT Storage
    "1.2.840.10008.5.1.4.1.1.501.5",  # DICOS 3D AIT Storage
    "1.2.840.10008.5.1.4.1.1.501.6",  # DICOS Quadrupole Resonance (QR) Storage
    "1.2.840.10008.5.1.4.1.1.601.1",  # Eddy Current Image Storage
    "1.2.840.10008.5.1.4.1.1.601.2",  # Eddy Current Multi-frame Image Storage
    "1.2.840.10008.5.1.4.34.1",  # RT Beams Delivery Instruction Storage - Trial (retired)
)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class the archive accepts C-STOREs of, in both roles; the extra
    ones registered with pynetdicom's Storage service (idempotent)."""
    listed = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    extra = [uid for uid in EXTRA_STORAGE_SOP_CLASSES if uid not in listed]
    for uid in extra:
        if uid_to_service_class(uid) is not StorageServiceClass:
            # A pydicom that does not know the UID gives no keyword: one made of the UID.
            keyword = UID(uid).keyword or "Storage_" + uid.replace(".", "_")
            register_uid(uid, keyword, StorageServiceClass)
    return listed + extra


def build_ae(settings: Settings) -> AE:
    # Received data sets are spooled to a file as they arrive, never decoded (set once per
    # process, like pydicom's config): C-STORE stores the bytes as received, and a large
    # instance never sits in memory.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # And an instance sent as stored (C-GET, C-MOVE) goes from its file, a PDU at a time
    # (sending.StoredFile), not encoded whole in memory first.
    _config.STORE_SEND_CHUNKED_DATASET = True
    # A request's identifier is decoded by the handlers only (identifier.decode: whole
    # elements, a Deflated one inflated no further than DIMSE_MAX_IDENTIFIER_BYTES). pynetdicom
    # would decode it first to log it, inflating a Deflated one whole, unbounded (found by
    # review: 389 KB sent inflated to 400 MB before the handler answered 0xC000).
    _config.LOG_REQUEST_IDENTIFIERS = False
    ae = _ArchiveAE(ae_title=settings.ae_title)
    # The association limits are the archive's (admission.Admission, settings
    # dimse_max_associations and dimse_max_associations_per_peer), which count associations
    # let in; pynetdicom's counts every connection accepted, the ones still sending their
    # request too (a slow-loris filled it), and is set where it never rejects.
    ae.maximum_associations = sys.maxsize
    ae.require_calling_aet = list(settings.dimse_allowed_aes or ())
    # Called AE title not checked: SCUs often send a default (dcmtk "ANY-SCP").
    ae.require_called_aet = False
    ae.network_timeout = DIMSE_NETWORK_TIMEOUT_S
    ae.dimse_timeout = DIMSE_DIMSE_TIMEOUT_S
    ae.acse_timeout = DIMSE_ACSE_TIMEOUT_S
    # These four bound every wait on a C-MOVE destination (PS3.4 C.4.2.3: its sub-operations
    # then fail, and the rest with them): connecting, its A-ASSOCIATE answer, each
    # C-STORE-RSP, and each send it stops taking or PDU it stops sending (bound_socket_waits).
    ae.connection_timeout = DIMSE_CONNECTION_TIMEOUT_S
    ae.add_supported_context(Verification)
    for uid in storage_sop_classes():
        # Both roles: a C-GET requestor proposes the SCP role for the storage contexts it
        # receives on (PS3.4 C.4.3; PS3.7 D.3.3.4 role selection).
        ae.add_supported_context(
            uid, list(ACCEPTED_TRANSFER_SYNTAXES), scu_role=True, scp_role=True
        )
    for uid in QUERY_RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(uid)
    return ae


@contextlib.asynccontextmanager
async def serve_dimse(
    settings: Settings, services: Services, audit: AuditLog | None = None
) -> AsyncIterator[DimseServer | None]:
    """Run the AE while the block runs (None when no DIMSE port is configured). Handlers
    run in pynetdicom's threads and hand their work to the running event loop."""
    if settings.dimse_port is None:
        yield None
        return
    peers = load_peers(settings.dimse_peers)
    base_url = settings.public_url or f"http://{settings.host}:{settings.port}{DICOMWEB_ROOT}"
    handlers = Handlers(
        services, asyncio.get_running_loop(), settings.ae_title, peers, base_url, audit,
        max_data_set_bytes=settings.max_part_bytes,
    )  # fmt: skip
    ae = build_ae(settings)
    dul_log = logging.getLogger("pynetdicom.dul")
    if _QUIET not in dul_log.filters:
        dul_log.addFilter(_QUIET)
    admission = Admission(
        handlers.connections, settings.dimse_max_associations,
        settings.dimse_max_associations_per_peer, settings.dimse_pdu_deadline_s,
    )  # fmt: skip
    bindings = [
        *handlers.bindings(),
        (evt.EVT_CONN_OPEN, bound_socket_waits),
        (evt.EVT_PDU_SENT, idle_both_ways),
        (evt.EVT_CONN_OPEN, bound_pdu_length),
        *admission.bindings(),  # after bound_pdu_length: the deadline is BoundedSocket's
        (evt.EVT_CONN_OPEN, abort_undecodable),
        (evt.EVT_CONN_OPEN, drop_data_after_the_end),
        (evt.EVT_CONN_OPEN, end_with_the_connection),
    ]
    server = ae.start_server((settings.host, settings.dimse_port), block=False,
                             evt_handlers=bindings)  # fmt: skip
    assert server is not None
    port = int(server.server_address[1])
    log.info("DIMSE: AE %s on %s:%d, %d peers", settings.ae_title, settings.host, port, len(peers))
    try:
        yield DimseServer(ae, port, server)
    finally:
        handlers.connections.stopping = True  # the A-ABORTs to come are audited as that
        # In a thread: handlers still running wait on this loop, which must keep turning.
        await anyio.to_thread.run_sync(ae.shutdown)
