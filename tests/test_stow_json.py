"""STOW-RS of metadata and bulk data (PS3.18 10.5.1.4): a DICOM JSON array and the values its
BulkDataURIs name, each instance stored as if it had come as a Part-10 file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tracemalloc
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
from dicomweb_server.dicomfile import InvalidInstanceError
from dicomweb_server.errors import FailureReason
from tests.helpers import ROOT, inst_url, make_instance, split_multipart, values

pytestmark = pytest.mark.db

BOUNDARY = "json-boundary"
JSON_STOW = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _body(metadata: Any, *bulk: tuple[str, str, bytes]) -> bytes:
    """The metadata part (a JSON value, or raw bytes), then (Content-Location, Content-Type,
    value) bulk data parts."""
    text = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    out = bytearray(f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode())
    out += text + b"\r\n"
    for location, ctype, value in bulk:
        head = f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\nContent-Location: {location}\r\n\r\n"
        out += head.encode() + value + b"\r\n"
    return bytes(out + f"--{BOUNDARY}--\r\n".encode())


def _metadata(ds: pydicom.Dataset, pixel_uri: str) -> dict[str, Any]:
    doc = ds.to_json_dict(bulk_data_threshold=1 << 30)
    doc.pop("7FE00010", None)
    doc["7FE00010"] = {"vr": "OB", "BulkDataURI": pixel_uri}
    return doc


def _seq(doc: Any, tag: str) -> list[dict[str, object]]:
    """The items of a sequence of a DICOM JSON document."""
    items = values(doc, tag)
    assert all(isinstance(i, dict) for i in items)
    return [i for i in items if isinstance(i, dict)]


async def _post(client: httpx.AsyncClient, body: bytes, path: str = "/studies") -> httpx.Response:
    headers = {"Content-Type": JSON_STOW, "Accept": "application/dicom+json"}
    return await client.post(f"{ROOT}{path}", content=body, headers=headers)


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


async def test_metadata_part_limit_at_the_edge(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_instance()
    text = json.dumps([_metadata(ds, "u:1")]).encode()
    bulk = ("u:1", "application/octet-stream", ds.PixelData)
    monkeypatch.setattr(stow_json, "MAX_JSON_METADATA_BYTES", len(text))
    assert (await _post(app_client, _body(text, bulk))).status_code == 200
    monkeypatch.setattr(stow_json, "MAX_JSON_METADATA_BYTES", len(text) - 1)
    r = await _post(app_client, _body(text, bulk))
    assert r.status_code == 413 and "metadata part" in r.json()["message"]


async def test_bulk_value_limit_at_the_edge(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-pixel bulk data value (here an encapsulated document) is read into the data set:
    at most MAX_JSON_BULK_VALUE_BYTES, else that instance fails (0xA700), a limit the
    request passed: audited as a refused request, not the archive out of resources."""
    pdf = b"%PDF-1.4 " + b"x" * 991
    docs = []
    for _ in range(2):
        ds = make_instance()
        del ds.PixelData
        doc = ds.to_json_dict()
        doc["00420011"] = {"vr": "OB", "BulkDataURI": "u:pdf"}
        docs.append(doc)
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_VALUE_BYTES", len(pdf))
    r = await _post(app_client, _body(docs[:1], ("u:pdf", "application/pdf", pdf)))
    assert r.status_code == 200, r.text
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_VALUE_BYTES", len(pdf) - 1)
    r = await _post(app_client, _body(docs[1:], ("u:pdf", "application/pdf", pdf)))
    assert r.status_code == 409
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [0xA700]
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT detail FROM audit_log WHERE action = 'store_instances' ORDER BY seq DESC LIMIT 1"
    )
    assert rows[0]["detail"] == "stored=0 failed=1"  # not ARCHIVE_FAULT: exported 4


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


