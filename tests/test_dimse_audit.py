"""The audit trail of associations that went wrong (dimse/connections.py): a request the
archive refused (`dimse_associate`), an association ended without release (`dimse_abort`),
and C-STOREs the association ended before they were served (`dimse_store`, 0xFF00), with
real peers: dcmtk's echoscu and findscu, pynetdicom SCUs, raw sockets. The C-STORE cuts, the
size limits and the queued C-STOREs are in test_dimse.py.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    Verification,
)

from dicomweb_server.audit import AuditEvent, AuditRow, dicom_audit_message
from dicomweb_server.config import Settings
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
    in_thread,
    running_archive,
    scu,
)

pytestmark = pytest.mark.db

ASSOCIATION = ("dimse_associate", "dimse_abort")
# Outcomes: the PDU type, then the PDU's result, source and reason bytes (PS3.8 9.3).
A_ABORT_BY_USER = 0x07000000  # A-ABORT, source 0 (service user), reason 0 (Table 9-26)
LOST = 0x07000200  # no PDU: A-P-ABORT, source 2 (service provider), reason not specified


def _export(row: dict[str, Any]) -> dict[str, Any]:
    """The row's DICOM audit message (PS3.15 A.5), as `audit export` writes it."""
    from datetime import UTC, datetime

    event = AuditEvent(datetime.now(UTC), row["caller"], row["client"], row["action"],
                       tuple(row["uids"]), row["outcome"], row["bytes"], row["detail"])  # fmt: skip
    message = dicom_audit_message(AuditRow(1, event, bytes(32), bytes(32)), "archive")
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
    assert row["detail"] == "aborted by the archive: nothing received for 1 s (network timeout)"


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
