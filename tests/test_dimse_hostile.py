"""Hostile peers on the DIMSE front door, found by fuzzing it: what pynetdicom holds in
memory (a message's command set, a C-FIND/C-GET/C-MOVE identifier) is bounded
(dimse/connections.py DIMSE_MAX_COMMAND_BYTES, DIMSE_MAX_IDENTIFIER_BYTES), at its edge."""

from __future__ import annotations

import contextlib
import io
import queue
import socket
import struct
import threading
import time
import zlib
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from dicomweb_server.dimse.connections import (
    DIMSE_MAX_COMMAND_BYTES,
    DIMSE_MAX_IDENTIFIER_BYTES,
    DIMSE_MAX_QUEUED_REQUESTS,
    Connections,
)
from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    Archive,
    Closes,
    associate,
    association_request,
    audit_rows,
    audit_seq,
    in_thread,
    read_pdu,
    scu,
)

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

FIND = StudyRootQueryRetrieveInformationModelFind
IMPLICIT, DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
# Bytes of one command fragment sent (below the archive's Maximum Length, PS3.8 D.1).
FRAGMENT = 16000


def _padded_echo_command(size: int) -> bytes:
    """A C-ECHO-RQ command set of exactly `size` bytes: its elements, then one more of
    group 0000 (implicit VR, 8 bytes of header) padding it out."""
    req = C_ECHO()
    req.MessageID, req.AffectedSOPClassUID = 1, Verification
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    command = cast(bytes, encode(msg.command_set, True, True))
    pad = size - len(command) - 8
    return command + struct.pack("<HHI", 0x0000, 0x5FF0, pad) + b"\x00" * pad


def _command_pdus(cx: int, command: bytes) -> bytes:
    """P-DATA-TFs of one PDV each carrying `command` in FRAGMENT-byte command fragments,
    the last one marked last (PS3.8 E.2: message control header bits 0 and 1)."""
    out = b""
    for at in range(0, len(command), FRAGMENT):
        last = at + FRAGMENT >= len(command)
        value = bytes([0x03 if last else 0x01]) + command[at : at + FRAGMENT]
        item = struct.pack(">IB", len(value) + 1, cx) + value
        out += struct.pack(">BBI", 0x04, 0, len(item)) + item
    return out


