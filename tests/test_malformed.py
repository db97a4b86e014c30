"""Malformed Part-10 files that pydicom reads leniently: refused at STOW with a reason, or,
when stored, answered with a 4xx or an icon, never a 500 (found by an adversarial review)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless

from dicomweb_server import dicomfile
from dicomweb_server.dicomfile import InvalidInstanceError, parse_file
from dicomweb_server.errors import FailureReason
from tests.helpers import (
    ROOT,
    element_bytes,
    ending_in_a_sequence,
    inst_url,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    return path


def _refused(path: Path) -> InvalidInstanceError:
    with pytest.raises(InvalidInstanceError) as info:
        parse_file(path)
    return info.value


async def _stow(
    client: httpx.AsyncClient, data: bytes, url: str = f"{ROOT}/studies"
) -> dict[str, Any]:
    r = await client.post(url, content=multipart_body([data]), headers=stow_headers())
    assert r.status_code in (200, 409), r.text
    doc: dict[str, Any] = r.json()
    doc["warning"] = r.headers.get("Warning", "")  # the failure's reason
    return doc


def _failure(doc: dict[str, Any]) -> int:
    (failed,) = doc["00081198"]["Value"]
    return int(failed["00081197"]["Value"][0])


# ---------------------------------------------------------------- after Pixel Data


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x0020000D, b"UI", b"9.9.9.9"),  # a second StudyInstanceUID: the checked one replaced
        (0x0020000D, b"UI", b"../../x?y#z <script>" + b"A" * 100),  # not even a UID
        (0x00280008, b"IS", b"5"),  # a Number of Frames the frame layout never saw
        (0x7FE00010, b"OB", b"\0\0"),  # Pixel Data again
    ],
)
async def test_element_after_pixel_data_out_of_order_is_refused(
    app_client: httpx.AsyncClient, tag: int, vr: bytes, value: bytes
) -> None:
    """PS3.5 7.1: elements in increasing tag order, each once. One after Pixel Data with a
    lower tag replaced a value already validated (the study of a RetrieveURL, a UID placed in
    URLs, the number of frames): the instance is now refused, nothing stored."""
    ds = make_instance()
    data = to_bytes(ds) + element_bytes(tag, vr, value)
    doc = await _stow(app_client, data, f"{ROOT}/studies/{ds.StudyInstanceUID}")
    assert _failure(doc) == FailureReason.CANNOT_UNDERSTAND
    assert "PS3.5 7.1" in doc["warning"]
    assert (await app_client.get(f"{ROOT}/instances")).status_code == 204


async def test_elements_after_pixel_data_in_order_are_kept(app_client: httpx.AsyncClient) -> None:
    """A private block after Pixel Data (tags above it) is stored and in the metadata."""
    ds = make_instance()
    tail = element_bytes(0x7FE10010, b"LO", b"ACME") + element_bytes(0x7FE11001, b"LO", b"after")
    doc = await _stow(app_client, to_bytes(ds) + tail)
    assert "00081198" not in doc
    r = await app_client.get(f"{inst_url(ds)}/metadata")
    (meta,) = r.json()
    assert meta["7FE11001"]["Value"] == ["after"]


# ---------------------------------------------------------------- lengths and frames


def test_value_running_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    """A binary value (deferred by the parse, so never read) whose length runs past the end:
    its range would be served as a Content-Length the file cannot fill."""
    ds = make_instance()
    del ds.PixelData
    data = (
        to_bytes(ds)
        + element_bytes(0x00290010, b"LO", b"X")
        + struct.pack("<HH2sHI", 0x0029, 0x1000, b"OB", 0, 0x7FFFFFF0)
        + b"\1" * 4000
    )
    exc = _refused(_write(tmp_path, data))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND and "(0029,1000)" in exc.message


@pytest.mark.parametrize("cut", [1, 4, 9, 20, 40])
def test_data_set_cut_inside_its_last_value_is_refused(tmp_path: Path, cut: int) -> None:
    """Found by review (a C-STORE whose data set was cut short): pydicom reads a value the file
    ends inside of as the bytes there are, so a sequence or text cut anywhere in its value
    was stored as complete (0x0000). dcmtk refuses such a file ("premature end of stream")."""
    data = ending_in_a_sequence()
    exc = _refused(_write(tmp_path, data[:-cut]))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert "(0040,0260)" in exc.message and "truncated" in exc.message


@pytest.mark.parametrize("stray", [b"\x40", b"\x40\x00\x60", b"\x40\x00\x60\x02SQ\x00"])
def test_partial_element_header_at_the_end_is_refused(tmp_path: Path, stray: bytes) -> None:
    """Fewer than 8 bytes after the last element (an element header cut short): pydicom stops
    there silently; the data set is truncated."""
    data = ending_in_a_sequence() + stray
    exc = _refused(_write(tmp_path, data))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert f"{len(stray)} bytes" in exc.message


def test_element_after_pixel_data_cut_short_is_refused(tmp_path: Path) -> None:
    """The same for an element after Pixel Data, read separately (wellformed.merge_tail)."""
    data = to_bytes(make_instance()) + element_bytes(0x7FE10010, b"LO", b"ACME CORPORATION")
    exc = _refused(_write(tmp_path, data[:-5]))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND and "(7FE1,0010)" in exc.message


def test_whole_data_sets_still_parse(tmp_path: Path) -> None:
    """The edges of the check above: nothing cut, and an element after Pixel Data whole."""
    parse_file(_write(tmp_path, ending_in_a_sequence()))
    tail = element_bytes(0x7FE10010, b"LO", b"ACME CORPORATION")
    parse_file(_write(tmp_path, to_bytes(make_instance()) + tail))


def _rle(frames: int, fragments: list[bytes]) -> bytes:
    ds = make_instance(rows=8, cols=8, BitsAllocated=8, BitsStored=8, HighBit=7)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def _rle_frame() -> bytes:
    arr = (np.arange(64, dtype=np.uint8) * 7).reshape(8, 8)
    return bytes(
        get_encoder(RLELossless).encode(
            arr, rows=8, columns=8, samples_per_pixel=1, bits_allocated=8, bits_stored=8,
            pixel_representation=0, photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
    )  # fmt: skip


@pytest.mark.parametrize("frames", [2, 2_147_483_647])
def test_more_frames_than_fragments_is_refused(tmp_path: Path, frames: int) -> None:
    """PS3.5 A.4: each frame is one fragment or more. Stored, 2^31-1 frames in one fragment
    made frame requests a 500 (a 128 GiB allocation) and /bulk/7FE00010 announce 137 GB."""
    exc = _refused(_write(tmp_path, _rle(frames, [_rle_frame()])))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND and "fragments" in exc.message
    assert parse_file(_write(tmp_path, _rle(2, [_rle_frame(), _rle_frame()]))).frames


async def test_damaged_offset_table_is_a_4xx_not_a_500(app_client: httpx.AsyncClient) -> None:
    """Three frames in five fragments with offsets that point nowhere: stored (the frames are
    found by decoding), and every pixel resource answers without a 500 (pydicom raised
    StopIteration, which crossed the worker thread as a RuntimeError)."""
    f = _rle_frame()
    ds = make_instance(rows=8, cols=8, BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.NumberOfFrames = 3
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([f[:10], f[10:], f, f[:5], f[5:]], has_bot=False)
    ds["PixelData"].VR = "OB"
    data = bytearray(to_bytes(ds))
    # A Basic Offset Table of three offsets, the second past every fragment.
    at = data.index(struct.pack("<HHI", 0xFFFE, 0xE000, 0))
    data[at : at + 8] = struct.pack("<HHI", 0xFFFE, 0xE000, 12) + struct.pack("<3I", 0, 999999, 5)
    doc = await _stow(app_client, bytes(data))
    assert "00081198" not in doc, doc
    url = inst_url(ds)
    for path, accept in [
        ("/frames/2", "*/*"),
        ("/bulk/7FE00010", "*/*"),
        ("/pixeldata", "*/*"),
        ("/bulkdata", "*/*"),
        ("/rendered", "image/gif"),
    ]:
        r = await app_client.get(url + path, headers={"Accept": accept})
        assert r.status_code < 500, (path, r.status_code, r.text)


async def test_palette_colour_without_its_tables(app_client: httpx.AsyncClient) -> None:
    """PALETTE COLOR with no lookup tables: /rendered is a 406 with a reason, /thumbnail an
    icon (a thumbnail is never an error); both were a 500."""
    ds = make_instance(PhotometricInterpretation="PALETTE COLOR")
    await _stow(app_client, to_bytes(ds))
    r = await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 406 and "render" in r.text
    r = await app_client.get(f"{inst_url(ds)}/thumbnail", headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


# ---------------------------------------------------------------- Deflated data sets


def _deflated(ds: Dataset, zeros: int) -> tuple[bytes, int]:
    """A Deflated Explicit VR Little Endian file of `ds` and a private OB of `zeros` zero
    bytes, deflated as it is made; and the size of the data set inflated."""
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [b"\0" * 128, b"DICM", meta.getvalue(), deflater.compress(body.getvalue())]
    tail = element_bytes(0x7FE10010, b"LO", b"ACME") + struct.pack(
        "<HH2sHI", 0x7FE1, 0x1000, b"OB", 0, zeros
    )
    out.append(deflater.compress(tail))
    chunk = b"\0" * (1024 * 1024)
    left = zeros
    while left:
        out.append(deflater.compress(chunk[: min(left, len(chunk))]))
        left -= min(left, len(chunk))
    out.append(deflater.flush())
    return b"".join(out), len(body.getvalue()) + len(tail) + zeros


def test_deflated_size_limit_at_its_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_INFLATED_BYTES: a data set inflating to exactly the limit is stored, one byte
    more is refused with 0xA700 (Out of Resources)."""
    ds = make_instance()
    data, inflated = _deflated(ds, 1000)
    path = _write(tmp_path, data)
    monkeypatch.setattr(dicomfile, "MAX_INFLATED_BYTES", inflated)
    assert parse_file(path).uids[1] == ds.SOPInstanceUID
    monkeypatch.setattr(dicomfile, "MAX_INFLATED_BYTES", inflated - 1)
    exc = _refused(path)
    assert exc.reason == FailureReason.OUT_OF_RESOURCES and "inflates" in exc.message


