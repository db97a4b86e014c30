"""What one peer may hold of the AE: associations (DIMSE_MAX_ASSOCIATIONS in all, of which
DIMSE_MAX_ASSOCIATIONS_PER_PEER from one IP address) and time (a PDU must arrive whole within
DIMSE_PDU_DEADLINE_S of its first byte).

Found by review (a slow-loris): pynetdicom counts every connection against its association
limit from the moment it is accepted, before its A-ASSOCIATE-RQ is read, and its 60 s network
timeout bounds each socket read, not a PDU. Three connections sending an A-ASSOCIATE-RQ a byte
every 20 s kept findscu and echoscu out of an archive limited to 3 for as long as they went on
(75 s tried; also past the ACSE timeout, as the association's thread then waits for the DUL
thread, stuck in its read). So did three associations dribbling a P-DATA-TF: past the network
timeout too, for the same reason. Now:

- An association counts once its request has arrived whole and been let in (`requested`, on
  EVT_REQUESTED), until it is released or its thread ends: a connection still sending it,
  or silent, holds no slot (it is bounded by the ACSE timeout and the PDU deadline). Over
  either limit the request is rejected as pynetdicom would have, A-ASSOCIATE-RJ
  rejected-transient, service provider (presentation related), local-limit-exceeded (PS3.8
  9.3.4, Table 9-21), and audited with the limit passed (connections.py). pynetdicom's own
  count is set out of the way (server.build_ae).
- A PDU not read whole within the deadline (`pdu_deadline`, on EVT_CONN_OPEN): the archive
  sends an A-ABORT (service provider, reason not specified, PS3.8 Table 9-26) and closes
  the connection, audited as its other aborts.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakSet

from pynetdicom import evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import A_ABORT_RQ

from dicomweb_server.dimse.connections import Connections

__all__ = ["Admission", "PduLate", "recv_before"]

log = logging.getLogger(__name__)

# Bytes asked of the socket at a time, as pynetdicom's AssociationSocket.recv (3.0).
_RECV_BYTES = 4096


class PduLate(TimeoutError):
    """The PDU being read was not whole by its deadline."""


def recv_before(sock: socket.socket, nr_bytes: int, deadline: float) -> bytearray:
    """`nr_bytes` read from `sock`, as AssociationSocket.recv reads them (fewer when the peer
    closes), each wait bounded by the socket's own timeout (the network timeout) and by
    `deadline` (time.monotonic()), past which PduLate."""
    idle = sock.gettimeout()
    data = bytearray()
    try:
        while len(data) < nr_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PduLate
            sock.settimeout(left if idle is None else min(idle, left))
            try:
                chunk = sock.recv(min(_RECV_BYTES, nr_bytes - len(data)))
            except TimeoutError:
                if time.monotonic() < deadline:
                    raise  # the network timeout
                raise PduLate from None
            if not chunk:
                break
            data += chunk
    finally:
        sock.settimeout(idle)
    return data


@dataclass
class Admission:
    """The bindings that let an association request in or reject it (`requested`) and put
    a deadline on each PDU (`pdu_deadline`)."""

    connections: Connections  # the audit of each connection: why a request was rejected
    max_associations: int
    max_per_peer: int
    pdu_deadline_s: float
    _admitted: WeakSet[Any] = field(default_factory=WeakSet, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bindings(self) -> list[EventHandlerType]:
        return [(evt.EVT_REQUESTED, self.requested), (evt.EVT_CONN_OPEN, self.pdu_deadline)]

    def requested(self, event: Event) -> None:
        """EVT_REQUESTED, in the association's thread, the A-ASSOCIATE-RQ whole and not yet
        answered: let it in, or reject it if the archive holds DIMSE_MAX_ASSOCIATIONS, or
        DIMSE_MAX_ASSOCIATIONS_PER_PEER from its address. A calling AE title not allowed is
        left to pynetdicom, which rejects it permanently (and it is not counted). One
        released counts no more: pynetdicom marks it so once its A-RELEASE-RP is sent, when
        it serves nothing more, but its thread lives on until the peer has closed the
        connection and the EVT_RELEASED handlers have run (connections.ended, which waits
        while the audit queue is full). Found chasing a flaky test: a peer at the limit that
        released one association and opened the next at once was rejected now and then."""
        assoc = event.assoc
        allowed = [title.strip() for title in assoc.ae.require_calling_aet]
        request = assoc.requestor.primitive
        if allowed and (request is None or request.calling_ae_title not in allowed):
            return
        address = assoc.requestor.address
        with self._lock:
            held = [a for a in assoc.ae.active_associations if a.is_acceptor
                    and a in self._admitted and not (a.is_rejected or a.is_released)]  # fmt: skip
            if len(held) >= self.max_associations:
                limit = f"at most {self.max_associations} at a time (DIMSE_MAX_ASSOCIATIONS)"
            elif sum(a.requestor.address == address for a in held) >= self.max_per_peer:
                limit = (f"at most {self.max_per_peer} at a time from {address}"
                         " (DIMSE_MAX_ASSOCIATIONS_PER_PEER)")  # fmt: skip
            else:
                self._admitted.add(assoc)
                return
        log.warning("DIMSE: association from %s rejected: %s", address, limit)
        self.connections.link(assoc).limit = limit
        # What pynetdicom does for its own limit (ACSE._negotiate_as_acceptor, 3.0); the
        # association's thread then answers nothing more (Association.run_reactor).
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def pdu_deadline(self, event: Event) -> None:
        """EVT_CONN_OPEN of an accepted connection, before its DUL thread starts (after
        server.bound_pdu_length): each PDU the DUL reads (DULServiceProvider._read_pdu_data,
        pynetdicom 3.0: called once a byte is there to read, it reads the PDU's header, then
        its length) is read by the deadline (the socket's `pdu_deadline`, server.BoundedSocket).
        When it passed, the PDU is given up as for a closed connection (Evt17, PS3.8 AA-4 or
        AA-5), after an A-ABORT, sent here, in the DUL thread, the only one writing to the
        socket (PS3.8 7.3.1: the service provider may abort)."""
        dul = event.assoc.dul
        sock: Any = dul.socket  # a server.BoundedSocket
        read = dul._read_pdu_data
        deadline_s = sock.pdu_deadline_s = self.pdu_deadline_s

        def read_pdu_data() -> None:
            sock.pdu_deadline = time.monotonic() + deadline_s
            try:
                read()
            finally:
                sock.pdu_deadline = None
            if sock.refused is not None and sock.late:
                log.warning("DIMSE: %s from %s: association aborted", sock.refused,
                            event.assoc.requestor.address)  # fmt: skip
                pdu = A_ABORT_RQ()
                pdu.source, pdu.reason_diagnostic = 0x02, 0x00
                dul._send(pdu)  # EVT_PDU_SENT: audited (connections.py)

        dul._read_pdu_data = read_pdu_data  # type: ignore[method-assign]
