"""The DIMSE front door, Verification and Storage, driven by real clients: dcmtk's echoscu
and storescu (Debian's dcmtk; `make test` installs it) and pynetdicom SCUs; the association
limits; `serve --dimse-port` in a real process. Query/Retrieve: test_dimse_qr.py.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    Verification,
)

from dicomweb_server.config import Settings
from dicomweb_server.dimse import server
from dicomweb_server.dimse.server import DIMSE_MAX_PDU_BYTES
from dicomweb_server.media.mediatypes import EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT_LE
from dicomweb_server.media.mediatypes import NOT_FOR_WEB
from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    SCU,
    Archive,
    Closes,
    associate,
    audit_rows,
    audit_seq,
    blobs,
    dataset_bytes,
    dcmtk,
    in_thread,
    instance_count,
    running_archive,
    scu,
    send_stores,
    store_one,
    store_one_file,
    stored_file,
    wado_instance,
)
from tests.helpers import ROOT, ending_in_a_sequence, make_instance, to_bytes

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

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
    # Ultrasound Image Storage (retired), which pynetdicom's storage contexts leave out: it
    # was refused over DIMSE while STOW-RS stored it (server.EXTRA_STORAGE_SOP_CLASSES).
    ("real/pydicom-data/color-pl.dcm", "-xe"),
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


# -- Verification ---------------------------------------------------------------------------


async def test_echoscu(archive: Archive) -> None:
    done = await dcmtk("echoscu", "-aet", SCU, "-aec", "DICOMWEB", "127.0.0.1", str(archive.port))
    assert done.returncode == 0, done.stderr


# -- Storage --------------------------------------------------------------------------------


def test_extra_storage_classes_registered_without_a_pydicom_keyword(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storage class pydicom has no keyword for is registered with pynetdicom under one made
    of its UID (an empty keyword would make register_uid fail, and the archive not start)."""
    registered: list[tuple[str, str]] = []
    monkeypatch.setattr(server, "UID", lambda uid: type("NoKeyword", (), {"keyword": ""})())
    monkeypatch.setattr(server, "uid_to_service_class", lambda uid: object)
    monkeypatch.setattr(server, "register_uid", lambda uid, kw, _cls: registered.append((uid, kw)))
    found = server.storage_sop_classes()
    assert [uid for uid, _ in registered] == list(server.EXTRA_STORAGE_SOP_CLASSES)
    assert all(kw.isidentifier() and uid.replace(".", "_") in kw for uid, kw in registered)
    assert found[-len(registered) :] == list(server.EXTRA_STORAGE_SOP_CLASSES)


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
        got = await stored_file(
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
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert dataset_bytes(await stored_file(archive, *uids)) == dataset_bytes(path), path
        sent = await wado_instance(archive, *uids)  # as stored, but never Implicit or Big Endian
        if ds.file_meta.TransferSyntaxUID in NOT_FOR_WEB:
            assert dcmread(io.BytesIO(sent)).file_meta.TransferSyntaxUID == EXPLICIT_LE
        else:
            assert dataset_bytes(sent) == dataset_bytes(path), path


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
    rsp = await store_one(archive, ds)
    assert rsp.Status == 0xA900
    assert "StudyInstanceUID" in rsp.ErrorComment
    assert await instance_count(archive) == 0
    assert blobs(archive) == []


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
    rsp = await store_one(archive, path)
    assert rsp.Status == 0xC000, hex(rsp.Status)
    assert await instance_count(archive) == 0
    assert blobs(archive) == []


@pytest.mark.parametrize("cut", [3, 30])
async def test_truncated_data_set_fails_c000_and_leaves_nothing(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    """Found by review: a data set cut short inside its last value (here a sequence of defined
    length, as an SR or a presentation state ends) was stored as complete, 0x0000. PS3.4
    B.2.3: 0xC000, Cannot understand; nothing stored."""
    from pynetdicom import _config

    path = tmp_path / "truncated.dcm"
    path.write_bytes(ending_in_a_sequence()[:-cut])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    rsp = await store_one(archive, path)
    assert rsp.Status == 0xC000, hex(rsp.Status)
    assert "truncated" in rsp.ErrorComment
    assert await instance_count(archive) == 0
    assert blobs(archive) == []


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
    rsp = await store_one(archive, path)
    assert rsp.Status == 0xA900
    assert "SOPInstanceUID" in rsp.ErrorComment
    assert await instance_count(archive) == 0


def _deflated(path: Path, ds: Dataset, zeros: int = 0) -> Path:
    """`ds` as a Deflated Part-10 file (PS3.5 A.5), followed in its data set by a private OB
    value of `zeros` zero bytes (a Deflate bomb: 1000 times smaller deflated)."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body, meta = DicomBytesIO(), DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    write_file_meta_info(meta, ds.file_meta)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = bytearray(b"\0" * 128 + b"DICM" + meta.getvalue())
    out += deflater.compress(body.getvalue())
    if zeros:
        out += deflater.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, zeros))
        for _ in range(zeros // 2**20):
            out += deflater.compress(bytes(2**20))
    path.write_bytes(out + deflater.flush())
    return path


def test_the_request_check_does_not_inflate_a_deflate_bomb(tmp_path: Path) -> None:
    """Found by review: the check that a C-STORE data set names the request's SOP Instance
    (_command_mismatch) read it with dcmread, which inflates a Deflated data set whole in
    memory before the ingest's MAX_INFLATED_BYTES check: a data set of 130 KB took 280 MB
    (one of a few MB, gigabytes). The UIDs come from its start now."""
    import tracemalloc
    from types import SimpleNamespace

    from dicomweb_server.dimse.stores import command_mismatch as _command_mismatch

    ds = make_instance()
    path = _deflated(tmp_path / "bomb.dcm", ds, zeros=128 * 2**20)
    assert path.stat().st_size < 2**20
    request = SimpleNamespace(
        AffectedSOPClassUID=ds.SOPClassUID, AffectedSOPInstanceUID=ds.SOPInstanceUID
    )
    other = SimpleNamespace(AffectedSOPClassUID=ds.SOPClassUID, AffectedSOPInstanceUID="1.2.3")
    tracemalloc.start()
    try:
        assert _command_mismatch(path, cast(Any, request)) is None
        assert "SOPInstanceUID" in str(_command_mismatch(path, cast(Any, other)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # 1 MiB inflated at most, and pydicom's copies


async def test_deflated_data_set_not_matching_the_request_fails_a900(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check still reads a Deflated data set's UIDs (from its start, inflated)."""
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
    from pynetdicom import _config

    ds = make_instance()
    sop = str(ds.SOPInstanceUID)
    # The File Meta header, whence the request's UIDs come, names another instance.
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop[:-1] + ("1" if sop[-1] != "1" else "2"))
    path = _deflated(tmp_path / "mismatch.dcm", ds)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    rsp = await store_one_file(archive, path, CTImageStorage, DeflatedExplicitVRLittleEndian)
    assert rsp.Status == 0xA900
    assert "SOPInstanceUID" in rsp.ErrorComment
    assert await instance_count(archive) == 0


LARGE_MULTIFRAME = "generated/large/ect_24frames_512_explicit_le.dcm"  # 12.5 MB, 24 frames
# Seconds to wait for the archive to notice an association that ended.
ENDED_WAIT_S = 10.0


def _spool_files(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.dcm"))


def _wait_for(check: Any, timeout_s: float = ENDED_WAIT_S) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


@pytest.mark.parametrize("how", ["a-abort", "tcp-cut"])
async def test_association_ended_mid_c_store_leaves_nothing(
    archive: Archive, samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Found by review: pynetdicom receives a C-STORE data set into a temporary file
    (STORE_RECV_CHUNKED_DATASET) that only its C-STORE service deletes, after the handler
    ran. An association aborted (A-ABORT) or cut (TCP closed) in the middle of a large
    multi-frame data set left that file in the temporary directory for good, 1.7 MB here
    each time. Now nothing remains (no spool file, row, reservation or blob) and the archive
    keeps serving: the same file stored afterwards is a success. Found by review too:
    neither the unfinished C-STORE nor the association's end was audited; now each is,
    once (dimse_store 0xFF00 with the bytes received, then dimse_abort)."""
    import contextlib
    import socket
    import tempfile

    from pynetdicom import _config, evt

    spool = tmp_path / "pynetdicom-spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where pynetdicom's files go
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    path = samples / LARGE_MULTIFRAME
    meta = dcmread(path, stop_before_pixels=True)
    ae = scu()
    ae.dimse_timeout = 5  # the C-STORE-RSP that will never come
    ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    spooled: list[bool] = []

    def end_it_midway() -> None:
        sent = 0

        def on_pdu(event: evt.Event) -> None:
            nonlocal sent
            sent += 1
            if sent != 40:  # about 640 KB of the 12.5 MB sent
                return
            spooled.append(_wait_for(lambda: bool(_spool_files(spool))))
            # Between two PDUs, in the thread that sends them: an A-ABORT PDU (PS3.8 9.3.8,
            # source service user) and the end of the connection, or the end alone.
            sock = assoc.dul.socket.socket  # type: ignore[union-attr]
            assert sock is not None
            if how == "a-abort":
                sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            sock.shutdown(socket.SHUT_RDWR)
            cut.append(sock)

        cut: list[socket.socket] = []
        assoc = associate(ae, archive, evt_handlers=[(evt.EVT_PDU_SENT, on_pdu)])
        with contextlib.suppress(Exception):  # the association is gone: that is the point
            assoc.send_c_store(path)
        for sock in cut:  # pynetdicom may leave it open: closed here, not by the collector
            sock.close()

    start = await audit_seq(archive)
    with Closes(archive) as closes:
        await in_thread(end_it_midway)
        await closes.wait()
    store, end = await audit_rows(archive, ("dimse_store", "dimse_abort"), start)
    assert spooled == [True], "the archive never started receiving"
    assert (store["action"], store["caller"], store["outcome"]) == ("dimse_store", f"ae:{SCU}",
                                                                    0xFF00)  # fmt: skip
    assert store["uids"] == [] and 0 < store["bytes"] < len(dataset_bytes(path))
    assert store["detail"].startswith(f"sop={meta.SOPInstanceUID} data set incomplete")
    ended = {"a-abort": "aborted by the peer (A-ABORT, service user)",
             "tcp-cut": "connection closed without A-RELEASE or A-ABORT"}[how]  # fmt: skip
    assert store["detail"].endswith(f"; not served, the association ended: {ended}")
    assert (end["action"], end["caller"], end["detail"]) == ("dimse_abort", f"ae:{SCU}", ended)
    assert await in_thread(_wait_for, lambda: not _spool_files(spool)), _spool_files(spool)
    assert await instance_count(archive) == 0
    assert blobs(archive) == []
    index = archive.services.index
    reserved = {r["blob_key"] for r in await index._fetch("SELECT blob_key FROM blob_reservation")}
    assert reserved <= set(index.spare_keys)  # keys reserved ahead are not a store's
    rsp = await store_one_file(archive, path, meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    assert rsp.Status == 0x0000
    assert await instance_count(archive) == 1


async def test_c_stores_queued_when_the_association_ends_leave_no_spool_file(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C-STOREs received whole but not yet served when the association ends (the requestor
    sent several before an A-ABORT) are never served: their spool files are deleted too."""
    import tempfile

    from pynetdicom import evt

    spool = tmp_path / "pynetdicom-spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    instances = [make_instance(rows=64, cols=64) for _ in range(6)]
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send_all_then_abort() -> None:
        assoc = associate(ae, archive)
        send_stores(assoc, instances)
        assoc.abort()

    start = await audit_seq(archive)
    with Closes(archive, evt.EVT_ABORTED) as aborts:  # queued ones are counted then
        await in_thread(send_all_then_abort)
        await aborts.wait()
    assert await in_thread(_wait_for, lambda: not _spool_files(spool)), _spool_files(spool)
    # Those served before the archive saw the abort are stored whole, the others not at all.
    assert len(blobs(archive)) == await instance_count(archive) < len(instances)
    # And each is audited once, stored (the first ones) or unserved (0xFF00), and the
    # association's end once. Found by review: the unserved ones left no trace.
    rows = await audit_rows(archive, ("dimse_store", "dimse_abort"), start)
    ends = [r["detail"] for r in rows if r["action"] == "dimse_abort"]
    assert ends == ["aborted by the peer (A-ABORT, service user)"]
    stores = [r for r in rows if r["action"] == "dimse_store"]
    outcomes = {r["detail"].split()[0]: r["outcome"] for r in stores}
    assert len(rows) == len(instances) + 1  # none twice
    assert all(
        r["detail"].endswith("received whole; not served, the association ended: aborted by"
                             " the peer (A-ABORT, service user)")
        for r in stores if r["outcome"] == 0xFF00
    )  # fmt: skip
    served = await instance_count(archive)
    assert outcomes == {
        f"sop={ds.SOPInstanceUID}": 0x0000 if n < served else 0xFF00
        for n, ds in enumerate(instances)
    }


# -- Limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["size", "size - 1", "1 MiB"])
async def test_c_store_data_set_size_limit_at_its_edge(
    settings: Settings, samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """Found by review: MAX_PART_BYTES (DICOMWEB_MAX_PART_BYTES) bounded a STOW-RS instance
    only; a C-STORE data set of any size was received (into the temporary directory) and
    stored. A data set of exactly the limit is stored; one byte more and the association is
    aborted as soon as the data set passes it (DIMSE has no status to answer before the data
    set is complete), nothing stored or left behind, and the abort audited (0xA700)."""
    import tempfile

    from pynetdicom import _config

    spool = tmp_path / "pynetdicom-spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    path = samples / LARGE_MULTIFRAME
    meta = dcmread(path, stop_before_pixels=True)
    size = len(dataset_bytes(path))
    most = {"size": size, "size - 1": size - 1, "1 MiB": 1024 * 1024}[limit]
    async with running_archive(settings, max_part_bytes=most) as archive:

        def send() -> Dataset | None:
            ae = scu()
            ae.dimse_timeout = 10
            ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
            assoc = associate(ae, archive)
            try:
                rsp = assoc.send_c_store(path)
                return rsp if "Status" in rsp else None
            finally:
                assoc.release()

        start = await audit_seq(archive)
        with Closes(archive) as closes:
            rsp = await in_thread(send)
            await closes.wait()
        stored = await instance_count(archive)
        assert await in_thread(_wait_for, lambda: not _spool_files(spool)), _spool_files(spool)
        rows = await audit_rows(archive, ("dimse_store", "dimse_abort"), start)
    if most < size:
        assert rsp is None  # aborted
        assert stored == 0
        # Audited once as a C-STORE (not again as unfinished), and the archive's abort.
        row, end = rows
        assert row["action"] == "dimse_store" and row["detail"].endswith(
            f"; sop={meta.SOPInstanceUID}"
        )
        assert row["outcome"] == 0xA700 and f"more than {most} bytes" in row["detail"]
        assert end["action"] == "dimse_abort" and end["detail"] == (
            f"aborted by the archive: a data set of more than {most} bytes"
            " (DICOMWEB_MAX_PART_BYTES)"
        )
    else:
        assert rsp is not None and rsp.Status == 0x0000
        assert stored == 1
        assert [(r["action"], r["outcome"]) for r in rows] == [("dimse_store", 0x0000)]


@pytest.mark.parametrize("over", [0, 1])
async def test_pdu_length_limit_at_its_edge(
    archive: Archive, over: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by review: pynetdicom reads a whole PDU into memory, whatever length its header
    announces, before anything else is checked (the calling AE title included): a peer that
    announced an A-ASSOCIATE-RQ of 2 GiB and sent 300 MiB grew the server by 310 MB, and a few
    such connections could exhaust its memory. A PDU longer than DIMSE_MAX_PDU_BYTES now
    closes the connection before its body is read; one of exactly that length is read (and
    this one, not an A-ASSOCIATE-RQ, refused with an A-ABORT)."""
    import socket
    import struct

    from dicomweb_server.dimse.server import DIMSE_MAX_PDU_BYTES

    length = DIMSE_MAX_PDU_BYTES + over

    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", archive.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0, length))
            try:
                if not over:
                    sock.sendall(b"\xff" * length)
                return sock.recv(16)
            except ConnectionResetError:
                return b""

    with caplog.at_level(logging.WARNING):
        answer = await in_thread(send)
    if over:
        assert answer == b""  # closed, nothing read or answered
        # One line says why, not pynetdicom's two ERRORs and a traceback after it (a peer
        # could fill the log with those).
        said = [r for r in caplog.records if r.name.startswith(("pynetdicom", "dicomweb"))]
        assert [(r.levelname, r.exc_info is None) for r in said] == [("WARNING", True)], [
            r.getMessage() for r in said
        ]
    else:
        assert answer[:1] == b"\x07"  # A-ABORT: the PDU was read, and refused
    echo = await dcmtk("echoscu", "-aet", SCU, "-aec", "DICOMWEB", "127.0.0.1", str(archive.port))
    assert echo.returncode == 0, echo.stderr


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


_PDU_OVER_THE_LIMIT = struct.pack(">BBI", 0x01, 0, DIMSE_MAX_PDU_BYTES + 1)  # its header only


def _association_request(protocol_version: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU with only its application context (PS3.8 9.3.2)."""
    app = b"1.2.840.10008.3.1.1.1"
    body = (struct.pack(">HH", protocol_version, 0) + b"DICOMWEB".ljust(16) + b"PROBE".ljust(16)
            + bytes(32) + struct.pack(">BBH", 0x10, 0, len(app)) + app)  # fmt: skip
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@pytest.mark.parametrize(
    ("first", "audited"),
    [
        pytest.param(_PDU_OVER_THE_LIMIT, ["dimse_associate"], id="pdu-over-the-limit"),
        pytest.param(b"\x04\x00\x00\x00\x00\x00", ["dimse_associate"], id="no-request"),
        pytest.param(_association_request(2), ["dimse_associate"], id="protocol-version-2"),
        pytest.param(b"", [], id="no-pdu"),
    ],
)
async def test_connection_closed_before_the_request_frees_its_association_slot(
    settings: Settings, first: bytes, audited: list[str]
) -> None:
    """Found by review: a connection that closed before its association request was taken up
    held one of DIMSE_MAX_ASSOCIATIONS for the 30 s of the ACSE timeout: closed by the
    archive for a first PDU over DIMSE_MAX_PDU_BYTES, after an A-ABORT for a first PDU that
    is no A-ASSOCIATE-RQ, or an A-ASSOCIATE-RJ for an unsupported protocol version, or by the
    peer before sending anything (a port probe). With the limit at 1, one such peer locked
    every modality out for 30 s. Now the slot is free within a second of the close, and a
    real association right after succeeds; the audit trail is as before (one row, none for
    a probe)."""

    def send() -> None:
        with socket.create_connection(("127.0.0.1", archive.port), timeout=10) as sock:
            sock.sendall(first)
            if not first:
                return
            try:
                while sock.recv(65536):  # until the archive closes it
                    pass
            except ConnectionResetError:
                pass

    async with running_archive(settings, dimse_max_associations=1) as archive:
        assert archive.dimse is not None
        ae = archive.dimse.ae
        start = await audit_seq(archive)
        with Closes(archive) as closes:
            await in_thread(send)
            await closes.wait()
        closed = time.monotonic()
        while [a for a in ae.active_associations if a.is_acceptor]:
            assert time.monotonic() - closed < 10, "the association slot is still taken"
            await in_thread(time.sleep, 0.02)
        freed = time.monotonic() - closed
        port = str(archive.port)
        echo = await dcmtk("echoscu", "-aet", SCU, "-aec", "DICOMWEB", "127.0.0.1", port)
        rows = await audit_rows(archive, ("dimse_associate", "dimse_abort"), start)
    assert freed < 5  # about 0.05 s; 30 s (the ACSE timeout) before the fix
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert [r["action"] for r in rows] == audited, rows


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


# -- Audit trail (issue 7) ------------------------------------------------------------------


async def test_dimse_operations_are_audited(archive: Archive) -> None:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    ds = make_instance(patient_id="AUDIT-1")
    bad = make_instance()
    del bad.StudyInstanceUID
    ae = scu(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def talk() -> list[int]:
        assoc = associate(ae, archive)
        try:
            codes = [int(assoc.send_c_store(x).Status) for x in (ds, bad)]
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.PatientID = "AUDIT-1"
            query.StudyInstanceUID = ""
            found = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            codes.append(int(found[-1][0].Status))
            return codes
        finally:
            assoc.release()

    assert await in_thread(talk) == [0x0000, 0xA900, 0x0000]
    assert archive.audit is not None
    await archive.audit.flush()
    rows = await archive.services.index._fetch(
        "SELECT caller, client, action, uids, outcome, detail FROM audit_log"
        " WHERE action LIKE 'dimse_%' ORDER BY seq DESC LIMIT 3"
    )
    stored, refused, find = [dict(r) for r in reversed(rows)]
    assert stored["caller"] == f"ae:{SCU}" and stored["client"] == "127.0.0.1"
    assert stored["uids"] == [f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"]
    assert (stored["outcome"], refused["outcome"], refused["uids"]) == (0, 0xA900, [])
    # Why it was refused, as the peer was told (found by review: only which instance).
    assert stored["detail"] == f"sop={ds.SOPInstanceUID}"
    assert refused["detail"].startswith(f"sop={bad.SOPInstanceUID}; ")
    assert "StudyInstanceUID" in refused["detail"]
    assert find["action"] == "dimse_find" and "PatientID=AUDIT-1" in find["detail"]
    assert "matches=1" in find["detail"]


def test_associations_send_without_nagle_delay() -> None:
    """Found by review: a C-STORE sub-operation is two PDUs, and with Nagle's algorithm the
    second waited for the peer's delayed ACK (C-GET and C-MOVE sent about 20 instances a
    second). Every association the archive accepts, and each it opens for a C-MOVE, sets
    TCP_NODELAY (association.no_delay, bound to EVT_CONN_OPEN)."""
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomweb_server.dimse import association, handlers
    from tests.liveserver import free_port

    bound = handlers.Handlers(cast(Any, None), cast(Any, None), "AE", {}, "").bindings()
    assert (evt.EVT_CONN_OPEN, association.no_delay) in bound
    scp = AE(ae_title="NODELAY")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, association.no_delay)]
    )
    assert server is not None

    def nodelay(assoc: Any) -> int:
        return int(assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        opened: list[int] = []

        def outgoing(event: evt.Event) -> None:
            association.no_delay(event)
            opened.append(nodelay(event.assoc))

        assoc = scu.associate(
            "127.0.0.1", port, ae_title="NODELAY", evt_handlers=[(evt.EVT_CONN_OPEN, outgoing)]
        )
        try:
            assert assoc.is_established
            (accepted,) = server.active_associations
            assert nodelay(accepted)
            assert opened and opened[0]
        finally:
            assoc.release()
    finally:
        server.shutdown()
