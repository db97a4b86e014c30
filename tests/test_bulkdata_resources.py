"""Bulkdata and Pixel Data resources of a study, series or instance (PS3.18 10.4.1.1.5-6,
payloads 10.4.3.3.5-6), and Study/Series/Instance resources asked for as bulk data (B.10)."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb_server.bulkvalue import read_bulk_value
from dicomweb_server.media.negotiate import wants_bulkdata
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
    undecodable_jpeg,
)

OCTETS = 'multipart/related; type="application/octet-stream"'
STORED = f"{OCTETS}; transfer-syntax=*"


async def _store(client: httpx.AsyncClient, *raws: bytes) -> None:
    r = await client.post(f"{ROOT}/studies", content=multipart_body(raws), headers=stow_headers())
    assert r.status_code == 200, r.text


def _with_bulk_values(**kw: Any) -> Dataset:
    """An instance with bulk data before, inside a sequence and at Pixel Data: an overlay,
    an icon (its own Pixel Data, nested) and the image."""
    ds = make_instance(rows=32, cols=32, **kw)  # 2 KiB of Pixel Data: above the threshold
    ds.add_new(0x60003000, "OW", bytes(range(256)) * 8)  # Overlay Data, 2 KiB
    ds.add_new(0x60000010, "US", 32)
    ds.add_new(0x60000011, "US", 32)
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.SamplesPerPixel, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 1, 8, 8, 7
    icon.PhotometricInterpretation, icon.PixelRepresentation = "MONOCHROME2", 0
    icon.add_new(0x7FE00010, "OB", bytes(range(256)) * 16)  # 4 KiB: over the threshold
    ds.IconImageSequence = Sequence([icon])
    return ds


def _uris(doc: object) -> list[str]:
    """Every BulkDataURI of a DICOM JSON document, in document order (nested ones in place)."""
    if isinstance(doc, dict):
        if "BulkDataURI" in doc:
            return [doc["BulkDataURI"]]
        return [u for key in sorted(doc) for u in _uris(doc[key])]
    if isinstance(doc, list):
        return [u for item in doc for u in _uris(item)]
    return []


async def _parts(
    client: httpx.AsyncClient, url: str, accept: str | None = OCTETS
) -> list[tuple[dict[str, str], bytes]]:
    r = await client.get(url, headers={"Accept": accept} if accept else {})
    assert r.status_code == 200, r.text
    return split_multipart(r.content, r.headers["content-type"])


@pytest.mark.db
async def test_instance_bulkdata_has_every_bulk_value_located_as_the_metadata_says(
    app_client: httpx.AsyncClient,
) -> None:
    ds = _with_bulk_values()
    await _store(app_client, to_bytes(ds))
    meta = (await app_client.get(f"{inst_url(ds)}/metadata")).json()[0]
    uris = _uris(meta)
    assert len(uris) == 3  # the icon's Pixel Data, the overlay, the Pixel Data (tag order)
    parts = await _parts(app_client, f"{inst_url(ds)}/bulkdata")
    assert [h["content-location"] for h, _ in parts] == uris
    assert [body for _, body in parts] == [
        ds.IconImageSequence[0].PixelData,
        ds[0x60003000].value,
        ds.PixelData,
    ]
    assert {h["content-type"] for h, _ in parts} == {"application/octet-stream"}
    # B.10: the instance resource asked for as octet-stream is its bulk data
    same = await _parts(app_client, inst_url(ds))
    assert [(h["content-location"], b) for h, b in same] == [
        (h["content-location"], b) for h, b in parts
    ]


@pytest.mark.db
async def test_pixeldata_resources_hold_only_top_level_pixel_data(
    app_client: httpx.AsyncClient,
) -> None:
    """10.4.3.3.6: Pixel Data of the top level data set; not an Icon Image Sequence's."""
    first = _with_bulk_values()
    second = _with_bulk_values(
        study=first.StudyInstanceUID, series=first.SeriesInstanceUID, InstanceNumber=2
    )
    other = make_instance(study=first.StudyInstanceUID)  # another series
    await _store(app_client, to_bytes(first), to_bytes(second), to_bytes(other))
    study = f"{ROOT}/studies/{first.StudyInstanceUID}"
    series = f"{study}/series/{first.SeriesInstanceUID}"
    for url, want in (
        (f"{inst_url(first)}/pixeldata", [first]),
        (f"{series}/pixeldata", [first, second]),
        (f"{study}/pixeldata", [first, second, other]),
    ):
        parts = await _parts(app_client, url)
        # in retrieve order (series by Series Number, then as stored): compared as sets
        assert sorted((h["content-location"], body) for h, body in parts) == sorted(
            (f"http://testserver{inst_url(d)}/bulk/7FE00010", d.PixelData) for d in want
        ), url
    parts = await _parts(app_client, f"{series}/bulkdata")
    assert len(parts) == 6
    parts = await _parts(app_client, study)  # the study resource asked for as bulk data
    assert len(parts) == 7


