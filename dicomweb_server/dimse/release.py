"""A C-GET requestor's A-RELEASE-RQ while the archive sends it C-STORE sub-operations.

PS3.8 7.2.2: the requestor of an A-RELEASE issues no primitive other than A-ABORT until the
release is confirmed, though it may still receive P-DATA; the acceptor may still send
P-DATA (and then answers the release, affirmatively, or aborts). So no C-STORE-RSP can come
for a sub-operation once the requestor has asked to release: the archive sent the rest of
the data set, then waited the DIMSE timeout (120 s) for that response, and the requestor,
its A-RELEASE unanswered, aborted (found by review: pynetdicom's requestor, after its ACSE
timeout). And pynetdicom's Get and Move SCPs (3.0), which look for a release request after
each sub-operation (ServiceClass._wrap_handler), take it off the queue where the association's
reactor looks for it, stop, and answer a final status that counts none of the sub-operations
not sent (Warning, or Success, where all failed): the release was never answered. Now
(Releases, on every association the archive accepts):

- a C-STORE sent whole whose response has not come fails at once: its wait is ended, in
  the DUL thread that reads the A-RELEASE-RQ, by a failure status put where pynetdicom
  waits for the response (it is not sent to anyone); the remaining sub-operations fail
  without being sent (retrieval.Retrieval.lost), the final C-GET response goes (P-DATA is
  allowed in Sta8, PS3.8 Table 9-10, AR-7), and the release is answered;
- a data set still being sent stops at its next fragment and the association is aborted
  (sending.send_growing): a message cannot end short (PS3.8 E.2), and the requestor could
  not answer it;
- while a C-GET or C-MOVE is served (`serving`) pynetdicom is not told of the request, so
  that the handler fails its remaining sub-operations itself (a C-MOVE's too: the requestor
  ends the association) and the final status counts them; after it, the request stays
  seen (`consumed`) until the reactor has answered it;
- so while a C-FIND is served: its handler stops and answers 0xFE00, the matches not sent
  left out (handlers.Handlers._find), where pynetdicom's Find SCP answered Success after
  the matches sent so far.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import A_RELEASE_RQ

from dicomweb_server.dimse.statuses import PROCESSING_FAILURE

__all__ = ["Releases", "release_requested"]

log = logging.getLogger(__name__)


def release_requested(assoc: Any) -> bool:
    """Whether the peer has asked to release the association (its A-RELEASE-RQ read)."""
    releases = getattr(assoc.dul, "releases", None)
    return isinstance(releases, Releases) and releases.requested


@dataclass
class Releases:
    """One association's C-STORE sent whole and awaiting its response, and whether the
    peer asked to release. Written by the association's thread (sent_whole, done) and its
    DUL thread (the events), under `lock`."""

    assoc: Any
    requested: bool = False
    message_id: int | None = None  # a C-STORE-RQ sent whole, its response not received
    context_id: int = 0
    serving: int = 0  # C-FINDs, C-GETs, C-MOVEs being served (the association's thread)
    consumed: bool = False  # the A-RELEASE indication taken off its queue, not answered yet
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def opened(cls, event: Event) -> None:
        """EVT_CONN_OPEN of an accepted association."""
        cls.install(event.assoc)

    @classmethod
    def install(cls, assoc: Any) -> Releases:
        """Once per association: on opening one accepted, or as a C-MOVE sub-association
        sends its first C-STORE (sending.send_stored_files)."""
        found = getattr(assoc.dul, "releases", None)
        if isinstance(found, Releases):
            return found
        releases = cls(assoc)
        assoc.dul.releases = releases
        assoc.bind(evt.EVT_DIMSE_RECV, releases.on_message)
        assoc.bind(evt.EVT_PDU_RECV, releases.on_pdu)
        acse = assoc.acse
        is_release_requested = acse.is_release_requested

        def release_indicated() -> bool:  # the association's thread
            if releases.serving:
                return False
            if not releases.consumed:
                releases.consumed = is_release_requested()
            return releases.consumed

        acse.is_release_requested = release_indicated
        return releases

    def sent_whole(self, message_id: int, context_id: int) -> None:
        """The last fragment of a C-STORE-RQ's data set about to be handed to the DUL. The
        peer may have asked to release since the sender last looked (sending.send_growing
        looks before each fragment, then may wait for it to be written): then no response
        can come, and the C-STORE fails at once here, as on_pdu fails it (found by review:
        the last fragment went, and the archive waited DIMSE_DIMSE_TIMEOUT_S for its
        response while the requestor, its release unanswered, aborted)."""
        with self.lock:
            if not self.requested:
                self.message_id, self.context_id = message_id, context_id
                return
        self._fail(message_id, context_id)

    def done(self) -> None:
        """The C-STORE is over (answered, failed or given up)."""
        with self.lock:
            self.message_id = None

    def on_message(self, event: Event) -> None:
        """EVT_DIMSE_RECV, in the DUL thread: its response came."""
        msg = event.message
        if isinstance(msg, C_STORE_RSP):
            with self.lock:
                if msg.command_set.get("MessageIDBeingRespondedTo") == self.message_id:
                    self.message_id = None

    def on_pdu(self, event: Event) -> None:
        """EVT_PDU_RECV, in the DUL thread, before the state machine takes the PDU: an
        A-RELEASE-RQ fails the C-STORE awaiting its response (see the module)."""
        if not isinstance(event.pdu, A_RELEASE_RQ):
            return
        with self.lock:
            self.requested = True
            waiting, context_id, self.message_id = self.message_id, self.context_id, None
        if waiting is not None:
            self._fail(waiting, context_id)

    def _fail(self, message_id: int, context_id: int) -> None:
        """End pynetdicom's wait for the response to C-STORE `message_id` (see the module)."""
        log.warning("DIMSE: the peer asked to release while C-STORE %d awaited its response:"
                    " it fails, and the remaining sub-operations", message_id)  # fmt: skip
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.Status = PROCESSING_FAILURE  # pynetdicom counts it failed; never sent
        self.assoc.dimse.msg_queue.put((context_id, rsp))
