"""Single part responses (PS3.18 10.4.4: "a single part Media Type is permitted for resources
which are a single response item"): an instance as `application/dicom`, one frame as
`application/octet-stream` or an image type, a bulk data value as `application/octet-stream`.
The body is the item itself, so a Range counts bytes of the value."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server.media.negotiate import single_parts
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

ELE = "1.2.840.10008.1.2.1"
RLE = Path("generated") / "coverage" / "nm_10frames_rle.dcm"


async def _store(client: httpx.AsyncClient, raw: bytes) -> pydicom.Dataset:
    r = await client.post(f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers())
    assert r.status_code == 200, r.text
    return pydicom.dcmread(io.BytesIO(raw))


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/dicom", ['multipart/related; type="application/dicom"']),
        ("application/dicom; transfer-syntax=*",
         ['multipart/related; type="application/dicom"; transfer-syntax=*']),
        ('application/dicom, multipart/related; type="application/dicom"',
         ['multipart/related; type="application/dicom"']),
        ('multipart/related; type="application/dicom", application/dicom', []),
        ("*/*, application/dicom", []),
        ("application/json, application/dicom", ['multipart/related; type="application/dicom"']),
        ("application/*", []),  # wildcards take the multipart answer
        ("multipart/related;q=0, */*, application/dicom;q=0.5",  # */* refuses multipart
         ['multipart/related; type="application/dicom"']),
        (None, []),
    ],
)  # fmt: skip
def test_single_part_ranges_before_any_multipart_one(
    accept: str | None, expected: list[str]
) -> None:
    got = single_parts(accept, lambda e: e == "application/dicom")
    assert [as_part for _, _, as_part in got] == expected


@pytest.mark.db
@pytest.mark.parametrize(
    "accept",
    [
        # Chrome's <img> and navigation Accept: no type it names is made, */* is multipart
        "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
        'image/webp, multipart/related; type="application/octet-stream"',
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50, */*",
    ],
)
async def test_a_single_part_range_that_cannot_be_met_passes_to_the_next(
    app_client: httpx.AsyncClient, accept: str
) -> None:
    """PS3.18 8.7.8.1: a range that cannot be met passes to the next; single part ranges
    made every later range unreachable (406 for a browser's Accept)."""
    ds = make_instance(frames=2, rows=4, cols=4)
    await _store(app_client, to_bytes(ds))
    r = await app_client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/related")
    for accept in (
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50, "
        'multipart/related; type="application/dicom"',
        "application/dicom; transfer-syntax=1.2.840.10008.1.2, */*",
    ):
        r = await app_client.get(inst_url(ds), headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    r = await app_client.get(
        inst_url(ds),
        params={"accept": "application/dicom;transfer-syntax=1.2.840.10008.1.2.4.50"},
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert r.status_code == 200


@pytest.mark.db
async def test_instance_as_application_dicom(
    app: Starlette, app_client: httpx.AsyncClient, samples: Path
) -> None:
    raw = (samples / RLE).read_bytes()
    ds = await _store(app_client, raw)
    url = inst_url(ds)
    r = await app_client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert r.status_code == 200, r.text
    assert (
        r.headers["content-type"]
        == f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
    )
    assert r.content == raw and r.headers["content-length"] == str(len(raw))
    r = await app_client.get(url, headers={"Accept": "application/dicom"})  # decoded
    assert r.status_code == 200 and r.headers["content-type"].endswith(ELE)
    sent = pydicom.dcmread(io.BytesIO(r.content))
    assert (sent.pixel_array == ds.pixel_array).all()
    assert list(app.state.services.scratch_dir.iterdir()) == []  # the converted copy is gone
    r = await app_client.head(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(raw))
    # a study is several items: no single part response for it
    r = await app_client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}",
                             headers={"Accept": "application/dicom"})  # fmt: skip
    assert r.status_code == 406


@pytest.mark.db
async def test_one_frame_as_a_single_part(app_client: httpx.AsyncClient, samples: Path) -> None:
    ds = make_instance(frames=3, rows=4, cols=4)  # 32 bytes a frame
    await _store(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/frames/2"
    frame = bytes(ds.PixelData)[32:64]
    r = await app_client.get(url, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200
    assert r.headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert r.content == frame and r.headers["accept-ranges"] == "bytes"
    r = await app_client.get(
        url, headers={"Accept": "application/octet-stream", "Range": "bytes=2-9"}
    )
    assert r.status_code == 206 and r.content == frame[2:10]
    assert r.headers["content-range"] == "bytes 2-9/32"
    rle = await _store(app_client, (samples / RLE).read_bytes())
    url = f"{inst_url(rle)}/frames/1"
    r = await app_client.get(url, headers={"Accept": "image/dicom-rle; transfer-syntax=*"})
    assert r.headers["content-type"] == "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"
    parts = await app_client.get(
        url, headers={"Accept": 'multipart/related; type="image/dicom-rle"'}
    )
    ((_, stored),) = split_multipart(parts.content, parts.headers["content-type"])
    assert r.content == stored
    r = await app_client.get(url, headers={"Accept": "image/jls"})
    assert r.status_code == 200 and r.content.startswith(b"\xff\xd8")
    assert r.headers["content-type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"


@pytest.mark.db
async def test_bulk_data_value_as_a_single_part(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    ds = make_instance(rows=64, cols=64)
    await _store(app_client, to_bytes(ds))
    uri = f"http://testserver{inst_url(ds)}/bulk/7FE00010"
    r = await app_client.get(uri, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.content == ds.PixelData
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-location"] == uri
    r = await app_client.get(
        uri, headers={"Accept": "application/octet-stream", "Range": "bytes=-4"}
    )
    assert r.status_code == 206 and r.content == ds.PixelData[-4:]
    rle = await _store(app_client, (samples / RLE).read_bytes())
    r = await app_client.get(f"{inst_url(rle)}/bulk/7FE00010",
                             headers={"Accept": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200
    assert r.headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert r.content == rle.pixel_array.astype("<u2").tobytes()


@pytest.mark.db
async def test_refused_multipart_and_refused_types_are_not_sent(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """RFC 9110 12.5.1 in the multipart negotiations too: `*/*` of a header that refuses
    multipart/related with q=0 does not take a multipart answer, and a type refused with q=0
    is not sent as a single part through `image/*`."""
    ds = make_instance()
    await _store(app_client, to_bytes(ds))
    r = await app_client.get(
        f"{ROOT}/studies/{ds.StudyInstanceUID}", headers={"Accept": "multipart/related;q=0, */*"}
    )
    assert r.status_code == 406
    jpeg = await _store(
        app_client, (samples / "generated" / "coverage" / "mg_jpeg_baseline_gray8.dcm").read_bytes()
    )
    r = await app_client.get(
        f"{inst_url(jpeg)}/frames/1", headers={"Accept": "image/jpeg;q=0, image/*"}
    )
    assert not r.headers.get("content-type", "").startswith("image/jpeg")


async def test_a_single_part_that_cannot_be_made_says_why(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A 12-bit JPEG Extended instance no installed decoder takes (a damaged scan header),
    asked for as one part in a
    syntax it would be converted to: the 406 listed that syntax among those that could be
    sent ("converted: ... 1.2.840.10008.1.2.4.80 ...") and did not say the decode failed, as
    the same request for a multipart response does (found by differential testing of frame
    and instance retrieval against dcmtk)."""
    lossy = (samples / "real" / "pydicom" / "JPEG-lossy.dcm").read_bytes()
    ds = await _store(app_client, undecodable_jpeg(lossy))
    jpeg_ls = "1.2.840.10008.1.2.4.80"
    for url, accept in (
        (inst_url(ds), f"application/dicom; transfer-syntax={jpeg_ls}"),
        (f"{inst_url(ds)}/frames/1", "application/octet-stream"),
        (f"{inst_url(ds)}/frames/1", f"image/jls; transfer-syntax={jpeg_ls}"),
    ):
        r = await app_client.get(url, headers={"Accept": accept})
        assert r.status_code == 406, (accept, r.text)
        message = r.json()["message"]
        assert message.startswith("cannot "), (accept, message)
        assert "Unable to decode" in message and "transfer-syntax=*" in message, accept
        assert "Accept" in r.headers["vary"]


async def test_a_single_part_refused_on_negotiation_says_each_thing_once(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A single part range that fails on negotiation (no codec tried: JPEG Baseline is never
    made from lossless pixels) already says what the multipart negotiation says: prefixed to
    it, the "acceptable: ..." list came twice in one reason. A decode failure the multipart
    negotiation meets too was said twice as well."""
    native = await _store(app_client, to_bytes(make_instance()))
    baseline = "1.2.840.10008.1.2.4.50"
    raw = undecodable_jpeg((samples / "real" / "pydicom" / "JPEG-lossy.dcm").read_bytes())
    lossy = await _store(app_client, raw)
    for url, accept, once in (
        (inst_url(native), f"application/dicom; transfer-syntax={baseline}", "acceptable:"),
        (f"{inst_url(native)}/frames/1", f"image/jpeg; transfer-syntax={baseline}",
         "acceptable:"),
        (f"{inst_url(lossy)}/frames/1", 'image/jls, multipart/related; type="image/jls"',
         "Unable to decode"),
    ):  # fmt: skip
        r = await app_client.get(url, headers={"Accept": accept})
        assert r.status_code == 406, (accept, r.text)
        assert r.json()["message"].count(once) == 1, (accept, r.json()["message"])
