"""The DIMSE front door, driven by real clients: dcmtk's echoscu, storescu, findscu, movescu
and getscu (Debian's dcmtk; `make test` installs it) and pynetdicom SCUs.

The archive runs in this process (the app's lifespan starts the AE on a free port); blocking
clients run in worker threads so that the event loop keeps serving the AE's handlers.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomweb_server.app import create_app
from dicomweb_server.config import Settings
from dicomweb_server.ingest import Services
from tests.helpers import (
    ROOT,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

T = TypeVar("T")
# Seconds any one client run may take: a hang fails the test instead of the suite.
CLIENT_TIMEOUT_S = 60
SCU = "TESTSCU"
PEER = "PEERSCP"
# Corpus files sent with storescu, with the option that makes it propose the file's transfer
# syntax (as a modality configured for it would): native (explicit, implicit), RLE, JPEG 2000,
# JPEG-LS multi-frame (15 frames), JPEG baseline, JPEG lossless.
CORPUS = (
    ("generated/archive/03782081/01/01/0001.dcm", "-xe"),
    ("generated/archive/08334413/03/03/0001.dcm", "-xi"),
    ("generated/archive/H4750355X/01/01/0001.dcm", "-xr"),
    ("generated/coverage/ct_j2k_lossless_signed.dcm", "-xv"),
    ("generated/coverage/ect_15frames_jpegls_lossless.dcm", "-xt"),
    ("generated/coverage/mg_jpeg_baseline_gray8.dcm", "-xy"),
    ("real/pydicom-data/JPEG-LL.dcm", "-xs"),
)
# dcmtk re-encodes what it sends: this file's undefined-length sequence items go out with
# explicit lengths, so the archive holds dcmtk's encoding of it (compared value by value).
REENCODED_BY_DCMTK = {"real/pydicom-data/JPEG-LL.dcm"}
# Sent by pynetdicom as raw bytes (its chunked send never decodes): the archive must return
# exactly these data sets, deflated and big endian ones included.
RAW_CORPUS = (
    *(name for name, _ in CORPUS),
    "generated/coverage/dx_deflated.dcm",
    "generated/coverage/cr_mono1_explicit_be.dcm",
    "real/pydicom-data/HTJ2KLossless_08_RGB.dcm",
)


@dataclass
class Peer:
    """A pynetdicom Storage SCP: the C-MOVE destination the archive is configured with."""

    port: int
    received: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> data set


@dataclass
class Archive:
    port: int
    http: httpx.AsyncClient
    services: Services
    settings: Settings


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def dataset_bytes(part10: bytes | Path) -> bytes:
    """The data set of a Part-10 file: the bytes after its File Meta Information."""
    if isinstance(part10, bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part10.dcm"
            path.write_bytes(part10)
            return dataset_bytes(path)
    _meta, offset = split_dataset(part10)
    return part10.read_bytes()[offset:]


def _received(event: Event) -> bytes:
    # The archive sets pynetdicom's STORE_RECV_CHUNKED_DATASET for this process.
    try:
        return dataset_bytes(event.dataset_path)
    except AttributeError:
        return event.encoded_dataset(include_meta=False)


@pytest.fixture
def peer() -> Iterator[Peer]:
    ae = AE(ae_title=PEER)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    found = Peer(0)

    def on_store(event: Event) -> int:
        request = cast(C_STORE, event.request)
        found.received[str(request.AffectedSOPInstanceUID)] = _received(event)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    found.port = int(server.server_address[1])
    try:
        yield found
    finally:
        server.shutdown()


@contextlib.asynccontextmanager
async def running_archive(settings: Settings, **overrides: Any) -> AsyncIterator[Archive]:
    s = replace(settings, host="127.0.0.1", dimse_port=0, **overrides)
    app = create_app(s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Archive(app.state.dimse.port, http, app.state.services, s)


@pytest.fixture
async def archive(settings: Settings, peer: Peer, tmp_path: Path) -> AsyncIterator[Archive]:
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


def scu(*contexts: str, **roles: Any) -> AE:
    ae = AE(ae_title=SCU)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT_S
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae


def associate(ae: AE, archive: Archive, **kwargs: Any) -> Association:
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="DICOMWEB", **kwargs)
    assert assoc.is_established, "association refused"
    return assoc


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


async def instance_count(archive: Archive) -> int:
    return (await archive.services.index.counts())["instances"]


# -- Verification ---------------------------------------------------------------------------


async def test_echoscu(archive: Archive) -> None:
    done = await dcmtk("echoscu", "-aet", SCU, "-aec", "DICOMWEB", "127.0.0.1", str(archive.port))
    assert done.returncode == 0, done.stderr


# -- Storage --------------------------------------------------------------------------------


async def test_storescu_then_qido_and_wado_byte_identical(archive: Archive, samples: Path) -> None:
    for name, option in CORPUS:
        done = await dcmtk(
            "storescu", "-v", "-R", option, "-aet", SCU, "-aec", "DICOMWEB",
            "127.0.0.1", str(archive.port), str(samples / name),
        )  # fmt: skip
        assert done.returncode == 0, (name, done.stdout + done.stderr)
        assert "Received Store Response (Success)" in done.stdout + done.stderr, name
    for name, _ in CORPUS:
        path = samples / name
        ds = dcmread(path, stop_before_pixels=True)
        r = await archive.http.get(
            f"{ROOT}/instances", params={"SOPInstanceUID": ds.SOPInstanceUID}
        )
        assert r.status_code == 200, (path, r.status_code)
        (found,) = r.json()
        assert found["0020000D"]["Value"] == [ds.StudyInstanceUID]
        got = await wado_instance(
            archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        # What storescu sent is the data set of the file (the File Meta Information is not
        # transmitted): the archive keeps it byte for byte, in the file's transfer syntax.
        if name in REENCODED_BY_DCMTK:
            assert dcmread(io.BytesIO(got)) == dcmread(path), name
        else:
            assert dataset_bytes(got) == dataset_bytes(path), name
        stored = dcmread(io.BytesIO(got), stop_before_pixels=True)
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


async def test_store_raw_bytes_come_back_identical(
    archive: Archive, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = [samples / name for name in RAW_CORPUS]
    metas = [dcmread(p, stop_before_pixels=True) for p in files]
    ae = scu()
    for ds in metas:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)

    def send() -> list[int]:
        assoc = associate(ae, archive)
        try:
            return [int(assoc.send_c_store(p).Status) for p in files]
        finally:
            assoc.release()

    assert await in_thread(send) == [0x0000] * len(files)
    for path, ds in zip(files, metas, strict=True):
        got = await wado_instance(
            archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert dataset_bytes(got) == dataset_bytes(path), path


async def test_store_duplicate_is_success_and_one_copy(archive: Archive) -> None:
    ds = make_instance()
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send_twice() -> list[int]:
        assoc = associate(ae, archive)
        try:
            return [int(assoc.send_c_store(ds).Status) for _ in range(2)]
        finally:
            assoc.release()

    assert await in_thread(send_twice) == [0x0000, 0x0000]
    assert await instance_count(archive) == 1


async def test_store_without_study_uid_fails_a900_and_stores_nothing(archive: Archive) -> None:
    ds = make_instance()
    del ds.StudyInstanceUID
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send() -> Dataset:
        assoc = associate(ae, archive)
        try:
            return assoc.send_c_store(ds)
        finally:
            assoc.release()

    rsp = await in_thread(send)
    assert rsp.Status == 0xA900
    assert "StudyInstanceUID" in rsp.ErrorComment
    assert await instance_count(archive) == 0
    assert _blobs(archive) == []


async def test_corrupt_data_set_fails_c000_and_leaves_nothing(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that are not a data set, sent raw (pynetdicom's chunked send does not decode)."""
    from pynetdicom import _config

    good = make_instance()
    path = tmp_path / "corrupt.dcm"
    whole = to_bytes(good)
    offset = len(whole) - len(dataset_bytes(whole))
    # (0008,0016) announced as a sequence whose item runs past the end of the data.
    truncated = b"\x08\x00\x16\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00abc"
    path.write_bytes(whole[:offset] + truncated)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send() -> Dataset:
        assoc = associate(ae, archive)
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()

    rsp = await in_thread(send)
    assert rsp.Status == 0xC000, hex(rsp.Status)
    assert await instance_count(archive) == 0
    assert _blobs(archive) == []


