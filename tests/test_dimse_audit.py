"""The audit trail of associations that went wrong (dimse/connections.py): a request the
archive refused (`dimse_associate`), an association ended without release (`dimse_abort`),
and C-STOREs the association ended before they were served (`dimse_store`, 0xFF00), with
real peers: dcmtk's echoscu and findscu, pynetdicom SCUs, raw sockets. The C-STORE cuts, the
size limits and the queued C-STOREs are in test_dimse.py.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import encode
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from dicomweb_server.audit import ARCHIVE_FAULT, AuditEvent, AuditRow, dicom_audit_messages
from dicomweb_server.config import Settings
from dicomweb_server.dimse import connections as dimse_connections
from dicomweb_server.dimse import handlers as dimse_handlers
from dicomweb_server.dimse import server as dimse_server
from dicomweb_server.index.database import Index
from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    SCU,
    Archive,
    Closes,
    associate,
    audit_rows,
    audit_seq,
    dcmtk,
    identifier,
    in_thread,
    requestor_store,
    running_archive,
    scu,
    send_stores,
    store_one,
    store_request,
    stow,
)
from tests.helpers import make_instance

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

ASSOCIATION = ("dimse_associate", "dimse_abort")
# Outcomes: the PDU type, then the PDU's result, source and reason bytes (PS3.8 9.3).
A_ABORT_BY_USER = 0x07000000  # A-ABORT, source 0 (service user), reason 0 (Table 9-26)
LOST = 0x07000200  # no PDU: A-P-ABORT, source 2 (service provider), reason not specified


def _sop(detail: str) -> str:
    """The `sop=UID` of a dimse_store row's detail."""
    return next(word.rstrip(";") for word in detail.split() if word.startswith("sop="))


def _export(row: dict[str, Any]) -> dict[str, Any]:
    """The row's DICOM audit message (PS3.15 A.5), as `audit export` writes it."""
    from datetime import UTC, datetime

    event = AuditEvent(datetime.now(UTC), row["caller"], row["client"], row["action"],
                       tuple(row["uids"]), row["outcome"], row["bytes"], row["detail"])  # fmt: skip
    message = dicom_audit_messages(AuditRow(1, event, bytes(32), bytes(32)), "archive")[0]
    return dict(message["AuditMessage"]["EventIdentification"])


async def test_unknown_calling_ae_rejection_is_audited_once(settings: Settings) -> None:
    """Found by review: an association the archive rejected left no trace. Now one row, the
    caller as dcmtk named itself, the A-ASSOCIATE-RJ as the outcome (PS3.8 Table 9-21:
    permanent, service user, calling AE title not recognised), exported as a failed Login;
    the allowed caller's association, released, adds none."""
    async with running_archive(settings, dimse_allowed_aes=("GOODSCU",)) as archive:
        start = await audit_seq(archive)
        port = str(archive.port)
        with Closes(archive) as closes:
            bad = await dcmtk("echoscu", "-aet", "BADSCU", "-aec", "DICOMWEB", "127.0.0.1", port)
            good = await dcmtk("echoscu", "-aet", "GOODSCU", "-aec", "DICOMWEB", "127.0.0.1", port)
            await closes.wait(2)
        rows = await audit_rows(archive, ASSOCIATION, start)
    assert bad.returncode != 0 and good.returncode == 0, good.stderr
    (row,) = rows
    assert (row["action"], row["caller"], row["client"]) == ("dimse_associate", "ae:BADSCU",
                                                             "127.0.0.1")  # fmt: skip
    assert row["outcome"] == 0x03010103
    assert "calling AE title not recognised" in row["detail"]
    ident = _export(row)
    assert ident["EventID"]["csd-code"] == "110114"  # User Authentication
    assert ident["EventTypeCode"][0]["csd-code"] == "110122"  # Login
    assert ident["EventOutcomeIndicator"] == 4
    assert ident["EventOutcomeDescription"] == row["detail"]  # why it was refused