class _CountingInflater:
    """zlib's decompress object, counting what it inflates."""

    inflated = 0

    def __init__(self, inflater: Any) -> None:
        self._inflater = inflater

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out: bytes = self._inflater.decompress(data, max_length)
        _CountingInflater.inflated += len(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inflater, name)


def test_deflate_bomb_is_refused_without_inflating_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0.1% upload that inflates to twice MAX_INFLATED_BYTES: refused, in bounded memory
    (pydicom inflated a 1 MB upload to 1 GiB in memory, 3 GB of RSS, before the change),
    and without inflating past the limit: it stops there rather than walking the whole bomb.
    (This bound replaced a wall-clock one, which a loaded CI machine missed under tracemalloc.)"""
    data, inflated = _deflated(make_instance(), 2 * dicomfile.MAX_INFLATED_BYTES)
    assert len(data) < inflated // 500
    path = _write(tmp_path, data)
    real = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: _CountingInflater(real(*a)))
    _CountingInflater.inflated = 0
    tracemalloc.start()
    try:
        exc = _refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.reason == FailureReason.OUT_OF_RESOURCES
    assert peak < 4 * 1024 * 1024, peak
    most = dicomfile.MAX_INFLATED_BYTES + dicomfile._INFLATE_READ_BYTES
    assert dicomfile.MAX_INFLATED_BYTES < _CountingInflater.inflated <= most


def test_deflate_bomb_behind_a_long_meta_is_refused_without_inflating_it(
    tmp_path: Path,
) -> None:
    """Found by review: File Meta Information longer than the walk looks into (a 70 KB
    Private Information element) hid the Deflated syntax, and pydicom inflated the bomb.
    The syntax and the data set's place are now pydicom's own reading of the meta."""
    ds = make_instance()
    ds.file_meta.PrivateInformationCreatorUID = UID("1.2.3.4")
    ds.file_meta.PrivateInformation = b"x" * 70_000
    data, _ = _deflated(ds, 2 * dicomfile.MAX_INFLATED_BYTES)
    path = _write(tmp_path, data)
    tracemalloc.start()
    try:
        exc = _refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.reason == FailureReason.OUT_OF_RESOURCES
    assert peak < 4 * 1024 * 1024, peak


def test_garbage_after_a_deflated_meta_is_refused(tmp_path: Path) -> None:
    data, _ = _deflated(make_instance(), 10)
    meta_end = data.index(b"1.2.840.10008.1.2.1.99") + 22
    exc = _refused(_write(tmp_path, data[:meta_end] + b"\xff" * 64))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND


def test_bytes_after_the_deflate_stream_end(tmp_path: Path) -> None:
    """Padding after the end of the deflate stream (pydicom's image_dfl.dcm has 8 bytes): the
    size check stops at the stream's end (it looped on them forever once)."""
    ds = make_instance()
    data, _ = _deflated(ds, 10)
    assert parse_file(_write(tmp_path, data + b"\0" * 8)).uids[1] == ds.SOPInstanceUID


async def test_nul_inside_text_values_is_stored(app_client: httpx.AsyncClient) -> None:
    """A NUL inside a text value (PS3.5 6.2 allows none): the instance is stored (it was
    refused, 0xA900, because PostgreSQL cannot hold U+0000), the metadata and QIDO give the
    NUL as U+FFFD, and the stored file keeps the bytes sent."""
    ds = make_instance(patient_id="P\0Q", ImageComments="first line\0second")
    data = to_bytes(ds)
    doc = await _stow(app_client, data)
    assert "00081198" not in doc, doc
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    assert meta["00204000"]["Value"] == ["first line\ufffdsecond"]
    assert meta["00100020"]["Value"] == ["P\ufffdQ"]
    r = await app_client.get(f"{ROOT}/studies", params={"PatientID": "P\ufffdQ"})
    assert r.status_code == 200 and len(r.json()) == 1
    r = await app_client.get(
        inst_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"; '
                                         "transfer-syntax=*"}
    )  # fmt: skip
    assert r.status_code == 200 and data in r.content
