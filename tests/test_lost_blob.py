"""A stored instance whose blob is gone (or cut short) is repaired by a re-send of the same data
set, over STOW-RS or C-STORE (duplicates.repair_lost_blob): the index once acknowledged it and
could not serve it, and the re-send did nothing. Until then, every read of the file answers a 500
that says so and how to repair it, and logs one line naming the file, no traceback
(blobstore.lost.LostBlobError); metadata, from the index, is served."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from starlette.applications import Starlette

from dicomweb_server.blobstore.lost import REPAIR_HINT
from tests.helpers import (
    ROOT,
    asgi_get,
    inst_url,
    make_instance,
    multipart_body,
    pending_reservations,
    split_multipart,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

# Clients that re-send the same instance at once in the concurrency test.
SENDERS = 4


def _blob_files(app: Starlette) -> list[Path]:
    """Placed blobs (spool files aside)."""
    root = app.state.services.blobs.root
    return [p for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "tmp"]


async def _blob_path(app: Starlette, ds: Any) -> Path:
    svc = app.state.services
    (inst,) = await svc.index.locate(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path: Path = svc.blobs.local_path(inst.blob_key)
    return path


async def _stow(client: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )


async def _retrieved(client: httpx.AsyncClient, ds: Any) -> bytes:
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    r = await client.get(inst_url(ds), headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((_headers, part),) = split_multipart(r.content, r.headers["content-type"])
    return part


async def _nothing_left(app: Starlette) -> None:
    """No reservation but the spare keys, no spool file."""
    svc = app.state.services
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        assert await pending_reservations(conn, svc.index) == 0
    finally:
        await conn.close()
    assert [p for p in svc.blobs.tmp_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
async def test_a_resent_instance_replaces_its_lost_blob(
    app: Starlette, app_client: httpx.AsyncClient, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_instance()
    data = to_bytes(ds)
    assert (await _stow(app_client, data)).status_code == 200
    lost = await _blob_path(app, ds)
    if damage == "deleted":
        lost.unlink()
    else:
        lost.write_bytes(data[: len(data) // 2])
    # Meanwhile (conformance/STATEMENT.md): metadata from the index, the file's bytes a 500.
    r = await app_client.get(f"{inst_url(ds)}/metadata")
    assert r.status_code == 200, r.text
    any_syntax = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = await app_client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": any_syntax})
    assert r.status_code == 500 and REPAIR_HINT in r.json()["message"]

    r = await _stow(app_client, data)
    assert r.status_code == 200, r.text
    assert "00081198" not in r.json()
    restored = await _blob_path(app, ds)
    assert restored.read_bytes() == data
    assert not lost.exists() or lost == restored
    assert _blob_files(app) == [restored]
    assert await _retrieved(app_client, ds) == data
    (warning,) = [m for m in caplog.messages if ds.SOPInstanceUID in m and "replaces" in m]
    assert ("missing" if damage == "deleted" else "bytes, not") in warning
    await _nothing_left(app)

    # Whole again: a further re-send is the plain duplicate (its copy deleted).
    assert (await _stow(app_client, data)).status_code == 200
    assert await _blob_path(app, ds) == restored
    assert _blob_files(app) == [restored]
    await _nothing_left(app)


async def test_senders_repairing_at_once_leave_one_copy(
    app: Starlette, app_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """SENDERS re-sends at once: one copy replaces the lost blob (the instance row is locked
    and its blob key compared, Index.replace_blob), the others are deleted as duplicates."""
    ds = make_instance()
    data = to_bytes(ds)
    assert (await _stow(app_client, data)).status_code == 200
    (await _blob_path(app, ds)).unlink()
    statuses: list[int] = []

    async def send() -> None:
        statuses.append((await _stow(app_client, data)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(SENDERS):
            tg.start_soon(send)
    assert statuses == [200] * SENDERS
    assert len([m for m in caplog.messages if ds.SOPInstanceUID in m and "replaces" in m]) == 1
    restored = await _blob_path(app, ds)
    assert _blob_files(app) == [restored]
    assert await _retrieved(app_client, ds) == data
    await _nothing_left(app)


async def test_a_c_store_again_replaces_a_lost_blob(archive: Any) -> None:
    from tests.dimse_support import blobs, store_one, wado_instance

    ds = make_instance()
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert (await store_one(archive, ds)).Status == 0
    svc = archive.services
    (inst,) = await svc.index.locate(*uids)
    first = await wado_instance(archive, *uids)
    svc.blobs.local_path(inst.blob_key).unlink()

    assert (await store_one(archive, ds)).Status == 0
    (again,) = await svc.index.locate(*uids)
    assert again.blob_key != inst.blob_key
    tmp = svc.blobs.tmp_root
    placed = [p for p in blobs(archive) if tmp not in p.parents]
    assert placed == [svc.blobs.local_path(again.blob_key)]
    assert await wado_instance(archive, *uids) == first


async def test_a_replaced_blob_whose_delete_fails_is_left_reserved(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The damaged file under the old key is deleted after the commit, while the reservation
    the commit took for it is dropped: when the delete fails (or the process dies there) the
    re-send still succeeds, and the reservation stays so that `recover` finds the file."""
    from dicomweb_server.blobstore.files import FileSystemBlobStore

    ds = make_instance()
    data = to_bytes(ds)
    assert (await _stow(app_client, data)).status_code == 200
    damaged = await _blob_path(app, ds)
    damaged.write_bytes(data[:100])

    async def refuse(self: FileSystemBlobStore, key: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(FileSystemBlobStore, "delete", refuse)
    r = await _stow(app_client, data)
    assert r.status_code == 200, r.text
    assert await _retrieved(app_client, ds) == data
    assert damaged.is_file()
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        reserved = {r[0] for r in await conn.fetch("SELECT blob_key FROM blob_reservation")}
    finally:
        await conn.close()
    assert damaged.name in reserved


# Accept values of the retrieves below.
_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_DICOM_UNCOMPRESSED = 'multipart/related; type="application/dicom"'
_OCTETS = 'multipart/related; type="application/octet-stream"'
_OCTETS_AS_STORED = _OCTETS + "; transfer-syntax=*"
_JPEG_FRAMES = 'multipart/related; type="image/jpeg"'
# Rows and columns of an instance past routes.responses.INLINE_RESPONSE_BYTES: streamed, its
# first file checked before the response starts.
_LARGE = 1024

# Every path that reads the stored file: (id, instance, method, level, suffix, Accept). The
# instance: "small" (4 x 4 native), "large" (_LARGE), "multi" (3 frames), or a file of
# pydicom's in the sample corpus: "rle" (encapsulated, its frames recorded), "deflated",
# "big-endian", "report" (an SR, rendered as text), "pdf" (rendered as the document).
_READS = [
    ("instance", "small", "GET", "instance", "", _DICOM),
    ("instance-single-part", "small", "GET", "instance", "", "application/dicom"),
    ("series", "small", "GET", "series", "", _DICOM),
    ("study", "small", "GET", "study", "", _DICOM),
    ("instance-streamed", "large", "GET", "instance", "", _DICOM),
    ("study-streamed", "large", "GET", "study", "", _DICOM),
    ("instance-converted", "rle", "GET", "instance", "", _DICOM_UNCOMPRESSED),
    ("frame-stored", "small", "GET", "instance", "/frames/1", _OCTETS_AS_STORED),
    ("frames-stored", "multi", "GET", "instance", "/frames/1,3", _OCTETS_AS_STORED),
    ("frame-encoded", "small", "GET", "instance", "/frames/1", _JPEG_FRAMES),
    ("frame-decoded", "rle", "GET", "instance", "/frames/1", _OCTETS),
    ("frame-of-deflated", "deflated", "GET", "instance", "/frames/1", _OCTETS),
    ("bulk-value", "small", "GET", "instance", "/bulk/7FE00010", _OCTETS),
    ("bulk-value-single-part", "small", "GET", "instance", "/bulk/7FE00010",
     "application/octet-stream"),
    ("bulk-value-deflated", "deflated", "GET", "instance", "/bulk/7FE00010", _OCTETS),
    ("bulk-value-big-endian", "big-endian", "GET", "instance", "/bulk/7FE00010", _OCTETS),
    ("bulk-value-decoded", "rle", "GET", "instance", "/bulk/7FE00010", _OCTETS),
    ("bulkdata", "small", "GET", "instance", "/bulkdata", _OCTETS),
    ("series-bulkdata", "small", "GET", "series", "/bulkdata", _OCTETS),
    ("study-pixeldata", "small", "GET", "study", "/pixeldata", _OCTETS),
    ("pixeldata-decoded", "rle", "GET", "instance", "/pixeldata", _OCTETS),
    ("rendered", "small", "GET", "instance", "/rendered", "image/jpeg"),
    ("frame-rendered", "multi", "GET", "instance", "/frames/2/rendered", "image/png"),
    ("series-rendered", "rle", "GET", "series", "/rendered", "image/jpeg"),
    ("study-rendered", "small", "GET", "study", "/rendered", "image/png"),
    ("report-rendered", "report", "GET", "instance", "/rendered", "text/html"),
    ("document-rendered", "pdf", "GET", "instance", "/rendered", "application/pdf"),
    ("thumbnail", "small", "GET", "instance", "/thumbnail", "image/jpeg"),
    ("series-thumbnail", "small", "GET", "series", "/thumbnail", "image/jpeg"),
    ("study-thumbnail", "rle", "GET", "study", "/thumbnail", "image/jpeg"),
    # A HEAD that reads the file to answer (its first chunk, a conversion, a rendering).
    ("head-instance", "small", "HEAD", "instance", "", _DICOM),
    ("head-study-streamed", "large", "HEAD", "study", "", _DICOM),
    ("head-frame-encoded", "small", "HEAD", "instance", "/frames/1", _JPEG_FRAMES),
    ("head-bulk-value-big-endian", "big-endian", "HEAD", "instance", "/bulk/7FE00010", _OCTETS),
    ("head-rendered", "rle", "HEAD", "instance", "/rendered", "image/jpeg"),
]  # fmt: skip
_SAMPLES = {
    "rle": "real/pydicom/MR_small_RLE.dcm",
    "deflated": "real/pydicom/image_dfl.dcm",
    "big-endian": "real/pydicom/MR_small_bigendian.dcm",
    "report": "real/pydicom/reportsi.dcm",
    "pdf": "generated/coverage/encapsulated_pdf.dcm",
}


def _instance(kind: str, samples: Path) -> bytes:
    if kind == "pdf":  # its document large enough for ingest to record its range
        ds = pydicom.dcmread(samples / _SAMPLES[kind])
        ds.EncapsulatedDocument = bytes(ds.EncapsulatedDocument) + bytes(4096)
        return to_bytes(ds)
    if kind in _SAMPLES:
        return (samples / _SAMPLES[kind]).read_bytes()
    size = {"large": _LARGE}.get(kind, 4)
    return to_bytes(make_instance(rows=size, cols=size, frames=3 if kind == "multi" else 1))


def _url(ds: Any, level: str) -> str:
    url = inst_url(ds)
    if level != "instance":
        url = url.rpartition("/instances/")[0]
    if level == "study":
        url = url.rpartition("/series/")[0]
    return url


def _damage(path: Path, damage: str) -> int | None:
    """The file deleted or cut to half its size; its size after (None: gone)."""
    if damage == "deleted":
        path.unlink()
        return None
    size = path.stat().st_size // 2
    os.truncate(path, size)
    return size


def _said_once(
    caplog: pytest.LogCaptureFixture, sop: str, path: Path, found: int | None, among: str = ""
) -> None:
    """One error line (of the loggers under `among`) naming the instance, its blob (key and
    path) and what is wrong with it; no traceback logged at all."""
    state = "is missing" if found is None else f"is {found} bytes, not the"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    (line,) = [r for r in errors if r.name.startswith(among)]
    message = line.getMessage()
    assert sop in message and path.name in message and str(path) in message, message
    assert state in message and REPAIR_HINT in message, message
    assert [r for r in caplog.records if r.exc_info is not None] == []


async def _last_outcome(app: Starlette) -> tuple[str, int]:
    """The action and outcome of the last request the audit trail recorded."""
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT action, outcome FROM audit_log ORDER BY seq DESC LIMIT 1"
    )
    return str(rows[0]["action"]), int(rows[0]["outcome"])


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
@pytest.mark.parametrize(
    ("kind", "method", "level", "suffix", "accept"),
    [case[1:] for case in _READS],
    ids=[case[0] for case in _READS],
)
async def test_a_lost_blob_is_a_500_that_says_so(
    app: Starlette,
    app_client: httpx.AsyncClient,
    samples: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    kind: str,
    method: str,
    level: str,
    suffix: str,
    accept: str,
) -> None:
    """Each path reading the file: a 500 naming the instance and the repair (a 500 "internal
    error" and a traceback before, or a 406 of a decoder, or a thumbnail's icon, for a file
    cut short); the audit trail records the failure; metadata is still served."""
    data = _instance(kind, samples)
    assert (await _stow(app_client, data)).status_code == 200
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    lost = await _blob_path(app, ds)
    found = _damage(lost, damage)
    caplog.clear()
    r = await app_client.request(method, _url(ds, level) + suffix, headers={"Accept": accept})
    assert r.status_code == 500, r.text
    if method == "GET":
        state = "is missing" if found is None else f"is {found} bytes, not the {len(data)} recorded"
        expected = f"the stored file of instance {ds.SOPInstanceUID} {state}; {REPAIR_HINT}"
        assert r.json() == {"status": 500, "message": expected}
    _said_once(caplog, ds.SOPInstanceUID, lost, found)
    action, outcome = await _last_outcome(app)
    assert action.startswith("retrieve_") and outcome == 500
    r = await app_client.get(f"{inst_url(ds)}/metadata")
    assert r.status_code == 200 and r.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
