"""Conversions to native encodings that pydicom does not make: a big endian instance in
Explicit VR Little Endian (every binary value swapped by its word size, PS3.5 7.3), and
1-bit data decoded bit-packed (PS3.5 8.1.1), in instances, frames and the bulk value of
Pixel Data."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.pixels.utils import unpack_bits
from pydicom.uid import ExplicitVRLittleEndian

from dicomweb_server.retrieve import pixeldata
from dicomweb_server.transcode.convert import (
    converted_dataset,
    one_bit_pixel_data,
    to_transfer_syntax,
)
from dicomweb_server.transcode.frames import frame_array
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
)
from tests.transcode_support import available

pytestmark = pytest.mark.db


@pytest.mark.parametrize(
    "name",
    ["generated/coverage/cr_mono1_explicit_be.dcm", "real/pydicom/SC_rgb_small_odd_big_endian.dcm",
     "real/pydicom-data/gdcm-US-ALOKA-16_big.dcm"],
)  # fmt: skip
def test_big_endian_to_explicit_little_endian(samples: Path, tmp_path: Path, name: str) -> None:
    """A big endian instance asked for in Explicit VR Little Endian: every element re-encoded,
    the pixels swapped (pydicom's save_as refuses to change endianness)."""
    src = samples / name
    dst = tmp_path / "le.dcm"
    to_transfer_syntax(src, dst, ExplicitVRLittleEndian)
    got, original = pydicom.dcmread(dst), pydicom.dcmread(src)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)
    for elem in original:
        if elem.tag.element != 0 and elem.tag != 0x7FE00010:  # group lengths are dropped
            assert same_value(got[elem.tag], elem), elem


# Binary VRs whose words follow the byte order of the transfer syntax (PS3.5 7.3), by width.
WORDS = {"OW": "u2", "OF": "f4", "OL": "u4", "OD": "f8", "OV": "u8"}


def same_value(le: pydicom.DataElement, be: pydicom.DataElement) -> bool:
    """A little endian element holds the big endian one's value: pydicom reads numbers as
    numbers, and keeps OW, OF, OL, OD and OV as the bytes read, each in its own order."""
    if be.VR == "SQ":
        return len(le.value) == len(be.value) and all(
            all(same_value(a[e.tag], e) for e in b if e.tag.element != 0)
            for a, b in zip(le.value, be.value, strict=True)
        )
    if be.VR in WORDS and isinstance(be.value, bytes):
        kind = WORDS[be.VR]
        return bool(
            np.array_equal(np.frombuffer(le.value, f"<{kind}"), np.frombuffer(be.value, f">{kind}"))
        )
    return bool(le.value == be.value)


