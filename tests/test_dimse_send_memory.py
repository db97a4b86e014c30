"""C-GET and C-MOVE sub-operations in bounded memory (dimse/sending.py): an instance sent as
stored is read from its file a PDU at a time, not encoded whole; one converted for a peer
that takes it only uncompressed is converted a frame at a time into a scratch file and sent
from it the same way (dimse/conversion.py); and the PDUs queued for a peer that reads slowly
stay within DIMSE_SEND_QUEUE_BYTES."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom import evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from dicomweb_server.dimse import conversion, sending
from dicomweb_server.index.rows import StoredInstance
from tests.dimse_support import (
    Archive,
    as_part10,
    associate,
    converted_whole,
    dataset_bytes,
    get_study,
    identifier,
    in_thread,
    requestor_store,
    scu,
)
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

# 8 MiB of pixels; the send queue scaled down to 128 KiB: memory holds the queue, a few PDUs
# and pynetdicom's and pydicom's own (2.4 MB in all), not the instance.
_ROWS = _COLS = 2048
_QUEUE = 128 * 1024


async def _stored(archive: Archive) -> tuple[str, bytes]:
    """(Study Instance UID, the data set as stored) of an 8 MiB instance."""
    ds = make_instance(rows=_ROWS, cols=_COLS)
    ds.PixelData = np.random.default_rng(3).integers(0, 4096, _ROWS * _COLS, "<u2").tobytes()
    raw = to_bytes(ds)
    body = multipart_body([raw])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    return str(ds.StudyInstanceUID), dataset_bytes(raw)


def _get(archive: Archive, study: str, slow_s: float) -> tuple[list[int], str]:
    """C-GET of the study by a requestor taking CT in Explicit VR Little Endian, waiting
    `slow_s` before each read of its socket (a slow reader); (the final status and
    completed count, the SHA-256 of the data set received, read from its spool file in
    chunks)."""
    digests: list[str] = []

    def on_store(event: Event) -> int:
        sha = hashlib.sha256()
        with open(event.dataset_path, "rb") as fh:
            fh.seek(sending_offset(event.dataset_path))
            while chunk := fh.read(64 * 1024):
                sha.update(chunk)
        digests.append(sha.hexdigest())
        return 0x0000

    model = StudyRootQueryRetrieveInformationModelGet
    ae = scu(model)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[requestor_store(on_store)])
    sock = assoc.dul.socket
    if slow_s and sock is not None:  # the requestor's DUL reads each PDU (header, body) later
        recv: Callable[[int], bytearray] = sock.recv

        def slow_recv(nr_bytes: int) -> bytearray:
            time.sleep(slow_s)
            return recv(nr_bytes)

        sock.recv = slow_recv  # type: ignore[method-assign]
    try:
        statuses = [st for st, _ in assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study),
                                                      model)]  # fmt: skip
    finally:
        assoc.release()
    final = statuses[-1]
    return [int(final.Status), int(final.NumberOfCompletedSuboperations)], "".join(digests)


def sending_offset(path: Any) -> int:
    """Where the data set of a spooled Part-10 file begins."""
    return int(split_dataset(path)[1])


@pytest.mark.parametrize("slow_s", [0.0, 0.0005], ids=["fast", "slow"])
async def test_get_sends_a_stored_instance_a_pdu_at_a_time(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, slow_s: float
) -> None:
    monkeypatch.setattr(sending, "DIMSE_SEND_QUEUE_BYTES", _QUEUE)
    study, data_set = await _stored(archive)
    tracemalloc.start()
    try:
        outcome, digest = await in_thread(_get, archive, study, slow_s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == [0x0000, 1]
    assert digest == hashlib.sha256(data_set).hexdigest()
    # Encoded whole (pynetdicom's send_c_store of a Dataset): 3 times the data set; then
    # queued whole for a slow reader.
    assert peak < len(data_set) // 2, peak


def _get_aborted(archive: Archive, study: str, after_pdus: int) -> None:
    """C-GET of the study by a slow requestor that aborts the association once it has read
    `after_pdus` P-DATA-TF PDUs, in the middle of the instance."""
    model = StudyRootQueryRetrieveInformationModelGet
    ae = scu(model)
    ae.dimse_timeout = 5  # its send_c_get waits for no more once it aborted
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scp_role=True)
    read = [0]
    aborting = threading.Event()

    def on_pdu(event: Event) -> None:  # in the requestor's DUL thread: abort from another
        read[0] += isinstance(event.pdu, P_DATA_TF)
        if read[0] >= after_pdus and not aborting.is_set():
            aborting.set()
            threading.Thread(target=event.assoc.abort).start()

    handlers = [requestor_store(lambda _: 0x0000), (evt.EVT_PDU_RECV, on_pdu)]
    assoc = associate(ae, archive, ext_neg=[role], evt_handlers=handlers)
    sock = assoc.dul.socket
    assert sock is not None
    raw = sock.socket
    recv: Callable[[int], bytearray] = sock.recv

    def slow_recv(nr_bytes: int) -> bytearray:
        time.sleep(0.0005)
        return recv(nr_bytes)

    sock.recv = slow_recv  # type: ignore[method-assign]
    with contextlib.suppress(Exception):
        for _ in assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study), model):
            pass
    assert aborting.wait(10)
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The requestor's pynetdicom keeps open the file it was receiving the data set into.
    spool = getattr(getattr(assoc.dimse, "message", None), "_data_set_file", None)
    if spool is not None:
        spool.close()
    if raw is not None:
        raw.close()  # pynetdicom leaves it open when the archive closed first


async def test_get_aborted_by_the_requestor_queues_no_more(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: once the requestor aborted (the DUL thread ended), the rest of the
    instance was read from its file into the DUL's queue, where nothing sends it: the memory
    the bound saves, held after all (27 MB of a 32 MB instance)."""
    monkeypatch.setattr(sending, "DIMSE_SEND_QUEUE_BYTES", _QUEUE)
    duls: list[Any] = []
    bound = sending.bound_send_queue

    def bound_and_kept(dul: Any) -> None:
        duls.append(dul)
        bound(dul)

    monkeypatch.setattr(sending, "bound_send_queue", bound_and_kept)
    study, data_set = await _stored(archive)
    spooled = set(Path(tempfile.gettempdir()).glob("tmp*.dcm"))
    await in_thread(_get_aborted, archive, study, 16)
    # ... and leaves it behind (_get_aborted).
    for left in set(Path(tempfile.gettempdir()).glob("tmp*.dcm")) - spooled:
        left.unlink()
    assert len(duls) == 1
    queued = [p for p in list(duls[0].to_provider_queue.queue) if isinstance(p, P_DATA)]
    held = sum(len(v) for p in queued for _, v in p.presentation_data_value_list)
    assert held <= _QUEUE, (held, len(data_set))