async def test_data_sets_are_checked_before_any_is_stored(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_JSON_DATASETS data sets (413), every one an object (400), nesting JSON
    cannot hold (400): refused before anything is stored."""
    docs = [_metadata(make_instance(), "u:px") for _ in range(3)]
    px = ("u:px", "application/octet-stream", make_instance().PixelData)
    monkeypatch.setattr(stow_json, "MAX_JSON_DATASETS", 2)
    r = await _post(app_client, _body(docs, px))
    assert r.status_code == 413 and "at most 2" in r.json()["message"]
    r = await _post(app_client, _body([docs[0], 1], px))
    assert r.status_code == 400 and "object" in r.json()["message"]
    r = await _post(app_client, _body(b"[" * 100_000 + b"]" * 100_000))
    assert r.status_code == 400
    uid = str(values(docs[0], "00080018")[0])
    assert (
        await app_client.get(f"{ROOT}/instances", params={"SOPInstanceUID": uid})
    ).status_code == 204
    r = await _post(app_client, _body(docs[:2], px))
    assert r.status_code == 200, r.text


async def test_bulk_budget_counts_every_value_of_a_data_set(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_instance()
    del ds.PixelData
    doc = ds.to_json_dict()
    blob = b"x" * 100
    doc["00091010"] = {"vr": "OB", "BulkDataURI": "u:blob"}
    doc["00091011"] = {"vr": "OB", "BulkDataURI": "u:blob"}
    doc["00090010"] = {"vr": "LO", "Value": ["TEST"]}
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_VALUE_BYTES", 2 * len(blob) - 1)
    r = await _post(app_client, _body([doc], ("u:blob", "application/octet-stream", blob)))
    assert r.status_code == 409
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [0xA700]


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


async def test_bulk_reuse_limit_at_the_edge(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data sets naming the same bulk data part copy it each: a request copies at most what
    it sent plus MAX_JSON_BULK_REUSE_BYTES (one 4 MiB part named by 50 data sets wrote 201
    MiB). Three data sets of one part of P bytes need 2P more: with exactly that all are
    stored, with a byte less the third fails (0xA700), a limit the request passed: not
    counted as the archive's failure in the audit trail (no ARCHIVE_FAULT)."""
    pixels = make_instance().PixelData

    def docs() -> list[dict[str, Any]]:
        return [_metadata(make_instance(), "u:px") for _ in range(3)]

    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_REUSE_BYTES", 2 * len(pixels))
    r = await _post(app_client, _body(docs(), ("u:px", "application/octet-stream", pixels)))
    assert r.status_code == 200, r.text
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_REUSE_BYTES", 2 * len(pixels) - 1)
    sent = docs()
    r = await _post(app_client, _body(sent, ("u:px", "application/octet-stream", pixels)))
    assert r.status_code == 202, r.text
    (failed,) = _seq(r.json(), "00081198")
    assert values(failed, "00081197") == [0xA700]
    assert values(failed, "00081155") == sent[2]["00080018"]["Value"]
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT detail FROM audit_log WHERE action = 'store_instances' ORDER BY seq DESC LIMIT 1"
    )
    assert rows[0]["detail"] == "stored=2 failed=1"


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


