"""STOW-RS of metadata and bulk data (PS3.18 10.5.1.4): a DICOM JSON array and the values its
BulkDataURIs name, each instance stored as if it had come as a Part-10 file. Its limits:
test_stow_json_limits.py; sequences nested deep: test_stow_json_sequences.py."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.tag import Tag, tag_in_exception
from starlette.applications import Starlette

from dicomweb_server import stow_json
from dicomweb_server.audit import ARCHIVE_FAULT
from dicomweb_server.errors import FailureReason
from tests.helpers import ROOT, inst_url, make_instance, split_multipart, values
from tests.stow_json_support import BOUNDARY, STORED, _body, _metadata, _post, _seq

pytestmark = pytest.mark.db


async def test_native_instance_from_metadata_and_bulk_data(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(rows=8, cols=6, frames=2, PixelSpacing=[0.5, 0.5])
    doc = _metadata(ds, "urn:pixels:1")
    doc["00281050"] = {"vr": "DS", "Value": ["40,5"]}  # a string, as PS3.18 F.2.3 allows
    doc["00200013"] = {"vr": "IS", "Value": ["7"]}
    r = await _post(app_client, _body([doc], ("urn:pixels:1", "application/octet-stream",
                                              ds.PixelData)))  # fmt: skip
    assert r.status_code == 200, r.text
    (ok,) = _seq(r.json(), "00081199")
    assert values(ok, "00081155") == [ds.SOPInstanceUID]
    r = await app_client.get(inst_url(ds), headers={"Accept": STORED})
    ((headers, data),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.1")
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert np.array_equal(stored.pixel_array, ds.pixel_array)
    assert stored.PatientName == ds.PatientName and stored.PixelSpacing == [0.5, 0.5]
    meta = (await app_client.get(f"{inst_url(ds)}/metadata")).json()[0]
    assert meta["00281050"]["Value"] == ["40,5"] and meta["00200013"]["Value"] == [7]


async def test_compressed_frames_one_part_each(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    src = pydicom.dcmread(samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm")
    ts = str(src.file_meta.TransferSyntaxUID)
    frames = list(generate_frames(src.PixelData, number_of_frames=int(src.NumberOfFrames)))
    doc = _metadata(src, "/frames-of/1")
    parts = [("/frames-of/1", f"image/jls; transfer-syntax={ts}", f) for f in frames]
    r = await _post(app_client, _body([doc], *parts))
    assert r.status_code == 200, r.text
    r = await app_client.get(
        f"{inst_url(src)}/frames/3",
        headers={"Accept": 'multipart/related; type="image/jls"; transfer-syntax=*'},
    )
    ((_, frame),) = split_multipart(r.content, r.headers["content-type"])
    assert frame == frames[2]
    r = await app_client.get(inst_url(src), headers={"Accept": STORED})
    ((_, data),) = split_multipart(r.content, r.headers["content-type"])
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert stored.file_meta.TransferSyntaxUID == ts
    assert np.array_equal(stored.pixel_array, src.pixel_array)


# A JPEG Baseline codestream of an 8 x 8 grey image (SOI, APP0, DQT, SOF0, DHT, SOS, EOI).
_BASELINE_8X8 = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b"
    "0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e3334"
    "32ffc0000b080008000801011100ffc4001f0000010501010101010100000000000000000102030405060708"
    "090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114"
    "328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748"
    "494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2"
    "a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9"
    "eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00fbfcffd9"
)


async def test_per_instance_failures(app_client: httpx.AsyncClient) -> None:
    good = make_instance()
    missing = make_instance()
    no_pixels_info = make_instance()
    docs = [_metadata(good, "u:good"), _metadata(missing, "u:nowhere")]
    compressed = _metadata(no_pixels_info, "u:jpeg")
    for key in ("00280010", "00280011"):  # Rows, Columns: this server does not read codestreams
        compressed.pop(key)
    docs.append(compressed)
    body = _body(docs, ("u:good", "application/octet-stream", good.PixelData),
                 ("u:jpeg", "image/jpeg", _BASELINE_8X8))  # fmt: skip
    r = await _post(app_client, body)
    assert r.status_code == 202, r.text
    (ok,) = _seq(r.json(), "00081199")
    assert values(ok, "00081155") == [good.SOPInstanceUID]
    failed = {values(f, "00081155")[0]: values(f, "00081197")[0] for f in
              _seq(r.json(), "00081198")}  # fmt: skip
    assert failed == {missing.SOPInstanceUID: 0xC000, no_pixels_info.SOPInstanceUID: 0xA900}
    assert "no bulk data part for 'u:nowhere'" in r.headers["warning"]


_NO_LOCATION = (
    f"--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n--{BOUNDARY}--\r\n"
)
_NO_METADATA = (
    f"--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Location: a\r\n"
    f"\r\nx\r\n--{BOUNDARY}--\r\n"
)


@pytest.mark.parametrize(
    ("body", "status", "why"),
    [
        (_body("not an array"), 400, "JSON array"),
        (_body(b"{not json"), 400, "not JSON"),
        (_NO_LOCATION.encode(), 400, "Content-Location"),
        (_NO_METADATA.encode(), 400, "no application/dicom+json part"),
        (_body([]), 400, "JSON array"),
    ],
)
async def test_bad_requests(
    app_client: httpx.AsyncClient, body: bytes, status: int, why: str
) -> None:
    r = await _post(app_client, body)
    assert r.status_code == status and why in r.json()["message"], r.text


async def test_study_of_the_url_is_checked(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    body = _body([_metadata(ds, "u:1")], ("u:1", "application/octet-stream", ds.PixelData))
    r = await _post(app_client, body, "/studies/1.2.3.4")
    assert r.status_code == 409
    failure = values(_seq(r.json(), "00081198")[0], "00081197")
    assert failure == [FailureReason.STUDY_INSTANCE_UID_MISMATCH]


async def test_pixel_data_given_wrongly_is_refused_per_instance(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by review: Pixel Data that is both inline and a BulkDataURI, a "Value", not an
    object, bad base64, or octet-stream naming another transfer syntax fails that instance
    (0xC000, a one-line reason), never a 200 without pixels and never a 500; an inline one
    is stored."""
    cases: list[Any] = [
        {"vr": "OW", "InlineBinary": "AAAA", "BulkDataURI": "u:px"},
        {"vr": "OW", "Value": [1, 2, 3]},
        "garbage",
        {"vr": "OW", "InlineBinary": "!!!notbase64"},
        {"vr": "OW", "BulkDataURI": "u:deflated"},
    ]
    docs = []
    for pixel in cases:
        doc = _metadata(make_instance(), "u:px")
        doc["7FE00010"] = pixel
        docs.append(doc)
    bad_vr = _metadata(make_instance(), "u:px")
    bad_vr["00101010"] = {"vr": "ZZ", "Value": ["x"]}
    docs.append(bad_vr)
    after = _metadata(make_instance(), "u:px")
    after["7FE10010"] = {"vr": "US", "Value": [70000]}  # after Pixel Data, out of range
    docs.append(after)
    inline = make_instance(rows=2, cols=2)
    inline_doc = inline.to_json_dict()
    docs.append(inline_doc)
    ds = make_instance()
    body = _body(
        docs,
        ("u:px", "application/octet-stream", ds.PixelData),
        ("u:deflated", "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1.99",
         ds.PixelData),
    )  # fmt: skip
    r = await _post(app_client, body)
    assert r.status_code == 202, r.text
    (ok,) = _seq(r.json(), "00081199")
    assert values(ok, "00081155") == [inline.SOPInstanceUID]
    failed = _seq(r.json(), "00081198")
    assert [values(f, "00081197") for f in failed] == [[0xC000]] * 7
    assert "Traceback" not in r.headers["warning"]
    r = await app_client.get(f"{inst_url(inline)}/frames/1")
    ((_, frame),) = split_multipart(r.content, r.headers["content-type"])
    assert frame == inline.PixelData