# pynetdicom's: a socket whose peer reset first, its shutdown failing, is left to be closed
# when collected (AssociationSocket._shutdown_socket skips the close then).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_get_aborted_by_the_requestor_reads_no_more(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the requestor aborted, the rest of the instance is not read from its file. Found
    by review: the DUL thread outlives the A-ABORT (or a connection lost, PS3.8 Sta1) until
    the association's thread sees it, and pynetdicom read the whole rest, fragment by
    fragment, for the DUL to drop each (4 to 5 MB of an 8 MiB instance)."""
    monkeypatch.setattr(sending, "DIMSE_SEND_QUEUE_BYTES", _QUEUE)
    # Data set bytes handed to the DUL (what pynetdicom read from the file), in all and once
    # the association had ended (PS3.8 Sta1: the A-ABORT received, or the connection closed).
    handed, after = [0], [0]
    bound = sending.bound_send_queue

    def bound_and_counted(dul: Any) -> None:
        bound(dul)
        send_pdu = dul.send_pdu

        def counted(primitive: Any) -> None:
            if isinstance(primitive, P_DATA):
                size = sum(len(v) for _, v in primitive.presentation_data_value_list)
                handed[0] += size
                after[0] += size if dul.state_machine.current_state != "Sta6" else 0
                time.sleep(0.002)  # read slower than sent: the DUL thread reads between
            send_pdu(primitive)

        dul.send_pdu = counted

    monkeypatch.setattr(sending, "bound_send_queue", bound_and_counted)
    study, data_set = await _stored(archive)
    spooled = set(Path(tempfile.gettempdir()).glob("tmp*.dcm"))
    await in_thread(_get_aborted, archive, study, 16)
    for left in set(Path(tempfile.gettempdir()).glob("tmp*.dcm")) - spooled:
        left.unlink()
    # Sent before (within the socket buffers, a few MB), then one PDU at most: the one that
    # found the association ended. Before, the rest: 4 to 5 MB.
    assert 0 < handed[0] < len(data_set), (handed[0], len(data_set))
    assert after[0] <= 64 * 1024, (after[0], handed[0])


# A JPEG-LS instance of 48 frames of 256 x 256 16-bit pixels: 6 MiB decoded, 128 KiB a frame.
_FRAMES, _SIDE = 48, 256
_FRAME_BYTES = _SIDE * _SIDE * 2


def _jpeg_ls(path: Path) -> None:
    ds = make_instance(frames=_FRAMES, rows=_SIDE, cols=_SIDE)
    ds.BitsStored, ds.HighBit = 12, 11
    noise = np.random.default_rng(5).integers(0, 4096, (_FRAMES, _SIDE, _SIDE), "<u2")
    ds.PixelData = noise.tobytes()
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def test_conversion_for_a_peer_holds_a_frame_not_the_instance(tmp_path: Path) -> None:
    """The instance converted for a peer that takes it only uncompressed is written to a
    scratch file a frame at a time and sent from it (a StoredFile): memory holds about a
    frame. Before, it was decoded whole into a data set that pynetdicom then encoded whole:
    three to four times the decoded size (a C-GET of a 125 MiB JPEG-LS instance, 450 MB)."""
    src = tmp_path / "jls.dcm"
    _jpeg_ls(src)
    ds = dcmread(src, stop_before_pixels=True)
    inst = StoredInstance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                          ds.SOPClassUID, "0" * 32, JPEGLSLossless, src.stat().st_size,
                          _FRAMES, None, None, True, bits_allocated=16, bits_stored=12,
                          samples_per_pixel=1, pixel_representation=0,
                          photometric="MONOCHROME2", rows=_SIDE, columns=_SIDE)  # fmt: skip
    scratch = tmp_path / "scratch"
    tracemalloc.start()
    try:
        sent = converted_whole(inst, src, ExplicitVRLittleEndian, scratch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(sent, sending.StoredFile) and sent.scratch
    assert sent.stored_path.parent == scratch
    # A frame is held a few times over as it is decoded and written (the codec's output,
    # pydicom's corrected copy, the frame before it): 6 frames (7 with a copy of each frame
    # to write it and the first frame kept to the end), 1/8 of the instance.
    assert peak < 6.5 * _FRAME_BYTES, (peak, _FRAMES * _FRAME_BYTES)
    got = dcmread(sent.stored_path)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, dcmread(src).pixel_array)
    sending.remove_scratch(sent)
    assert list(scratch.iterdir()) == []


def test_decoded_at_once_is_a_frame_where_the_conversion_streams() -> None:
    def inst(ts: str, **values: Any) -> StoredInstance:
        return StoredInstance("1.2", "1.2.3", "1.2.3.4", CTImageStorage, "0" * 32, ts,
                              10_000_000, 10, None, None, False, **values)  # fmt: skip

    pixels = {"rows": 512, "columns": 512, "samples_per_pixel": 1, "bits_allocated": 16}
    frame = 512 * 512 * 2
    assert conversion.decoded_at_once(inst(JPEGLSLossless, **pixels)) == frame
    assert conversion.decoded_at_once(inst(JPEGLSLossless)) is None
    # Converted in memory: Deflated, 1-bit (a byte a pixel, decoded).
    deflated = "1.2.840.10008.1.2.1.99"
    assert conversion.decoded_at_once(inst(deflated, **pixels)) == 10 * frame
    one_bit = {**pixels, "bits_allocated": 1}
    assert conversion.decoded_at_once(inst(JPEGLSLossless, **one_bit)) == 10 * 512 * 512
    # Big endian: the pixels swapped in chunks, the rest of the file read whole.
    big = "1.2.840.10008.1.2.2"
    assert conversion.decoded_at_once(inst(big, **pixels)) == 10_000_000 - 10 * frame
    assert conversion.decoded_at_once(inst(big)) == 10_000_000
    # A single frame larger than the bound, copied (swapped) in chunks: the rest of the file.
    one = StoredInstance("1.2", "1.2.3", "1.2.3.4", CTImageStorage, "0" * 32, big,
                         8_400_000, 1, None, None, False, rows=2048, columns=2048,
                         samples_per_pixel=1, bits_allocated=16)  # fmt: skip
    assert conversion.decoded_at_once(one) == 8_400_000 - 2048 * 2048 * 2
    # Little endian, for the other little endian syntax: copied the same way, 1-bit too.
    for native in (ExplicitVRLittleEndian, "1.2.840.10008.1.2"):
        assert conversion.decoded_at_once(inst(native, **pixels)) == 10_000_000 - 10 * frame
        assert conversion.decoded_at_once(inst(native, **one_bit)) == 10_000_000 - 327_680
        assert conversion.decoded_at_once(inst(native)) == 10_000_000
    assert conversion.decoded_at_once(inst(big, **one_bit)) == 10_000_000  # unpacked whole


async def test_get_converts_for_a_requestor_into_a_scratch_file(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C-GET of a multi-frame JPEG-LS instance by a requestor taking it only in Explicit VR
    Little Endian: the pixels received are pydicom's decoding of the stored ones, memory
    holds a few frames and the send queue, and the scratch file is gone afterwards."""
    monkeypatch.setattr(sending, "DIMSE_SEND_QUEUE_BYTES", _QUEUE)
    src = tmp_path / "jls.dcm"
    _jpeg_ls(src)
    ds = dcmread(src)
    body = multipart_body([src.read_bytes()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    received: list[tuple[Path, str]] = []

    def on_store(event: Event) -> int:  # the data set received, copied in chunks
        kept = tmp_path / f"received{len(received)}"
        with open(event.dataset_path, "rb") as fh, open(kept, "wb") as out:
            fh.seek(sending_offset(event.dataset_path))
            shutil.copyfileobj(fh, out, 64 * 1024)
        received.append((kept, str(event.context.transfer_syntax)))
        return 0x0000

    tracemalloc.start()
    try:
        statuses = await in_thread(get_study, archive, ds.StudyInstanceUID, ds.SOPClassUID,
                                   on_store)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert statuses[-1].Status == 0x0000 and statuses[-1].NumberOfCompletedSuboperations == 1
    ((kept, syntax),) = received
    assert syntax == ExplicitVRLittleEndian
    got = as_part10(kept.read_bytes(), syntax)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    decoded = _FRAMES * _FRAME_BYTES
    # Decoded whole into a data set, then encoded whole by pynetdicom: 3 to 4 times `decoded`
    # (measured 21 MB).
    assert peak < decoded // 2, (peak, decoded)  # 2.6 MB: pynetdicom, pydicom, 6 frames
    assert list(archive.services.scratch_dir.iterdir()) == []


# How long a requestor of the test below waits for the other one.
CLIENT_WAIT_S = 60


def _get_converted(
    archive: Archive, study: str, syntax: str, on_store: Callable[[Event], int]
) -> list[Dataset]:
    """C-GET of a study by a requestor taking CT Image Storage in `syntax` only."""
    model = StudyRootQueryRetrieveInformationModelGet
    ae = scu(model)
    ae.add_requested_context(CTImageStorage, syntax)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[requestor_store(on_store)])
    try:
        return [
            st for st, _ in assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study), model)
        ]
    finally:
        assoc.release()


