"""Association events that are no DIMSE service: TCP_NODELAY on its socket (no_delay), every
wait on its socket bounded (bound_socket_waits), its network timeout counting what it sends
as well as what it receives (idle_both_ways, never_idle), the spool files of C-STOREs it
ended before they were served deleted (discard_unserved_stores), and the final responses of
a C-GET or C-MOVE: without a count of remaining sub-operations (no_remaining_in_final), and
when refused before any sub-operation, answered as such (final_failure)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.events import Event
from pynetdicom.status import STATUS_CANCEL, STATUS_PENDING, code_to_category

__all__ = [
    "bound_socket_waits",
    "discard_unserved_stores",
    "final_failure",
    "idle_both_ways",
    "never_idle",
    "no_delay",
    "no_remaining_in_final",
]


def no_delay(event: Event) -> None:
    """TCP_NODELAY on an association's socket. A C-STORE sub-operation is a command PDU then a
    data set PDU; with Nagle's algorithm the second waited for the peer's delayed ACK, so
    C-GET and C-MOVE sent about 20 instances a second whatever their size (found by review:
    100 small instances took 4.9 s; 0.7 s without the delay)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # not TCP (a test's socket pair), or gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bound_socket_waits(event: Event) -> None:
    """EVT_CONN_OPEN, in both roles: the association's socket given its network timeout
    (DIMSE_NETWORK_TIMEOUT_S), so that a send the peer stops taking (its TCP window full)
    and a PDU it stops sending halfway fail after that many seconds without progress, as a
    closed connection (PS3.8 Evt17: the association is aborted, the operation's
    sub-operation fails).

    pynetdicom (3.0) gives no socket a timeout once connected: it clears the requestor's
    after connecting (AssociationSocket.connect), and an accepted socket has none. Its
    network timeout is only the association's idle check, made by a thread that is not the
    one stuck: the DUL thread's socket.send to a peer that stopped reading blocked for ever,
    and with it the association's thread (waiting for room in the send queue, or in
    Association.kill for the DUL to stop). Found by review: a C-MOVE destination that
    accepted the association and stopped reading held the C-MOVE, its sub-association and
    their threads for good; a C-GET requestor that stopped reading, the same. A slow peer
    goes on only while it drains enough within each timeout for the socket to be reported
    writable again, which on Linux, once the send buffer is full, is roughly 110 KB
    (measured over loopback on Linux 6.18, the peer reading 5 or 20 KB/s), not a few bytes:
    a peer reading slower than about 1.8 KB/s is cut at the timeout (60 s), as one that
    stopped."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(event.assoc.network_timeout)


def idle_both_ways(event: Event) -> None:
    """EVT_PDU_SENT of an accepted association: a PDU sent restarts its idle timer, as one
    received does, so that its network timeout (DIMSE_NETWORK_TIMEOUT_S) measures silence in
    both directions.

    pynetdicom (3.0) restarts it only when a PDU is received (DULServiceProvider.run_reactor),
    and the association's thread looks at it after each request it served: a C-MOVE, C-FIND
    or C-GET that took longer than the network timeout, its requestor sending nothing
    meanwhile as it should (PS3.7 9.1.3: pending responses are the SCP's), had its
    association aborted right after the final response, the requestor unable to release it
    or to send a next request on it (found by review: a C-MOVE of 5 instances to a
    destination answering each C-STORE in 1 s, network timeout 2 s). A peer that neither
    reads nor sends is still bounded: a send it does not take fails after the same timeout
    (bound_socket_waits), and with nothing to send the association is idle. Bound to the
    DUL thread's send (pynetdicom's EVT_PDU_SENT, after the PDU is written to the socket),
    the thread that restarts it on receipt."""
    event.assoc.dul._idle_timer.restart()


def never_idle(assoc: Any) -> None:
    """A C-MOVE sub-association (the archive the requestor) is never aborted for its network
    timeout: it exists only while its C-MOVE is served, its destination speaks only to
    answer, and each wait on it is bounded otherwise (connecting, the A-ASSOCIATE and
    A-RELEASE answers, each C-STORE-RSP, each socket send or PDU read: _ArchiveAE, server.py).
    pynetdicom's requestor looks at the idle timer whenever no message is being sent on the
    association (Association._run_reactor, paused only inside send_c_store): the archive
    reading or converting the next instance for longer than the network timeout, or before
    the first, had the sub-association aborted under its C-MOVE, every sub-operation left
    failed. The socket's timeout, set when it connected (bound_socket_waits), stays."""
    assoc.dul._idle_timer.timeout = None