async def test_one_part_per_frame(app_client: httpx.AsyncClient, samples: Path) -> None:
    src = pydicom.dcmread(samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm")
    ts = str(src.file_meta.TransferSyntaxUID)
    frames = list(generate_frames(src.PixelData, number_of_frames=int(src.NumberOfFrames)))
    parts = [("/f", f"image/jls; transfer-syntax={ts}", f) for f in frames[:14]]
    r = await _post(app_client, _body([_metadata(src, "/f")], *parts))
    assert r.status_code == 409
    assert "14 frame parts for Number of Frames 15: one part per frame" in r.headers["warning"]


async def test_fewer_fragments_than_frames_is_refused(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A Part-10 instance whose encapsulated Pixel Data holds fewer fragments than Number of
    Frames (PS3.5 A.4: each frame is one fragment or more): refused with the reason (0xC000).
    It was stored, its missing frames a 404, until an absurd Number of Frames showed what
    that lets through (a 128 GiB allocation, a Content-Length of 137 GB)."""
    from pydicom.encaps import encapsulate

    from tests.helpers import multipart_body, stow_headers, to_bytes

    ds = pydicom.dcmread(samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=15))
    ds.PixelData = encapsulate(frames[:14])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 409
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [0xC000]
    assert "14 fragments" in r.headers["Warning"]


@pytest.mark.parametrize("in_pydicom", [False, True])
@pytest.mark.parametrize(("error", "reason"), [(errno.ENOSPC, 0xA700), (errno.EIO, 0x0110)])
async def test_assembly_io_errors_follow_the_part10_rule(
    app: Starlette,
    app_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    error: int,
    reason: int,
    in_pydicom: bool,
) -> None:
    """Writing the assembled file fails as a Part-10 part's spooling does: a full disk is
    0xA700 (out of resources), any other I/O error 0x0110 (processing failure); both the
    archive's failure in the audit trail (ARCHIVE_FAULT: exported 8, as over DIMSE). Met
    while pydicom writes an element (`in_pydicom`), the error is re-raised as an OSError of
    its message alone, with no errno nor strerror, raised from the first: the reason still
    names the error (it read "storage: None"), and not pydicom's traceback."""

    def failing(*_: object) -> None:
        with tag_in_exception(Tag(0x7FE00010)) if in_pydicom else contextlib.nullcontext():
            raise OSError(error, os.strerror(error))

    monkeypatch.setattr(stow_json, "_assemble", failing)
    ds = make_instance()
    r = await _post(app_client, _body([_metadata(ds, "u:1")], ("u:1", "application/octet-stream",
                                                                 ds.PixelData)))  # fmt: skip
    assert r.status_code == 409
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [reason]
    assert os.strerror(error) in r.headers["warning"]
    assert "None" not in r.headers["warning"] and "Traceback" not in r.headers["warning"]
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT detail FROM audit_log WHERE action = 'store_instances' ORDER BY seq DESC LIMIT 1"
    )
    assert rows[0]["detail"] == f"{ARCHIVE_FAULT}1 not stored; stored=0 failed=1"


@pytest.mark.parametrize(
    ("bits", "options", "expected"),
    [
        (8, {"level": 90}, "1.2.840.10008.1.2.4.50"),
        (16, {"lossless": True, "predictor": 1, "bitspersample": 16}, "1.2.840.10008.1.2.4.70"),
        (16, {"lossless": True, "predictor": 6, "bitspersample": 16}, "1.2.840.10008.1.2.4.57"),
    ],
)
async def test_image_jpeg_parts_without_a_syntax_are_read_from_the_codestream(
    app_client: httpx.AsyncClient, bits: int, options: dict[str, Any], expected: str
) -> None:
    """`image/jpeg` with no transfer-syntax: the frame header says which JPEG process it is
    (camera JPEG is Baseline; the RESTful default, Lossless SV1, is not assumed)."""
    import imagecodecs

    ds = make_instance(rows=16, cols=16)
    pixels: np.ndarray
    if bits == 8:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        pixels = (np.arange(256, dtype=np.uint8)).reshape(16, 16)
    else:
        pixels = (np.arange(256, dtype=np.uint16) * 255).reshape(16, 16)
    ds.PixelData = pixels.tobytes()
    frame = bytes(imagecodecs.jpeg8_encode(pixels, **options))
    r = await _post(app_client, _body([_metadata(ds, "u:f")], ("u:f", "image/jpeg", frame)))
    assert r.status_code == 200, r.text
    r = await app_client.get(inst_url(ds), headers={"Accept": STORED})
    ((headers, data),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"].endswith(f"transfer-syntax={expected}")
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    got = next(generate_frames(stored.PixelData, number_of_frames=1))
    assert got == frame + b"\x00" * (len(frame) % 2)  # fragments have even length


@pytest.mark.parametrize("inline", ["QUJD!!", "QUJDRA==xyz", "!!!", "QUJDR", 7])
async def test_inline_binary_that_is_not_base64_is_refused(
    app_client: httpx.AsyncClient, inline: object
) -> None:
    """PS3.18 F.2.7: InlineBinary is base64. pydicom decodes what it can of anything else and
    drops the rest (`QUJD!!` was stored as `ABC`): the data set is refused (0xC000)."""
    ds = make_instance()
    doc = _metadata(ds, "u:1")
    doc["00091010"] = {"vr": "OB", "InlineBinary": inline}
    doc["00090010"] = {"vr": "LO", "Value": ["TEST"]}
    r = await _post(app_client, _body([doc], ("u:1", "application/octet-stream", ds.PixelData)))
    assert r.status_code == 409, r.text
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [0xC000]
    assert "base64" in r.headers["Warning"]


async def test_inline_binary_may_be_wrapped(app_client: httpx.AsyncClient) -> None:
    """White space inside InlineBinary (line-wrapped base64, as XML allows) is ignored, in a
    sequence item too."""
    ds = make_instance()
    doc = _metadata(ds, "u:1")
    item = {"00091010": {"vr": "OB", "InlineBinary": "QUJD\r\nRA=="}}
    doc["00091001"] = {"vr": "SQ", "Value": [item]}
    doc["00090010"] = {"vr": "LO", "Value": ["TEST"]}
    r = await _post(app_client, _body([doc], ("u:1", "application/octet-stream", ds.PixelData)))
    assert r.status_code == 200, r.text
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    assert meta["00091001"]["Value"][0]["00091010"]["InlineBinary"] == "QUJDRA=="
