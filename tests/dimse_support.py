"""Shared by the DIMSE tests: the archive with its AE on a free port, a peer Storage SCP,
and the clients (dcmtk in subprocesses, pynetdicom SCUs in worker threads, so that the event
loop keeps serving the archive's handlers). Every client call is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from dicomweb_server.app import create_app
from dicomweb_server.auditlog import AuditLog
from dicomweb_server.config import Settings
from dicomweb_server.dimse.server import DimseServer
from dicomweb_server.ingest import Services
from tests.helpers import (
    ROOT,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

T = TypeVar("T")
# Seconds any one client run may take: a hang fails the test instead of the suite.
CLIENT_TIMEOUT_S = 60
SCU = "TESTSCU"
PEER = "PEERSCP"


@dataclass
class Peer:
    """A pynetdicom Storage SCP: the C-MOVE destination the archive is configured with."""

    port: int
    received: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> data set
    syntaxes: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> as sent


@dataclass
class Archive:
    port: int
    http: httpx.AsyncClient
    services: Services
    settings: Settings
    audit: AuditLog | None = None
    dimse: DimseServer | None = None


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def store_request(ds: Dataset, message_id: int) -> C_STORE:
    """A C-STORE-RQ primitive of `ds` (CT Image Storage, explicit VR little endian)."""
    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    req.DataSet = io.BytesIO(cast(bytes, encode(ds, False, True)))
    return req


def send_stores(assoc: Association, instances: list[Dataset]) -> None:
    """A C-STORE-RQ of each of `instances` sent on the association's one accepted context,
    without waiting for any answer (Message IDs 1, 2, ...)."""
    (cx,) = assoc.accepted_contexts
    for n, ds in enumerate(instances, 1):
        assoc.dimse.send_msg(store_request(ds, n), cast(int, cx.context_id))


def dataset_bytes(part10: bytes | Path) -> bytes:
    """The data set of a Part-10 file: the bytes after its File Meta Information."""
    if isinstance(part10, bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part10.dcm"
            path.write_bytes(part10)
            return dataset_bytes(path)
    _meta, offset = split_dataset(part10)
    return part10.read_bytes()[offset:]


def requestor_store(handler: Callable[[Event], int]) -> tuple[Any, Callable[[Event], int]]:
    """The EVT_C_STORE binding of a C-GET requestor: `handler`, then the file the data set
    was received into deleted. The archive turns pynetdicom's STORE_RECV_CHUNKED_DATASET on
    for the whole process, and pynetdicom deletes those files in its Storage SCP service
    only, not on a requestor's side (Association._c_store_scp, pynetdicom 3.0): every
    instance a test's C-GET received stayed in TMPDIR."""

    def served(event: Event) -> int:
        try:
            return handler(event)
        finally:
            with contextlib.suppress(AttributeError):  # not spooled: nothing to delete
                event.dataset_path.unlink(missing_ok=True)

    return (evt.EVT_C_STORE, served)


def received_data_set(event: Event) -> bytes:
    # The archive sets pynetdicom's STORE_RECV_CHUNKED_DATASET for this process.
    try:
        return dataset_bytes(event.dataset_path)
    except AttributeError:
        return event.encoded_dataset(include_meta=False)


@contextlib.contextmanager
def running_peer(
    transfer_syntaxes: list[str] = ALL_TRANSFER_SYNTAXES, store_delay_s: float = 0.0
) -> Iterator[Peer]:
    """A Storage SCP for every storage SOP Class in `transfer_syntaxes`, taking
    `store_delay_s` over each C-STORE (a slow destination)."""
    ae = AE(ae_title=PEER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT_S
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, transfer_syntaxes)
    found = Peer(0)

    def on_store(event: Event) -> int:
        time.sleep(store_delay_s)
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        found.received[uid] = received_data_set(event)
        found.syntaxes[uid] = str(event.context.transfer_syntax)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    found.port = int(server.server_address[1])
    try:
        yield found
    finally:
        ae.shutdown()


@contextlib.asynccontextmanager
async def running_archive(settings: Settings, **overrides: Any) -> AsyncIterator[Archive]:
    s = replace(settings, host="127.0.0.1", dimse_port=0, **overrides)
    app = create_app(s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Archive(app.state.dimse.port, http, app.state.services, s, app.state.audit,
                          app.state.dimse)  # fmt: skip


@contextlib.asynccontextmanager
async def archive_with_peer(
    settings: Settings, peer: Peer, tmp_path: Path
) -> AsyncIterator[Archive]:
    """The archive, with `peer` configured as the C-MOVE destination PEERSCP."""
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({PEER: {"host": "127.0.0.1", "port": peer.port}}))
    async with running_archive(settings, dimse_peers=peers) as a:
        yield a


async def dcmtk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} not found: `make test` installs Debian's dcmtk")
    return await in_thread(
        subprocess.run, list(args), capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
        cwd=cwd,
    )  # fmt: skip


def scu(*contexts: str) -> AE:
    ae = AE(ae_title=SCU)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT_S
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae


def associate(ae: AE, archive: Archive, **kwargs: Any) -> Association:
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="DICOMWEB", **kwargs)
    assert assoc.is_established, "association refused"
    return assoc


