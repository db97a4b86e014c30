"""C-GET of an uncompressed instance by a requestor that took the other little endian syntax
(stored Explicit VR Little Endian, taken only Implicit VR, or the reverse; stored big endian):
converted into a scratch file, its pixels copied (swapped) a chunk at a time, and sent from
it a PDU at a time (dimse/conversion.py). pynetdicom re-encoded the data set read whole, in
memory, several times its size (a 240 MB instance took the server from 103 to 847 MB). The
data set received is the one pynetdicom's re-encoding sent, byte for byte, and the stored one
element for element."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from dicomweb_server.dimse import conversion, sending
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.transcode.convert import converted_dataset
from dicomweb_server.transcode.frames import read_stored
from tests.dimse_support import (
    Archive,
    as_part10,
    associate,
    blobs,
    converted_whole,
    dataset_bytes,
    identifier,
    in_thread,
    requestor_store,
    scu,
)
from tests.helpers import ROOT, float_map, make_instance, multipart_body, stow_headers

# The other little endian syntax a requestor takes, for each stored uncompressed one.
_OTHER: dict[str, str] = {
    ExplicitVRLittleEndian: ImplicitVRLittleEndian,
    ImplicitVRLittleEndian: ExplicitVRLittleEndian,
    ExplicitVRBigEndian: ImplicitVRLittleEndian,
}


def _varied(ts: str, rows: int = 64, cols: int = 64) -> Dataset:
    """An instance in `ts` with what a re-encoding must keep: a nested sequence, private
    tags (a creator, LO, OB and UN values, of odd lengths), an odd-length string, a private
    OB value long enough to be left in the file when read (over 64 KiB, odd), an OW value,
    and elements after the Pixel Data."""
    ds = make_instance(rows=rows, cols=cols, patient_name="Odd")
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.add_new(0x00090010, "LO", "ACME 1.1")
    ds.add_new(0x00091001, "LO", "x")
    ds.add_new(0x00091002, "OB", b"\x01\x02\x03")
    ds.add_new(0x00091003, "OB", bytes(range(256)) * 400 + b"\x07")
    ds.add_new(0x00091004, "OW", np.arange(100, dtype="<u2").tobytes())
    ds.add_new(0x00091005, "UN", b"\x01\x02\x03\x04\x05")
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "odd"
    inner.add_new(0x00110010, "LO", "ACME")
    inner.add_new(0x00111001, "OB", b"\xff" * 7)
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [item]
    pixels = np.random.default_rng(7).integers(0, 4096, rows * cols, "<u2")
    if ts == ExplicitVRBigEndian:
        ds.PixelData = pixels.astype(">u2").tobytes()
        ds[0x00091004].value = np.arange(100, dtype=">u2").tobytes()
    else:
        ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 5)  # Data Set Trailing Padding, after the pixels
    return ds


def _saved(ds: Dataset, path: Path) -> Path:
    ts = ds.file_meta.TransferSyntaxUID
    ds.save_as(path, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
               enforce_file_format=True)  # fmt: skip
    return path


def _as_pynetdicom_sent(path: Path, target: str) -> bytes:
    """The data set pynetdicom sent before, re-encoded in memory: the stored file read as the
    C-GET read it (big endian: converted to little endian in memory first)."""
    stored = read_stored(path, defer_size=1024)
    if not stored.file_meta.TransferSyntaxUID.is_little_endian:
        stored = converted_dataset(path, ExplicitVRLittleEndian)
    encoded = encode(stored, target == ImplicitVRLittleEndian, True)
    assert encoded is not None
    return encoded


def _value_bytes(value: Any) -> bytes:
    return bytes(value) if isinstance(value, bytes | bytearray) else b""


def _same(got: Dataset, want: Dataset, where: str = "") -> None:
    """`got` (received) holds the elements of `want` (stored), in order, at every depth, with
    their values: an odd-length binary value padded to even (PS3.5 7.1.1); one received in
    Implicit VR read with the VR `want` gives it (a private one is UN, or as pydicom's
    private dictionary says, not as stored); a big endian binary value swapped (OW, OF and OD
    words). Group Lengths are left out, as pydicom's writer leaves them out (retired, PS3.5
    7.2)."""
    kept = [tag for tag in want.keys() if tag.element != 0]
    assert list(got.keys()) == kept, where
    for elem in (want[tag] for tag in kept):
        at = f"{where}{elem.tag}"
        raw = got.get_item(elem.tag)
        if isinstance(raw, RawDataElement) and raw.VR != elem.VR:  # read with the stored VR
            encoding = want._character_set
            mine = convert_raw_data_element(raw._replace(VR=elem.VR), encoding=encoding)
        else:
            mine = got[elem.tag]
        if elem.VR == "SQ":
            assert len(mine.value) == len(elem.value), at
            for n, (a, b) in enumerate(zip(mine.value, elem.value, strict=True)):
                _same(a, b, f"{at}[{n}]")
            continue
        if mine.value == elem.value or (elem.value in (None, "", b"") and not mine.value):
            continue  # empty in any VR
        value, stored = _value_bytes(mine.value), _value_bytes(elem.value)
        if len(stored) % 2:  # padded
            assert value == stored + b"\0", at
        elif want.original_encoding[1] is False and elem.VR in ("OW", "OF", "OD", "OB or OW"):
            width = {"OF": 4, "OD": 8}.get(elem.VR, 2)
            assert value == np.frombuffer(stored, f">u{width}").astype(f"<u{width}").tobytes(), at
        else:
            pytest.fail(f"{at}: {mine!r} != {elem!r}")


def _get(
    archive: Archive, study: str, sop_class: str, ts: str, kept: Path
) -> tuple[list[Dataset], list[tuple[Path, str]]]:
    """C-GET of the study by a requestor taking `sop_class` in `ts` only: the statuses, and
    the data sets received (each copied in chunks into a file in `kept`, and the syntax it
    came in)."""
    received: list[tuple[Path, str]] = []

    def on_store(event: Event) -> int:
        copy = kept / f"received{len(received)}"
        with open(event.dataset_path, "rb") as fh, open(copy, "wb") as out:
            fh.seek(split_dataset(event.dataset_path)[1])
            shutil.copyfileobj(fh, out, 64 * 1024)
        received.append((copy, str(event.context.transfer_syntax)))
        return 0x0000

    model = StudyRootQueryRetrieveInformationModelGet
    ae = scu(model)
    ae.add_requested_context(sop_class, ts)
    role = build_role(sop_class, scp_role=True)
    assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[requestor_store(on_store)])
    try:
        ident = identifier("STUDY", StudyInstanceUID=study)
        return [st for st, _ in assoc.send_c_get(ident, model)], received
    finally:
        assoc.release()


async def _stow(archive: Archive, path: Path) -> None:
    body = multipart_body([path.read_bytes()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


def _check_received(
    archive: Archive,
    statuses: list[Dataset],
    received: list[tuple[Path, str]],
    target: str,
    stored: Path,
) -> None:
    assert statuses[-1].Status == 0x0000, statuses[-1]
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    ((copy, syntax),) = received
    data_set = copy.read_bytes()
    assert syntax == target
    assert data_set == _as_pynetdicom_sent(stored, target)  # what the peer had before
    _same(as_part10(data_set, syntax), dcmread(stored))
    assert list(archive.services.scratch_dir.iterdir()) == []


@pytest.mark.db
@pytest.mark.parametrize("stored_ts", list(_OTHER), ids=["explicit", "implicit", "big"])
async def test_get_in_the_other_syntax_goes_through_a_scratch_file(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored_ts: str
) -> None:
    """The instance, one frame of 2048 x 4096 16-bit pixels (16 MiB), is converted into a
    scratch file and sent from it, its pixels copied (swapped) a chunk at a time: memory
    holds the send queue, a chunk and pynetdicom's and pydicom's own, not the instance
    (the re-encoding in memory: 3 times it). The conversion is not refused for its single
    frame, larger than what is decoded at once (DIMSE_DECODE_MAX_BYTES, here 4 MiB):
    nothing is decoded (a big endian frame over it was refused before)."""
    import tracemalloc

    monkeypatch.setattr(sending, "DIMSE_SEND_QUEUE_BYTES", 128 * 1024)
    monkeypatch.setattr(conversion, "DIMSE_DECODE_MAX_BYTES", 4 * 1024 * 1024)
    ds = _varied(stored_ts, 2048, 4096)
    path = _saved(ds, tmp_path / "stored.dcm")
    await _stow(archive, path)
    (blob,) = blobs(archive)
    assert blob.read_bytes() == path.read_bytes()
    target = _OTHER[stored_ts]
    tracemalloc.start()
    try:
        statuses, received = await in_thread(_get, archive, ds.StudyInstanceUID, ds.SOPClassUID,
                                             target, tmp_path)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    # Re-encoded whole by pynetdicom: 3 to 4 times the instance. Converted while it is sent
    # (streaming.py), the conversion's chunk and the PDUs are held at once: 4.4 MB, 4.1 MB
    # converted first.
    assert peak < size // 3, (peak, size)
    _check_received(archive, statuses, received, target, path)


@pytest.mark.db
@pytest.mark.parametrize("stored_ts", list(_OTHER), ids=["explicit", "implicit", "big"])
async def test_get_in_the_other_syntax_keeps_every_element(
    archive: Archive, tmp_path: Path, stored_ts: str
) -> None:
    """Sequences, private tags, OB, OW and UN values, odd lengths, a value left in the file
    when read, elements after the Pixel Data: received as the re-encoding in memory sent
    them, byte for byte, and as stored, element for element."""
    ds = _varied(stored_ts)
    path = _saved(ds, tmp_path / "stored.dcm")
    await _stow(archive, path)
    target = _OTHER[stored_ts]
    statuses, received = await in_thread(_get, archive, ds.StudyInstanceUID, ds.SOPClassUID,
                                         target, tmp_path)  # fmt: skip
    _check_received(archive, statuses, received, target, path)


@pytest.mark.db
@pytest.mark.parametrize("stored_ts", [ExplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["explicit", "big"])  # fmt: skip
async def test_get_of_float_pixel_data_copies_it_a_chunk_at_a_time(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored_ts: str
) -> None:
    """A Parametric Map of 16 MiB of Float Pixel Data (no Pixel Data) for a requestor
    taking only Implicit VR: its pixels copied (swapped by 4 bytes from big endian) a chunk
    at a time, as decoded_at_once counts them; they were read whole, and swapped whole,
    into pydicom's conversion in memory (a 100 MB value took 308 MB)."""
    import tracemalloc

    monkeypatch.setattr(sending, "DIMSE_SEND_QUEUE_BYTES", 128 * 1024)
    ds = float_map(stored_ts, 16, 512, 512)
    path = _saved(ds, tmp_path / "stored.dcm")
    await _stow(archive, path)
    tracemalloc.start()
    try:
        statuses, received = await in_thread(_get, archive, ds.StudyInstanceUID, ds.SOPClassUID,
                                             ImplicitVRLittleEndian, tmp_path)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert peak < size // 3, (peak, size)
    _check_received(archive, statuses, received, ImplicitVRLittleEndian, path)


