"""A converted instance goes to a C-GET requestor while it is converted (dimse/streaming.py,
sending.send_growing): its C-STORE begins once the header and first frame are written, not
once the whole instance is (a 1 GiB JPEG 2000 one took 6 minutes, past a requestor's 30 s
DIMSE timeout); a conversion failing mid-way aborts the association, the requestor never
given a data set cut short as a whole one; the scratch file goes either way."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb_server.config import Settings
from dicomweb_server.dimse import conversion, sending, streaming
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.transcode import convert
from dicomweb_server.transcode.codecs import TranscodeError
from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    PEER,
    Archive,
    as_part10,
    associate,
    audit_rows,
    audit_seq,
    dataset_bytes,
    identifier,
    in_thread,
    requestor_store,
    running_archive,
    scu,
)
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

_CT = "1.2.840.10008.5.1.4.1.1.2"
# 40 RLE frames of 64 x 64 16-bit pixels, each taking _DELAY_S more to decode: 2 s at least.
_FRAMES, _SIDE, _DELAY_S = 40, 64, 0.05


class _Decoder:
    """pydicom's decoder, each frame taking `delay` seconds more to decode (counted in
    `decoded`, with when the last was), raising once `fail_at` frames are decoded."""

    def __init__(self, real: Any, decoded: _Decoded, fail_at: int | None) -> None:
        self.real, self.decoded, self.fail_at = real, decoded, fail_at

    def iter_array(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in self.real.iter_array(*args, **kwargs):
            if self.decoded.count == self.fail_at:
                raise ValueError("frame cannot be decoded (test)")
            time.sleep(_DELAY_S)
            self.decoded.count += 1
            self.decoded.last = time.monotonic()
            yield item


class _Decoded:
    """The frames the slowed decoders decoded, and when the last was."""

    count = 0
    last = 0.0


def _slow(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> _Decoded:
    real = convert.get_decoder  # type: ignore[attr-defined]
    decoded = _Decoded()
    monkeypatch.setattr(convert, "get_decoder", lambda ts: _Decoder(real(ts), decoded, fail_at))
    return decoded


async def _stored(archive: Archive) -> Any:
    ds = make_instance(rows=_SIDE, cols=_SIDE, frames=_FRAMES)
    noise = np.random.default_rng(7).integers(0, 4096, (_FRAMES, _SIDE, _SIDE), "<u2")
    ds.PixelData = noise.tobytes()
    ds.compress(RLELossless, generate_instance_uid=False)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    body = multipart_body([out.getvalue()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    return ds


class _Requestor:
    """A C-GET requestor taking CT only in Explicit VR Little Endian: what it stored, and
    when the first data set fragment of a C-STORE arrived (and the frames decoded then)."""

    def __init__(self, decoder: _Decoded) -> None:
        self.decoder = decoder
        self.stored: list[bytes] = []
        self.first_data: tuple[float, int] | None = None
        self.data_fragments: list[int] = []  # data set bytes of each P-DATA fragment
        self.aborted = False
        self.max_pdu: int | None = None  # else pynetdicom's default

    def on_store(self, event: Event) -> int:
        self.stored.append(dataset_bytes(Path(event.dataset_path)))
        return 0x0000

    def on_pdu(self, event: Event) -> None:
        items = getattr(event.pdu, "presentation_data_value_items", [])
        data = [i for i in items if i.message_control_header_byte[-1] == "0"]
        self.data_fragments += [len(i.presentation_data_value) - 1 for i in data]
        if data and self.first_data is None:
            self.first_data = (time.monotonic(), self.decoder.count)

    def get(self, archive: Archive, study: str) -> list[Any]:
        model = StudyRootQueryRetrieveInformationModelGet
        ae = scu(model)
        ae.add_requested_context(_CT, ExplicitVRLittleEndian)
        role = build_role(_CT, scp_role=True)
        handlers = [requestor_store(self.on_store), (evt.EVT_PDU_RECV, self.on_pdu)]
        limit = {} if self.max_pdu is None else {"max_pdu": self.max_pdu}
        assoc = associate(ae, archive, ext_neg=[role], evt_handlers=handlers, **limit)
        try:
            ident = identifier("STUDY", StudyInstanceUID=study)
            return [st for st, _ in assoc.send_c_get(ident, model)]
        finally:
            if assoc.is_established:
                assoc.release()
            assoc.join(CLIENT_TIMEOUT_S)  # its reactor notes an abort in its own time
            self.aborted = assoc.is_aborted
            # pynetdicom leaves the spool file of a data set it was receiving open.
            receiving = assoc.dimse.message
            if receiving is not None and receiving._data_set_file is not None:
                receiving._data_set_file.close()
                Path(receiving._data_set_file.name).unlink(missing_ok=True)


async def test_get_sends_a_converted_instance_while_it_is_converted(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first data set fragment of the C-STORE reaches the requestor while frames are
    still to decode; the pixels received are those of the stored instance, whole."""
    ds = await _stored(archive)
    decoder = _slow(monkeypatch)
    requestor = _Requestor(decoder)
    statuses = await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert statuses[-1].Status == 0x0000, statuses[-1]
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    assert requestor.first_data is not None
    at, frames_then = requestor.first_data
    # Before: the whole instance converted first (all 40 frames decoded, 2 s).
    assert frames_then < _FRAMES // 2, frames_then
    assert at < decoder.last
    (received,) = requestor.stored
    got = as_part10(received, ExplicitVRLittleEndian)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert list(archive.services.scratch_dir.iterdir()) == []