def association_request(calling: str = SCU) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification in Implicit VR Little Endian, as
    presentation context 1 (PS3.8 9.3.2: application context, one presentation context, a
    Maximum Length): for a peer on a plain socket, which nothing but the test reads."""

    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    syntaxes = item(0x30, Verification.encode()) + item(0x40, b"1.2.840.10008.1.2")
    context = b"\x01\x00\x00\x00" + syntaxes
    user = item(0x51, struct.pack(">I", 16382))
    body = (struct.pack(">HH", 1, 0) + b"DICOMWEB".ljust(16) + calling.encode().ljust(16)
            + bytes(32) + item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context)
            + item(0x50, user))  # fmt: skip
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> bytes:
    """The next PDU the archive sends, whole (b"" once it closed)."""
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


async def store_one(archive: Archive, data: Dataset | Path) -> Dataset:
    """One CT C-STORE (explicit little endian) over its own association; the response."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    return await store_one_file(archive, data, CTImageStorage, ExplicitVRLittleEndian)


async def store_one_file(
    archive: Archive, path: Dataset | Path, sop_class: str, syntax: str
) -> Dataset:
    """One C-STORE (of a Part-10 file, or a data set) in the presentation context of
    `sop_class` and `syntax`, over its own association; the response."""
    ae = scu()
    ae.add_requested_context(sop_class, syntax)

    def send() -> Dataset:
        assoc = associate(ae, archive)
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()

    return await in_thread(send)


async def stow(archive: Archive, *datasets: Dataset) -> None:
    body = multipart_body(to_bytes(ds) for ds in datasets)
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


async def wado_instance(archive: Archive, study: str, series: str, sop: str) -> bytes:
    url = f"{ROOT}/studies/{study}/series/{series}/instances/{sop}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    r = await archive.http.get(url, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((_headers, part),) = split_multipart(r.content, r.headers["content-type"])
    return part


async def stored_file(archive: Archive, study: str, series: str, sop: str) -> bytes:
    """The file the archive keeps for an instance, read from its blob: what was received, byte
    for byte (WADO-RS sends Implicit VR and Big Endian instances converted, PS3.18 8.7.3)."""
    (inst,) = await archive.services.index.locate(study, series, sop)
    return archive.services.blobs.local_path(inst.blob_key).read_bytes()


async def instance_count(archive: Archive) -> int:
    return (await archive.services.index.counts())["instances"]


def blobs(archive: Archive) -> list[Path]:
    """Placed blobs and leftover spool files (the spool directory itself may remain)."""
    root = archive.settings.blob_dir
    return [p for p in root.rglob("*") if p.is_file()]


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


async def audit_seq(archive: Archive) -> int:
    """The last row of the audit trail (which no test truncates: its triggers refuse it)."""
    assert archive.audit is not None
    await archive.audit.flush()
    rows = await archive.services.index._fetch("SELECT coalesce(max(seq), 0) AS s FROM audit_log")
    return int(rows[0]["s"])


async def audit_rows(
    archive: Archive, action: str | tuple[str, ...], after: int
) -> list[dict[str, Any]]:
    """The audit trail's rows of `action` (or of any of them) after row `after`, oldest
    first, once every event queued is written."""
    assert archive.audit is not None
    await archive.audit.flush()
    rows = await archive.services.index._fetch(
        "SELECT caller, client, action, uids, outcome, bytes, detail FROM audit_log"
        " WHERE action = ANY($1::text[]) AND seq > $2 ORDER BY seq",
        [action] if isinstance(action, str) else list(action),
        after,
    )
    return [dict(r) for r in rows]


class Closes:
    """Counts the connections the archive has finished with. Bound to EVT_CONN_CLOSE (or
    `event`) after the archive's own handlers, it runs once they have handled it and queued
    their audit events (dimse/connections.py), so that `wait` then `audit_rows` reads them."""

    def __init__(self, archive: Archive, event: Any = evt.EVT_CONN_CLOSE) -> None:
        assert archive.dimse is not None
        self._server = archive.dimse.server
        self._event = event
        self._closed = threading.Semaphore(0)

    def __enter__(self) -> Closes:
        self._server.bind(self._event, self._on_close)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.unbind(self._event, self._on_close)

    def _on_close(self, event: Event) -> None:
        self._closed.release()

    async def wait(self, count: int = 1) -> None:
        """Until `count` more connections have closed."""
        for _ in range(count):
            closed = await in_thread(self._closed.acquire, timeout=CLIENT_TIMEOUT_S)
            assert closed, "the archive never closed the connection"


def get_study(
    archive: Archive, study: str, sop_class: str, on_store: Callable[[Event], int]
) -> list[Dataset]:
    """C-GET of a study by a requestor taking `sop_class` in Explicit VR Little Endian only;
    the statuses answered."""
    from pydicom.uid import ExplicitVRLittleEndian

    model = StudyRootQueryRetrieveInformationModelGet
    ae = scu(model)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    role = build_role(sop_class, scp_role=True)
    assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[requestor_store(on_store)])
    try:
        ident = identifier("STUDY", StudyInstanceUID=study)
        return [st for st, _ in assoc.send_c_get(ident, model)]
    finally:
        assoc.release()


def as_part10(data_set: bytes, transfer_syntax: str) -> Dataset:
    """A data set received over DIMSE, decoded in the transfer syntax it was sent in."""
    ts = UID(transfer_syntax)
    ds = read_dataset(io.BytesIO(data_set), ts.is_implicit_VR, ts.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def converted_whole(inst: Any, path: Path, target: str, scratch_dir: Path) -> Any:
    """conversion.converted_for_peer, once its conversion is over (it returns once the
    converted file's header is written, the rest written as it is sent): the StoredFile."""
    from dicomweb_server.dimse import conversion

    sent = conversion.converted_for_peer(inst, path, target, scratch_dir)
    assert sent.growing is not None
    try:
        assert sent.growing.wait_done(CLIENT_TIMEOUT_S), "the conversion never ended"
    except BaseException:
        sent.growing.cancel()
        raise
    return sent
