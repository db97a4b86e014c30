"""The fallback JPEG decoder (transcode/fallback.py): libjpeg-turbo, through imagecodecs, for a
frame every pydicom plugin refuses; never for one they decode."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
import warnings
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from dicomweb_server.transcode.codecs import PixelInfo
from dicomweb_server.transcode.convert import converted_dataset, to_transfer_syntax
from dicomweb_server.transcode.fallback import FALLBACK_PLUGIN, FALLBACK_SYNTAXES
from dicomweb_server.transcode.frames import decode_codestream, decode_frames, frame_array
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

LOSSY = Path("real") / "pydicom" / "JPEG-lossy.dcm"
# JPEG-lossy.dcm's one frame, 1024 x 256 12-bit samples in 16-bit words, as dcmtk's dcmdjpeg
# (IJG libjpeg) decodes it: the SHA-256 of its little-endian words.
LOSSY_SHA256 = "d30242775a414c01d616447854ebe3f2b20259822894bcd6891f879bcdcbf313"
DICOM = 'multipart/related; type="application/dicom"'  # dicomweb-client's default Accept
OCTETS = 'multipart/related; type="application/octet-stream"'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pixels(path: Path, plugin: str, as_rgb: bool = True) -> np.ndarray:
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin=plugin, as_rgb=as_rgb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array.astype(np.int64)


def _dcmdjpeg(path: Path, tmp_path: Path) -> np.ndarray:
    """`path` decoded by dcmtk's dcmdjpeg (YCbCr to RGB, as pydicom's as_rgb)."""
    if shutil.which("dcmdjpeg") is None:
        pytest.skip("dcmtk's dcmdjpeg is not installed")
    out = tmp_path / "dcmdjpeg.dcm"
    subprocess.run(["dcmdjpeg", str(path), str(out)], check=True, capture_output=True)
    ds = pydicom.dcmread(out)
    ds.pixel_array_options(as_rgb=False)
    return ds.pixel_array.astype(np.int64)


def test_the_fallback_comes_after_the_other_decoders() -> None:
    """Registered on importing the pixel layer, last: pydicom tries its plugins in order."""
    from pydicom.pixels.decoders.base import get_decoder

    for uid in FALLBACK_SYNTAXES:
        assert list(get_decoder(uid)._available)[-1] == FALLBACK_PLUGIN, uid.name


def test_plugins_failing_before_the_fallback_log_no_error(
    samples: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom logs each plugin that fails on a frame at ERROR with its traceback, then tries
    the next: a frame the fallback decodes left two tracebacks in the server's log (found
    live). A failure of every plugin is raised with each one's message, and answered."""
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        (frame,) = decode_frames(samples / LOSSY, [1])
    assert _sha(frame) == LOSSY_SHA256
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_jpeg_lossy_decodes_as_dcmdjpeg_does(samples: Path, tmp_path: Path) -> None:
    """pydicom's 12-bit JPEG Extended file, whose scan header pylibjpeg's libjpeg refuses
    (spectral selection 0-0, not 0-63) and Pillow cannot take (12 bits): decoded, on every
    path (a frame, a frame's codestream, the instance converted whole, streamed or in memory,
    to Explicit VR Little Endian and to HTJ2K), to the values dcmdjpeg gives."""
    path = samples / LOSSY
    ds = pydicom.dcmread(path)
    with pytest.raises(RuntimeError, match="scan start must be zero"):
        _pixels(path, "pylibjpeg")
    expected = _dcmdjpeg(path, tmp_path) if shutil.which("dcmdjpeg") else None
    (frame,) = decode_frames(path, [1])
    assert _sha(frame) == LOSSY_SHA256
    if expected is not None:
        assert frame == expected.astype("<u2").tobytes()
    head = pydicom.dcmread(path, stop_before_pixels=True)
    assert _sha(frame_array(path, head, 1).astype("<u2").tobytes()) == LOSSY_SHA256
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    arr = decode_codestream(codestream, str(ds.file_meta.TransferSyntaxUID), PixelInfo.of(ds))
    assert _sha(arr.astype("<u2").tobytes()) == LOSSY_SHA256
    to_transfer_syntax(path, tmp_path / "streamed.dcm", ExplicitVRLittleEndian)
    for converted in (
        pydicom.dcmread(tmp_path / "streamed.dcm"),
        converted_dataset(path, ExplicitVRLittleEndian),
        converted_dataset(path, "1.2.840.10008.1.2.4.201"),  # HTJ2K Lossless
    ):
        assert _sha(converted.pixel_array.astype("<u2").tobytes()) == LOSSY_SHA256