async def test_a_conversion_failing_mid_way_aborts_the_association(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame that cannot be decoded once the C-STORE has begun: the requestor's
    association is aborted (PS3.7 has no other way to end a data set short), it stores
    nothing; the scratch file goes; the archive serves the next requestor."""
    ds = await _stored(archive)
    requestor = _Requestor(_slow(monkeypatch, fail_at=_FRAMES // 2))
    await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert requestor.first_data is not None  # the C-STORE had begun
    assert requestor.aborted
    assert requestor.stored == []
    deadline = time.monotonic() + 10
    while list(archive.services.scratch_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(archive.services.scratch_dir.iterdir()) == []
    monkeypatch.undo()
    again = _Requestor(_slow(monkeypatch))
    statuses = await in_thread(again.get, archive, str(ds.StudyInstanceUID))
    assert statuses[-1].Status == 0x0000 and len(again.stored) == 1


async def test_a_conversion_failing_at_its_first_frame_fails_the_sub_operation_only(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing before its header is written (at its first frame, where a decoder that
    cannot read the data fails), nothing is sent: the sub-operation fails, the association
    goes on to its end."""
    ds = await _stored(archive)
    requestor = _Requestor(_slow(monkeypatch, fail_at=0))
    statuses = await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert not requestor.aborted and requestor.stored == []
    assert statuses[-1].Status == 0xA702, statuses[-1]  # every sub-operation failed
    assert statuses[-1].NumberOfFailedSuboperations == 1
    assert list(archive.services.scratch_dir.iterdir()) == []


async def test_a_conversion_failing_mid_way_is_audited_with_the_bytes_it_sent(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit's byte count of a C-GET whose converted instance failed once half sent:
    the data set bytes handed on, at least what the requestor received, not the whole
    instance (found by review: 0, the size of the scratch file the failure had removed)."""
    ds = await _stored(archive)
    start = await audit_seq(archive)
    requestor = _Requestor(_slow(monkeypatch, fail_at=_FRAMES // 2))
    await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert requestor.aborted
    deadline = time.monotonic() + 10  # audited as its handler ends, after the abort
    while not (rows := await audit_rows(archive, "dimse_get", start)):
        assert time.monotonic() < deadline, "the C-GET was not audited"
        await anyio.sleep(0.05)
    (row,) = rows
    received = sum(requestor.data_fragments)
    assert 0 < received <= row["bytes"] < _FRAMES * _SIDE * _SIDE * 2, (received, row)


def test_a_conversion_whose_file_cannot_be_removed_still_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion failing whose scratch file then cannot be removed (EACCES, EIO): the
    sender is told all the same (found by review: it waited for the header forever)."""
    src = tmp_path / "src.dcm"
    inst = _rle(src)
    real = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path.parent.name == "scratch" and threading.current_thread().name.endswith("/convert"):
            raise PermissionError(13, "cannot remove (test)", str(path))
        real(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    _slow(monkeypatch, fail_at=0)  # fails at its first frame, before its header is written
    done: list[bool] = []

    def convert() -> None:
        with contextlib.suppress(TranscodeError):
            conversion.converted_for_peer(inst, src, ExplicitVRLittleEndian, tmp_path / "scratch")
        done.append(True)

    waiting = threading.Thread(target=convert, daemon=True)
    waiting.start()
    waiting.join(10)
    assert done, "converted_for_peer never returned"


def test_a_conversion_thread_that_cannot_start_leaves_no_scratch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread for the conversion (RuntimeError: can't start new thread): the error is
    raised (the sub-operation fails), no scratch file is left (found by review: it was)."""
    src = tmp_path / "src.dcm"
    inst = _rle(src)
    real = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.endswith("/convert"):
            raise RuntimeError("can't start new thread (test)")
        real(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    scratch = tmp_path / "scratch"
    with pytest.raises(RuntimeError, match="can't start"):
        conversion.converted_for_peer(inst, src, ExplicitVRLittleEndian, scratch)
    assert list(scratch.iterdir()) == []


def _rle(path: Path) -> StoredInstance:
    ds = make_instance(rows=_SIDE, cols=_SIDE, frames=4)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return StoredInstance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, _CT,
                          "0" * 32, RLELossless, path.stat().st_size, 4, None, None, False,
                          rows=_SIDE, columns=_SIDE, samples_per_pixel=1,
                          bits_allocated=16)  # fmt: skip


def test_pixels_past_the_scratch_bound_fail_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DIMSE_CONVERTED_MAX_BYTES, at its edge, for the decoded pixels alone (Image Pixel
    attributes): one byte fewer than they hold fails before the conversion begins; as many
    begins, and fails on its way (the header makes the file larger), where it would abort
    the association once sent from; no scratch file left either way."""
    src = tmp_path / "src.dcm"
    inst = _rle(src)
    pixels = 4 * _SIDE * _SIDE * 2
    scratch = tmp_path / "scratch"
    begun: list[Path] = []
    real = convert.to_transfer_syntax

    def counted(src: Path, *args: Any, **kwargs: Any) -> None:
        begun.append(src)
        real(src, *args, **kwargs)

    monkeypatch.setattr(conversion, "to_transfer_syntax", counted)
    monkeypatch.setattr(conversion, "DIMSE_CONVERTED_MAX_BYTES", pixels - 1)
    with pytest.raises(TranscodeError, match=f"more than {pixels - 1} bytes"):
        conversion.converted_for_peer(inst, src, ExplicitVRLittleEndian, scratch)
    assert begun == []
    monkeypatch.setattr(conversion, "DIMSE_CONVERTED_MAX_BYTES", pixels)
    with pytest.raises(TranscodeError, match=f"more than {pixels} bytes"):
        sent = conversion.converted_for_peer(inst, src, ExplicitVRLittleEndian, scratch)
        assert sent.growing is not None
        sent.growing.wait_done(30)
    assert begun == [src]
    assert list(scratch.iterdir()) == []


def test_bytes_sent_may_be_written_again_only_as_they_were(tmp_path: Path) -> None:
    """A value filled in once written (the length of the Pixel Data) where the sender has
    read it: the same bytes go on; other bytes fail the conversion, not the peer's copy."""
    path = tmp_path / "growing.dcm"
    growing = streaming.Growing(path)
    with open(path, "wb", buffering=0) as f:
        growing.opening()
        growing.write(0, memoryview(b"abcdefgh"), f.write)
        growing.started = True
        growing.finish()
        chunks = growing.fragments(0, 4, lambda: True)
        assert next(chunks) == (b"abcd", False)  # read: bytes 0 to 4 are the peer's
        f.seek(2)
        growing.write(2, memoryview(b"cd"), f.write)  # as they were
        f.seek(6)
        growing.write(6, memoryview(b"XY"), f.write)  # not sent yet
        f.seek(3)
        with pytest.raises(ValueError, match="changed after they were sent"):
            growing.write(3, memoryview(b"Z"), f.write)
        assert next(chunks) == (b"efXY", True)
    with pytest.raises(ValueError, match="decoder failed once"):
        growing.opening()


@contextlib.contextmanager
def _explicit_only_peer() -> Iterator[tuple[int, list[bytes], list[bool]]]:
    """A C-MOVE destination taking CT only in Explicit VR Little Endian: its port, the data
    sets it stored, and whether each association it had was aborted."""
    ae = AE(ae_title=PEER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT_S
    ae.add_supported_context(_CT, ExplicitVRLittleEndian)
    stored: list[bytes] = []
    aborted: list[bool] = []

    def on_store(event: Event) -> int:
        stored.append(dataset_bytes(Path(event.dataset_path)))
        return 0x0000

    def on_aborted(event: Event) -> None:  # pynetdicom leaves the spool file open
        aborted.append(True)
        receiving = event.assoc.dimse.message
        if receiving is not None and receiving._data_set_file is not None:
            receiving._data_set_file.close()
            Path(receiving._data_set_file.name).unlink(missing_ok=True)

    handlers: list[Any] = [requestor_store(on_store), (evt.EVT_ABORTED, on_aborted)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield int(server.server_address[1]), stored, aborted
    finally:
        ae.shutdown()


def _move(archive: Archive, study: str) -> list[Any]:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = associate(scu(model), archive)
    try:
        ident = identifier("STUDY", StudyInstanceUID=study)
        return [st for st, _ in assoc.send_c_move(ident, PEER, model)]
    finally:
        assoc.release()


@pytest.mark.parametrize("fail_at", [None, _FRAMES // 2], ids=["whole", "failing"])
async def test_move_sends_while_converting_and_aborts_only_its_sub_association(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int | None
) -> None:
    """C-MOVE to a destination taking the instance only uncompressed: it stores the
    instance whole, its first fragment sent before the last frame was decoded; failing
    mid-way, the sub-association is aborted (the destination stores nothing) and the
    C-MOVE answers the sub-operation failed on its own association."""
    with _explicit_only_peer() as (port, stored, aborted):
        peers = tmp_path / "peers.json"
        peers.write_text(json.dumps({PEER: {"host": "127.0.0.1", "port": port}}))
        async with running_archive(settings, dimse_peers=peers) as archive:
            ds = await _stored(archive)
            decoded = _slow(monkeypatch, fail_at)
            statuses = await in_thread(_move, archive, str(ds.StudyInstanceUID))
            final = statuses[-1]
            if fail_at is None:
                assert final.Status == 0x0000, final
                (received,) = stored
                got = as_part10(received, ExplicitVRLittleEndian)
                assert np.array_equal(got.pixel_array, ds.pixel_array)
                assert aborted == []
            else:
                assert final.Status == 0xA702, final
                assert final.NumberOfFailedSuboperations == 1
                assert stored == [] and aborted == [True]
                assert decoded.count == fail_at
            assert list(archive.services.scratch_dir.iterdir()) == []


async def test_a_peer_without_a_pdu_limit_gets_fragments_of_the_bound(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requestor that sets no maximum PDU length (0): each data set fragment but the last
    holds DIMSE_UNLIMITED_PDV_BYTES exactly (not the rest of the file, read whole)."""
    bound = 100_000
    monkeypatch.setattr(sending, "DIMSE_UNLIMITED_PDV_BYTES", bound)
    ds = await _stored(archive)
    requestor = _Requestor(_slow(monkeypatch))
    requestor.max_pdu = 0
    statuses = await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert statuses[-1].Status == 0x0000
    *full, last = requestor.data_fragments
    assert full and set(full) == {bound} and 0 < last <= bound
    assert sum(requestor.data_fragments) == len(requestor.stored[0])


async def test_a_peer_with_a_huge_pdu_limit_gets_fragments_of_the_bound(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requestor whose maximum PDU length is the largest there is (0xFFFFFFFF): as one
    that set none, fragments of DIMSE_UNLIMITED_PDV_BYTES, sent as converted (found by
    review: the rest of the file in one fragment, read whole once the conversion was over)."""
    bound = 100_000
    monkeypatch.setattr(sending, "DIMSE_UNLIMITED_PDV_BYTES", bound)
    ds = await _stored(archive)
    decoder = _slow(monkeypatch)
    requestor = _Requestor(decoder)
    requestor.max_pdu = 0xFFFFFFFF
    statuses = await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert statuses[-1].Status == 0x0000
    *full, last = requestor.data_fragments
    assert full and set(full) == {bound} and 0 < last <= bound
    assert requestor.first_data is not None and requestor.first_data[1] < _FRAMES
    assert sum(requestor.data_fragments) == len(requestor.stored[0])


@pytest.mark.parametrize("max_pdu", [0, 0xFFFFFFFF])
async def test_an_instance_sent_as_stored_goes_in_fragments_of_the_bound(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, max_pdu: int
) -> None:
    """An instance sent as stored (the requestor took its syntax) to a requestor that set no
    maximum PDU length, or the largest: fragments of DIMSE_UNLIMITED_PDV_BYTES, as a
    converted one (found by review: pynetdicom read the whole file into one fragment); the
    audit counts its data set bytes."""
    bound = 100_000
    monkeypatch.setattr(sending, "DIMSE_UNLIMITED_PDV_BYTES", bound)
    ds = make_instance(rows=_SIDE, cols=_SIDE, frames=_FRAMES)  # Explicit VR Little Endian
    noise = np.random.default_rng(8).integers(0, 4096, (_FRAMES, _SIDE, _SIDE), "<u2")
    ds.PixelData = noise.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    body = multipart_body([out.getvalue()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    start = await audit_seq(archive)
    requestor = _Requestor(_Decoded())
    requestor.max_pdu = max_pdu
    statuses = await in_thread(requestor.get, archive, str(ds.StudyInstanceUID))
    assert statuses[-1].Status == 0x0000
    *full, last = requestor.data_fragments
    assert full and set(full) == {bound} and 0 < last <= bound
    (received,) = requestor.stored
    assert sum(requestor.data_fragments) == len(received)
    assert np.array_equal(as_part10(received, ExplicitVRLittleEndian).pixel_array, ds.pixel_array)
    deadline = time.monotonic() + 10
    while not (rows := await audit_rows(archive, "dimse_get", start)):
        assert time.monotonic() < deadline, "the C-GET was not audited"
        await anyio.sleep(0.05)
    assert rows[0]["bytes"] == len(received)