async def test_implicit_only_requestor_gets_it_converted_while_another_one_waits(
    archive: Archive, tmp_path: Path
) -> None:
    """A requestor that takes CT only in Implicit VR Little Endian gets a JPEG-LS instance
    converted into it (target_syntax), with its nested sequences, odd-length values and
    private elements; and a peer slow to answer its C-STORE holds only its own scratch file,
    not the one-conversion-at-a-time lock: another requestor's conversion goes through
    meanwhile (checked by review: the lock is held for the conversion, not the send)."""
    from pydicom.dataset import Dataset as Item
    from pydicom.sequence import Sequence

    first = make_instance(frames=3, rows=32, cols=32)
    code = Item()
    code.CodeValue, code.CodeMeaning = "X1", "odd"
    content = Item()
    content.ConceptNameCodeSequence = Sequence([code])
    first.ContentSequence = Sequence([content, content])
    first.add_new(0x00111000, "LO", "ACME")
    first.add_new(0x00111001, "US", [1, 2, 3])
    first.PixelData = np.random.default_rng(7).integers(0, 4096, 3 * 32 * 32, "<u2").tobytes()
    first.compress(JPEGLSLossless, generate_instance_uid=False)
    second = tmp_path / "jls.dcm"
    _jpeg_ls(second)
    other = dcmread(second, stop_before_pixels=True)
    for raw in (to_bytes(first), second.read_bytes()):
        r = await archive.http.post(
            f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers()
        )
        assert r.status_code == 200, r.text
    held, answered = threading.Event(), threading.Event()
    received: list[tuple[bytes, str]] = []

    def slow(event: Event) -> int:  # answers once the other requestor got its instance
        with open(event.dataset_path, "rb") as fh:
            fh.seek(sending_offset(event.dataset_path))
            received.append((fh.read(), str(event.context.transfer_syntax)))
        held.set()
        assert answered.wait(CLIENT_WAIT_S)
        return 0x0000

    async def other_requestor() -> list[Dataset]:
        await in_thread(held.wait, CLIENT_WAIT_S)
        assert len(list(archive.services.scratch_dir.iterdir())) == 1  # the slow one's
        try:
            return await in_thread(_get_converted, archive, other.StudyInstanceUID,
                                   ExplicitVRLittleEndian, lambda _: 0x0000)  # fmt: skip
        finally:
            answered.set()

    async with anyio.create_task_group() as tg:
        results: dict[str, list[Dataset]] = {}

        async def run(name: str, call: Callable[[], Awaitable[list[Dataset]]]) -> None:
            results[name] = await call()

        tg.start_soon(run, "slow", functools.partial(
            in_thread, _get_converted, archive, first.StudyInstanceUID, ImplicitVRLittleEndian,
            slow))  # fmt: skip
        tg.start_soon(run, "other", other_requestor)
    for name in ("slow", "other"):
        assert results[name][-1].Status == 0x0000, name
        assert results[name][-1].NumberOfCompletedSuboperations == 1
    ((data, syntax),) = received
    assert syntax == ImplicitVRLittleEndian
    got = as_part10(data, syntax)
    assert "TransferSyntaxUID" not in got  # no File Meta Information in the data set sent
    assert np.array_equal(got.pixel_array, first.pixel_array)
    assert got.ContentSequence[1].ConceptNameCodeSequence[0].CodeMeaning == "odd"
    assert got[0x00111001].value == b"\x01\x00\x02\x00\x03\x00"  # private: UN, as implicit VR says
    assert got.PatientName == first.PatientName
    assert list(archive.services.scratch_dir.iterdir()) == []


async def test_a_full_scratch_disk_fails_the_sub_operation_and_says_so(
    archive: Archive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The scratch file of a conversion for a peer cannot be written (the disk full): that
    sub-operation fails, out of resources (0xA702 when it was the only one), its partial
    scratch file is removed, and the log names the scratch directory as well as the blob; it
    said only "cannot read blob", of a blob that read well (found by review)."""
    src = tmp_path / "jls.dcm"
    _jpeg_ls(src)
    r = await archive.http.post(
        f"{ROOT}/studies", content=multipart_body([src.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text

    def disk_full(_src: Path, made: Path, _target: str, *_: object, **__: object) -> None:
        made.write_bytes(bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(conversion, "to_transfer_syntax", disk_full)
    study = dcmread(src, stop_before_pixels=True).StudyInstanceUID
    statuses = await in_thread(_get_converted, archive, study, ExplicitVRLittleEndian,
                               lambda _: 0x0000)  # fmt: skip
    assert statuses[-1].Status == 0xA702 and statuses[-1].NumberOfFailedSuboperations == 1
    assert list(archive.services.scratch_dir.iterdir()) == []
    (logged,) = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert f"write it converted in {archive.services.scratch_dir}" in logged, logged
