"""Each connection the AE accepts, as the audit trail sees it: the size limit of the data
set it is receiving, how it ended, and the C-STOREs it left unserved.

pynetdicom tells its handlers about services, not about associations that go wrong: a
rejected request, an A-ABORT, a cut connection or a C-STORE whose data set never completed
left no trace in the audit trail. Each connection's DUL thread, the one that reads and writes
its PDUs, sees all of it, in order: the PDU events (EVT_PDU_RECV, EVT_PDU_SENT) note what
was asked and answered, and EVT_CONN_CLOSE, its last event (pynetdicom triggers it once, when
the state machine closes the connection), writes what it came to. C-STOREs received whole
but still queued are counted when the association's own thread has stopped serving
(EVT_ABORTED, EVT_RELEASED), as discard_unserved_stores deletes their files:

- `dimse_associate`: an association request the archive did not turn into a usable
  association. Rejected (A-ASSOCIATE-RJ: a calling AE title not allowed, an association
  limit, admission.py), accepted with every presentation context refused (pynetdicom never
  rejects an association for its contexts, PS3.8 9.3.3.2; the requestor then aborts or drops
  it), or never answered (its first PDU longer than DIMSE_MAX_PDU_BYTES, or not whole within
  DIMSE_PDU_DEADLINE_S, or not an A-ASSOCIATE-RQ).
- `dimse_abort`: an established association that ended without A-RELEASE: an A-ABORT from
  the peer or from the archive (a data set over MAX_PART_BYTES, the network timeout, a PDU
  not whole within DIMSE_PDU_DEADLINE_S, a protocol error, shutdown), or a connection closed
  without either (a cut, or a PDU over DIMSE_MAX_PDU_BYTES).
- `dimse_store` with UNFINISHED (0xFF00) for each C-STORE the association ended before it was
  served: its data set still arriving (EVT_CONN_CLOSE), or received whole and not yet handed
  to the handler (EVT_ABORTED, EVT_RELEASED). When the peer ends the association, pynetdicom
  triggers these in the association's thread once it serves nothing more: what it served
  was served. When the archive aborts it (another thread), one it takes up afterwards is not
  served (claim), so that none is both stored and audited as unserved.

A connection that never sends a PDU (a port probe, a health check) is not audited.

The outcome of an association row is the PDU that refused or ended it, as PS3.8 encodes it:
its PDU type, then its result, source and reason bytes (0x03RRSSDD an A-ASSOCIATE-RJ, Table
9-21; 0x0700SSDD an A-ABORT received or sent, Table 9-26; 0x020000DD an A-ASSOCIATE-AC that
accepted no presentation context, DD the result of the first, Table 9-18). A connection that
ended with no such PDU ended in an A-P-ABORT (PS3.8 7.4, AA-4/AA-5): 0x07000200, service
provider, reason not specified. Never 0, so never a success.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from weakref import WeakKeyDictionary

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_items import PresentationDataValueItem

from dicomweb_server.audit import OVER_LIMIT, AuditEvent
from dicomweb_server.dimse.statuses import OUT_OF_RESOURCES, UNFINISHED

__all__ = [
    "DIMSE_MAX_COMMAND_BYTES",
    "DIMSE_MAX_IDENTIFIER_BYTES",
    "DIMSE_MAX_QUEUED_REQUESTS",
    "LOST",
    "Connections",
    "Link",
]

log = logging.getLogger(__name__)

# Bytes of one message's command set, and of a data set pynetdicom keeps in memory (a C-FIND,
# C-GET or C-MOVE identifier: only a C-STORE's data set is spooled to a file), past which the
# association is aborted. Found by fuzzing: command fragments were not counted at all and
# identifiers only against DICOMWEB_MAX_PART_BYTES (4 GiB); a peer streaming 300 MB of either
# grew the server by 300 MB, the association still up. A command set is a few hundred bytes
# (PS3.7 E.1); an identifier listing 1000 UIDs (identifier.py's list limit) about 66 KB.
DIMSE_MAX_COMMAND_BYTES = 64 * 1024
DIMSE_MAX_IDENTIFIER_BYTES = 4 * 1024 * 1024
# Requests received whole and queued unanswered for the association's thread, past which a
# P-DATA-TF aborts the association. Without an asynchronous operations window (the archive
# negotiates none) a peer may have one operation outstanding (PS3.7 D.3.3.3); one sending
# C-ECHO-RQs without reading the answers had pynetdicom queue each, its memory growing for as
# long as it went on (the byte limits count identifiers only). At most one P-DATA-TF's
# messages more are queued (a PDU is at most DIMSE_MAX_PDU_BYTES).
DIMSE_MAX_QUEUED_REQUESTS = 16

# PS3.8 Table 9-21: A-ASSOCIATE-RJ Result, Source and Reason/Diag.
_RESULTS = {1: "permanent", 2: "transient"}
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
# PS3.8 Table 9-26: A-ABORT Reason/Diag. of a service-provider abort (source 2).
_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}
# PS3.8 Table 9-18: Result/Reason of a presentation context the acceptor refused.
_CONTEXT_RESULTS = {
    1: "user rejection",
    2: "no reason",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}
# The outcome of a connection that ended without an A-ABORT: an A-P-ABORT (service provider,
# reason not specified).
LOST = 0x07 << 24 | 2 << 8


def _over(count: int, limit: int, what: str) -> str | None:
    """Why `count` bytes of `what` pass `limit` (the held text of Link), else None; "" for a
    spooled data set (over max_data_set_bytes)."""
    if count <= limit:
        return None
    constant = "DIMSE_MAX_COMMAND_BYTES" if "command" in what else "DIMSE_MAX_IDENTIFIER_BYTES"
    return f"{what} of more than {limit} bytes ({constant})" if what else ""


def _queued_requests(assoc: Any) -> tuple[int, int]:
    """The requests pynetdicom received whole and queued for the association's thread, which
    serves one at a time (DIMSEServiceProvider.msg_queue, pynetdicom 3.0): how many (see
    DIMSE_MAX_QUEUED_REQUESTS), and the bytes of their identifiers. A peer that does not wait
    for each response (PS3.7 D.3.3.3: one operation outstanding without an asynchronous
    operations window) had them pile up in memory, each identifier within
    DIMSE_MAX_IDENTIFIER_BYTES (found by review). A C-STORE's data set is in its spool file."""
    msg_queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if msg_queue is None:
        return 0, 0
    with msg_queue.mutex:
        queued = list(msg_queue.queue)
    held = [getattr(primitive, "Identifier", None) for _cx, primitive in queued]
    nbytes = sum(len(value.getbuffer()) for value in held if isinstance(value, io.BytesIO))
    return len(queued), nbytes