# Files both decoders take: (path, most the fallback's samples differ from pylibjpeg's, after
# YCbCr is made RGB, and from dcmdjpeg's). Lossless: none. Lossy: libjpeg-turbo's inverse DCT
# rounds otherwise than Thomas Richter's libjpeg (pylibjpeg), by 1; YCbCr 4:2:2 adds the
# chroma upsampling, libjpeg-turbo's (and IJG's, dcmdjpeg's) "fancy" triangle filter against
# libjpeg's: up to 22 in an RGB sample of the generated ultrasound frames. The fallback is
# libjpeg-turbo, as dcmdjpeg is IJG libjpeg: the same values but for 412 samples, by 1, of
# those 4:2:2 frames.
AGREEMENT = [
    ("real/pydicom-data/JPEG-LL.dcm", 0, 0),  # JPEG Lossless SV1, 16-bit
    ("real/pydicom-data/JPGLosslessP14SV1_1s_1f_8b.dcm", 0, 0),
    ("real/pydicom/SC_rgb_jpeg_gdcm.dcm", 0, 0),  # SV1, RGB
    ("real/pydicom/JPGExtended.dcm", 1, 0),  # 12-bit JPEG Extended
    ("generated/coverage/mg_jpeg_baseline_gray8.dcm", 1, 0),
    ("real/pydicom/SC_rgb_jpeg_dcmtk.dcm", 0, 0),  # YBR_FULL
    ("real/pydicom/SC_rgb_jpeg_lossy_gdcm.dcm", 2, 0),  # YBR_FULL
    ("real/pydicom/SC_rgb_dcmtk_+eb+cr.dcm", 1, 0),  # RGB, no colour transform
    ("real/pydicom/SC_rgb_dcmtk_+eb+cy+np.dcm", 2, 0),  # YBR_FULL_422
    ("real/pydicom/examples_ybr_color.dcm", 3, 0),  # YBR_FULL_422, 30 frames
    ("generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm", 22, 1),  # 4:2:2, 12 frames
]


@pytest.mark.parametrize(("name", "from_primary", "from_dcmtk"), AGREEMENT)
def test_the_fallback_agrees_where_both_decode(
    samples: Path, tmp_path: Path, name: str, from_primary: int, from_dcmtk: int
) -> None:
    """The fallback asked by name, on files pylibjpeg decodes too: the same colour handling
    (the codestream's samples, YCbCr made RGB by pydicom), values within the bounds above;
    and the archive's own decode of these files is still pylibjpeg's, to the value."""
    path = samples / name
    ours = _pixels(path, FALLBACK_PLUGIN)
    theirs = _pixels(path, "pylibjpeg")
    assert ours.shape == theirs.shape
    assert int(np.abs(ours - theirs).max()) == from_primary
    if shutil.which("dcmdjpeg"):
        assert int(np.abs(ours - _dcmdjpeg(path, tmp_path)).max()) == from_dcmtk
    head = pydicom.dcmread(path, stop_before_pixels=True)
    first = theirs[0] if int(head.get("NumberOfFrames") or 1) > 1 else theirs
    assert np.array_equal(frame_array(path, head, 1), first)


async def _stow(client: httpx.AsyncClient, *files: bytes) -> None:
    r = await client.post(f"{ROOT}/studies", content=multipart_body(list(files)),
                          headers=stow_headers())  # fmt: skip
    assert r.status_code == 200, r.text


@pytest.mark.db
async def test_a_series_holding_jpeg_lossy_is_sent_whole_in_explicit_vr(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """dicomweb-client's retrieve_series and retrieve_study ask for application/dicom in
    Explicit VR Little Endian (found by a differential run with it): a series of an instance
    that converts and then JPEG-lossy.dcm, which no decoder here took, was a 200 whose body
    stopped at it (requests' ChunkedEncodingError). Both are now sent converted, the body
    whole; its frames as octet-stream are the decoded pixels, and it renders as a native
    copy of those pixels does."""
    raw = (samples / LOSSY).read_bytes()
    lossy = pydicom.dcmread(io.BytesIO(raw))
    st, se = lossy.StudyInstanceUID, lossy.SeriesInstanceUID
    before = make_instance(study=st, series=se, rows=8, cols=8)  # Instance Number 1 < 5
    before.compress(RLELossless)
    await _stow(app_client, to_bytes(before), raw)
    for url in (f"{ROOT}/studies/{st}/series/{se}", f"{ROOT}/studies/{st}"):
        r = await app_client.get(url, headers={"Accept": DICOM})
        assert r.status_code == 200 and r.content.endswith(b"--\r\n"), url  # whole
        parts = split_multipart(r.content, r.headers["content-type"])
        assert [h["content-type"] for h, _ in parts] == [
            f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
        ] * 2, url
        sent = pydicom.dcmread(io.BytesIO(parts[1][1]))
        assert sent.SOPInstanceUID == lossy.SOPInstanceUID
        assert sent.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert _sha(sent.PixelData) == LOSSY_SHA256, url
    r = await app_client.get(f"{inst_url(lossy)}/frames/1", headers={"Accept": OCTETS})
    assert r.status_code == 200, r.text
    ((headers, frame),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"].startswith("application/octet-stream")
    assert _sha(frame) == LOSSY_SHA256
    native = pydicom.dcmread(io.BytesIO(raw))  # the decoded pixels, uncompressed
    native.SOPInstanceUID = native.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    native.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    native.PixelData = frame
    native["PixelData"].VR, native["PixelData"].is_undefined_length = "OW", False
    await _stow(app_client, to_bytes(native))
    rendered = []
    for ds in (lossy, native):
        r = await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        rendered.append(np.asarray(Image.open(io.BytesIO(r.content))))
    assert rendered[0].shape == (1024, 256) and rendered[0].std() > 0
    assert np.array_equal(rendered[0], rendered[1])
    r = await app_client.get(f"{inst_url(lossy)}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/"), r.text