async def test_association_limit_rejection_is_audited(settings: Settings) -> None:
    async with running_archive(settings, dimse_max_associations=1) as archive:
        start = await audit_seq(archive)

        def second_while_first_held() -> bool:
            ae = scu(Verification)
            first = associate(ae, archive)
            second = ae.associate("127.0.0.1", archive.port)
            first.release()
            return second.is_rejected

        with Closes(archive) as closes:
            assert await in_thread(second_while_first_held)
            await closes.wait(2)
        (row,) = await audit_rows(archive, ASSOCIATION, start)
    assert (row["action"], row["caller"]) == ("dimse_associate", f"ae:{SCU}")
    assert row["outcome"] == 0x03020302  # transient, service provider, local limit exceeded
    assert "local limit exceeded" in row["detail"] and "1 at a time" in row["detail"]


@pytest.mark.parametrize("requestor", ["findscu", "pynetdicom"])
async def test_no_acceptable_presentation_context_is_audited_once(
    archive: Archive, requestor: str
) -> None:
    """The archive never rejects an association for its presentation contexts: pynetdicom
    accepts it with each one refused (PS3.8 9.3.3.2), and the requestor gives up, dcmtk by
    closing the connection, pynetdicom with an A-ABORT. One row, as refused, not a second
    for the end (the outcome: A-ASSOCIATE-AC, abstract syntax not supported, Table 9-18)."""
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        if requestor == "findscu":  # Modality Worklist: this archive does not offer it
            done = await dcmtk("findscu", "-W", "-aet", SCU, "-k", "PatientName=", "127.0.0.1",
                               str(archive.port))  # fmt: skip
            assert "No Acceptable Presentation Contexts" in done.stdout + done.stderr
        else:
            refused = await in_thread(
                scu(ModalityWorklistInformationFind).associate, "127.0.0.1", archive.port
            )
            assert not refused.is_established
        await closes.wait()
    (row,) = await audit_rows(archive, ASSOCIATION, start)
    assert (row["action"], row["caller"], row["outcome"]) == ("dimse_associate", f"ae:{SCU}",
                                                              0x02000003)  # fmt: skip
    then = {"findscu": "connection closed without A-RELEASE or A-ABORT",
            # pynetdicom aborts as the service provider (acse.py: send_abort(0x02))
            "pynetdicom": "aborted by the peer (A-ABORT, service provider: reason not"
                          " specified)"}[requestor]  # fmt: skip
    assert row["detail"] == (
        f"accepted with no presentation context (abstract syntax not supported:"
        f" {ModalityWorklistInformationFind}), then {then}"
    )


@pytest.mark.parametrize("how", ["a-abort", "tcp-cut"])
async def test_association_ended_without_release_is_audited_once(
    archive: Archive, how: str
) -> None:
    """An idle established association the peer aborts, or whose connection it drops: one
    `dimse_abort` row (the A-ABORT received; else an A-P-ABORT), exported as a Logout that
    failed."""
    start = await audit_seq(archive)

    def end_it() -> None:
        assoc = associate(scu(Verification), archive)
        if how == "a-abort":
            assoc.abort()
            return
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # pynetdicom's DUL sees it and ends
        assoc.kill()
        sock.close()  # pynetdicom leaves it open (its shutdown() raised): closed here

    with Closes(archive) as closes:
        await in_thread(end_it)
        await closes.wait()
    (row,) = await audit_rows(archive, ASSOCIATION, start)
    assert (row["action"], row["caller"], row["client"]) == ("dimse_abort", f"ae:{SCU}",
                                                             "127.0.0.1")  # fmt: skip
    if how == "a-abort":
        assert (row["outcome"], row["detail"]) == (
            A_ABORT_BY_USER, "aborted by the peer (A-ABORT, service user)")  # fmt: skip
    else:
        assert (row["outcome"], row["detail"]) == (
            LOST, "connection closed without A-RELEASE or A-ABORT")  # fmt: skip
    ident = _export(row)
    assert ident["EventID"]["csd-code"] == "110114"
    assert ident["EventTypeCode"][0]["csd-code"] == "110123"  # Logout
    assert ident["EventOutcomeIndicator"] == 4