def test_a_bad_value_deep_in_sequences_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Found by fuzzing (tests/test_fuzz_stow_metadata.py): pydicom's writer wraps a failure
    in each enclosing sequence with the message and traceback so far, doubling it per level;
    a US value out of range 12 items deep took 4 GB, 13 killed the server. Now refused
    (0xC000) naming the element, in a few MB."""
    node: dict[str, Any] = {"vr": "SQ", "Value": [{"00280010": {"vr": "US", "Value": [70000]}}]}
    for _ in range(10):
        node = {"vr": "SQ", "Value": [{"00081140": node}]}
    doc = make_instance().to_json_dict()
    doc["00081140"] = node
    refused = _refused_in_bounded_memory(doc, tmp_path)
    assert "(0028,0010)" in refused.message and len(refused.message) < 400


def _refused_in_bounded_memory(doc: dict[str, Any], tmp_path: Path) -> InvalidInstanceError:
    """The refusal (0xC000) of assembling `doc`, which must take under 20 MB."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(InvalidInstanceError) as caught:
            stow_json._assemble(doc, {}, stow_json._Budget({}), tmp_path / "out.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak
    assert caught.value.reason == FailureReason.CANNOT_UNDERSTAND
    return caught.value


def _nested(levels: int, leaf: dict[str, Any]) -> dict[str, Any]:
    """A Referenced Image Sequence `levels` sequences deep, `leaf` the innermost item."""
    node: dict[str, Any] = {"vr": "SQ", "Value": [leaf]}
    for _ in range(levels - 1):
        node = {"vr": "SQ", "Value": [{"00081140": node}]}
    return node


async def test_sequences_nest_at_most_max_json_sequence_depth(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by fuzzing: 250 levels of valid items overflowed pydicom's recursive writer, and
    its RecursionError, re-raised with the traceback so far at each level, took all memory.
    MAX_JSON_SEQUENCE_DEPTH levels are stored; one more fails that instance (0xC000)."""
    docs, instances = [], [make_instance() for _ in range(3)]
    depth = stow_json.MAX_JSON_SEQUENCE_DEPTH
    for ds, levels in zip(instances, [depth, depth + 1, 250], strict=True):
        doc = _metadata(ds, f"u:{ds.SOPInstanceUID}")
        doc["00081140"] = _nested(levels, {"00081150": {"vr": "UI", "Value": ["1.2.3"]}})
        docs.append(doc)
    parts = [(f"u:{ds.SOPInstanceUID}", "application/octet-stream", ds.PixelData)
             for ds in instances]  # fmt: skip
    r = await _post(app_client, _body(docs, *parts))
    assert r.status_code == 202, r.text
    (ok,) = _seq(r.json(), "00081199")
    assert values(ok, "00081155") == [instances[0].SOPInstanceUID]
    failed = _seq(r.json(), "00081198")
    assert [values(f, "00081197") for f in failed] == [[0xC000], [0xC000]]
    named = f"deeper than {depth} levels in (0008,1140) ReferencedImageSequence"
    assert r.headers["Warning"].count(named) == 2  # the sequence named (was the limit alone)
    assert (await app_client.get(inst_url(instances[1]) + "/metadata")).status_code == 404


@pytest.mark.parametrize(
    ("tag", "element"),
    [
        ("00091010", {"vr": "US or SS", "Value": [1]}),  # no rule resolves a private tag's
        ("00091010", {"vr": "OB or OW", "InlineBinary": "AAAA"}),
        ("00280106", {"vr": "US or SS", "Value": [70000]}),  # resolved to US, then too large
        ("00283006", {"vr": "US or OW", "Value": [1, 2]}),  # no LUT Descriptor to resolve it
    ],
)
def test_an_ambiguous_vr_deep_in_sequences_is_refused_in_bounded_memory(
    tmp_path: Path, tag: str, element: dict[str, Any]
) -> None:
    """Review of the check above: it skipped elements of an ambiguous VR (`US or SS`),
    leaving them to dcmwrite, whose failure deep in sequences took the doubling path again
    (150 MB at 10 levels, 4 GB at 13). Each is now resolved as dcmwrite would, then checked."""
    doc = make_instance().to_json_dict()
    doc["00081140"] = _nested(10, {tag: element})
    refused = _refused_in_bounded_memory(doc, tmp_path)
    assert f"({tag[:4]},{tag[4:]})" in refused.message, refused.message


async def test_an_ambiguous_vr_deep_in_sequences_is_resolved_from_its_ancestors(
    app_client: httpx.AsyncClient,
) -> None:
    """`US or SS` is still accepted where dcmwrite resolves it: from the Pixel Representation
    of the item or of an ancestor (PS3.5 Annex A), here the top level's (signed)."""
    ds = make_instance()
    ds.PixelRepresentation = 1
    doc = _metadata(ds, f"u:{ds.SOPInstanceUID}")
    doc["00081140"] = _nested(5, {"00280106": {"vr": "US or SS", "Value": [-5]}})
    parts = (f"u:{ds.SOPInstanceUID}", "application/octet-stream", ds.PixelData)
    r = await _post(app_client, _body([doc], parts))
    assert r.status_code == 200, r.text
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    item = meta["00081140"]["Value"][0]
    for _ in range(4):
        item = item["00081140"]["Value"][0]
    assert item["00280106"] == {"vr": "SS", "Value": [-5]}


def test_the_reason_names_a_vr_of_any_length_briefly(tmp_path: Path) -> None:
    """A DICOM JSON `vr` can be any string: the failure reason quotes at most 14 characters
    of it (a 100 KB `vr` made a 100 KB reason)."""
    doc = make_instance().to_json_dict()
    doc["00091010"] = {"vr": "X" * 100_000, "Value": [1]}
    with pytest.raises(InvalidInstanceError) as caught:
        stow_json._assemble(doc, {}, stow_json._Budget({}), tmp_path / "out.dcm")
    assert "(0009,1010) (VR XXXXXXXXXXXXXX...)" in caught.value.message
    assert len(caught.value.message) < 400, len(caught.value.message)


async def test_group_lengths_are_not_checked_as_they_are_not_written(
    app_client: httpx.AsyncClient,
) -> None:
    """Review of the per-element check: it also encoded the retired Group Lengths (gggg,0000)
    of groups above 6, which pydicom's writer leaves out (PS3.5 7.2), and so refused data sets
    stored before for a value that is never written."""
    ds = make_instance()
    doc = _metadata(ds, f"u:{ds.SOPInstanceUID}")
    doc["00100000"] = {"vr": "UL", "Value": [-1]}
    doc["00081140"] = _nested(2, {"00080000": {"vr": "XX", "Value": [1]}})
    parts = (f"u:{ds.SOPInstanceUID}", "application/octet-stream", ds.PixelData)
    r = await _post(app_client, _body([doc], parts))
    assert r.status_code == 200, r.text
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    assert "00100000" not in meta and "00080000" not in meta["00081140"]["Value"][0]


async def test_bulk_data_parts_keep_no_bytes_in_memory(app_client: httpx.AsyncClient) -> None:
    """Bulk data parts are spooled to files, all of them kept until the metadata is read;
    each kept the hash of its spool file too, with up to 128 KiB of its last bytes (an
    instance's DataSetHash): a request of 10,000 frame parts (MAX_PARTS) held 830 MB. Now a
    part keeps its file's name and size."""
    from pydicom.pixels.encoders.base import get_encoder

    count, side = 100, 256
    rng = np.random.default_rng(5)
    noise = [rng.integers(0, 4096, (side, side), dtype=np.uint16) for _ in range(4)]
    jls = pydicom.uid.JPEGLSLossless
    encoder = get_encoder(jls)
    pixel: dict[str, Any] = {"rows": side, "columns": side, "samples_per_pixel": 1,
             "bits_allocated": 16, "bits_stored": 12, "pixel_representation": 0,
             "number_of_frames": 1, "photometric_interpretation": "MONOCHROME2"}  # fmt: skip
    frames = [encoder.encode(a, **pixel) for a in noise]
    ds = make_instance(rows=side, cols=side, frames=count, BitsStored=12, HighBit=11)
    doc = _metadata(ds, "/frames-of/1")
    parts = [("/frames-of/1", f"image/jls; transfer-syntax={jls}", frames[n % 4])
             for n in range(count)]  # fmt: skip
    body = _body([doc], *parts)
    held = sum(min(len(frames[n % 4]), 64 * 1024) for n in range(count))  # 6.4 MB
    tracemalloc.start()
    try:
        r = await _post(app_client, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    # httpx's ASGI transport hands the app a copy of the body (10 MB): the rest is the
    # server's. It held `held` more (21 MB in all).
    assert peak < len(body) + held // 2, (peak, len(body), held)