def test_big_endian_binary_values_swapped(samples: Path, tmp_path: Path) -> None:
    """The OW palette of a big endian instance, and OW, OF, OL, OD and OV values nested in
    items, come out little endian (they were copied as read: a palette's [0 256 256] came out
    [0 1 1]); the result equals the same image stored little endian."""
    dst = tmp_path / "le.dcm"
    pydicom_data = samples / "real/pydicom-data"
    to_transfer_syntax(pydicom_data / "OBXXXX1A_expb.dcm", dst, ExplicitVRLittleEndian)
    got, stored_le = pydicom.dcmread(dst), pydicom.dcmread(pydicom_data / "OBXXXX1A.dcm")
    assert np.frombuffer(got.RedPaletteColorLookupTableData, "<u2")[:3].tolist() == [0, 256, 256]
    for elem in stored_le:
        if elem.tag.element != 0 and elem.keyword != "SOPInstanceUID":
            assert got[elem.tag].value == elem.value, elem
    # Nested values, written big endian by hand (pydicom writes bytes values as given).
    ds = make_instance(rows=4, cols=4)
    item = pydicom.Dataset()
    values = {
        0x00640009: ("OF", np.array([1.5, -2.25], ">f4")),  # Vector Grid Data
        0x00660040: ("OL", np.array([1, 70000], ">u4")),  # Long Primitive Point Index List
        0x00660022: ("OD", np.array([0.5, 3e9], ">f8")),  # Double Point Coordinates Data
        0x00720081: ("OV", np.array([1, 2**40], ">u8")),  # Selector OV Value
        0x00281201: ("OW", np.array([0, 256, 65280], ">u2")),  # Red Palette ... Data
    }
    for tag, (vr, arr) in values.items():
        item.add_new(tag, vr, arr.tobytes())
    ds.add_new(0x00081115, "SQ", [item])  # Referenced Series Sequence
    src = tmp_path / "be.dcm"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    pydicom.dcmwrite(src, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    to_transfer_syntax(src, dst, ExplicitVRLittleEndian)
    out = pydicom.dcmread(dst)
    (nested,) = out[0x00081115].value
    for tag, (_, arr) in values.items():
        assert np.frombuffer(nested[tag].value, arr.dtype.newbyteorder("<")).tolist() == (
            arr.tolist()
        ), hex(tag)
    assert np.array_equal(out.pixel_array, pydicom.dcmread(src).pixel_array)


# 1-bit instances compressed, and the same image stored uncompressed (PS3.5 8.1.1: bit-packed,
# the frames following each other with no padding, 510 x 510 not ending on a byte).
ONE_BIT = {
    "liver_j2k.dcm": "liver.dcm",
    "liver_nonbyte_aligned_j2k.dcm": "liver_nonbyte_aligned.dcm",
    "liver_rle.dcm": "liver.dcm",  # 1-bit RLE: pydicom's decoders refuse it
    "liver_nonbyte_aligned_rle.dcm": "liver_nonbyte_aligned.dcm",
}


@pytest.mark.parametrize("name", ONE_BIT)
def test_one_bit_compressed_decoded_bit_packed(samples: Path, name: str) -> None:
    """A 1-bit instance decoded (WADO and DIMSE conversions) is bit-packed as Bits Allocated 1
    says; it held a byte per pixel (pydicom's decompress), and 1-bit RLE was not decoded."""
    pydicom_data = samples / "real/pydicom-data"
    native = pydicom.dcmread(pydicom_data / ONE_BIT[name])
    got = converted_dataset(pydicom_data / name, ExplicitVRLittleEndian)
    assert got.BitsAllocated == 1 and got["PixelData"].VR == "OB"
    assert got.PixelData == native.PixelData
    assert np.array_equal(got.pixel_array, native.pixel_array)
    header = pydicom.dcmread(pydicom_data / name, stop_before_pixels=True)
    frame = frame_array(pydicom_data / name, header, 2)  # rendered, frames
    assert np.array_equal(frame, native.pixel_array[1])


async def test_one_bit_rle_retrieved_as_its_metadata_offers(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A 1-bit RLE instance's metadata offers Explicit VR Little Endian, and the instance and
    its frames are sent so (it was a 406): the frames bit-packed each on its own."""
    pydicom_data = samples / "real/pydicom-data"
    path = pydicom_data / "liver_nonbyte_aligned_rle.dcm"
    ds = pydicom.dcmread(path)
    native = pydicom.dcmread(pydicom_data / "liver_nonbyte_aligned.dcm")
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200
    assert ExplicitVRLittleEndian in await available(app_client, ds)
    r = await app_client.get(
        inst_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    out = pydicom.dcmread(io.BytesIO(body))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(out.pixel_array, native.pixel_array)
    accept = 'multipart/related; type="application/octet-stream"'
    r = await app_client.get(f"{inst_url(ds)}/frames/3", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((_, frame),) = split_multipart(r.content, r.headers["content-type"])
    pixels = int(ds.Rows) * int(ds.Columns)
    assert np.array_equal(unpack_bits(frame)[:pixels], native.pixel_array[2].ravel())


@pytest.mark.parametrize(
    "name", [*ONE_BIT, "liver.dcm", "liver_nonbyte_aligned.dcm", "liver_expb.dcm"]
)
async def test_one_bit_pixel_data_bulk_value_is_its_uncompressed_value(
    app_client: httpx.AsyncClient, samples: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PS3.18 8.7.3.3: the uncompressed bulk value of Pixel Data is the element's value in
    Explicit VR Little Endian, for 1-bit data the frames bit-packed as one run (PS3.5 8.1.1,
    510 x 510 frames not starting on a byte): what the same image stored uncompressed holds.
    It was a 406 ("no byte-aligned uncompressed form") for 1-bit data stored compressed;
    stored uncompressed it is the stored value (byte-swapped from big endian: OB, none)."""
    pydicom_data = samples / "real/pydicom-data"
    path = pydicom_data / name
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    native = pydicom.dcmread(pydicom_data / ONE_BIT.get(name, name.replace("_expb", "")))
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    value = f"{inst_url(ds)}/bulk/7FE00010"
    with monkeypatch.context() as m:  # a HEAD decodes nothing
        m.setattr(pixeldata, "one_bit_pixel_data", None)
        r = await app_client.head(value, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-length"] == str(len(native.PixelData))
    r = await app_client.get(value, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.content == native.PixelData
    r = await app_client.get(
        value, headers={"Accept": "application/octet-stream", "Range": "bytes=40000-40009"}
    )
    assert r.status_code == 206 and r.content == native.PixelData[40000:40010]
    for url in (value, f"{inst_url(ds)}/pixeldata", f"{inst_url(ds)}/bulkdata"):
        r = await app_client.get(
            url, headers={"Accept": 'multipart/related; type="application/octet-stream"'}
        )
        assert r.status_code == 200, (url, r.text)
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert body == native.PixelData, url
        assert headers["content-location"].endswith(f"{ds.SOPInstanceUID}/bulk/7FE00010"), url


def test_one_bit_pixel_data_made_whole(samples: Path) -> None:
    """one_bit_pixel_data: the frames decoded and bit-packed as one run, padded to an even
    length (510 x 510 x 3 bits are 97537.5 bytes: 97538)."""
    pydicom_data = samples / "real/pydicom-data"
    for name, stored in ONE_BIT.items():
        data = one_bit_pixel_data(pydicom_data / name)
        assert data == pydicom.dcmread(pydicom_data / stored).PixelData, name
        assert len(data) % 2 == 0
