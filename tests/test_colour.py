"""Colour of frames served on their own (frames, Pixel Data bulk data): in the colour space
the metadata gives, the only description of a frame a client has. YBR_FULL stays YBR_FULL
(PS3.5 8.2.2 note 4); Cornerstone and pydicom convert it to RGB themselves, so an RGB frame
under YBR_FULL metadata was converted twice. YBR_FULL_422 and YBR_ICT come as RGB."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import pixel_array
from pydicom.uid import RLELossless

from tests.helpers import ROOT, inst_url, multipart_body, split_multipart, stow_headers

JLS = 'multipart/related; type="image/jls"'


async def _store(client: httpx.AsyncClient, raw: bytes) -> pydicom.Dataset:
    r = await client.post(f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers())
    assert r.status_code == 200, r.text
    return pydicom.dcmread(io.BytesIO(raw))


async def _frame(
    client: httpx.AsyncClient, ds: pydicom.Dataset, accept: str | None = None
) -> bytes:
    r = await client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": accept} if accept else {})
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    return body


def _rle_ybr_full(samples: Path) -> bytes:
    ds = pydicom.dcmread(samples / "real" / "pydicom-data" / "SC_ybr_full_uncompressed.dcm")
    ds.compress(RLELossless, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.db
@pytest.mark.parametrize("source", ["jpeg", "rle"])
async def test_ybr_full_frames_stay_ybr_full(
    app_client: httpx.AsyncClient, samples: Path, source: str
) -> None:
    if source == "jpeg":
        raw = (samples / "real" / "pydicom" / "SC_rgb_jpeg_dcmtk.dcm").read_bytes()
    else:
        raw = _rle_ybr_full(samples)
    ds = await _store(app_client, raw)
    assert ds.PhotometricInterpretation == "YBR_FULL" and ds.get("PlanarConfiguration", 0) == 0
    ybr = pixel_array(ds, as_rgb=False)
    frame = await _frame(app_client, ds)
    assert frame == ybr.tobytes()
    # a client reading the frame as the metadata says gets the colours pydicom shows
    got = np.frombuffer(frame, np.uint8).reshape(ybr.shape)
    assert np.array_equal(convert_color_space(got, "YBR_FULL", "RGB"), pixel_array(ds))
    # the Pixel Data by its BulkDataURI is the same value
    r = await app_client.get(f"{inst_url(ds)}/bulk/7FE00010")
    ((_, bulk),) = split_multipart(r.content, r.headers["content-type"])
    assert bulk == frame
    # re-encoded frames hold the same samples: JPEG-LS, lossless
    jls = await _frame(app_client, ds, JLS)
    one = pydicom.dcmread(io.BytesIO(raw))
    one.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    one.PixelData = pydicom.encaps.encapsulate([jls])
    assert np.array_equal(pixel_array(one, as_rgb=False), ybr)


@pytest.mark.db
async def test_ybr_full_422_and_ict_frames_are_rgb(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    for path in (
        samples / "real" / "pydicom" / "SC_rgb_dcmtk_+eb+cy+np.dcm",  # YBR_FULL_422 JPEG
        samples / "real" / "pydicom-data" / "US1_J2KI.dcm",  # YBR_ICT
    ):
        ds = await _store(app_client, path.read_bytes())
        frame = await _frame(app_client, ds)
        assert frame == pixel_array(ds).tobytes(), path.name  # RGB, 3 bytes a pixel