@pytest.mark.db
async def test_compressed_pixel_data_as_bulk_data(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Encapsulated Pixel Data is sent as its BulkDataURI sends it: uncompressed for
    octet-stream, its frames as stored for transfer-syntax=*, each located at
    {BulkDataURI}/frames/{n}, which answers that frame."""
    path = samples / "generated" / "coverage" / "nm_10frames_rle.dcm"
    ds = pydicom.dcmread(path)
    await _store(app_client, path.read_bytes())
    url = f"{inst_url(ds)}/pixeldata"
    pixels = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()
    ((headers, body),) = await _parts(app_client, url)
    assert headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.1")
    assert body == pixels
    uri = f"http://testserver{inst_url(ds)}/bulk/7FE00010"
    assert headers["content-location"] == uri
    frames = await _parts(app_client, url, STORED)
    assert [h["content-location"] for h, _ in frames] == [f"{uri}/frames/{n}" for n in range(1, 11)]
    assert frames[0][0]["content-type"] == "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"
    ((_, third),) = await _parts(app_client, frames[2][0]["content-location"], STORED)
    assert third == frames[2][1]
    r = await app_client.get(f"{uri}/frames/1,2", headers={"Accept": STORED})
    assert len(split_multipart(r.content, r.headers["content-type"])) == 2
    # the frames of the bulk data URI itself are located the same way
    single = await _parts(app_client, uri, STORED)
    assert [h["content-location"] for h, _ in single] == [h["content-location"] for h, _ in frames]


@pytest.mark.db
async def test_values_that_cannot_be_sent_as_accepted_are_left_out_with_a_warning(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """All bulk data "that can be converted to one of the requested media types": asked for
    in image/jls only, the overlay is left out (a Warning says so) and the Pixel Data comes
    as JPEG-LS frames, native and RLE alike; nothing that can be sent is a 406."""
    path = samples / "generated" / "coverage" / "nm_10frames_rle.dcm"
    rle = pydicom.dcmread(path)
    native = _with_bulk_values(study=rle.StudyInstanceUID)
    del native.IconImageSequence
    await _store(app_client, path.read_bytes(), to_bytes(native))
    jls = 'multipart/related; type="image/jls"'
    r = await app_client.get(f"{ROOT}/studies/{rle.StudyInstanceUID}/bulkdata",
                             headers={"Accept": jls})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="image/jls"')
    assert "1 bulk data value(s) not sent" in r.headers["warning"]
    parts = split_multipart(r.content, r.headers["content-type"])
    assert len(parts) == int(rle.NumberOfFrames) + 1
    assert {h["content-type"] for h, _ in parts} == {
        "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    }
    decoded = {h["content-location"].split("/instances/")[1].split("/")[0]: b for h, b in parts}
    got = _jls_instance(native, decoded[native.SOPInstanceUID]).pixel_array
    assert got.astype("<u2").tobytes() == native.PixelData
    # only the overlay of an instance: nothing acceptable is a 406
    r = await app_client.get(f"{inst_url(native)}/bulkdata", headers={"Accept": "image/png"})
    assert r.status_code == 406


def _jls_instance(like: Dataset, frame: bytes) -> Dataset:
    """A one-frame JPEG-LS instance holding `frame`, to decode it as pydicom would."""
    ds = make_instance(rows=like.Rows, cols=like.Columns)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.db
async def test_bulkdata_of_a_resource_without_any_is_204_and_unknown_is_404(
    app_client: httpx.AsyncClient,
) -> None:
    ds = make_instance()
    del ds.PixelData  # nothing else above the bulk data threshold
    await _store(app_client, to_bytes(ds))
    r = await app_client.get(f"{inst_url(ds)}/bulkdata", headers={"Accept": OCTETS})
    assert r.status_code == 204 and r.content == b""
    r = await app_client.get(f"{inst_url(ds)}/pixeldata", headers={"Accept": OCTETS})
    assert r.status_code == 204
    r = await app_client.get(f"{ROOT}/studies/1.2.3/bulkdata", headers={"Accept": OCTETS})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("accept", "bulk"),
    [
        (OCTETS, True),
        (STORED, True),
        ('multipart/related; type="image/jpeg"', True),
        ('multipart/related; type="application/dicom"', False),
        (f'multipart/related; type="application/dicom", {OCTETS}', False),
        (f'{OCTETS}; q=0.5, multipart/related; type="application/dicom"', False),
        ("*/*", False),
        ("multipart/*", False),
        (None, False),
        (f"application/dicom+json, {OCTETS}", True),
        ("application/octet-stream", False),  # not multipart: not bulk data of an instance
    ],
)
def test_which_instance_requests_are_for_bulk_data(accept: str | None, bulk: bool) -> None:
    assert wants_bulkdata(accept) is bulk


def _read_with_peak(path: Path, tag_path: str) -> tuple[tuple[bytes, str] | None, int]:
    """read_bulk_value's answer and the most memory Python held while it ran."""
    tracemalloc.start()
    try:
        value = read_bulk_value(path, tag_path)
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_nested_bulk_value_is_read_without_the_pixel_data(tmp_path: Path) -> None:
    """A value inside a sequence is read by parsing the file (no byte range is recorded for
    it); the parse leaves the other large values unread: the icon of a 20 MB multi-frame
    instance costs kilobytes, not the file (/bulkdata reads every nested value this way)."""
    ds = make_instance(rows=512, cols=512, frames=40)
    icon = Dataset()
    icon.add_new(0x7FE00010, "OB", b"\x01" * 4096)
    ds.IconImageSequence = Sequence([icon])
    path = tmp_path / "big.dcm"
    path.write_bytes(to_bytes(ds))
    value, peak = _read_with_peak(path, "00880200/0/7FE00010")
    assert value == (b"\x01" * 4096, "OB")
    assert peak < 1_000_000, peak


@pytest.mark.db
async def test_an_accept_range_for_instances_after_an_image_type_is_tried(
    app_client: httpx.AsyncClient,
) -> None:
    """PS3.18 8.7.8.1: when no bulk data can be sent in the first range's type, the next
    range naming DICOM instances is served, as it was before the bulk data resources."""
    ds = make_instance()
    await _store(app_client, to_bytes(ds))
    dicom = 'multipart/related; type="application/dicom"'
    png = 'multipart/related; type="image/png"'
    for params, headers in (
        ({}, {"Accept": f"{png}, {dicom}"}),
        ({"accept": png}, {"Accept": dicom}),
    ):
        r = await app_client.get(inst_url(ds), params=params, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(dicom)
    r = await app_client.get(inst_url(ds), headers={"Accept": png})
    assert r.status_code == 406


@pytest.mark.db
@pytest.mark.parametrize("undecodable_first", [True, False])
async def test_a_value_that_cannot_be_decoded_is_left_out(
    app_client: httpx.AsyncClient, samples: Path, undecodable_first: bool
) -> None:
    """A decoder failing on a value's first frame leaves that value out, named in the
    Warning when that is known before the response starts; the others are sent, the body
    whole (it used to be a 406 for the study, or a body cut short). The instance: a JPEG
    Extended one whose damaged scan header every installed decoder refuses."""
    raw = undecodable_jpeg((samples / "real" / "pydicom" / "JPEG-lossy.dcm").read_bytes())
    bad = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    good = make_instance(study=bad.StudyInstanceUID, SeriesNumber=5 if undecodable_first else -5)
    await _store(app_client, raw, to_bytes(good))
    r = await app_client.get(
        f"{ROOT}/studies/{bad.StudyInstanceUID}/pixeldata", headers={"Accept": OCTETS}
    )
    assert r.status_code == 200, r.text
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == good.PixelData and good.SOPInstanceUID in headers["content-location"]
    assert r.content.endswith(b"--\r\n")  # the closing delimiter: the body is whole
    if undecodable_first:
        assert "1 bulk data value(s) not sent" in r.headers["warning"]
        assert bad.SOPInstanceUID in r.headers["warning"]
    r = await app_client.get(f"{inst_url(bad)}/pixeldata", headers={"Accept": OCTETS})
    assert r.status_code == 406 and "cannot decode" in r.text


@pytest.mark.db
async def test_a_later_value_not_made_in_the_image_type_asked_is_left_out(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A study's Pixel Data as image/jls: an RLE instance of 32-bit samples after one that
    JPEG-LS takes cannot be made so (JPEG-LS stops at 16 bits); found by interop review, the
    response broke off at it (curl exit 18, "incomplete chunked read"), the negotiation's
    406 raised once the 200 was sent. It is left out as a value the client cannot take is."""
    pydicom_data = samples / "real" / "pydicom-data"
    native = pydicom.dcmread(pydicom_data / "SC_rgb.dcm")
    rle32 = samples / "real" / "pydicom" / "SC_rgb_rle_32bit.dcm"
    assert pydicom.dcmread(rle32).StudyInstanceUID == native.StudyInstanceUID
    await _store(app_client, (pydicom_data / "SC_rgb.dcm").read_bytes())
    await _store(app_client, rle32.read_bytes())  # stored second: sent second
    jls = 'multipart/related; type="image/jls"'
    for resource in ("pixeldata", "bulkdata"):
        url = f"{ROOT}/studies/{native.StudyInstanceUID}/{resource}"
        r = await app_client.get(url, headers={"Accept": jls})
        assert r.status_code == 200 and r.content.endswith(b"--\r\n"), resource  # whole
        parts = split_multipart(r.content, r.headers["content-type"])
        assert [h["content-type"].partition(";")[0] for h, _ in parts] == ["image/jls"]
        assert native.SOPInstanceUID in parts[0][0]["content-location"]


@pytest.mark.db
async def test_head_of_bulk_resources_decodes_nothing(
    app_client: httpx.AsyncClient, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomweb_server.retrieve import frames

    path = samples / "generated" / "coverage" / "nm_10frames_rle.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    await _store(app_client, path.read_bytes())
    calls: list[int] = []
    real = frames.convert_codestream  # type: ignore[attr-defined]

    def counted(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return bytes(real(*args, **kwargs))

    monkeypatch.setattr(frames, "convert_codestream", counted)
    for url in (f"{inst_url(ds)}/pixeldata", f"{inst_url(ds)}/bulkdata", inst_url(ds)):
        for accept in (OCTETS, 'multipart/related; type="image/jls"'):
            r = await app_client.head(url, headers={"Accept": accept})
            assert r.status_code == 200 and r.content == b"", (url, accept)
            # The headers a GET sends (found by review: a HEAD said Content-Length 0, and
            # octet-stream where the GET sends image/jls), its boundary aside.
            assert "content-length" not in r.headers, (url, accept)
            expected = "image/jls" if "jls" in accept else "application/octet-stream"
            assert r.headers["content-type"].startswith(f'multipart/related; type="{expected}"')
            # A multipart type without its boundary (found by interop review: curl -I of
            # /bulkdata said `multipart/related; type="application/octet-stream"`).
            assert "; boundary=" in r.headers["content-type"], (url, accept)
    # The image/jls HEADs of /pixeldata and /bulkdata start at most their first frame (the
    # part type is the first part's); a decoded value is not read, nor any other frame.
    assert len(calls) <= 2
    before = len(calls)
    r = await app_client.get(f"{inst_url(ds)}/pixeldata", headers={"Accept": OCTETS})
    # The GET decodes every frame (but one a HEAD left in the frame cache).
    assert r.status_code == 200 and len(calls) - before >= 10 - before


def test_big_endian_value_is_swapped_without_a_word_per_object(tmp_path: Path) -> None:
    """A big endian file's OW value is swapped with `array` (a 10 MB value took 11 s and
    670 MB as 2-byte slices): the same bytes, memory a few times the value."""
    ds = make_instance(rows=1024, cols=1024)  # 2 MiB of 16-bit pixels
    little = bytes(ds.PixelData)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.PixelData = np.frombuffer(little, "<u2").astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    path = tmp_path / "be.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    value, peak = _read_with_peak(path, "7FE00010")
    assert value == (little, "OW")
    assert peak < 4 * len(little), peak


@pytest.mark.db
async def test_nested_compressed_pixel_data_is_sent_uncompressed(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """An icon whose Pixel Data is encapsulated (the file is compressed) is decoded, as
    octet-stream bulk data is uncompressed (8.7.3.3); it went as its raw item stream."""
    from pydicom.pixels.encoders.base import get_encoder

    path = samples / "generated" / "coverage" / "nm_10frames_rle.dcm"
    ds = pydicom.dcmread(path)
    pixels = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.SamplesPerPixel, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 1, 8, 8, 7
    icon.PhotometricInterpretation, icon.PixelRepresentation = "MONOCHROME2", 0
    rle = get_encoder(pydicom.uid.RLELossless).encode(
        pixels, rows=64, columns=64, samples_per_pixel=1, bits_allocated=8, bits_stored=8,
        pixel_representation=0, photometric_interpretation="MONOCHROME2", number_of_frames=1,
    )  # fmt: skip
    icon.add_new(0x7FE00010, "OB", pydicom.encaps.encapsulate([rle]))
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = Sequence([icon])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    await _store(app_client, buf.getvalue())
    uri = f"http://testserver{inst_url(ds)}/bulk/00880200/0/7FE00010"
    r = await app_client.get(uri)
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == pixels.tobytes()
    parts = await _parts(app_client, f"{inst_url(ds)}/bulkdata")
    assert {h["content-location"]: b for h, b in parts}[uri] == pixels.tobytes()


@pytest.mark.db
async def test_compressed_pixel_data_without_a_frame_map_is_decoded(
    app_client: httpx.AsyncClient,
) -> None:
    """Frames in more fragments than frames, with no offset table, are not mapped at ingest;
    their Pixel Data was sent as its compressed bytes labelled uncompressed octet-stream."""
    from pydicom.pixels.encoders.base import get_encoder

    ds = make_instance(frames=2, rows=16, cols=16)
    pixels = np.frombuffer(ds.PixelData, "<u2").reshape(2, 16, 16)
    opts: dict[str, Any] = {
        "rows": 16, "columns": 16, "samples_per_pixel": 1, "bits_allocated": 16,
        "bits_stored": 16, "pixel_representation": 0, "number_of_frames": 1,
        "photometric_interpretation": "MONOCHROME2",
    }  # fmt: skip
    encoder = get_encoder(pydicom.uid.JPEGLSLossless)
    frames = [encoder.encode(f, **opts) for f in pixels]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate(frames, fragments_per_frame=2, has_bot=False)
    ds["PixelData"].VR = "OB"
    await _store(app_client, to_bytes(ds))
    r = await app_client.get(f"{inst_url(ds)}/bulk/7FE00010", headers={"Accept": OCTETS})
    assert r.status_code == 200, r.text
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.1")
    assert body == pixels.tobytes()
    ((_, again),) = await _parts(app_client, f"{inst_url(ds)}/pixeldata")
    assert again == body


@pytest.mark.db
async def test_uncompressed_value_of_odd_length_is_padded(app_client: httpx.AsyncClient) -> None:
    """RLE Pixel Data of 3 x 3 8-bit pixels sent as its uncompressed value: 9 bytes and a
    padding byte (PS3.5 7.1.1), as in the instance converted to Explicit VR Little Endian; a
    range over the end gets the pad, one before it none."""
    ds = make_instance(rows=3, cols=3)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    pixels = np.arange(9, dtype=np.uint8).reshape(3, 3) + 1
    ds.PixelData = pixels.tobytes() + b"\0"
    ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    await _store(app_client, to_bytes(ds))
    uri = f"{inst_url(ds)}/bulk/7FE00010"
    octets = {"Accept": "application/octet-stream"}
    r = await app_client.get(uri, headers=octets)
    assert r.status_code == 200 and r.content == pixels.tobytes() + b"\0"
    whole = await app_client.get(inst_url(ds), headers={"Accept": "application/dicom"})
    assert pydicom.dcmread(io.BytesIO(whole.content)).PixelData == r.content
    r = await app_client.get(uri, headers=octets | {"Range": "bytes=8-"})
    assert r.status_code == 206 and r.content == b"\x09\0"
    r = await app_client.get(uri, headers=octets | {"Range": "bytes=0-8"})
    assert r.content == pixels.tobytes()


@pytest.mark.db
async def test_bulk_data_refused_with_q0_is_not_sent(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """`type="application/octet-stream"; q=0, */*` (RFC 9110 12.5.1: the most specific range
    gives a representation its quality) took uncompressed frames and instances from the
    frames and instance resources, but the bulk data and Pixel Data resources still sent
    octet-stream: encapsulated Pixel Data now goes as its frames as stored (the next
    acceptable), a value with no other representation is a 406 that says why."""
    path = samples / "generated" / "coverage" / "nm_10frames_rle.dcm"
    rle = pydicom.dcmread(path)
    native = _with_bulk_values(study=rle.StudyInstanceUID)
    await _store(app_client, path.read_bytes(), to_bytes(native))
    refused = 'multipart/related; type="application/octet-stream"; q=0, */*'
    for url in (f"{inst_url(rle)}/pixeldata", f"{inst_url(rle)}/bulk/7FE00010"):
        parts = await _parts(app_client, url, refused)
        assert len(parts) == int(rle.NumberOfFrames), url
        assert {h["content-type"] for h, _ in parts} == {
            "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"
        }
    no_rle = f'multipart/related; type="image/*"; q=0, {refused}'
    r = await app_client.get(f"{inst_url(rle)}/pixeldata", headers={"Accept": no_rle})
    assert r.status_code == 406
    assert "refuses (q=0) the Pixel Data uncompressed and its frames as stored" in r.text
    for url in (f"{inst_url(native)}/bulk/60003000", f"{inst_url(native)}/bulkdata"):
        r = await app_client.get(url, headers={"Accept": refused})
        assert r.status_code == 406, url
        assert "the Accept refuses it (q=0)" in r.text, url
    # the study's bulk data: the RLE frames, the native instance's values left out
    r = await app_client.get(f"{ROOT}/studies/{rle.StudyInstanceUID}/bulkdata",
                             headers={"Accept": refused})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="image/dicom-rle"')
    assert "3 bulk data value(s) not sent" in r.headers["warning"]