def _manifest(samples: Path, syntaxes: tuple[str, ...]) -> list[dict[str, str]]:
    with open(samples / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [r for r in rows if r["transfer_syntax_uid"] in syntaxes]


def _inst(path: Path, row: dict[str, str]) -> StoredInstance:
    def number(key: str) -> int | None:
        return int(row[key]) if row[key] else None

    return StoredInstance(row["study_uid"], row["series_uid"], row["sop_instance_uid"],
                          row["sop_class_uid"], "0" * 32, row["transfer_syntax_uid"],
                          path.stat().st_size, number("frames") or 1, None, None, True,
                          rows=number("rows"), columns=number("cols"),
                          bits_allocated=number("bits_allocated"))  # fmt: skip


def test_the_samples_convert_for_a_peer_as_pynetdicom_re_encoded_them(
    samples: Path, tmp_path: Path
) -> None:
    """Every uncompressed sample (explicit and implicit VR little endian, big endian; 1-bit,
    odd lengths, palettes, private tags among them) converted for a peer taking the other
    little endian syntax: the data set pynetdicom's re-encoding in memory sent, byte for
    byte, and the stored one element for element (the big endian samples compared with
    their conversion in memory, whose values are swapped)."""
    rows = _manifest(samples, tuple(_OTHER))
    assert len([r for r in rows if r["transfer_syntax_uid"] == ExplicitVRBigEndian]) >= 10
    scratch = tmp_path / "scratch"
    done = 0
    for row in rows:
        path = samples / row["path"]
        ts = row["transfer_syntax_uid"]
        targets = [_OTHER[ts]] if ts != ExplicitVRBigEndian else list(_OTHER)[:2]
        for target in targets:
            inst = _inst(path, row)
            accepted = {(inst.sop_class_uid, target)}
            assert conversion.target_syntax(inst, accepted) == target
            sent = converted_whole(inst, path, target, scratch)
            assert isinstance(sent, sending.StoredFile)
            data_set = dataset_bytes(sent.stored_path)
            assert data_set == _as_pynetdicom_sent(path, target), (row["path"], target)
            little = ts != ExplicitVRBigEndian
            want = dcmread(path) if little else converted_dataset(path, ExplicitVRLittleEndian)
            _same(as_part10(data_set, target), want, row["path"])
            sending.remove_scratch(sent)
            done += 1
    assert done >= 400
    assert list(scratch.iterdir()) == []


def test_conversion_copies_uncompressed_pixels_a_chunk_at_a_time(tmp_path: Path) -> None:
    """converted_for_peer of an 8 MiB single-frame instance to the other little endian
    syntax holds a chunk of its pixels (convert.CONVERT_COPY_BYTES) and its header."""
    import tracemalloc

    for stored_ts in _OTHER:
        ds = _varied(stored_ts, 2048, 2048)
        path = _saved(ds, tmp_path / "stored.dcm")
        inst = StoredInstance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                              ds.SOPClassUID, "0" * 32, stored_ts, path.stat().st_size, 1,
                              None, None, True, rows=2048, columns=2048, samples_per_pixel=1,
                              bits_allocated=16)  # fmt: skip
        tracemalloc.start()
        try:
            sent = converted_whole(inst, path, _OTHER[stored_ts], tmp_path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * 1024 * 1024, (stored_ts, peak)
        shutil.copy(sent.stored_path, tmp_path / "sent.dcm")
        sending.remove_scratch(sent)
        got = dcmread(tmp_path / "sent.dcm")
        assert got.file_meta.TransferSyntaxUID == _OTHER[stored_ts]
        assert np.array_equal(got.pixel_array, ds.pixel_array)


def test_an_element_without_a_known_vr_is_compared_as_stored() -> None:
    """_same reads a value received as UN with the VR it was stored with."""
    got, want = Dataset(), Dataset()
    want.add(DataElement(0x00091001, "LO", "x"))
    got[0x00091001] = RawDataElement(Tag(0x00091001), None, 2, b"x ", 0, True, True)
    _same(got, want)
