"""Colour of frames served on their own (frames, Pixel Data bulk data): in the colour space
the metadata gives, the only description of a frame a client has. YBR_FULL stays YBR_FULL
(PS3.5 8.2.2 note 4); Cornerstone and pydicom convert it to RGB themselves, so an RGB frame
under YBR_FULL metadata was converted twice. YBR_FULL_422 and YBR_ICT come as RGB, uncompressed
or re-encoded (Cornerstone takes a YBR_FULL_422 frame of 3 samples a pixel as RGB)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import httpx
import jpeg_ls
import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import pixel_array
from pydicom.uid import RLELossless

from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

ELE_UID = "1.2.840.10008.1.2.1"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
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


def _decode_as_metadata_says(ds: pydicom.Dataset, ts: str, frame: bytes) -> np.ndarray:
    """A one-frame codestream decoded as a client does: by the instance's metadata."""
    one = copy.deepcopy(ds)
    one.file_meta.TransferSyntaxUID = pydicom.uid.UID(ts)
    one.NumberOfFrames = 1
    one.PixelData = pydicom.encaps.encapsulate([frame])
    one["PixelData"].VR = "OB"
    return pixel_array(one)


def _decoded_as_rgb(ts: str, frame: bytes, ds: pydicom.Dataset) -> np.ndarray:
    """A one-frame codestream decoded as Cornerstone (OHIF's loader) shows a frame of 3
    samples a pixel under YBR_FULL_422: its codec's output, not converted (it converts only
    a frame of the subsampled length, isColorConversionRequired), as Orthanc and dcm4chee
    send it."""
    one = copy.deepcopy(ds)
    one.PhotometricInterpretation = "RGB"
    return _decode_as_metadata_says(one, ts, frame)


# The lossless syntaxes frames are re-encoded in, and their part media types.
LOSSLESS_PARTS = {
    JPEG_LS_LOSSLESS: "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201": "image/jphc",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "image/jphc",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # RLE Lossless
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG Lossless SV1
}


@pytest.mark.db
@pytest.mark.parametrize("ts", list(LOSSLESS_PARTS))
async def test_ybr_full_422_frames_re_encoded_are_rgb(
    app_client: httpx.AsyncClient, samples: Path, ts: str
) -> None:
    """Found by review: frames of a YBR_FULL_422 instance (JPEG Baseline, as ultrasound and
    endoscopy send) re-encoded for OHIF (`image/jphc`, `image/jp2`, `image/jls`) held its
    YCbCr samples, upsampled; Cornerstone takes a frame of 3 samples a pixel under
    YBR_FULL_422 as RGB, and showed them so (errors up to 255). They are RGB now, as its
    uncompressed frames are."""
    ybr422 = await _store(
        app_client, (samples / "real" / "pydicom" / "SC_rgb_dcmtk_+eb+cy+np.dcm").read_bytes()
    )
    assert ybr422.PhotometricInterpretation == "YBR_FULL_422"
    frame = await _frame(
        app_client, ybr422, f'multipart/related; type="{LOSSLESS_PARTS[ts]}"; transfer-syntax={ts}'
    )
    assert np.array_equal(_decoded_as_rgb(ts, frame, ybr422), pixel_array(ybr422))


@pytest.mark.db
async def test_ybr_full_frames_in_jpeg_baseline_decode_to_the_same_colours(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """JPEG Baseline frames under YBR_FULL metadata are made from RGB (its encoder converts
    to YCbCr itself), so the error is the loss of quality 90 only."""
    ybr = await _store(app_client, _rle_ybr_full(samples))
    baseline = 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'
    jpeg = await _frame(app_client, ybr, baseline)
    got = _decode_as_metadata_says(ybr, "1.2.840.10008.1.2.4.50", jpeg).astype(int)
    assert np.abs(got - pixel_array(ybr).astype(int)).mean() < 3.0


@pytest.mark.db
async def test_big_endian_ybr_full_instance_converted_keeps_its_colours(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Explicit VR Big Endian re-encoded as Explicit VR Little Endian: the pixel bytes are
    swapped, colour untouched (its samples were made RGB under a YBR_FULL label)."""
    ds = pydicom.dcmread(samples / "real" / "pydicom-data" / "SC_ybr_full_uncompressed.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    await _store(app_client, buf.getvalue())
    r = await app_client.get(inst_url(ds), headers={"Accept": "application/dicom"})
    sent = pydicom.dcmread(io.BytesIO(r.content))
    assert sent.file_meta.TransferSyntaxUID == ELE_UID
    assert np.array_equal(pixel_array(sent), pixel_array(ds))


def _rgb_planar_instance() -> bytes:
    """An 8-bit RGB instance stored colour-by-plane (Planar Configuration 1)."""
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(16, dtype=np.uint8)[:, None] * 16  # red: rows
    rgb[..., 1] = np.arange(16, dtype=np.uint8)[None, :] * 16  # green: columns
    rgb[..., 2] = 200
    ds = make_instance(rows=16, cols=16)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.transpose(2, 0, 1).tobytes()
    return to_bytes(ds)


@pytest.mark.db
async def test_jpeg_ls_frames_of_a_planar_instance_decode_planar(
    app_client: httpx.AsyncClient,
) -> None:
    """JPEG-LS frames of an instance whose metadata says Planar Configuration 1 are encoded
    with ILV 0 (component by component): CharLS, which OHIF's loader uses, then gives the
    samples colour-by-plane, as the loader reads them by the metadata. With ILV 2 (pixel
    interleaved) it gave them interleaved, and the loader garbled the colours."""
    ds = await _store(app_client, _rgb_planar_instance())
    want = pixel_array(ds)
    codestream = await _frame(app_client, ds, JLS)
    buffer, info = jpeg_ls.decode_pixel_data(codestream)
    assert info["interleave_mode"] == 0
    as_client_reads = np.frombuffer(buffer, np.uint8).reshape(3, 16, 16).transpose(1, 2, 0)
    assert np.array_equal(as_client_reads, want)
    assert np.array_equal(_decode_as_metadata_says(ds, JPEG_LS_LOSSLESS, codestream), want)
    # The instance converted whole says Planar Configuration 0, as its codestreams are.
    r = await app_client.get(
        inst_url(ds), headers={"Accept": f"application/dicom; transfer-syntax={JPEG_LS_LOSSLESS}"}
    )
    sent = pydicom.dcmread(io.BytesIO(r.content))
    assert sent.PlanarConfiguration == 0
    frame = next(pydicom.encaps.generate_fragmented_frames(sent.PixelData))
    assert jpeg_ls.decode_pixel_data(b"".join(frame))[1]["interleave_mode"] == 2
    assert np.array_equal(pixel_array(sent), want)
