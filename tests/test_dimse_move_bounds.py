"""Every wait on a peer that stops answering is bounded: a C-MOVE destination that cannot be
connected to, never answers the A-ASSOCIATE-RQ, never answers a C-STORE, or stops reading
its socket; a C-GET requestor that stops reading. The C-MOVE requestor gets its final
response (PS3.4 C.4.2.3: the sub-operations not performed counted failed), the archive's
threads end, and it serves the next association. The bounds are made small here (the
server's constants, read when the AE is built).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AssociationSocket

from dicomweb_server.config import Settings
from dicomweb_server.dimse import server as dimse_server
from dicomweb_server.dimse.association import discard_unserved_stores
from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    Archive,
    Closes,
    associate,
    identifier,
    in_thread,
    requestor_store,
    running_archive,
    scu,
    stow,
)
from tests.helpers import make_instance

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

MOVE = StudyRootQueryRetrieveInformationModelMove
# The archive's bounds in these tests (seconds): 3 s of network timeout leaves a busy machine
# room for a send that makes progress.
NETWORK_S, ACSE_S, DIMSE_S, CONNECT_S = 3, 2, 2, 2
# Seconds the C-MOVE's final response may take past its bound: the archive's threads,
# the sub-operations failed after it, a busy machine.
SLACK_S = 10


# An instance larger than what the sockets between the archive and a peer that stops
# reading can hold (the archive's send buffer grows to tcp_wmem's 4 MB; the peer's receive
# buffer is made small): 12 MB of pixel data.
def large_instance(study: str) -> Dataset:
    return make_instance(study=study, frames=6, rows=1024, cols=1024)


# The test peers' own files of a data set cut short (pynetdicom leaves them), deleted as the
# archive's are.
SPOOL_CLEANUP = [(event, discard_unserved_stores)
                 for event in (evt.EVT_CONN_CLOSE, evt.EVT_ABORTED)]  # fmt: skip


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dimse_server, "DIMSE_NETWORK_TIMEOUT_S", NETWORK_S)
    monkeypatch.setattr(dimse_server, "DIMSE_ACSE_TIMEOUT_S", ACSE_S)
    monkeypatch.setattr(dimse_server, "DIMSE_DIMSE_TIMEOUT_S", DIMSE_S)
    monkeypatch.setattr(dimse_server, "DIMSE_CONNECTION_TIMEOUT_S", CONNECT_S)


@contextlib.contextmanager
def listen_only(backlog_full: bool = False) -> Iterator[int]:
    """A TCP port where connections are accepted and never read from nor written to (a
    destination that never answers the A-ASSOCIATE-RQ); or, `backlog_full`, where nothing is
    accepted and the listen queue is full, so that a new connection's SYN is dropped and
    connecting hangs (a destination host that does not answer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(listener.accept()[0])

    if backlog_full:
        for _ in range(3):  # Linux queues backlog + 1; the rest wait for room
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            held.append(filler)
        time.sleep(0.2)
        thread = None
    else:
        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        listener.close()  # a connection still trying gets refused: the archive unblocks
        for sock in held:
            sock.close()


@contextlib.contextmanager
def stuck_destination(stop_reading: bool) -> Iterator[tuple[int, list[str]]]:
    """A Storage SCP that accepts the association and then answers its first C-STORE only:
    the second never gets a C-STORE-RSP (`stop_reading` False); or that stops reading its
    socket at the first P-DATA-TF (its DUL thread held in the EVT_PDU_RECV handler, a
    receive buffer of 4 KB). Released when the block ends. Yields its port and the SOP
    Instance UIDs it stored."""
    release = threading.Event()
    stored: list[str] = []
    ae = AE(ae_title="STUCK")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT_S
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ExplicitVRLittleEndian)

    def on_store(event: Event) -> int:
        if stored:
            release.wait(CLIENT_TIMEOUT_S)
        stored.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        with contextlib.suppress(AttributeError):
            event.dataset_path.unlink(missing_ok=True)
        return 0x0000

    def on_pdu(event: Event) -> None:  # in the DUL thread, the only one reading
        if isinstance(event.pdu, P_DATA_TF):
            release.wait(CLIENT_TIMEOUT_S)

    accepted: list[socket.socket] = []

    def on_open(event: Event) -> None:
        accepted.append(cast(socket.socket, cast(AssociationSocket, event.assoc.dul.socket).socket))

    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open),
                           *SPOOL_CLEANUP]  # fmt: skip
    if stop_reading:
        handlers.append((evt.EVT_PDU_RECV, on_pdu))
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None
    # Inherited by the connections accepted (a receive window of a few KB).
    cast(socket.socket, server.socket).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        yield int(server.server_address[1]), stored
    finally:
        release.set()
        ae.shutdown()
        for sock in accepted:  # pynetdicom leaves it open when the archive closed first
            sock.close()