async def test_pdu_too_long_on_an_association_is_audited(archive: Archive) -> None:
    """A P-DATA-TF announcing more than DIMSE_MAX_PDU_BYTES on an established association:
    the archive closes the connection before reading it, and says so."""
    start = await audit_seq(archive)
    length = dimse_server.DIMSE_MAX_PDU_BYTES + 1

    def announce_too_much() -> list[str]:
        """The PDUs the SCU received: its own pynetdicom reads the socket, and sees it close."""
        received: list[str] = []
        closed = threading.Event()
        handlers = [(evt.EVT_PDU_RECV, lambda e: received.append(type(e.pdu).__name__)),
                    (evt.EVT_CONN_CLOSE, lambda _e: closed.set())]  # fmt: skip
        assoc = associate(scu(Verification), archive, evt_handlers=handlers)
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        sock.sendall(struct.pack(">BBI", 0x04, 0, length))  # a P-DATA-TF header, no more
        assert closed.wait(CLIENT_TIMEOUT_S), "the archive never closed the connection"
        assoc.kill()
        sock.close()  # in case pynetdicom left it open
        return received

    with Closes(archive) as closes:
        # Closed by the archive with nothing answered (no A-ABORT).
        assert await in_thread(announce_too_much) == ["A_ASSOCIATE_AC"]
        await closes.wait()
    (row,) = await audit_rows(archive, ASSOCIATION, start)
    assert (row["action"], row["caller"], row["outcome"]) == ("dimse_abort", f"ae:{SCU}", LOST)
    assert row["detail"] == (
        f"connection closed by the archive: a PDU of {length} bytes announced, more than"
        f" DIMSE_MAX_PDU_BYTES ({dimse_server.DIMSE_MAX_PDU_BYTES})"
    )


