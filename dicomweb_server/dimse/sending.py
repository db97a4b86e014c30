"""Sending C-STORE sub-operations (C-GET, C-MOVE) in bounded memory: an instance that goes
as stored, or converted for the peer into a scratch file, is read from its file a PDU at a
time (StoredFile, send_stored_files), the converted one while it is written (streaming.py,
send_growing), and the PDUs waiting for the peer to take them are held to
DIMSE_SEND_QUEUE_BYTES (bound_send_queue). None is sent once the peer has asked to release
the association (release.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu_primitives import P_DATA

from dicomweb_server.dimse.release import Releases, release_requested
from dicomweb_server.dimse.streaming import Cancelled, Growing, StreamFailed

__all__ = [
    "DIMSE_SEND_QUEUE_BYTES",
    "DIMSE_UNLIMITED_PDV_BYTES",
    "StoredFile",
    "bound_send_queue",
    "conversion_failed",
    "remove_scratch",
    "send_growing",
    "send_stored_files",
]

log = logging.getLogger(__name__)

# Bytes of P-DATA-TF PDUs an association may have queued for its peer (at least one PDU):
# the thread sending a message waits for the peer to take them before it queues more.
# pynetdicom queues a whole message at once, unbounded (DIMSE.send_msg puts every fragment
# into the DUL's queue), so a C-GET of a 200 MB instance by a requestor reading 20 MB/s held
# 180 MB of PDUs waiting.
DIMSE_SEND_QUEUE_BYTES = 4 * 1024 * 1024
# Seconds between two looks at whether the DUL thread still takes PDUs, while waiting.
_QUEUE_POLL_S = 0.1
# Data set bytes in each P-DATA fragment of an instance sent from its file (as stored, or
# converted as it is written) to a peer that set no maximum PDU length (0, PS3.8
# D.3.3.2.2), or a larger one (up to 0xFFFFFFFF): pynetdicom sends the rest of a file in
# one fragment, the file's whole size, read into memory at once.
DIMSE_UNLIMITED_PDV_BYTES = 1024 * 1024


class StoredFile(Dataset):
    """An instance that goes to a peer as the bytes of a Part-10 file, in that file's syntax
    (the stored file, or a `scratch` file it was converted into, removed once sent or once
    its sub-operation is given up: remove_scratch): pynetdicom reads the data set from the
    file a PDU at a time (STORE_SEND_CHUNKED_DATASET) when send_c_store is given the file's
    path (send_stored_files), where it encoded a data set whole in memory first, three times
    over: a C-GET of a 500 MB instance took 1.7 GB. Its SOP Class and Instance UIDs are
    pynetdicom's, for its failed-instance list. `growing`: the scratch file is still being
    written by its conversion, sent as it is (send_growing)."""

    def __init__(
        self,
        path: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        scratch: bool = False,
        growing: Growing | None = None,
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.stored_path = path
        self.scratch = scratch or growing is not None
        self.growing = growing


def remove_scratch(dataset: object) -> None:
    """The scratch file of a StoredFile made for one sub-operation removed (sent, or never
    to be), its conversion stopped before its next frame if still under way (it removes
    the file again as it ends); anything else left alone."""
    if isinstance(dataset, StoredFile) and dataset.scratch:
        if dataset.growing is not None:
            dataset.growing.cancel()
        dataset.stored_path.unlink(missing_ok=True)


def conversion_failed(dataset: object) -> bool:
    """Whether the conversion of a StoredFile sent as it was written failed (the archive's
    fault; not cancelled for a peer gone)."""
    growing = dataset.growing if isinstance(dataset, StoredFile) else None
    error = growing.failure() if growing is not None else None
    return error is not None and not isinstance(error, Cancelled)


def send_stored_files(assoc: Any) -> None:
    """Make an association's send_c_store send a StoredFile from its file (pynetdicom's C-GET
    and C-MOVE services take only a Dataset from the handler, and pass it on to it), and
    bound what it queues (bound_send_queue): the archive's C-GET associations and C-MOVE
    sub-associations. Once per association."""
    send_c_store = assoc.send_c_store
    if getattr(send_c_store, "sends_stored_files", False):
        return
    bound_send_queue(assoc.dul)
    releases = Releases.install(assoc)
    growing: dict[Path, Growing] = {}  # the one being sent, by its path
    send_growing(assoc, growing)

    def send(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if not isinstance(dataset, StoredFile):
            return cast(Dataset, send_c_store(dataset, *args, **kwargs))
        try:
            if release_requested(assoc):  # nothing sent: no response could come
                raise StreamFailed("the peer asked to release the association")
            if dataset.growing is not None:
                if not _taking(assoc.dul):  # aborted (a stream failed): sent to no one
                    raise StreamFailed("the association is no longer up")
                growing[dataset.stored_path] = dataset.growing
            else:  # sent as the growing ones are: pynetdicom would read a fragment of any size
                growing[dataset.stored_path] = Growing.whole(dataset.stored_path)
            assoc.dul.sending_file = True  # bound_send_queue: the rest of it not read
            return cast(Dataset, send_c_store(dataset.stored_path, *args, **kwargs))
        except StreamFailed:
            # pynetdicom's send_c_store paused the association's thread until the response,
            # which will not come: resumed, it sees the association ended, and ends.
            assoc._reactor_checkpoint.set()
            raise
        finally:
            assoc.dul.sending_file = False
            releases.done()
            growing.clear()
            remove_scratch(dataset)

    send.sends_stored_files = True  # type: ignore[attr-defined]
    assoc.send_c_store = send


def send_growing(assoc: Any, growing: dict[Path, Growing]) -> None:
    """Make the association's DIMSE provider send the C-STORE request of a file in `growing`
    as the file is written (streaming.py): pynetdicom would take the file's size when it
    begins and send it cut short; and of a file already whole (Growing.whole) the same way,
    in fragments of DIMSE_UNLIMITED_PDV_BYTES at most: pynetdicom reads each fragment whole,
    the whole file for a peer that set no maximum PDU length (found by review: a stored
    instance went to such a peer in one fragment, the file read whole into memory). The
    command set goes as pynetdicom encodes it, then the data set from the file, fragment by
    fragment as written, the last flagged last (PS3.8 E.2). A conversion failed before the
    command goes fails the sub-operation, nothing sent; once it has gone, the association
    is aborted (the peer must not take the data set cut short for a whole one; PS3.7 has
    no other way) and the sub-operation fails; so it is when the peer asks to release the
    association meanwhile (release.py).
    EVT_DIMSE_SENT (the audit's byte count, retrieval.BytesSent) is told once the data set
    has gone, with the data set bytes handed on (`streamed_bytes`): not the file's size
    then, which a failed conversion has removed (found by review: half an instance sent
    before its conversion failed was audited as 0 bytes) and a peer gone has not taken."""
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def send(primitive: Any, context_id: int) -> None:
        where = getattr(primitive, "_dataset_path", None)  # (path, offset) to send a file
        stream = growing.get(where[0]) if isinstance(where, tuple) else None
        if stream is None or not isinstance(primitive, C_STORE) or where is None:
            send_msg(primitive, context_id)
            return
        msg = C_STORE_RQ()
        msg.primitive_to_message(primitive)
        msg.context_id = context_id
        failed = stream.failure()
        if failed is not None:  # nothing sent: the sub-operation fails, the association goes on
            raise StreamFailed(str(failed))
        msg._data_set_path = None  # the command set alone, the data set below
        for pdata in msg.encode_msg(context_id, dimse.maximum_pdu_size):
            dimse.dul.send_pdu(pdata)
        most = dimse.maximum_pdu_size
        # Less a PDV's header (PS3.8 9.3.5); no more than the bound for a peer that set a
        # maximum as large as none (0xFFFFFFFF): a fragment is read whole, and sent once that
        # many bytes are written.
        size = min(most - 6, DIMSE_UNLIMITED_PDV_BYTES) if most else DIMSE_UNLIMITED_PDV_BYTES
        streamed, whole = 0, False

        def sending() -> bool:  # the peer takes PDUs, and can answer this C-STORE
            return _taking(assoc.dul) and not release_requested(assoc)

        try:
            for data, whole in stream.fragments(where[1], size, sending):
                if whole:  # before it goes: its response may come at once
                    assoc.dul.releases.sent_whole(primitive.MessageID, context_id)
                pdata = P_DATA()
                pdata.presentation_data_value_list.append(
                    (context_id, (b"\x02" if whole else b"\x00") + data)
                )
                dimse.dul.send_pdu(pdata)
                streamed += len(data)
            if not whole and release_requested(assoc):
                raise StreamFailed("the peer asked to release the association (PS3.8 7.2.2)")
        except (StreamFailed, OSError) as exc:
            log.error("aborting the association: %s failed while it was sent: %s",
                      primitive.AffectedSOPInstanceUID, exc)  # fmt: skip
            assoc.abort()
            raise StreamFailed(str(exc)) from None
        finally:
            msg._data_set_path = where
            msg.streamed_bytes = streamed  # type: ignore[attr-defined]
            evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": msg})

    dimse.send_msg = send


def bound_send_queue(dul: Any) -> None:
    """A P-DATA primitive handed to the DUL waits, in the sending thread, while the PDUs
    already queued for the peer hold DIMSE_SEND_QUEUE_BYTES (counted as that many PDUs of its
    size); the DUL thread takes them as the peer's connection accepts them (queue.Queue's
    get wakes the waiters). Once the DUL thread has ended (the association aborted, the
    connection gone) nothing waits, and a P-DATA is dropped, not queued: it would never be
    sent (found by review: the rest of an instance the requestor aborted was read from its
    file into the queue, 27 MB of 32 MB, held until the association was freed). One of a
    file being sent (send_stored_files) fails the send instead (StreamFailed), so that the
    rest of the file is not read: pynetdicom reads it fragment by fragment as they are
    handed here, and read it to the end to drop it (found by review)."""
    send_pdu = dul.send_pdu
    pending = dul.to_provider_queue

    def bounded(primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            size = sum(len(value) for _, value in primitive.presentation_data_value_list)
            room = max(1, DIMSE_SEND_QUEUE_BYTES // max(1, size))
            with pending.not_full:
                while pending._qsize() >= room and _taking(dul):
                    pending.not_full.wait(_QUEUE_POLL_S)
            if not _taking(dul):
                if getattr(dul, "sending_file", False):
                    raise StreamFailed("the association is no longer up")
                return
        send_pdu(primitive)

    dul.send_pdu = bounded


def _taking(dul: Any) -> bool:
    """Whether the DUL thread is running and will send what is queued: the association still
    up (PS3.8: a P-DATA request, Evt9, has an action in its state, Sta6 or Sta8). The DUL
    thread outlives an A-ABORT received or the connection lost (Sta1) until the association's
    thread, busy serving the request, sees it (found by review: the rest of an instance was
    read and queued for a connection already gone, drop_data_after_the_end dropping it)."""
    machine = dul.state_machine
    return (
        bool(dul.is_alive())
        and not dul._kill_thread
        and ("Evt9", machine.current_state) in TRANSITION_TABLE
    )