@contextlib.asynccontextmanager
async def archive_moving_to(settings: Settings, tmp_path: Path, port: int) -> Any:
    (tmp_path / "peers.json").write_text(json.dumps({"STUCK": {"host": "127.0.0.1",
                                                               "port": port}}))  # fmt: skip
    async with running_archive(settings, dimse_peers=tmp_path / "peers.json") as archive:
        yield archive


async def move_within(
    archive: Archive, study: str, bound_s: float
) -> tuple[list[tuple[Dataset, Dataset | None]], float]:
    """A C-MOVE of `study` to STUCK, in a thread of its own: its responses, and the seconds
    they took. Fails when the final response has not come within `bound_s` (the thread is
    left to end when the destination is released)."""
    got: list[tuple[Dataset, Dataset | None]] = []
    done = threading.Event()

    def run() -> None:
        try:
            assoc = associate(scu(MOVE), archive)
            ident = identifier("STUDY", StudyInstanceUID=study)
            try:
                got.extend(assoc.send_c_move(ident, "STUCK", MOVE))
            finally:
                done.set()
                # Not a release: should the archive abort the association meanwhile, a
                # pynetdicom requestor whose A-RELEASE-RQ crosses the A-ABORT waits for
                # its reply for the whole ACSE timeout.
                sock = getattr(assoc.dul.socket, "socket", None)
                assoc.abort()
                if sock is not None:
                    sock.close()  # pynetdicom leaves it open when the archive closed first
        finally:
            done.set()

    began = time.monotonic()
    threading.Thread(target=run, daemon=True).start()
    arrived = await in_thread(done.wait, bound_s)
    took = time.monotonic() - began
    assert arrived, f"no final C-MOVE response within {bound_s} s"
    return got, took


async def still_serving(archive: Archive) -> None:
    """Another association, served: a C-ECHO."""

    def echo() -> int:
        assoc = associate(scu(Verification), archive)
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc.release()

    assert await in_thread(echo) == 0x0000


def final_counts(final: Dataset) -> tuple[int, int, int, int]:
    return (int(final.Status), int(final.NumberOfCompletedSuboperations),
            int(final.NumberOfFailedSuboperations),
            int(final.get("NumberOfRemainingSuboperations") or 0))  # fmt: skip


@pytest.fixture
def sub_associations(monkeypatch: pytest.MonkeyPatch) -> list[Association]:
    """The C-MOVE sub-associations the archive opens (the one that failed, when it could not
    be established), as they are opened."""
    opened: list[Association] = []
    associate_ = dimse_server._ArchiveAE.associate

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        assoc = associate_(self, *args, **kwargs)
        opened.append(getattr(assoc, "_failed", assoc))
        return assoc

    monkeypatch.setattr(dimse_server._ArchiveAE, "associate", recording)
    return opened


async def ended(opened: list[Association]) -> None:
    """Until the sub-association's threads (its own, its DUL's) have ended, its socket
    closed."""
    (assoc,) = opened
    deadline = time.monotonic() + SLACK_S
    while (assoc.is_alive() or assoc.dul.is_alive()) and time.monotonic() < deadline:
        await in_thread(time.sleep, 0.05)
    assert not assoc.is_alive() and not assoc.dul.is_alive(), "its threads still run"
    sock = getattr(assoc.dul.socket, "socket", None)
    assert sock is None or sock.fileno() == -1, "its socket still open"


@pytest.mark.usefixtures("small_bounds")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # pynetdicom's refused socket
async def test_a_destination_that_cannot_be_connected_to(
    settings: Settings, tmp_path: Path, sub_associations: list[Association]
) -> None:
    """Its SYN dropped (its listen queue full): DIMSE_CONNECTION_TIMEOUT_S. Before, pynetdicom
    set no connection timeout: the C-MOVE waited for Linux's SYN retries (127 s)."""
    study = "1.2.826.0.1.3680043.8.498.7711"
    with listen_only(backlog_full=True) as port:
        async with archive_moving_to(settings, tmp_path, port) as archive:
            await stow(archive, *(make_instance(study=study) for _ in range(3)))
            got, took = await move_within(archive, study, CONNECT_S + SLACK_S)
            await ended(sub_associations)
            await still_serving(archive)
    assert final_counts(got[-1][0]) == (0xA702, 0, 3, 0)
    assert took >= CONNECT_S


@pytest.mark.usefixtures("small_bounds")
async def test_a_destination_that_never_answers_the_association_request(
    settings: Settings, tmp_path: Path, sub_associations: list[Association]
) -> None:
    """Connected, the A-ASSOCIATE-RQ never answered: the ACSE timeout, then every
    sub-operation failed (0xA702, the destination not reached)."""
    study = "1.2.826.0.1.3680043.8.498.7712"
    with listen_only() as port:
        async with archive_moving_to(settings, tmp_path, port) as archive:
            await stow(archive, *(make_instance(study=study) for _ in range(3)))
            got, took = await move_within(archive, study, ACSE_S + SLACK_S)
            await ended(sub_associations)
            await still_serving(archive)
    assert final_counts(got[-1][0]) == (0xA702, 0, 3, 0)
    assert took >= ACSE_S