def _rejected(result: int, source: int, reason: int) -> int:
    return 0x03 << 24 | result << 16 | source << 8 | reason


def _aborted(source: int, reason: int) -> int:
    return 0x07 << 24 | source << 8 | reason


@dataclass
class Link:
    """One connection. Written in its DUL thread, except `ending` and `unserved`, under
    `lock`, which the C-STORE handler reads in the association's thread."""

    client: str
    calling: str | None = None  # the A-ASSOCIATE-RQ's Calling AE Title, once one was read
    answer: tuple[int, str] | None = None  # an A-ASSOCIATE-RJ, or an AC accepting nothing
    accepted: bool = False  # an A-ASSOCIATE-AC accepting some context was sent
    released: bool = False  # the peer asked for A-RELEASE
    end: tuple[int, str] | None = None  # the first A-ABORT received or sent: outcome, how
    why: str = ""  # why the archive aborts it, said before its A-ABORT is sent
    receiving: int = 0  # bytes of the data set being received
    commanding: int = 0  # bytes of the command set being received
    held: str = ""  # the in-memory limit (command set, identifier) passed, if one was
    limit: str = ""  # the association limit its request passed (admission.py), if it did
    # The data set being received passed max_data_set_bytes: the association is aborted for
    # it, and it never completes (what the peer sends on is dropped, limit_data_set).
    too_large: bool = False
    closed: bool = False  # its connection closed
    ending: bool = False  # C-STOREs not yet begun will not be served
    unserved: list[Any] = field(default_factory=list)  # C-STORE requests audited unserved
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def caller(self) -> str:
        return f"ae:{self.calling}" if self.calling is not None else "-"

    def how(self) -> tuple[int, str]:
        """How it ended, once closed: its A-ABORT, else how its connection closed."""
        if self.end is not None:
            return self.end
        if self.released:
            return 0x0000, "released by the peer"
        if not self.closed and self.why:  # the archive's A-ABORT is on its way
            return _aborted(0, 0), f"aborted by the archive: {self.why}"
        return LOST, "connection closed without A-RELEASE or A-ABORT"


