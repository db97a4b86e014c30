"""STOW-RS of metadata and bulk data takes back what the archive serves: the metadata of an
instance and its bulk data, as the archive sends them, stored again under another SOP
Instance UID (tests/test_stow_json*.py hold the rest of STOW-RS of metadata)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from dicomweb_server.media.negotiate import frame_syntax
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
)
from tests.stow_json_support import STORED, _body, _metadata, _post

DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"  # PS3.5 A.4.13


def test_octet_stream_names_a_syntax_of_octet_stream_frames_only() -> None:
    octets = "application/octet-stream; transfer-syntax="
    assert frame_syntax(octets + DEFLATED_IMAGE_FRAME) == DEFLATED_IMAGE_FRAME
    assert frame_syntax(octets + "1.2.840.10008.1.2.1.98") == "1.2.840.10008.1.2.1.98"
    assert frame_syntax("application/octet-stream") == "1.2.840.10008.1.2.1"
    for other in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2", "1.2.3.4"):
        assert frame_syntax(octets + other) is None, other


@pytest.mark.db
async def test_deflated_image_frames_round_trip(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A SEG in Deflated Image Frame Compression: its bulk data is served as stored, one
    `application/octet-stream; transfer-syntax=1.2.840.10008.1.2.8.1` part per frame (no
    decoder here, and PS3.18 Table 8.7.3-5 gives that syntax no media type of its own).
    STOW-RS refused those parts back (0xC000: octet-stream was native only); now each is a
    frame, stored encapsulated in that syntax."""
    path = samples / "real/pydicom-data/liver_deflate.dcm"
    src = pydicom.dcmread(path)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    meta = (await app_client.get(f"{inst_url(src)}/metadata")).json()[0]
    uri = meta["7FE00010"]["BulkDataURI"]
    r = await app_client.get(uri, headers={"Accept": "*/*"})
    assert r.status_code == 200, r.text
    parts = [(uri, h["content-type"], body)
             for h, body in split_multipart(r.content, r.headers["content-type"])]  # fmt: skip
    assert {ctype for _, ctype, _ in parts} == {
        f"application/octet-stream; transfer-syntax={DEFLATED_IMAGE_FRAME}"
    }
    copy = generate_uid()
    meta["00080018"]["Value"] = [copy]
    r = await _post(app_client, _body([meta], *parts))
    assert r.status_code == 200, r.headers.get("Warning")
    src.SOPInstanceUID = copy
    r = await app_client.get(inst_url(src), headers={"Accept": STORED})
    ((headers, data),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"].endswith(f"transfer-syntax={DEFLATED_IMAGE_FRAME}")
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    nframes = int(src.NumberOfFrames)
    assert list(generate_frames(stored.PixelData, number_of_frames=nframes)) == list(
        generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=nframes)
    )


ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"  # PS3.5 A.4.11


@pytest.mark.db
async def test_encapsulated_uncompressed_frames_are_one_native_frame_each(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by review: a part in Encapsulated Uncompressed Explicit VR Little Endian of any
    size was stored (its frames then undecodable), and a part count other than Number of
    Frames was refused as "compressed frame parts". PS3.5 A.4.11: one fragment per frame,
    holding the frame's native bytes (Rows x Columns x SamplesPerPixel x BitsAllocated / 8).
    A part of another size is 0xC000 with the reason; the right size is stored."""
    ds = make_instance(rows=8, cols=6, frames=2)  # 16-bit, one sample: 96 bytes a frame
    frame = bytes(ds.PixelData[:96])
    ctype = f"application/octet-stream; transfer-syntax={ENCAPSULATED_UNCOMPRESSED}"
    for sizes, status, said in (
        ((96, 95), 0xC000, "frame 2 is 95 bytes, not the 96 of one uncompressed frame"),
        ((97, 96), 0xC000, "frame 1 is 97 bytes, not the 96 of one uncompressed frame"),
        ((96,), 0xA900, "1 frame parts for Number of Frames 2: one part per frame"),
    ):
        doc = _metadata(ds, "/f")
        doc["00080018"]["Value"] = [generate_uid()]
        parts = [("/f", ctype, (frame * 2)[:n]) for n in sizes]
        r = await _post(app_client, _body([doc], *parts))
        assert r.status_code == 409, sizes
        failed = r.json()["00081198"]["Value"][0]
        assert failed["00081197"]["Value"] == [status], sizes
        assert said in r.headers["warning"], (sizes, r.headers["warning"])
    doc = _metadata(ds, "/f")
    r = await _post(app_client, _body([doc], ("/f", ctype, frame), ("/f", ctype, frame)))
    assert r.status_code == 200, r.headers.get("warning")


@pytest.mark.db
async def test_encapsulated_uncompressed_ybr_full_422_frame_is_two_samples_a_pixel(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by review: the .98 frame size check counted 3 samples a pixel for YBR_FULL_422,
    whose native frame holds 2 (PS3.3 C.7.6.3.1.2: Y Y CB CR for each pair of pixels), and
    refused a whole frame. Rows x Columns x 2 bytes is stored; the 3-sample size is 0xC000."""
    ds = make_instance(rows=8, cols=6)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ctype = f"application/octet-stream; transfer-syntax={ENCAPSULATED_UNCOMPRESSED}"
    doc = _metadata(ds, "/f")
    doc["00080018"]["Value"] = [generate_uid()]
    r = await _post(app_client, _body([doc], ("/f", ctype, b"\x80" * (8 * 6 * 3))))
    assert r.status_code == 409
    assert "frame 1 is 144 bytes, not the 96 of one uncompressed frame" in r.headers["warning"]
    doc = _metadata(ds, "/f")
    r = await _post(app_client, _body([doc], ("/f", ctype, b"\x80" * (8 * 6 * 2))))
    assert r.status_code == 200, r.headers.get("warning")