@pytest.mark.usefixtures("small_bounds")
async def test_a_destination_that_never_answers_a_c_store(
    settings: Settings, tmp_path: Path, sub_associations: list[Association]
) -> None:
    """Its first C-STORE answered, the second never: the DIMSE timeout aborts the
    sub-association, that sub-operation and the one left fail at once (not each after its
    own DIMSE timeout, nor read): 0xB000, 1 completed, 2 failed, listed."""
    study = "1.2.826.0.1.3680043.8.498.7713"
    instances = [make_instance(study=study) for _ in range(3)]
    with stuck_destination(stop_reading=False) as (port, stored):
        async with archive_moving_to(settings, tmp_path, port) as archive:
            await stow(archive, *instances)
            got, took = await move_within(archive, study, DIMSE_S + SLACK_S)
            await ended(sub_associations)
            await still_serving(archive)
            answered = list(stored)
    final, failed = got[-1]
    assert final_counts(final) == (0xB000, 1, 2, 0)
    assert failed is not None
    assert sorted([*failed.FailedSOPInstanceUIDList, *answered]) == sorted(
        i.SOPInstanceUID for i in instances
    )
    assert took < 2 * DIMSE_S + ACSE_S + SLACK_S


@pytest.mark.usefixtures("small_bounds")
async def test_a_destination_that_stops_reading(
    settings: Settings,
    tmp_path: Path,
    sub_associations: list[Association],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Associated, then its socket never read: the archive's send blocks once the buffers
    are full, and gives up after DIMSE_NETWORK_TIMEOUT_S without progress (the connection
    treated as closed: PS3.8 AA-4). Before, pynetdicom's requestor socket had no timeout:
    the DUL thread's send, the C-MOVE's thread (waiting for room to queue the rest) and the
    C-MOVE requestor waited for ever. The DIMSE timeout is long here: not what ends it."""
    monkeypatch.setattr(dimse_server, "DIMSE_DIMSE_TIMEOUT_S", CLIENT_TIMEOUT_S)
    study = "1.2.826.0.1.3680043.8.498.7714"
    with stuck_destination(stop_reading=True) as (port, stored):
        async with archive_moving_to(settings, tmp_path, port) as archive:
            await stow(archive, large_instance(study), make_instance(study=study))
            got, took = await move_within(archive, study, NETWORK_S + SLACK_S)
            await ended(sub_associations)
            await still_serving(archive)
    assert stored == []
    assert final_counts(got[-1][0]) == (0xA702, 0, 2, 0)
    assert took >= NETWORK_S


@pytest.mark.usefixtures("small_bounds")
async def test_a_get_requestor_that_stops_reading(settings: Settings) -> None:
    """The acceptor side: a C-GET requestor that stops reading its socket while an instance
    is sent to it. Accepted sockets had no timeout either (pynetdicom 3.0): the send
    blocked for ever, and the association's thread with it; the network timeout bounds it
    now, the association ends, and the archive serves the next one."""
    study = "1.2.826.0.1.3680043.8.498.7715"
    release = threading.Event()
    model = StudyRootQueryRetrieveInformationModelGet

    def on_pdu(event: Event) -> None:  # the requestor's DUL thread: nothing more read
        if isinstance(event.pdu, P_DATA_TF):
            release.wait(CLIENT_TIMEOUT_S)

    def small_window(event: Event) -> None:
        sock = cast(socket.socket, cast(AssociationSocket, event.assoc.dul.socket).socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client_socket.append(sock)

    def get() -> None:
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        role = build_role(CTImageStorage, scp_role=True)
        handlers = [(evt.EVT_CONN_OPEN, small_window), (evt.EVT_PDU_RECV, on_pdu),
                    requestor_store(lambda _e: 0x0000), *SPOOL_CLEANUP]  # fmt: skip
        assoc = associate(ae, archive_ref[0], ext_neg=[role], evt_handlers=handlers)
        with contextlib.suppress(Exception):
            list(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study), model))
        assoc.abort()

    archive_ref: list[Archive] = []
    client_socket: list[socket.socket] = []
    async with running_archive(settings) as archive:
        archive_ref.append(archive)
        await stow(archive, large_instance(study))
        with Closes(archive) as closes:
            client = threading.Thread(target=get, daemon=True)
            began = time.monotonic()
            client.start()
            try:
                closed = await in_thread(closes._closed.acquire, timeout=NETWORK_S + SLACK_S)
                took = time.monotonic() - began
            finally:
                release.set()
                for sock in client_socket:  # the requestor gives up too (else its own
                    with contextlib.suppress(OSError):  # DIMSE timeout, 60 s)
                        sock.shutdown(socket.SHUT_RDWR)
                await in_thread(client.join, CLIENT_TIMEOUT_S)
        await still_serving(archive)
    assert closed, f"the archive still sending after {NETWORK_S + SLACK_S} s"
    assert took >= NETWORK_S
