"""Sending C-STORE sub-operations (C-GET, C-MOVE) in bounded memory: an instance that goes
as stored, or converted for the peer into a scratch file, is read from its file a PDU at a
time (StoredFile, send_stored_files), and the PDUs waiting for the peer to take them are
held to DIMSE_SEND_QUEUE_BYTES (bound_send_queue)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom.pdu_primitives import P_DATA

__all__ = [
    "DIMSE_SEND_QUEUE_BYTES",
    "StoredFile",
    "bound_send_queue",
    "remove_scratch",
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


class StoredFile(Dataset):
    """An instance that goes to a peer as the bytes of a Part-10 file, in that file's syntax
    (the stored file, or a `scratch` file it was converted into, removed once sent or once
    its sub-operation is given up: remove_scratch): pynetdicom reads the data set from the
    file a PDU at a time (STORE_SEND_CHUNKED_DATASET) when send_c_store is given the file's
    path (send_stored_files), where it encoded a data set whole in memory first, three times
    over: a C-GET of a 500 MB instance took 1.7 GB. Its SOP Class and Instance UIDs are
    pynetdicom's, for its failed-instance list."""

    def __init__(
        self, path: Path, sop_class_uid: str, sop_instance_uid: str, scratch: bool = False
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.stored_path = path
        self.scratch = scratch


def remove_scratch(dataset: object) -> None:
    """The scratch file of a StoredFile made for one sub-operation removed (sent, or never
    to be); anything else left alone."""
    if isinstance(dataset, StoredFile) and dataset.scratch:
        dataset.stored_path.unlink(missing_ok=True)


def send_stored_files(assoc: Any) -> None:
    """Make an association's send_c_store send a StoredFile from its file (pynetdicom's C-GET
    and C-MOVE services take only a Dataset from the handler, and pass it on to it), and
    bound what it queues (bound_send_queue): the archive's C-GET associations and C-MOVE
    sub-associations. Once per association."""
    send_c_store = assoc.send_c_store
    if getattr(send_c_store, "sends_stored_files", False):
        return
    bound_send_queue(assoc.dul)

    def send(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if not isinstance(dataset, StoredFile):
            return cast(Dataset, send_c_store(dataset, *args, **kwargs))
        try:
            return cast(Dataset, send_c_store(dataset.stored_path, *args, **kwargs))
        finally:
            remove_scratch(dataset)

    send.sends_stored_files = True  # type: ignore[attr-defined]
    assoc.send_c_store = send


def bound_send_queue(dul: Any) -> None:
    """A P-DATA primitive handed to the DUL waits, in the sending thread, while the PDUs
    already queued for the peer hold DIMSE_SEND_QUEUE_BYTES (counted as that many PDUs of its
    size); the DUL thread takes them as the peer's connection accepts them (queue.Queue's
    get wakes the waiters). Once the DUL thread has ended (the association aborted, the
    connection gone) nothing waits, and a P-DATA is dropped, not queued: it would never be
    sent (found by review: the rest of an instance the requestor aborted was read from its
    file into the queue, 27 MB of 32 MB, held until the association was freed)."""
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
                return
        send_pdu(primitive)

    dul.send_pdu = bounded


def _taking(dul: Any) -> bool:
    """Whether the DUL thread is running and will take what is queued."""
    return bool(dul.is_alive()) and not dul._kill_thread