def _answer(assoc: Any) -> Any:
    """The next message the archive answers on `assoc`, or None once it is no longer
    established (pynetdicom's reactor paused, so that the answer is not taken by it)."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while time.monotonic() < deadline and assoc.is_established:
            with contextlib.suppress(queue.Empty):
                return assoc.dimse.msg_queue.get(timeout=0.05)[1]
        return None
    finally:
        assoc._reactor_checkpoint.set()


def _echo_with_command_of(archive: Archive, size: int) -> Any:
    """A C-ECHO whose command set is `size` bytes: its C-ECHO-RSP, or None if aborted."""
    assoc = associate(scu(Verification), archive)
    try:
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        cx = cast(int, assoc.accepted_contexts[0].context_id)
        sock.sendall(_command_pdus(cx, _padded_echo_command(size)))
        return _answer(assoc)
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.kill()


def _find_with_identifier_of(archive: Archive, size: int) -> Any:
    """A C-FIND whose identifier is `size` bytes (a study query padded with a private
    element): its first C-FIND-RSP, or None if aborted."""
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.PatientID = "STUDY", "NOBODY"
    encoded = cast(bytes, encode(ds, True, True))
    pad = size - len(encoded) - 8
    identifier = encoded + struct.pack("<HHI", 0x0009, 0x1000, pad) + b"\x00" * pad
    return _request_with_identifier(archive, C_FIND(), FIND, identifier)


def _request_with_identifier(
    archive: Archive, req: Any, sop_class: str, identifier: bytes, syntax: str = IMPLICIT
) -> Any:
    """`req` (a C-FIND, C-GET or C-MOVE primitive) of `sop_class` carrying `identifier` as
    sent, in `syntax` (Implicit VR Little Endian): its first response, or None if aborted."""
    req.MessageID, req.Priority, req.AffectedSOPClassUID = 1, 2, sop_class
    req.Identifier = io.BytesIO(identifier)
    ae = scu()
    ae.add_requested_context(sop_class, syntax)
    assoc = associate(ae, archive)
    try:
        assoc.dimse.send_msg(req, cast(int, assoc.accepted_contexts[0].context_id))
        return _answer(assoc)
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.kill()


async def test_command_set_at_the_limit_is_served_past_it_aborted(archive: Archive) -> None:
    """Found by fuzzing: command fragments were not counted, and a peer streaming 300 MB of
    them grew the server by 300 MB. A command set of DIMSE_MAX_COMMAND_BYTES is served;
    one byte more aborts the association (PS3.8 7.3.1: A-ABORT), audited with why."""
    rsp = await in_thread(_echo_with_command_of, archive, DIMSE_MAX_COMMAND_BYTES)
    assert rsp is not None and rsp.Status == 0x0000
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        assert await in_thread(_echo_with_command_of, archive, DIMSE_MAX_COMMAND_BYTES + 1) is None
        await closes.wait()
    (row,) = await audit_rows(archive, ("dimse_abort", "dimse_store"), start)
    assert row["action"] == "dimse_abort"
    assert row["detail"] == (
        f"aborted by the archive: a command set of more than {DIMSE_MAX_COMMAND_BYTES}"
        " bytes (DIMSE_MAX_COMMAND_BYTES)"
    )


async def test_identifier_at_the_limit_is_served_past_it_aborted(archive: Archive) -> None:
    """Found by fuzzing: a C-FIND identifier, which pynetdicom holds in memory, was bounded
    only by DICOMWEB_MAX_PART_BYTES (4 GiB): 200 MB of one grew the server by 200 MB. One of
    DIMSE_MAX_IDENTIFIER_BYTES is answered; one byte more aborts the association."""
    rsp = await in_thread(_find_with_identifier_of, archive, DIMSE_MAX_IDENTIFIER_BYTES)
    assert rsp is not None and rsp.Status is not None
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        over = DIMSE_MAX_IDENTIFIER_BYTES + 1
        assert await in_thread(_find_with_identifier_of, archive, over) is None
        await closes.wait()
    rows = await audit_rows(archive, ("dimse_abort", "dimse_store", "dimse_find"), start)
    assert [(r["action"], r["detail"]) for r in rows] == [(
        "dimse_abort",
        f"aborted by the archive: an identifier of more than {DIMSE_MAX_IDENTIFIER_BYTES}"
        " bytes (DIMSE_MAX_IDENTIFIER_BYTES)",
    )]  # fmt: skip


class _Assoc:
    """What Connections.limit_data_set reads of an association: its requestor, pynetdicom's
    DIMSE provider (the message being decoded, the requests received whole and queued for
    the association's thread), and abort."""

    def __init__(self, queued: list[Any]) -> None:
        self.requestor = SimpleNamespace(address="127.0.0.1")
        self.dimse = SimpleNamespace(message=None, msg_queue=queue.Queue())
        for primitive in queued:
            self.dimse.msg_queue.put((1, primitive))
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()


def _pdu(*values: bytes) -> P_DATA_TF:
    """A P-DATA-TF of one PDV per value (its message control header first)."""
    pdu = P_DATA_TF()
    for value in values:
        item = PresentationDataValueItem()
        item.presentation_context_id, item.presentation_data_value = 1, value
        pdu.presentation_data_value_items.append(item)
    return pdu


def _queued_find(size: int) -> C_FIND:
    req = C_FIND()
    req.MessageID, req.Priority, req.AffectedSOPClassUID = 1, 2, FIND
    req.Identifier = io.BytesIO(b"\x00" * size)
    return req


def _received(connections: Connections, assoc: _Assoc, *values: bytes) -> bool:
    """Whether the archive aborts the association on receiving a P-DATA-TF of `values`."""
    connections.limit_data_set(cast(Any, SimpleNamespace(pdu=_pdu(*values), assoc=assoc)))
    if not connections.link(assoc).too_large:
        return False
    return assoc.aborted.wait(CLIENT_TIMEOUT_S)  # the A-ABORT is sent from a thread of its own


@pytest.mark.parametrize("over", [0, 1])
@pytest.mark.parametrize("one_pdu", [False, True])
def test_identifiers_queued_unserved_count_against_the_limit(over: int, one_pdu: bool) -> None:
    """Found by review: DIMSE_MAX_IDENTIFIER_BYTES bounded one identifier, and a peer that
    sends requests without waiting for their responses (PS3.7 D.3.3.3: one outstanding
    without an asynchronous operations window) had pynetdicom queue each, identifier
    decoded, for the association's thread, busy serving the first: 100 C-FINDs of 4 MiB
    held 400 MiB. The identifier being received counts with those queued unserved; one
    sent in the PDU that ends its command was not counted against the limit at all."""
    queued = DIMSE_MAX_IDENTIFIER_BYTES // 2
    assoc = _Assoc([_queued_find(queued)])
    connections = Connections(record=lambda _event: None, max_data_set_bytes=2**32)
    command = b"\x03" + b"\x00" * 80  # its last fragment
    identifier = b"\x02" + b"\x00" * (DIMSE_MAX_IDENTIFIER_BYTES - queued + over)
    if one_pdu:
        assert _received(connections, assoc, command, identifier) is bool(over)
    else:
        assert not _received(connections, assoc, command)
        assoc.dimse.message = SimpleNamespace(_data_set_file=None)  # a C-FIND-RQ, decoded
        assert _received(connections, assoc, identifier) is bool(over)
    if over:
        assert connections.link(assoc).why == (
            "identifiers held (one arriving, others queued) of more than"
            f" {DIMSE_MAX_IDENTIFIER_BYTES} bytes (DIMSE_MAX_IDENTIFIER_BYTES)"
        )


def _queued_echo() -> C_ECHO:
    req = C_ECHO()
    req.MessageID, req.AffectedSOPClassUID = 1, Verification
    return req


@pytest.mark.parametrize("over", [0, 1])
def test_requests_queued_unanswered_are_bounded(over: int) -> None:
    """Found by review: the byte limits count identifiers only, and a peer sending C-ECHO-RQs
    without reading the answers (PS3.7 D.3.3.3: one outstanding) had pynetdicom queue each
    for as long as it went on. DIMSE_MAX_QUEUED_REQUESTS queued are let be; one more, and the
    next P-DATA-TF aborts the association, its values dropped."""
    assoc = _Assoc([_queued_echo() for _ in range(DIMSE_MAX_QUEUED_REQUESTS + over)])
    connections = Connections(record=lambda _event: None, max_data_set_bytes=2**32)
    values = [b"\x03" + b"\x00" * 80]
    pdu = _pdu(*values)
    connections.limit_data_set(cast(Any, SimpleNamespace(pdu=pdu, assoc=assoc)))
    assert connections.link(assoc).too_large is bool(over)
    assert len(pdu.presentation_data_value_items) == (0 if over else 1)
    if over:
        assert assoc.aborted.wait(CLIENT_TIMEOUT_S)
        assert connections.link(assoc).why == (
            f"more than {DIMSE_MAX_QUEUED_REQUESTS} requests queued unanswered"
            " (DIMSE_MAX_QUEUED_REQUESTS)"
        )


def _echo_pdu(count: int) -> bytes:
    """A P-DATA-TF of `count` C-ECHO-RQs (one PDV each, presentation context 1)."""
    command = _padded_echo_command(100)
    item = struct.pack(">IB", len(command) + 2, 1) + b"\x03" + command
    return struct.pack(">BBI", 0x04, 0, len(item) * count) + item * count


def _until_aborted(sock: socket.socket) -> bool:
    """Read what the archive sends, the answers unread until now among it, up to its A-ABORT
    or the end of the connection: whether either came (within the socket's timeout)."""
    data = b""
    try:
        while True:
            while len(data) >= 6 and len(data) >= 6 + struct.unpack(">I", data[2:6])[0]:
                if data[0] == 0x07:  # A-ABORT: the peer closes the connection (PS3.8 AA-3)
                    return True
                data = data[6 + struct.unpack(">I", data[2:6])[0] :]
            chunk = sock.recv(65536)
            if not chunk:
                return True
            data += chunk
    except TimeoutError:
        return False
    except OSError:  # reset: the archive closed the connection with what was sent unread
        return True


def _echo_flood(archive: Archive, count: int) -> bool:
    """`count` C-ECHO-RQs sent, 100 to a P-DATA-TF, none of the answers read: whether the
    archive aborted the association or closed the connection (within CLIENT_TIMEOUT_S of the
    last one sent). The peer is a plain socket, which only this reads: a pynetdicom
    association's DUL thread reads its socket whatever its reactor does, and read the
    answers alongside this, each taking pieces of the other's PDUs (the DUL then aborted the
    association itself, before the archive did, and left its socket, reset by the archive,
    unclosed: pynetdicom 3.0 closes one only if its shutdown succeeds)."""
    address = ("127.0.0.1", archive.port)
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(association_request())
        assert read_pdu(sock)[0] == 0x02, "not accepted"  # A-ASSOCIATE-AC
        pdu = _echo_pdu(100)
        try:
            for _ in range(count // 100):
                sock.sendall(pdu)
        except TimeoutError:
            return False
        except OSError:  # reset: the archive closed the connection with the flood unread
            return True
        return _until_aborted(sock)


async def test_echo_flood_is_aborted(archive: Archive) -> None:
    """A live peer sending C-ECHO-RQs without reading the answers: the association is
    aborted once more than DIMSE_MAX_QUEUED_REQUESTS wait, audited with why."""
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        assert await in_thread(_echo_flood, archive, 20_000)
        await closes.wait()
    rows = await audit_rows(archive, "dimse_abort", start)
    assert [r["detail"] for r in rows] == [
        f"aborted by the archive: more than {DIMSE_MAX_QUEUED_REQUESTS} requests queued"
        " unanswered (DIMSE_MAX_QUEUED_REQUESTS)"
    ]


def _flood_while_answering(archive: Archive, answering: threading.Event) -> bool:
    """One C-ECHO-RQ, then, once the archive is `answering` it, DIMSE_MAX_QUEUED_REQUESTS + 1
    more (queued) and one after them (which the archive aborts the association on): whether
    the archive aborted it or closed the connection."""
    address = ("127.0.0.1", archive.port)
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(association_request())
        assert read_pdu(sock)[0] == 0x02, "not accepted"  # A-ASSOCIATE-AC
        sock.sendall(_echo_pdu(1))
        assert answering.wait(CLIENT_TIMEOUT_S), "the C-ECHO was never answered"
        # A P-DATA-TF each: pynetdicom 3.0 decodes one message of a PDU, the first.
        sock.sendall(_echo_pdu(1) * (DIMSE_MAX_QUEUED_REQUESTS + 2))
        return _until_aborted(sock)


async def test_answer_after_the_archive_aborted_is_dropped(archive: Archive) -> None:
    """Found chasing a flaky test: the archive aborts an association for a limit from a thread
    of its own, and the association's thread may be answering a request meanwhile. Its answer
    came to pynetdicom's DUL after the A-ABORT was sent (PS3.8 Sta13, where the state table
    has no P-DATA request, Evt9), which raised InvalidEventError out of the DUL thread: it
    ended, the connection was never closed by the archive nor audited (no EVT_CONN_CLOSE).
    The answer is dropped; the association ends as any other the archive aborts. Here the
    first C-ECHO-RSP is held (EVT_DIMSE_SENT, before it is queued) until the A-ABORT is
    sent, and the DUL thread then (EVT_PDU_SENT, before it goes to Sta13) until the answer
    is queued for it: pynetdicom closes the connection as soon as it finds nothing more to
    read in Sta13, and the answer came between the two when the peer was still sending."""
    assert archive.dimse is not None
    answering, aborted = threading.Event(), threading.Event()

    def hold(_event: Event) -> None:
        if not answering.is_set():
            answering.set()
            aborted.wait(CLIENT_TIMEOUT_S)

    def sent(event: Event) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            aborted.set()
            queued = event.assoc.dul.to_provider_queue
            deadline = time.monotonic() + CLIENT_TIMEOUT_S
            while queued.empty() and time.monotonic() < deadline:
                time.sleep(0.001)

    handlers = [(evt.EVT_DIMSE_SENT, hold), (evt.EVT_PDU_SENT, sent)]
    start = await audit_seq(archive)
    for kind, handler in handlers:
        archive.dimse.server.bind(kind, handler)
    try:
        with Closes(archive) as closes:
            assert await in_thread(_flood_while_answering, archive, answering)
            await closes.wait()
    finally:
        for kind, handler in handlers:
            archive.dimse.server.unbind(kind, handler)
    assert aborted.is_set()
    rows = await audit_rows(archive, "dimse_abort", start)
    assert [r["detail"] for r in rows] == [
        f"aborted by the archive: more than {DIMSE_MAX_QUEUED_REQUESTS} requests queued"
        " unanswered (DIMSE_MAX_QUEUED_REQUESTS)"
    ]


def test_identifier_count_starts_again_with_each_message() -> None:
    """Identifiers served one after another on a long association are each held to the
    limit, not their sum: the count starts again with each message (its last fragment)."""
    assoc = _Assoc([])
    connections = Connections(record=lambda _event: None, max_data_set_bytes=2**32)
    command = b"\x03" + b"\x00" * 80
    half = b"\x00" + b"\x00" * (DIMSE_MAX_IDENTIFIER_BYTES // 2)
    for _ in range(3):
        assert not _received(connections, assoc, command)
        assoc.dimse.message = SimpleNamespace(_data_set_file=None)  # a C-FIND-RQ, decoded
        assert not _received(connections, assoc, half)
        assert not _received(connections, assoc, b"\x02" + half[1:])  # the limit, exactly
        assoc.dimse.message = None  # served


def test_data_set_over_the_limit_in_its_last_fragment_counts_its_bytes() -> None:
    """The bytes of a C-STORE data set audited (0xA700) when its last fragment passes
    max_data_set_bytes were 0: the count started again before the limit was checked."""
    assoc = _Assoc([])
    assoc.dimse.message = SimpleNamespace(_data_set_file=io.BytesIO())  # a C-STORE's, spooled
    connections = Connections(record=lambda _event: None, max_data_set_bytes=100)
    assert _received(connections, assoc, b"\x02" + b"\x00" * 101)
    assert connections.link(assoc).receiving == 101


def _truncated_study_query(cut: int) -> bytes:
    """A study identifier matching PatientID ABCD, its last `cut` bytes not sent: 2 cuts
    into the value (declared 4 bytes), 6 into the element's header."""
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.PatientID = "STUDY", "ABCD"
    return cast(bytes, encode(ds, True, True))[:-cut]


@pytest.mark.parametrize(
    ("cut", "comment"),
    [
        (2, "truncated data set: value of (0010,0020) lacks 2 bytes"),
        (6, "truncated data set: 6 bytes after (0008,0052), no whole element"),
    ],
)
async def test_truncated_find_identifier_is_unable_to_process(
    archive: Archive, cut: int, comment: str
) -> None:
    """Found by review: pydicom decodes an identifier cut short leniently (the value as the
    bytes there are, a header cut short dropped) and the C-FIND answered Success as if it
    were whole. It is refused, 0xC000, as a C-STORE's data set is (PS3.5 7.1)."""
    identifier = _truncated_study_query(cut)
    rsp = await in_thread(_request_with_identifier, archive, C_FIND(), FIND, identifier)
    assert rsp is not None
    assert (rsp.Status, rsp.ErrorComment) == (0xC000, comment)


async def test_truncated_get_identifier_is_unable_to_process(archive: Archive) -> None:
    """The same for a C-GET: its final response 0xC000 with the Error Comment, no
    sub-operation (found by review: it was taken as a query for StudyInstanceUID `1.`)."""
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", "1.2.3.4"
    identifier = cast(bytes, encode(ds, True, True))[:-6]
    get = StudyRootQueryRetrieveInformationModelGet
    rsp = await in_thread(_request_with_identifier, archive, C_GET(), get, identifier)
    assert rsp is not None
    comment = "truncated data set: value of (0020,000D) lacks 6 bytes"
    assert (rsp.Status, rsp.ErrorComment) == (0xC000, comment)
    assert rsp.NumberOfCompletedSuboperations in (None, 0)


async def test_deflated_identifier_is_never_inflated_past_the_limit(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: pynetdicom decoded every request identifier itself before the
    handler, to log it (its LOG_REQUEST_IDENTIFIERS), inflating a Deflated one whole: 389 KB
    sent grew the server by 800 MB before identifier.decode answered 0xC000 (4 MiB sent,
    by some 4 GB). Nothing inflates more than DIMSE_MAX_IDENTIFIER_BYTES + 1 of it."""
    inflated: list[int] = []
    decompress = zlib.decompress

    def spy(data: bytes, *args: Any) -> bytes:
        out = decompress(data, *args)
        inflated.append(len(out))
        return out

    monkeypatch.setattr(zlib, "decompress", spy)
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.PatientID = "STUDY", "NOBODY"
    pad = DIMSE_MAX_IDENTIFIER_BYTES  # the whole identifier is past the limit
    plain = cast(bytes, encode(ds, False, True))
    plain += struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, pad) + b"\x00" * pad
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    identifier = packer.compress(plain) + packer.flush()
    rsp = await in_thread(_request_with_identifier, archive, C_FIND(), FIND, identifier, DEFLATED)
    assert rsp is not None
    limit = DIMSE_MAX_IDENTIFIER_BYTES
    assert (rsp.Status, rsp.ErrorComment) == (0xC000, f"identifier inflates past {limit} bytes")
    assert not [n for n in inflated if n > limit], inflated