@dataclass
class Connections:
    """The bindings that keep a Link per accepted connection and write its audit events
    with `record`, which hands them to the server's event loop (waiting only while the
    audit queue is full, as for every DIMSE event)."""

    record: Callable[[AuditEvent], None]
    max_data_set_bytes: int  # a C-STORE data set larger is aborted (MAX_PART_BYTES)
    stopping: bool = False  # the AE is shutting down: its A-ABORTs are said to be that
    _links: WeakKeyDictionary[Any, Link] = field(default_factory=WeakKeyDictionary, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bindings(self) -> list[EventHandlerType]:
        """Each handler guarded (_guarded): none of them raises into pynetdicom."""
        handlers: list[tuple[Any, Callable[[Event], None]]] = [
            (evt.EVT_PDU_RECV, self.limit_data_set),
            (evt.EVT_PDU_RECV, self.received),
            (evt.EVT_PDU_SENT, self.sent),
            (evt.EVT_CONN_CLOSE, self.closed),
            (evt.EVT_ABORTED, self.ended),
            (evt.EVT_RELEASED, self.ended),
        ]
        return [(event, _guarded(handler)) for event, handler in handlers]

    def link(self, assoc: Any) -> Link:
        with self._lock:
            found = self._links.get(assoc)
            if found is None:
                found = self._links[assoc] = Link(str(assoc.requestor.address))
            return found

    def _event(self, link: Link, action: str, outcome: int, nbytes: int, detail: str) -> None:
        when = datetime.now(UTC)
        self.record(AuditEvent(when, link.caller, link.client, action, (), outcome, nbytes,
                               detail))  # fmt: skip

    # -- the data set size limit ------------------------------------------------------------

    def limit_data_set(self, event: Event) -> None:
        """EVT_PDU_RECV, in the thread that receives, before the PDU is written out: abort
        the association once the data set it is receiving passes max_data_set_bytes (found
        by review: the limit bounded STOW-RS only, and a C-STORE of any size was received
        into the temporary directory and stored). DIMSE has no status to answer before a
        data set is whole, hence A-ABORT; discard_unserved_stores deletes what was received.
        Counted from the P-DATA values, data set fragments only (PS3.8 E.2: bit 0 of the
        message control header is set for a command fragment, bit 1 for the last one).

        The PDU is decoded (DT-2) after this handler, and PDUs go on arriving until the
        A-ABORT is sent: the values from the one that passes the limit on are dropped from
        them, so that the data set never completes and is never served, and the spool file
        grows no further. Found by review: it could complete (its last PDU passing the
        limit), and was then told from the C-STOREs queued before it by its Message ID,
        which a peer may reuse (a C-STORE queued with the same one was neither served nor
        audited), and which was unknown when the command came in the same PDU (audited
        twice, 0xA700 without its SOP Instance UID, then 0xFF00)."""
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        link = self.link(event.assoc)
        items = pdu.presentation_data_value_items
        if link.too_large:
            del items[:]
            return
        if not link.ending:
            self._count_data_set(event, link, items)

    def _count_data_set(
        self, event: Event, link: Link, items: list[PresentationDataValueItem]
    ) -> None:
        """limit_data_set's count of the bytes of one P-DATA-TF's values; the values from the
        one that passes a limit on are dropped, and the association aborted. A data set is
        held to max_data_set_bytes when spooled (a C-STORE's, its command decoded), else to
        DIMSE_MAX_IDENTIFIER_BYTES with the identifiers queued unserved (_queued_requests); one
        whose command ends in this PDU (decoded after it: its kind unknown) to both."""
        size, command = link.receiving, link.commanding
        waiting, queued = _queued_requests(event.assoc)
        if waiting > DIMSE_MAX_QUEUED_REQUESTS:
            link.held = (f"more than {DIMSE_MAX_QUEUED_REQUESTS} requests queued unanswered"
                         " (DIMSE_MAX_QUEUED_REQUESTS)")  # fmt: skip
            del items[:]
            self._abort_too_large(event, link)
            return
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        spooled, unknown = getattr(message, "_data_set_file", None) is not None, False
        for n, pdv in enumerate(items):
            value = pdv.presentation_data_value or b"\x00"
            if value[0] & 1:  # a command: a message begins (or goes on)
                size, command = 0, command + len(value) - 1
                over = _over(command, DIMSE_MAX_COMMAND_BYTES, "a command set")
                if value[0] & 2:  # its data set, if any, comes after
                    command, spooled, unknown = 0, False, True
            else:
                size += len(value) - 1
                over = self._data_set_over(size, queued, spooled, unknown)
            if over is not None:  # link.receiving: the bytes audited of a C-STORE's
                link.receiving, link.commanding, link.held = size, command, over
                del items[n:]
                self._abort_too_large(event, link)
                return
            if value[0] & 3 == 2:  # a message whole, decoded after this PDU: queued then
                size, queued = 0, queued + (0 if spooled else size)
        link.receiving, link.commanding = size, command

    def _data_set_over(self, size: int, queued: int, spooled: bool, unknown: bool) -> str | None:
        """_over for `size` bytes of a data set being received (see _count_data_set)."""
        if spooled:
            return _over(size, self.max_data_set_bytes, "")
        what = "identifiers held (one arriving, others queued)" if queued else "an identifier"
        over = _over(size + queued, DIMSE_MAX_IDENTIFIER_BYTES, what)
        if over is None and unknown:
            return _over(size, self.max_data_set_bytes, "")
        return over

    def _abort_too_large(self, event: Event, link: Link) -> None:
        """Audited (0xA700) when the connection closes, the message's command decoded; one
        over an in-memory limit (link.held) is audited with the association only."""
        limit = self.max_data_set_bytes
        with link.lock:
            link.ending = True
            link.too_large = True
        link.why = link.held or f"a data set of more than {limit} bytes (DICOMWEB_MAX_PART_BYTES)"
        log.warning("DIMSE: %s: association aborted", link.why)
        # Inside a notification handler, assoc.abort is pynetdicom's non-blocking abort
        # (events.trigger sets it to _abort_nonblocking while the handlers run; pynetdicom
        # 3.0): it queues the A-ABORT for this DUL thread to send, triggers EVT_ABORTED and
        # returns, without waiting for the connection to close. It runs in a thread of its own
        # so that EVT_ABORTED's handlers (ended, which audits the queued C-STOREs and may wait
        # while the audit queue is full, and discard_unserved_stores) do not hold up this
        # thread, which sends the A-ABORT and reads on until the connection closes.
        threading.Thread(target=event.assoc.abort, name="dimse-abort", daemon=True).start()

    # -- what the peer asked and the archive answered ---------------------------------------

    def received(self, event: Event) -> None:
        """EVT_PDU_RECV: the association request, a release request, an A-ABORT."""
        pdu = event.pdu
        if isinstance(pdu, P_DATA_TF):
            return
        link = self.link(event.assoc)
        if isinstance(pdu, A_ASSOCIATE_RQ):
            link.calling = str(pdu.calling_ae_title).strip()
        elif isinstance(pdu, A_RELEASE_RQ):
            link.released = True
        elif isinstance(pdu, A_ABORT_RQ) and link.end is None:
            source, reason = pdu.source or 0, pdu.reason_diagnostic or 0
            link.end = (
                _aborted(source, reason),
                f"aborted by the peer ({_abort_text(source, reason)})",
            )

    def sent(self, event: Event) -> None:
        """EVT_PDU_SENT: the answer to the association request, the archive's A-ABORT."""
        pdu = event.pdu
        if isinstance(pdu, P_DATA_TF):
            return
        link = self.link(event.assoc)
        if isinstance(pdu, A_ASSOCIATE_RJ):
            link.answer = _rejection(pdu, link.limit)
        elif isinstance(pdu, A_ASSOCIATE_AC):
            if event.assoc.accepted_contexts:
                link.accepted = True
            else:
                link.answer = _nothing_accepted(event)
        elif isinstance(pdu, A_ABORT_RQ) and link.end is None:  # pynetdicom may send several
            source, reason = pdu.source or 0, pdu.reason_diagnostic or 0
            link.end = _aborted(source, reason), f"aborted by the archive: {self._why(event, link)}"

    def _why(self, event: Event, link: Link) -> str:
        if link.why:
            return link.why
        sock: Any = event.assoc.dul.socket  # a server.BoundedSocket, saying why it is late
        if getattr(sock, "late", False):  # a PDU past its deadline (admission.py)
            return str(sock.refused)
        if self.stopping:
            return "the archive is shutting down"
        if event.assoc.dul.idle_timer_expired():
            return f"nothing sent or received for {event.assoc.network_timeout} s (network timeout)"
        # Our handlers abort only for a data set too large (link.why): this is pynetdicom's
        # state machine refusing a PDU (PS3.8 9.2, AA-1), or on an association its DIMSE
        # provider refusing a message, or a DIMSE timeout.
        if not link.accepted:
            return "a PDU it could not accept as an association request"
        return "a PDU or message it could not accept, or no answer in time"

    # -- the end ----------------------------------------------------------------------------

    def closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE, in the DUL thread, every PDU of the connection read: the C-STORE
        whose data set was arriving, then the association, are audited (and the queued
        C-STOREs, when the archive's own A-ABORT came first, ended)."""
        link = self.link(event.assoc)
        refused = getattr(event.assoc.dul.socket, "refused", None)  # server.BoundedSocket
        if refused is not None and link.end is None:
            link.end = LOST, f"connection closed by the archive: {refused}"
        with link.lock:
            if link.closed:
                return
            link.closed = True
        # The message being received: pynetdicom's DIMSEServiceProvider.message (3.0).
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        command = getattr(message, "command_set", None)
        sop = str(getattr(command, "AffectedSOPInstanceUID", ""))
        if link.too_large and not link.held:  # the data set being received, never complete
            # OVER_LIMIT first: the export makes it a refused request, not the archive failing.
            limit = f"more than {self.max_data_set_bytes} bytes (DICOMWEB_MAX_PART_BYTES)"
            self._event(link, "dimse_store", OUT_OF_RESOURCES, link.receiving,
                        f"{OVER_LIMIT}a data set of {limit}, aborted; sop={sop}")  # fmt: skip
        elif isinstance(message, C_STORE_RQ):
            received = f"data set incomplete ({link.receiving} bytes received)"
            self._unserved(link, sop, received, link.receiving)
        if link.ending:
            self._queued(event, link)
        ending = _ending(link)
        if ending is not None:
            self._event(link, *ending)

    def ended(self, event: Event) -> None:
        """EVT_ABORTED, EVT_RELEASED: the C-STOREs queued whole are not served. Triggered
        in the association's thread when the peer ended it (it serves nothing more), or in
        the thread that aborts it (the archive)."""
        link = self.link(event.assoc)
        with link.lock:
            link.ending = True
        if link.end is None and not (link.closed or link.released or link.why):
            link.why = self._why(event, link)  # the archive's A-ABORT, not sent yet
        self._queued(event, link)

    def _queued(self, event: Event, link: Link) -> None:
        """Audit the C-STOREs queued whole (pynetdicom's DIMSEServiceProvider.msg_queue,
        pynetdicom 3.0), each once."""
        dimse = getattr(event.assoc, "dimse", None)
        for _context_id, request in list(dimse.msg_queue.queue) if dimse else []:
            if not isinstance(request, C_STORE) or request.MessageIDBeingRespondedTo is not None:
                continue  # (a response: release.Releases ends a wait with one)
            with link.lock:
                if any(request is done for done in link.unserved):
                    continue
                link.unserved.append(request)
            self._unserved(link, str(request.AffectedSOPInstanceUID), "received whole", 0)

    def _unserved(self, link: Link, sop: str, state: str, nbytes: int) -> None:
        detail = f"sop={sop} {state}; not served, the association ended: {link.how()[1]}"
        self._event(link, "dimse_store", UNFINISHED, nbytes, detail)

    def claim(self, event: Event) -> str | None:
        """In the C-STORE handler, before it serves a C-STORE: None to serve it, else why
        not. Once the association is ending (the archive aborting it; the peer's end stops
        the association's thread first), one not yet served is not, and is audited unless
        it was (queued when the end came). Found by review: a C-STORE the association
        ended before it was served was stored by no one and audited by no one."""
        link = self.link(event.assoc)
        request = cast(C_STORE, event.request)
        with link.lock:
            if not link.ending:
                return None
            if any(request is done for done in link.unserved):
                return "the association ended"
            link.unserved.append(request)
        self._unserved(link, str(request.AffectedSOPInstanceUID), "received whole", 0)
        return "the association ended"


def _guarded(handler: Callable[[Event], None]) -> Callable[[Event], None]:
    """`handler`, an exception in it logged rather than raised. pynetdicom calls a
    notification event's handlers in one loop (events.trigger, pynetdicom 3.0), and the first
    to raise skips the rest: the later ones bound to it, discard_unserved_stores among them
    (found by review: an error in one of these, other than the recording, which never raises,
    left the spool files of the C-STOREs an association left unserved). The association
    goes on, or ends, as it would have: pynetdicom only logs the exception either way."""

    @functools.wraps(handler)
    def guarded(event: Event) -> None:
        try:
            handler(event)
        except Exception:
            log.exception("DIMSE: %s failed on %s", handler.__name__, event.event.name)

    return guarded


def _abort_text(source: int, reason: int) -> str:
    if source == 2:
        return f"A-ABORT, service provider: {_ABORT_REASONS.get(reason, f'reason {reason}')}"
    return "A-ABORT, service user" if source == 0 else f"A-ABORT, source {source}"


def _rejection(pdu: A_ASSOCIATE_RJ, limit: str) -> tuple[int, str]:
    result, source, reason = pdu.result or 0, pdu.source or 0, pdu.reason_diagnostic or 0
    text = _REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
    if (source, reason) == (1, 3):
        text = f"{text}: not one of the allowed calling AE titles"
    elif (source, reason) == (3, 2) and limit:
        text = f"{text}: {limit}"
    kind = _RESULTS.get(result, f"result {result}")
    return _rejected(result, source, reason), f"rejected (A-ASSOCIATE-RJ, {kind}): {text}"


def _nothing_accepted(event: Event) -> tuple[int, str]:
    refused = event.assoc.rejected_contexts
    result = int(refused[0].result or 0) if refused else 0
    syntaxes = ", ".join(str(cx.abstract_syntax) for cx in refused[:5])
    more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
    why = _CONTEXT_RESULTS.get(result, f"result {result}")
    return 0x02 << 24 | result, f"accepted with no presentation context ({why}: {syntaxes}{more})"


def _ending(link: Link) -> tuple[str, int, int, str] | None:
    """(action, outcome, bytes, detail) of the association's end; None for an orderly one,
    and for a connection that sent no PDU."""
    outcome, how = link.how()
    if link.answer is not None:
        code, text = link.answer
        if code >> 24 == 0x03:  # rejected: what the peer does next does not matter
            return "dimse_associate", code, 0, text
        return "dimse_associate", code, 0, f"{text}, then {how}"
    if link.calling is None and link.end is None:
        return None  # a probe, or nothing sent before the ACSE timeout
    if not link.accepted:  # (released before it was answered: pynetdicom aborts that, AA-8)
        return "dimse_associate", outcome or LOST, 0, f"not answered: {how}"
    if link.end is None and link.released:
        return None
    return "dimse_abort", outcome, 0, how