async def test_idle_association_aborted_by_the_archive_is_audited(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An association left idle past the network timeout: the archive's A-ABORT, and why."""
    monkeypatch.setattr(dimse_server, "DIMSE_NETWORK_TIMEOUT_S", 1)
    async with running_archive(settings) as archive:
        start = await audit_seq(archive)
        aborted: list[bool] = []

        def wait_for_the_archive() -> None:
            done = threading.Event()
            assoc = associate(scu(Verification), archive,
                              evt_handlers=[(evt.EVT_ABORTED, lambda _e: done.set())])  # fmt: skip
            sock = assoc.dul.socket.socket  # type: ignore[union-attr]
            aborted.append(done.wait(CLIENT_TIMEOUT_S))
            assoc.kill()
            if sock is not None:
                sock.close()  # in case pynetdicom left it open

        with Closes(archive) as closes:
            await in_thread(wait_for_the_archive)
            await closes.wait()
        (row,) = await audit_rows(archive, ASSOCIATION, start)
    assert aborted == [True]
    assert (row["action"], row["caller"], row["outcome"]) == ("dimse_abort", f"ae:{SCU}",
                                                              A_ABORT_BY_USER)  # fmt: skip
    assert row["detail"] == (
        "aborted by the archive: nothing sent or received for 1 s (network timeout)"
    )


async def test_associations_aborted_at_shutdown_are_audited(settings: Settings) -> None:
    """The AE aborts what is still open when the server stops: audited as that, and written
    before the audit trail closes."""
    ae = scu(Verification)
    async with running_archive(settings) as archive:
        start = await audit_seq(archive)
        held = await in_thread(associate, ae, archive)
    held.kill()
    assert settings.database_url is not None
    index = await Index.open(settings.database_url, max_size=1, timeout_s=30)
    try:
        rows = await index._fetch(
            "SELECT action, caller, outcome, detail FROM audit_log WHERE seq > $1", start
        )
    finally:
        await index.close()
    assert [dict(r) for r in rows] == [{
        "action": "dimse_abort", "caller": f"ae:{SCU}", "outcome": A_ABORT_BY_USER,
        "detail": "aborted by the archive: the archive is shutting down",
    }]  # fmt: skip


@pytest.mark.parametrize("over", [0, 1])
async def test_refused_first_pdu_is_audited_without_a_caller(archive: Archive, over: int) -> None:
    """A connection whose first PDU is no association request: longer than
    DIMSE_MAX_PDU_BYTES (closed before it is read), or of that length and unreadable
    (A-ABORT). No AE title was read: the caller is `-`, the peer's address is known."""
    start = await audit_seq(archive)
    length = dimse_server.DIMSE_MAX_PDU_BYTES + over

    def send() -> None:
        with socket.create_connection(("127.0.0.1", archive.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0, length))
            try:
                if not over:
                    sock.sendall(b"\xff" * length)
                while sock.recv(65536):  # until the archive closes it
                    pass
            except ConnectionResetError:
                pass

    with Closes(archive) as closes:
        await in_thread(send)
        await closes.wait()
    (row,) = await audit_rows(archive, ASSOCIATION, start)
    assert (row["action"], row["caller"], row["client"]) == ("dimse_associate", "-",
                                                             "127.0.0.1")  # fmt: skip
    if over:
        assert row["outcome"] == LOST
        assert row["detail"].startswith(
            f"not answered: connection closed by the archive: a PDU of {length} bytes"
        )
    else:
        assert row["outcome"] == A_ABORT_BY_USER  # pynetdicom sends its A-ABORT so (AA-1)
        assert row["detail"] == (
            "not answered: aborted by the archive: a PDU it could not accept as an"
            " association request"
        )


async def test_connection_without_a_pdu_is_not_audited(archive: Archive) -> None:
    """A port probe or a health check (connect, close) is no association attempt."""
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        await in_thread(lambda: socket.create_connection(("127.0.0.1", archive.port)).close())
        await closes.wait()
    assert await audit_rows(archive, ASSOCIATION, start) == []


async def test_released_association_is_not_audited(archive: Archive) -> None:
    start = await audit_seq(archive)

    def echo_then_release() -> None:
        assoc = associate(scu(Verification), archive)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

    with Closes(archive) as closes:
        await in_thread(echo_then_release)
        await closes.wait()
    assert await audit_rows(archive, (*ASSOCIATION, "dimse_store"), start) == []


# -- Messages pynetdicom cannot take, data sets over the limit (found by review) -------------


def _p_data_tf(*pdvs: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU of these (context ID, message control header + fragment) values
    (PS3.8 9.3.5, E.2), as a peer may send it: several PDVs in one PDU."""
    items = b"".join(struct.pack(">IB", len(value) + 1, cx) + value for cx, value in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


def _c_store_values(ds: Dataset, message_id: int = 1) -> tuple[bytes, bytes]:
    """A C-STORE-RQ of `ds` (explicit VR little endian) as two last fragments: its command,
    its data set."""
    req = store_request(ds, message_id)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = cast(bytes, encode(msg.command_set, True, True))
    return b"\x03" + command, b"\x02" + cast(io.BytesIO, req.DataSet).getvalue()


def _send_then_wait_for_the_end(archive: Archive, pdu: bytes) -> None:
    """Over a CT association, send `pdu` raw, then read until the archive closes."""
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, archive)
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock is not None
    sock.sendall(pdu)
    sock.settimeout(CLIENT_TIMEOUT_S)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    assoc.kill()
    sock.close()  # in case pynetdicom left it open


@pytest.mark.parametrize("message", ["unknown command field", "context never accepted"])
async def test_message_pynetdicom_cannot_decode_is_aborted_and_audited(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    """Found by review: a command pynetdicom could not decode raised out of its state
    machine and ended the connection's DUL thread, with no A-ABORT and no EVT_CONN_CLOSE:
    the association left no audit row, and a C-STORE's spool file stayed behind. Now it is
    an invalid PDU (PS3.8 9.2 Evt19): the archive's A-ABORT, audited as any other."""
    spool = tmp_path / "pynetdicom-spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    ds = make_instance(rows=8, cols=8)
    if message == "unknown command field":
        req = C_ECHO()
        req.MessageID, req.AffectedSOPClassUID = 1, Verification
        echo = C_ECHO_RQ()
        echo.primitive_to_message(req)
        echo.command_set.CommandField = 0x1234  # no DIMSE message (PS3.7 Table E.1-1)
        pdu = _p_data_tf((1, b"\x03" + cast(bytes, encode(echo.command_set, True, True))))
    else:
        command, _data_set = _c_store_values(ds)
        pdu = _p_data_tf((99, command))  # the SCU proposed context 1 only
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        await in_thread(_send_then_wait_for_the_end, archive, pdu)
        await closes.wait()
    rows = await audit_rows(archive, (*ASSOCIATION, "dimse_store"), start)
    why = "aborted by the archive: a PDU or message it could not accept, or no answer in time"
    expected = [("dimse_abort", 0x07000200, why)]  # A-ABORT, service provider (AA-8)
    if message == "context never accepted":  # its command decoded, its data set not sent
        expected.insert(0, ("dimse_store", 0xFF00, f"sop={ds.SOPInstanceUID} data set"
                            f" incomplete (0 bytes received); not served, the association"
                            f" ended: {why}"))  # fmt: skip
    assert [(r["action"], r["outcome"], r["detail"]) for r in rows] == expected
    assert list(spool.glob("*.dcm")) == []


async def test_too_large_data_set_sent_with_its_command_is_audited_once(
    settings: Settings,
) -> None:
    """A peer may send a command and its data set in one P-DATA-TF. Found by review: when
    the data set passed the limit in that PDU, the archive did not know the C-STORE yet and
    audited it twice: 0xA700 with no SOP Instance UID, then 0xFF00 as received whole."""
    ds = make_instance(rows=64, cols=64)
    command, data_set = _c_store_values(ds)
    async with running_archive(settings, max_part_bytes=1000) as archive:
        start = await audit_seq(archive)
        with Closes(archive) as closes:
            await in_thread(_send_then_wait_for_the_end, archive,
                            _p_data_tf((1, command), (1, data_set)))  # fmt: skip
            await closes.wait()
        rows = await audit_rows(archive, (*ASSOCIATION, "dimse_store"), start)
    limit = "more than 1000 bytes (DICOMWEB_MAX_PART_BYTES)"
    store = f"over the limit: a data set of {limit}, aborted; sop={ds.SOPInstanceUID}"
    end = f"aborted by the archive: a data set of {limit}"
    assert [(r["action"], r["outcome"], r["detail"]) for r in rows] == [
        ("dimse_store", 0xA700, store),
        ("dimse_abort", A_ABORT_BY_USER, end),
    ]
    # Exported as a refused request, as STOW's 413 for the same limit (found by review: 8,
    # a serious failure), each with why (found by review: the detail was not exported).
    for row, why in zip(rows, (store, end), strict=True):
        exported = _export(row)
        assert (exported["EventOutcomeIndicator"], exported["EventOutcomeDescription"]) == (
            4,
            why,
        )


async def test_c_store_queued_before_a_too_large_one_with_its_message_id_is_audited(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Message IDs need only be unique among a peer's outstanding requests, and some peers
    reuse one. Found by review: the C-STORE aborted for its size was told from those queued
    by its Message ID, so one queued with the same ID was neither served nor audited. Here
    the first C-STORE is slow to store, the second waits, whole, and the third is too large:
    the first is stored, the second audited unserved, the third audited 0xA700."""
    store = dimse_handlers.Handlers._store
    storing = threading.Event()

    def slow_store(handlers: Any, event: Any) -> Any:
        storing.set()
        time.sleep(1.0)
        return store(handlers, event)

    monkeypatch.setattr(dimse_handlers.Handlers, "_store", slow_store)
    first, second = make_instance(rows=8, cols=8), make_instance(rows=8, cols=8)
    too_large = make_instance(rows=256, cols=256)
    async with running_archive(settings, max_part_bytes=20_000) as archive:
        start = await audit_seq(archive)

        def send() -> None:
            ae = scu()
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = associate(ae, archive, evt_handlers=[(evt.EVT_ABORTED, lambda _e: done.set())])
            (cx,) = assoc.accepted_contexts
            for ds in (first, second, too_large):  # the same Message ID each time
                assoc.dimse.send_msg(store_request(ds, 1), cast(int, cx.context_id))
                # The first being stored before the others come: on a loaded machine the
                # too large one came first and the first went unserved (0xFF00) too.
                assert storing.wait(CLIENT_TIMEOUT_S), "the first C-STORE was not served"
            assert done.wait(CLIENT_TIMEOUT_S), "the archive never aborted"
            assoc.kill()

        done = threading.Event()
        with Closes(archive) as closes:
            await in_thread(send)
            await closes.wait()
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while len(rows := await audit_rows(archive, "dimse_store", start)) < 3:
            assert time.monotonic() < deadline, rows  # the first one is still being stored
            await asyncio.sleep(0.1)
    outcomes = {_sop(r["detail"]): r["outcome"] for r in rows}
    assert len(rows) == 3 and outcomes == {
        f"sop={first.SOPInstanceUID}": 0x0000,
        f"sop={second.SOPInstanceUID}": 0xFF00,
        f"sop={too_large.SOPInstanceUID}": 0xA700,
    }


def test_audit_event_once_the_server_loop_stopped_neither_waits_nor_raises() -> None:
    """Found by review: an event recorded from pynetdicom's threads once the server's loop
    had stopped (a connection still open after shutdown) waited DIMSE_QUERY_TIMEOUT_S, in a
    DUL thread that keeps the process alive, and raised once the loop was closed, which
    made pynetdicom skip the event's later handlers (discard_unserved_stores)."""
    from datetime import UTC, datetime

    class Trail:
        async def record(self, event: AuditEvent) -> None:
            raise AssertionError("never run")

    loop = asyncio.new_event_loop()
    handlers = dimse_handlers.Handlers(cast(Any, None), loop, "AE", {}, "", cast(Any, Trail()))
    event = AuditEvent(datetime.now(UTC), "ae:X", "127.0.0.1", "dimse_abort", (), LOST)
    began = time.monotonic()
    handlers._record(event)  # stopped
    loop.close()
    handlers._record(event)  # closed
    assert time.monotonic() - began < 5  # DIMSE_QUERY_TIMEOUT_S before the fix


async def test_a_connections_handler_that_raises_skips_no_later_handler(
    archive: Archive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pynetdicom calls an event's handlers in one loop, and the first to raise skips the
    rest. Found by review: an error in a Connections handler skipped the handlers bound after
    it, discard_unserved_stores among them. Here the step that audits the queued C-STOREs
    fails (on EVT_ABORTED, and on EVT_CONN_CLOSE): the error is logged, the spool files of
    the C-STOREs left queued still go, the later handlers (Closes) still run, and the
    archive serves the next association."""
    spool = tmp_path / "pynetdicom-spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    store = dimse_handlers.Handlers._store

    def slow_store(handlers: Any, event: Any) -> Any:  # the others queue meanwhile
        time.sleep(1.0)
        return store(handlers, event)

    def broken(*_args: Any) -> None:
        raise RuntimeError("an internal step failed")

    monkeypatch.setattr(dimse_handlers.Handlers, "_store", slow_store)
    monkeypatch.setattr(dimse_connections.Connections, "_queued", broken)
    instances = [make_instance(rows=64, cols=64) for _ in range(4)]

    def send_all_then_abort() -> None:
        ae = scu()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, archive)
        send_stores(assoc, instances)
        time.sleep(0.3)  # all of them received, the first being stored
        assoc.abort()

    def spool_emptied() -> bool:
        deadline = time.monotonic() + 10
        while list(spool.glob("*.dcm")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not list(spool.glob("*.dcm"))

    with Closes(archive, evt.EVT_ABORTED) as aborts, Closes(archive) as closes:
        await in_thread(send_all_then_abort)
        assert await in_thread(spool_emptied), list(spool.glob("*.dcm"))
        await aborts.wait()  # bound after Connections.ended: they ran
        await closes.wait()  # bound after Connections.closed
    logged = {r.getMessage(): r.exc_info for r in caplog.records}
    assert "an internal step failed" in str(logged["DIMSE: ended failed on EVT_ABORTED"])
    monkeypatch.undo()
    assert (await store_one(archive, make_instance(rows=8, cols=8))).Status == 0x0000


async def test_a_retrieve_the_archive_could_not_send_is_its_failure(archive: Archive) -> None:
    """Found by review: every 0xA702 (every sub-operation failed) was exported as a refused
    request (4), so was a C-GET whose instances the archive could not read (its files lost):
    the archive failing, as a 5xx, a serious failure (8). Its detail says so first; the
    same C-GET with the files there but no SCP role taken (the requestor's doing) stays 4."""
    study = "1.2.826.0.1.3680043.8.498.81"
    instances = [make_instance(study=study, patient_id="LOST-ALL") for _ in range(2)]
    await stow(archive, *instances)
    model = StudyRootQueryRetrieveInformationModelGet

    def get(role: bool) -> Dataset:
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ext_neg = [build_role(CTImageStorage, scp_role=True)] if role else []
        on_store = requestor_store(lambda _event: 0x0000)
        assoc = associate(ae, archive, ext_neg=ext_neg, evt_handlers=[on_store])
        try:
            ident = identifier("STUDY", StudyInstanceUID=study)
            return [st for st, _ in assoc.send_c_get(ident, model)][-1]
        finally:
            assoc.release()

    start = await audit_seq(archive)
    assert (await in_thread(get, False)).Status == 0xA702
    for inst in await archive.services.index.locate(study):
        archive.services.blobs.local_path(inst.blob_key).unlink()
    assert (await in_thread(get, True)).Status == 0xA702
    refused, lost = await audit_rows(archive, "dimse_get", start)
    assert (refused["outcome"], lost["outcome"]) == (0xA702, 0xA702)
    assert not refused["detail"].startswith(ARCHIVE_FAULT)
    assert lost["detail"] == (
        f"{ARCHIVE_FAULT}2 not read or converted; matched=2 completed=0 warning=0 failed=2"
    )
    assert [_export(row)["EventOutcomeIndicator"] for row in (refused, lost)] == [4, 8]


def _full_disk(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spool file's fsync fails with ENOSPC, as a full disk fails it (test_faults.py)."""
    import errno
    import os

    from dicomweb_server.blobstore import files

    real_fsync, tmp_dir = files._fsync_path, archive.services.blobs.tmp_dir  # type: ignore[attr-defined]

    def full(path: Path, flags: int = os.O_RDONLY) -> None:
        if tmp_dir in path.parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(path, flags)

    monkeypatch.setattr(files, "_fsync_path", full)


async def _stow_refused(archive: Archive, part10: bytes) -> dict[str, Any]:
    """STOW-RS of one instance the archive does not store: its audit row."""
    from tests.helpers import ROOT, multipart_body, stow_headers

    start = await audit_seq(archive)
    r = await archive.http.post(
        f"{ROOT}/studies", content=multipart_body([part10]), headers=stow_headers()
    )
    assert r.status_code == 409, r.text
    (row,) = await audit_rows(archive, "store_instances", start)
    return row


async def test_a_full_disk_is_the_archives_failure_on_both_paths(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a full disk exported as a serious failure (8) over DIMSE (0xA700)
    and as a refused request (4) over STOW-RS (409: nothing stored). The archive could not
    do what it was asked for want of its own resources: 8 on both. The STOW row's detail
    says so first (ARCHIVE_FAULT); a STOW refused for its content stays 4."""
    from tests.helpers import to_bytes

    _full_disk(archive, monkeypatch)
    start = await audit_seq(archive)
    assert (await store_one(archive, make_instance())).Status == 0xA700
    (dimse,) = await audit_rows(archive, "dimse_store", start)
    stow_row = await _stow_refused(archive, to_bytes(make_instance()))
    assert dimse["outcome"] == 0xA700 and "No space left" in dimse["detail"]
    assert stow_row["outcome"] == 409
    assert stow_row["detail"] == f"{ARCHIVE_FAULT}1 not stored; stored=0 failed=1"
    assert [_export(row)["EventOutcomeIndicator"] for row in (dimse, stow_row)] == [8, 8]
    monkeypatch.undo()
    refused = await _stow_refused(archive, b"not DICOM")
    assert refused["detail"] == "stored=0 failed=1"
    assert _export(refused)["EventOutcomeIndicator"] == 4


async def test_a_deflate_bomb_is_a_refused_request_on_both_paths(
    archive: Archive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by review: a Deflated C-STORE data set inflating past MAX_INFLATED_BYTES
    (0xA700) exported as a serious failure (8), STOW-RS's refusal of the same (409) as a
    refused request (4). A limit the peer passed: 4 on both, its DIMSE detail beginning
    OVER_LIMIT as that of a data set over MAX_PART_BYTES does."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from dicomweb_server import dicomfile
    from dicomweb_server.audit import OVER_LIMIT
    from tests.dimse_support import store_one_file

    ds = make_instance(rows=64, cols=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(dicomfile, "MAX_INFLATED_BYTES", 4096)  # Pixel Data alone is 8 KiB
    caplog.set_level("INFO", logger="dicomweb_server.dimse.handlers")
    start = await audit_seq(archive)
    rsp = await store_one_file(archive, path, CTImageStorage, DeflatedExplicitVRLittleEndian)
    assert rsp.Status == 0xA700 and "inflates" in rsp.ErrorComment
    # The log names the instance the request named (the refused file's own UIDs unread): it
    # said "C-STORE of None refused".
    assert f"C-STORE of {ds.SOPInstanceUID} refused" in caplog.text
    (dimse,) = await audit_rows(archive, "dimse_store", start)
    stow_row = await _stow_refused(archive, path.read_bytes())
    assert dimse["detail"] == f"{OVER_LIMIT}sop={ds.SOPInstanceUID}; {rsp.ErrorComment}"
    assert stow_row["detail"] == "stored=0 failed=1"
    assert [_export(row)["EventOutcomeIndicator"] for row in (dimse, stow_row)] == [4, 4]


async def test_why_a_c_find_failed_is_audited(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a failed C-FIND's row held its query only, not why it failed. Its
    detail now ends with the Error Comment answered, as a refused C-STORE's does. A C-FIND
    that fails unexpectedly is answered 0x0110 (processing failure: pynetdicom answered
    0xC311 with no comment) and audited so, a serious failure (8), not 0xFF00 (the
    association ended first) without a reason."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    model = StudyRootQueryRetrieveInformationModelFind

    def find(ident: Dataset) -> Dataset:
        assoc = associate(scu(model), archive)
        try:
            return [st for st, _ in assoc.send_c_find(ident, model)][-1]
        finally:
            assoc.release()

    await stow(archive, make_instance(patient_id="FIND-FAILS"))
    start = await audit_seq(archive)
    refused = await in_thread(find, identifier("STUDY", StudyDate="2024x"))
    assert refused.Status == 0xC000 and refused.ErrorComment
    (row,) = await audit_rows(archive, "dimse_find", start)
    assert (row["outcome"], row["detail"]) == (
        0xC000, f"StudyDate=2024x QueryRetrieveLevel=STUDY matches=0; {refused.ErrorComment}"
    )  # fmt: skip
    assert _export(row)["EventOutcomeIndicator"] == 4

    def broken(*_: object) -> Dataset:
        raise RuntimeError("an internal step failed")

    monkeypatch.setattr(dimse_handlers, "find_response", broken)
    start = await audit_seq(archive)
    failed = await in_thread(find, identifier("STUDY", PatientID="FIND-FAILS"))
    assert (failed.Status, failed.ErrorComment) == (0x0110, "processing failure")
    (row,) = await audit_rows(archive, "dimse_find", start)
    assert (row["outcome"], row["detail"]) == (
        0x0110, "QueryRetrieveLevel=STUDY PatientID=FIND-FAILS matches=0; processing failure"
    )  # fmt: skip
    assert _export(row)["EventOutcomeIndicator"] == 8