async def test_a_range_of_a_lost_encapsulated_frame_is_a_500_that_says_so(
    app: Starlette,
    app_client: httpx.AsyncClient,
    samples: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """A Range of an encapsulated frame as stored, whose items are mapped before it is read
    (retrieve.frames.sized_range): the same 500 and log line, its size checked in the
    worker-thread call that maps them."""
    data = _instance("rle", samples)
    assert (await _stow(app_client, data)).status_code == 200
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    lost = await _blob_path(app, ds)
    found = _damage(lost, damage)
    caplog.clear()
    headers = {"Accept": _OCTETS_AS_STORED, "Range": "bytes=0-99"}
    r = await app_client.get(inst_url(ds) + "/frames/1", headers=headers)
    assert r.status_code == 500 and REPAIR_HINT in r.json()["message"], r.text
    _said_once(caplog, ds.SOPInstanceUID, lost, found)


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
async def test_a_later_lost_blob_cuts_a_study_with_one_line(
    app: Starlette,
    app_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """A study streamed (over INLINE_RESPONSE_BYTES) whose second file is lost: found once
    the body started with the first, the body is cut (left unfinished, the connection then
    closed by the server), the log has the one clear line and no traceback (nothing is
    raised to the server, which logged one for it), and the audit trail the archive's
    failure."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    first, second = (
        make_instance(study=study, series=series, rows=_LARGE, cols=_LARGE, InstanceNumber=n)
        for n in (1, 2)
    )
    assert (await _stow(app_client, to_bytes(first))).status_code == 200
    assert (await _stow(app_client, to_bytes(second))).status_code == 200
    lost = await _blob_path(app, second)
    found = _damage(lost, damage)
    caplog.clear()
    accept = [(b"accept", _DICOM.encode())]
    status, length, ended = await asgi_get(app, f"{ROOT}/studies/{study}", accept)
    assert status == 200 and length > len(to_bytes(first)) and not ended
    _said_once(caplog, second.SOPInstanceUID, lost, found)
    assert await _last_outcome(app) == ("retrieve_study", 500)  # guard.CUT_BY_SERVER


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
@pytest.mark.parametrize("operation", ["get", "move"])
async def test_a_lost_blob_fails_its_sub_operation_with_one_line(
    archive: Any, caplog: pytest.LogCaptureFixture, damage: str, operation: str
) -> None:
    """C-GET and C-MOVE: the lost instance's sub-operation fails, the others complete, with
    the one line the HTTP answer logs (a file cut short was sent as it was, and counted
    completed)."""
    from tests.dimse_support import (
        PEER,
        associate,
        identifier,
        in_thread,
        requestor_store,
        scu,
        stow,
    )

    study = pydicom.uid.generate_uid()
    kept, lost = (make_instance(study=study, rows=64, cols=64) for _ in range(2))
    await stow(archive, kept, lost)
    (inst,) = await archive.services.index.locate(study, lost.SeriesInstanceUID)
    path = archive.services.blobs.local_path(inst.blob_key)
    found = _damage(path, damage)
    caplog.clear()

    def retrieve() -> Any:
        model = (StudyRootQueryRetrieveInformationModelGet if operation == "get"
                 else StudyRootQueryRetrieveInformationModelMove)  # fmt: skip
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        role = build_role(CTImageStorage, scp_role=True)
        on_store = requestor_store(lambda _event: 0x0000)
        assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[on_store])
        try:
            ident = identifier("STUDY", StudyInstanceUID=study)
            sent = (assoc.send_c_get(ident, model) if operation == "get"
                    else assoc.send_c_move(ident, PEER, model))  # fmt: skip
            return [st for st, _ in sent][-1], assoc.is_aborted
        finally:
            assoc.release()

    final, aborted = await in_thread(retrieve)
    assert not aborted
    assert final.Status == 0xB000  # PS3.4 C.4.3.1.4: sub-operations complete, failures
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    # pynetdicom adds its own lines for any sub-operation that fails (handlers._failed).
    _said_once(caplog, lost.SOPInstanceUID, path, found, among="dicomweb_server.")