def discard_unserved_stores(event: Event) -> None:
    """Delete the spool files of C-STOREs an association ended before they were served.

    pynetdicom receives a C-STORE data set into a temporary file of its own
    (STORE_RECV_CHUNKED_DATASET) and deletes it only in its C-STORE service, after our
    handler ran. A data set still arriving when the association was aborted or its
    connection cut, and any received whole but still queued when it ended, are never served:
    their files stayed in the temporary directory for good (found by review: 1.7 MB left by
    each A-ABORT in the middle of a large multi-frame C-STORE). Bound to EVT_CONN_CLOSE,
    which pynetdicom triggers in the thread that writes the files, after the last byte was
    read: the one being received is closed and deleted there. Bound to EVT_ABORTED and
    EVT_RELEASED, after which the association serves nothing more: the queued ones too, and
    the one being received is only unlinked (a local abort, at shutdown, may come while it
    is written to; the file is freed when pynetdicom drops it). pynetdicom keeps them in
    private attributes (DIMSEServiceProvider.message, msg_queue; pynetdicom 3.0)."""
    dimse = getattr(event.assoc, "dimse", None)
    if dimse is None:
        return
    receiving = getattr(dimse.message, "_data_set_file", None)
    closing = event.event == evt.EVT_CONN_CLOSE
    _discard(receiving, close=closing)
    if not closing:
        for _context_id, primitive in list(dimse.msg_queue.queue):
            _discard(getattr(primitive, "_dataset_file", None), close=True)


def _discard(spool: Any, close: bool) -> None:
    if spool is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if close:
            spool.close()
        os.unlink(spool.name)


def no_remaining_in_final(event: Event) -> None:
    """EVT_CONN_OPEN of an accepted association: a C-GET or C-MOVE response that is final
    (Success, Warning, Failure) carries no Number of Remaining Sub-operations.

    PS3.4 C.4.2.1.6 (C-MOVE) and C.4.3.1.5 (C-GET): a response with a status of Pending
    shall contain it, Canceled may (the sub-operations not initiated because of the
    C-CANCEL), and Warning, Failure or Success shall not; PS3.4 Tables C.4-2 and C.4-3 list
    (0000,1020) among the related fields of Pending and Cancel only. pynetdicom's Move and
    Get SCPs (3.0) build every response of an operation on one primitive, and the final
    one kept the Remaining count of the last pending one: 0 (found by review; dcmtk's
    movescu and getscu read it only when present). Wraps the DIMSE provider's send_msg
    before anything else does (send_growing, final_failure), so it sees every response."""
    dimse = event.assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        code = getattr(primitive, "Status", None) if isinstance(primitive, C_GET | C_MOVE) else None
        if code is not None and code_to_category(code) not in (STATUS_PENDING, STATUS_CANCEL):
            primitive.NumberOfRemainingSuboperations = None  # left out of the command set
        send(primitive, context_id)

    dimse.send_msg = send_msg  # type: ignore[method-assign]


def final_failure(event: Event, answer: Dataset) -> None:
    """Make the final response to this C-GET or C-MOVE `answer` (a status data set: Status,
    Error Comment), with no sub-operation counted; the handler then yields 0 sub-operations.

    A request refused as a whole (an identifier at an unknown level, or without its unique
    key) has no sub-operations, and its counts are of sub-operations (PS3.7 9.1.3, 9.1.4;
    PS3.4 C.4.2.1.3, C.4.3.1.3): all 0, as dcmqrscp answers. With no failed sub-operation
    there is no Failed SOP Instance UID List and so no Identifier (C.4.2.1.4.2, C.4.3.1.4.2).
    pynetdicom answers a failure only after a count of at least 1, which it then reports
    failed, with an Identifier of an empty list (which getscu never reads: its A-RELEASE met
    that P-DATA and failed); for a count of 0 it answers Success, with counts of 0 and no
    Identifier, at once: a C-MOVE before it associates with the destination. That response
    is made this one: the association's DIMSE provider sends it through send_msg, wrapped
    here for this one response (by its Message ID Being Responded To) and then unwrapped.
    The association serves one request at a time, so no other response passes meanwhile.
    A C-MOVE to an unknown destination, which pynetdicom answers 0xA801 when the handler
    yields no address, has its response made `answer` the same way (its Error Comment).
    The send_msg it wraps is put back as it was: the provider's own method, or the wrapper
    set on it before (no_remaining_in_final, sending.send_growing), which a delattr lost
    for the rest of the association (found by review)."""
    dimse = event.assoc.dimse
    message_id = event.request.MessageID
    send = dimse.send_msg
    own = vars(dimse).get("send_msg")  # a wrapper set on this provider, if any

    def send_final(primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_GET | C_MOVE) and (
            primitive.MessageIDBeingRespondedTo == message_id
        ):
            if own is None:
                delattr(dimse, "send_msg")  # the provider's own method again
            else:
                setattr(dimse, "send_msg", own)  # noqa: B010 (as below)
            for element in answer:
                setattr(primitive, element.keyword, element.value)
            primitive.Identifier = None
        send(primitive, context_id)

    setattr(dimse, "send_msg", send_final)  # noqa: B010 (mypy: a method is not assigned to)