async def test_data_set_not_matching_the_request_fails_a900(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    ds = make_instance()
    sop = str(ds.SOPInstanceUID)
    other = sop[:-1] + ("1" if sop[-1] != "1" else "2")
    # The File Meta header (first occurrence) names another instance: the request will too.
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(to_bytes(ds).replace(sop.encode(), other.encode(), 1))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send() -> Dataset:
        assoc = associate(ae, archive)
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()

    rsp = await in_thread(send)
    assert rsp.Status == 0xA900
    assert "SOPInstanceUID" in rsp.ErrorComment
    assert await instance_count(archive) == 0


def _blobs(archive: Archive) -> list[Path]:
    """Placed blobs and leftover spool files (the spool directory itself may remain)."""
    root = archive.settings.blob_dir
    return [p for p in root.rglob("*") if p.is_file()]


# -- Query ----------------------------------------------------------------------------------


def _find(archive: Archive, model: str, identifier: Dataset) -> list[tuple[int, Dataset | None]]:
    ae = scu(model)
    assoc = associate(ae, archive)
    try:
        return [(int(st.Status), ident) for st, ident in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


async def test_find_stowed_instance_at_every_level(archive: Archive) -> None:
    ds = make_instance(patient_id="FIND-1", patient_name="Find^Me", modality="MR")
    other = make_instance(patient_id="OTHER", patient_name="Other^One")
    await stow(archive, ds, other)
    patient_root = PatientRootQueryRetrieveInformationModelFind
    study_root = StudyRootQueryRetrieveInformationModelFind

    got = await in_thread(
        _find, archive, patient_root,
        _identifier("PATIENT", PatientID="FIND-1", PatientName="", PatientSex="",
                    NumberOfPatientRelatedStudies=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    match = got[0][1]
    assert match is not None
    assert match.PatientName == "Find^Me"
    assert match.NumberOfPatientRelatedStudies == 1
    assert match.QueryRetrieveLevel == "PATIENT"
    assert "StudyInstanceUID" not in match  # only what was asked for

    for model in (patient_root, study_root):
        got = await in_thread(
            _find, archive, model,
            _identifier("STUDY", PatientID="FIND-1", StudyInstanceUID="", StudyDate="",
                        ModalitiesInStudy=""),
        )  # fmt: skip
        assert [s for s, _ in got] == [0xFF00, 0x0000]
        match = got[0][1]
        assert match is not None
        assert match.StudyInstanceUID == ds.StudyInstanceUID
        assert match.StudyDate == "20240115"
        assert match.ModalitiesInStudy == "MR"

    got = await in_thread(
        _find, archive, study_root,
        _identifier("SERIES", StudyInstanceUID=ds.StudyInstanceUID, SeriesInstanceUID="",
                    Modality="MR", NumberOfSeriesRelatedInstances=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    assert got[0][1] is not None and got[0][1].SeriesInstanceUID == ds.SeriesInstanceUID

    got = await in_thread(
        _find, archive, patient_root,
        _identifier("IMAGE", PatientID="FIND-1", StudyInstanceUID=ds.StudyInstanceUID,
                    SeriesInstanceUID=ds.SeriesInstanceUID, SOPInstanceUID="",
                    InstanceNumber="", Rows=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    match = got[0][1]
    assert match is not None
    assert match.SOPInstanceUID == ds.SOPInstanceUID
    assert match.Rows == 4
    assert match.InstanceNumber == 1

    # Wildcard on a PN, nothing else matching: only the patient asked for.
    got = await in_thread(
        _find, archive, study_root, _identifier("STUDY", PatientName="find*", PatientID="")
    )
    assert [m.PatientID for s, m in got if m is not None and s == 0xFF00] == ["FIND-1"]


async def test_findscu_study_root(archive: Archive, tmp_path: Path) -> None:
    ds = make_instance(patient_id="DCMTK-1", study_date="20230301")
    await stow(archive, ds, make_instance(patient_id="DCMTK-2", study_date="20220101"))
    done = await dcmtk(
        "findscu", "-S", "-aet", SCU, "-aec", "DICOMWEB", "-X", "-od", str(tmp_path),
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyDate=20230101-20231231",
        "-k", "StudyInstanceUID", "-k", "PatientID", "-k", "NumberOfStudyRelatedInstances",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    responses = sorted(tmp_path.glob("rsp*.dcm"))
    assert len(responses) == 1, done.stderr
    rsp = dcmread(responses[0])
    assert rsp.PatientID == "DCMTK-1"
    assert rsp.StudyInstanceUID == ds.StudyInstanceUID
    assert rsp.NumberOfStudyRelatedInstances == 1


async def test_find_refusals(archive: Archive) -> None:
    study_root = StudyRootQueryRetrieveInformationModelFind
    got = await in_thread(_find, archive, study_root, _identifier("PATIENT", PatientID=""))
    assert [s for s, _ in got] == [0xA900]
    got = await in_thread(_find, archive, study_root, _identifier("STUDY", StudyDate="2024x"))
    assert [s for s, _ in got] == [0xC000]
    got = await in_thread(_find, archive, study_root, _identifier("STUDY", SOPInstanceUID="1.2.3"))
    assert [s for s, _ in got] == [0xA900]
    got = await in_thread(
        _find, archive, study_root, _identifier("STUDY", InstitutionName="Somewhere")
    )
    assert [s for s, _ in got] == [0xC000]


# -- Retrieve -------------------------------------------------------------------------------


async def test_movescu_to_a_configured_peer(archive: Archive, peer: Peer) -> None:
    ds = make_instance(patient_id="MOVE-1")
    await stow(archive, ds, make_instance(patient_id="NOT-MOVED"))
    done = await dcmtk(
        "movescu", "-S", "-aet", SCU, "-aec", "DICOMWEB", "-aem", PEER,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert list(peer.received) == [ds.SOPInstanceUID]
    sent = await wado_instance(
        archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert peer.received[ds.SOPInstanceUID] == dataset_bytes(sent)


def _move(archive: Archive, destination: str, identifier: Dataset) -> list[Dataset]:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = associate(scu(model), archive)
    try:
        return [st for st, _ in assoc.send_c_move(identifier, destination, model)]
    finally:
        assoc.release()


async def test_pynetdicom_move_counts_and_unknown_destination(archive: Archive, peer: Peer) -> None:
    series = "1.2.826.0.1.3680043.8.498.99.1"
    a = make_instance(series=series, study="1.2.826.0.1.3680043.8.498.99")
    b = make_instance(series=series, study="1.2.826.0.1.3680043.8.498.99")
    await stow(archive, a, b)
    ident = _identifier("SERIES", StudyInstanceUID=a.StudyInstanceUID, SeriesInstanceUID=series)
    statuses = await in_thread(_move, archive, PEER, ident)
    final = statuses[-1]
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfFailedSuboperations == 0
    assert set(peer.received) == {a.SOPInstanceUID, b.SOPInstanceUID}

    statuses = await in_thread(_move, archive, "NOBODY", ident)
    assert [int(s.Status) for s in statuses] == [0xA801]

    missing_key = _identifier("SERIES", StudyInstanceUID=a.StudyInstanceUID)
    statuses = await in_thread(_move, archive, PEER, missing_key)
    assert int(statuses[-1].Status) == 0xA900


async def test_move_compressed_multiframe_as_stored(
    archive: Archive, peer: Peer, samples: Path
) -> None:
    path = samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm"
    body = multipart_body([path.read_bytes()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    ds = dcmread(path, stop_before_pixels=True)
    ident = _identifier(
        "IMAGE",
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID=ds.SOPInstanceUID,
    )
    statuses = await in_thread(_move, archive, PEER, ident)
    assert statuses[-1].Status == 0x0000
    assert peer.received[ds.SOPInstanceUID] == dataset_bytes(path)


async def test_get_with_a_lost_blob_counts_a_failure(archive: Archive) -> None:
    kept, lost = make_instance(patient_id="GET-3"), make_instance(patient_id="GET-3")
    await stow(archive, kept, lost)
    (inst,) = await archive.services.index.locate(lost.StudyInstanceUID)
    archive.services.blobs.local_path(inst.blob_key).unlink()

    def get() -> list[Dataset]:
        model = PatientRootQueryRetrieveInformationModelGet
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        role = build_role(CTImageStorage, scp_role=True)
        on_store = (evt.EVT_C_STORE, lambda event: 0x0000)
        assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[on_store])
        try:
            ident = _identifier("PATIENT", PatientID="GET-3")
            return [st for st, _ in assoc.send_c_get(ident, model)]
        finally:
            assoc.release()

    statuses = await in_thread(get)
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    assert statuses[-1].NumberOfFailedSuboperations == 1
    assert statuses[-1].Status == 0xB000  # PS3.4 C.4.3.1.4: sub-operations complete, failures


async def test_getscu(archive: Archive, tmp_path: Path) -> None:
    ds = make_instance(patient_id="GET-1")
    await stow(archive, ds)
    out = tmp_path / "got"
    out.mkdir()
    done = await dcmtk(
        "getscu", "-S", "-aet", SCU, "-aec", "DICOMWEB", "-od", str(out),
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
        "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (got,) = list(out.iterdir())
    sent = await wado_instance(
        archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert dataset_bytes(got) == dataset_bytes(sent)


async def test_pynetdicom_get(archive: Archive) -> None:
    ds = make_instance(patient_id="GET-2")
    await stow(archive, ds)
    received: list[bytes] = []

    def on_store(event: Event) -> int:
        received.append(_received(event))
        return 0x0000

    def get() -> list[Dataset]:
        model = StudyRootQueryRetrieveInformationModelGet
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        role = build_role(CTImageStorage, scp_role=True)
        assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            ident = _identifier("STUDY", StudyInstanceUID=ds.StudyInstanceUID)
            return [st for st, _ in assoc.send_c_get(ident, model)]
        finally:
            assoc.release()

    statuses = await in_thread(get)
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    sent = await wado_instance(
        archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert received == [dataset_bytes(sent)]


# -- Limits ---------------------------------------------------------------------------------


async def test_unknown_calling_ae_refused(settings: Settings) -> None:
    async with running_archive(settings, dimse_allowed_aes=("GOODSCU",)) as archive:
        port = str(archive.port)
        bad = await dcmtk("echoscu", "-aet", "BADSCU", "-aec", "DICOMWEB", "127.0.0.1", port)
        good = await dcmtk("echoscu", "-aet", "GOODSCU", "-aec", "DICOMWEB", "127.0.0.1", port)
    assert bad.returncode != 0
    assert "Rejected" in bad.stdout + bad.stderr
    assert good.returncode == 0, good.stderr


async def test_association_limit(settings: Settings) -> None:
    async with running_archive(settings, dimse_max_associations=1) as archive:

        def attempt() -> tuple[bool, bool, bool]:
            ae = scu(Verification)
            first = ae.associate("127.0.0.1", archive.port)
            held = first.is_established
            second = ae.associate("127.0.0.1", archive.port)
            refused = second.is_rejected
            first.release()
            third = ae.associate("127.0.0.1", archive.port)
            ok = third.is_established
            third.release()
            return held, refused, ok

        first_ok, second_refused, third_ok = await in_thread(attempt)
    assert first_ok
    assert second_refused
    assert third_ok


# -- The command line -----------------------------------------------------------------------


async def test_serve_with_dimse_port(settings: Settings, tmp_path: Path) -> None:
    """`dicomweb-server serve --dimse-port N --ae-title T` in a real process: C-STORE with
    storescu, then QIDO-RS over HTTP finds the instance."""
    from tests import liveserver

    port = liveserver.free_port()
    ds = make_instance(patient_id="LIVE-1")
    path = tmp_path / "one.dcm"
    path.write_bytes(to_bytes(ds))
    server = await in_thread(
        liveserver.start, tmp_path / "live", settings.database_url,
        extra_args=("--dimse-port", str(port), "--ae-title", "LIVEARCHIVE"),
    )  # fmt: skip
    try:
        echo = await dcmtk("echoscu", "-aec", "LIVEARCHIVE", "127.0.0.1", str(port))
        assert echo.returncode == 0, echo.stderr
        store = await dcmtk("storescu", "-v", "127.0.0.1", str(port), str(path))
        assert "Received Store Response (Success)" in store.stdout + store.stderr
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as http:
            r = await http.get(f"{server.url}/studies", params={"PatientID": "LIVE-1"})
        assert r.status_code == 200
        assert r.json()[0]["0020000D"]["Value"] == [ds.StudyInstanceUID]
    finally:
        server.proc.terminate()
        await in_thread(server.proc.wait, timeout=30)
