"""Colour of whole instances converted to another transfer syntax (WADO-RS application/dicom
with a transfer-syntax, and C-MOVE/C-GET to a peer that takes only uncompressed data): YCbCr
samples of a YBR_FULL original stay YCbCr, labelled YBR_FULL, under every lossless target
(PS3.5 8.2.1-8.2.4 list YBR_FULL for JPEG Lossless, RLE, JPEG-LS and JPEG 2000). Converted
to RGB, they changed (the conversion rounds) under a syntax that claims to be lossless, with
neither a new SOP Instance UID nor Lossy Image Compression (PS3.3 C.7.6.1.1.5)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb_server.config import Settings
from dicomweb_server.transcode.codecs import (
    ENCODERS,
    HTJ2K_ANY,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    PixelInfo,
    segments,
)
from tests.dimse_support import (
    PEER,
    Archive,
    archive_with_peer,
    as_part10,
    associate,
    identifier,
    in_thread,
    running_peer,
    scu,
)
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db

REAL = Path("real")
NATIVE_YBR = REAL / "pydicom-data" / "SC_ybr_full_uncompressed.dcm"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Every lossless target ENCODERS offers: Explicit VR Little Endian, RLE Lossless, JPEG-LS
# Lossless, JPEG 2000 Lossless, the three HTJ2K syntaxes (ours reversible), JPEG Lossless SV1.
LOSSLESS = [uid for uid, codec in ENCODERS.items() if not codec.lossy]


def _saved(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _compressed(samples: Path, uid: str) -> bytes:
    """The real YBR_FULL sample compressed by pydicom, its samples kept (YBR_FULL)."""
    ds = dcmread(samples / NATIVE_YBR)
    ds.compress(uid, generate_instance_uid=False)
    assert ds.PhotometricInterpretation == "YBR_FULL"
    return _saved(ds)


def _synthetic(bits: int = 8) -> bytes:
    """A two-frame YBR_FULL instance stored colour-by-plane (Planar Configuration 1), its
    samples random: no RGB rounds back to them."""
    rows, cols, frames = 40, 48, 2
    ds = make_instance(rows=rows, cols=cols, frames=frames, modality="OT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PlanarConfiguration = 1
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    ybr = np.random.default_rng(bits).integers(0, 1 << bits, (frames, rows, cols, 3), dtype)
    ds.PixelData = np.ascontiguousarray(ybr.transpose(0, 3, 1, 2)).tobytes()
    return to_bytes(ds)


SOURCES: dict[str, Callable[[Path], bytes]] = {
    "native": lambda s: (s / NATIVE_YBR).read_bytes(),
    "jpeg-baseline": lambda s: (s / REAL / "pydicom" / "SC_rgb_jpeg_dcmtk.dcm").read_bytes(),
    "jpeg-baseline-n1": lambda s: (
        s / REAL / "pydicom" / "SC_rgb_dcmtk_+eb+cy+n1.dcm"
    ).read_bytes(),
    "rle": lambda s: _compressed(s, RLELossless),
    "jpeg-ls": lambda s: _compressed(s, JPEGLSLossless),
    "jpeg-2000": lambda s: _compressed(s, JPEG2000Lossless),
    "synthetic-planar": lambda _s: _synthetic(),
}


async def _stored(client: httpx.AsyncClient, raw: bytes) -> Dataset:
    r = await client.post(f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers())
    assert r.status_code == 200, r.text
    return dcmread(io.BytesIO(raw))


async def _converted(client: httpx.AsyncClient, ds: Dataset, target: str) -> httpx.Response:
    accept = f"application/dicom; transfer-syntax={target}"
    return await client.get(inst_url(ds), headers={"Accept": accept})


def _multi_component_transform(codestream: bytes) -> int:
    """SGcod's multiple component transformation of a JPEG 2000 main header's COD (ISO
    15444-1 A.6.1): 1 when the colour transform was applied."""
    start = codestream.find(b"\xff\x4f\xff\x51")  # SOC, SIZ
    cod = next(pos for marker, pos in segments(codestream, start + 2) if marker == 0x52)
    return codestream[cod + 8]


def _check_ybr_kept(sent: Dataset, stored: Dataset, target: str) -> None:
    """`sent` holds the stored YCbCr samples exactly, says YBR_FULL, and says nothing new
    about loss; its Planar Configuration is the one its bytes are read by."""
    what = f"{stored.file_meta.TransferSyntaxUID.name} to {UID(target).name}"
    assert sent.file_meta.TransferSyntaxUID == target, what
    assert sent.PhotometricInterpretation == "YBR_FULL", what
    assert sent.SOPInstanceUID == stored.SOPInstanceUID, what
    assert sent.get("LossyImageCompression") == stored.get("LossyImageCompression"), what
    want = pixel_array(stored, as_rgb=False)
    got = pixel_array(sent, as_rgb=False)
    assert got.shape == want.shape and np.array_equal(got, want), what
    if not sent.file_meta.TransferSyntaxUID.is_compressed:  # the bytes in that layout
        planar = sent.get("PlanarConfiguration") == 1
        layout = np.moveaxis(want, -1, -3) if planar else want
        assert bytes(sent.PixelData) == np.ascontiguousarray(layout).tobytes(), what
    if target in (JPEG_2000_LOSSLESS, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K_ANY):
        # PS3.5 8.2.4, 8.2.14: a colour transform in the codestream means YBR_RCT
        frame = next(pydicom.encaps.generate_frames(sent.PixelData, number_of_frames=1))
        assert _multi_component_transform(frame) == 0, what


@pytest.mark.parametrize("source", list(SOURCES))
async def test_ybr_full_instance_converted_losslessly_keeps_its_samples(
    app_client: httpx.AsyncClient, samples: Path, source: str
) -> None:
    """A YBR_FULL instance, stored uncompressed, JPEG Baseline (real), RLE, JPEG-LS, JPEG
    2000 or colour-by-plane and multi-frame, converted whole to each lossless target."""
    stored = await _stored(app_client, SOURCES[source](samples))
    assert stored.PhotometricInterpretation == "YBR_FULL"
    for target in LOSSLESS:
        r = await _converted(app_client, stored, target)
        assert r.status_code == 200, (target, r.text)
        _check_ybr_kept(dcmread(io.BytesIO(r.content)), stored, target)


async def test_ybr_full_422_and_jpeg_baseline_targets(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """As frames are: YBR_FULL_422 from (lossy) JPEG decoded to Explicit VR Little Endian is
    RGB (PS3.5 8.2.1 note: already lossy; the subsampled layout is not remade); re-encoded
    losslessly it holds its YCbCr samples, upsampled, labelled YBR_FULL. JPEG Baseline is
    made from RGB and says YBR_FULL_422, as its codestream holds."""
    ybr422 = await _stored(
        app_client, (samples / REAL / "pydicom" / "SC_rgb_dcmtk_+eb+cy+np.dcm").read_bytes()
    )
    assert ybr422.PhotometricInterpretation == "YBR_FULL_422"
    for target in LOSSLESS:
        sent = dcmread(io.BytesIO((await _converted(app_client, ybr422, target)).content))
        if target == ExplicitVRLittleEndian:
            assert sent.PhotometricInterpretation == "RGB"
            assert np.array_equal(pixel_array(sent), pixel_array(ybr422))
        else:
            assert sent.PhotometricInterpretation == "YBR_FULL", target
            want = pixel_array(ybr422, as_rgb=False)
            assert np.array_equal(pixel_array(sent, as_rgb=False), want), target
        assert sent.LossyImageCompression == "01"  # the JPEG original was lossy
    ybr = await _stored(app_client, (samples / NATIVE_YBR).read_bytes())
    sent = dcmread(io.BytesIO((await _converted(app_client, ybr, JPEG_BASELINE)).content))
    assert sent.LossyImageCompression == "01"
    _check_baseline_ybr_422(sent, pixel_array(ybr))


def _check_baseline_ybr_422(sent: Dataset, rgb: np.ndarray) -> None:
    """JPEG Baseline made by the archive says what its codestream holds (PS3.5 8.2.1): YCbCr
    with the chrominance halved horizontally, YBR_FULL_422 (it said RGB); and decodes, as
    that label says, to about the original colours."""
    assert sent.PhotometricInterpretation == "YBR_FULL_422"
    frame = next(pydicom.encaps.generate_frames(sent.PixelData, number_of_frames=1))
    sof = next(pos for marker, pos in segments(frame, 2) if marker in (0xC0, 0xC1))
    # SOF0 (ITU T.81 B.2.2): Nf, then per component its id, Hi<<4|Vi and Tq
    assert frame[sof + 9] == 3
    sampling = [frame[sof + 10 + 3 * i + 1] for i in range(3)]
    assert sampling == [0x21, 0x11, 0x11], [hex(s) for s in sampling]
    decoded = pixel_array(sent).astype(int)
    assert np.abs(decoded - rgb.astype(int)).mean() < 8


async def test_rgb_instance_in_jpeg_baseline_says_ybr_full_422(
    app_client: httpx.AsyncClient,
) -> None:
    """RGB converted whole to JPEG Baseline: YBR_FULL_422, 4:2:2 in the codestream."""
    ds = make_instance(rows=32, cols=48, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PlanarConfiguration = 7, 0
    y, x = np.mgrid[0:32, 0:48]
    ds.PixelData = np.stack([x * 5, y * 7, 255 - x * 5], axis=-1).astype(np.uint8).tobytes()
    stored = await _stored(app_client, to_bytes(ds))
    sent = dcmread(io.BytesIO((await _converted(app_client, stored, JPEG_BASELINE)).content))
    _check_baseline_ybr_422(sent, pixel_array(stored))


async def test_16_bit_ybr_full_converted_where_ybr_full_is_allowed(
    app_client: httpx.AsyncClient,
) -> None:
    """PS3.5 Tables 8.2.2-1 and 8.2.3-1 allow YBR_FULL in RLE and JPEG-LS only with 8 bits;
    12-bit YCbCr samples go to JPEG 2000, HTJ2K and JPEG Lossless unchanged, and RLE and
    JPEG-LS are refused with a 406 (pydicom converts only 8-bit YCbCr to RGB: these were all
    a 406 before)."""
    stored = await _stored(app_client, _synthetic(bits=12))
    for target in LOSSLESS:
        r = await _converted(app_client, stored, target)
        if target in (RLE_LOSSLESS, JPEG_LS_LOSSLESS):
            assert r.status_code == 406, (target, r.status_code)
            continue
        assert r.status_code == 200, (target, r.text)
        _check_ybr_kept(dcmread(io.BytesIO(r.content)), stored, target)


@pytest.mark.parametrize("bits", [8, 9])
def test_rle_and_jpeg_ls_take_ybr_full_of_8_bits_at_most(bits: int) -> None:
    """The edge of PS3.5 Tables 8.2.2-1 and 8.2.3-1 for YBR_FULL (RGB goes to 16 bits)."""
    allocated = 8 if bits <= 8 else 16
    ybr = PixelInfo(allocated, bits, 3, 0, "YBR_FULL", 64, 64)
    rgb = PixelInfo(allocated, bits, 3, 0, "RGB", 64, 64)
    for target in (RLE_LOSSLESS, JPEG_LS_LOSSLESS):
        assert ENCODERS[target].accepts(ybr) is (bits <= 8), target
        assert ENCODERS[target].accepts(rgb), target
    assert ENCODERS[HTJ2K_LOSSLESS].accepts(ybr)


def _move(archive: Archive, ident: Dataset) -> list[Dataset]:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = associate(scu(model), archive)
    try:
        return [st for st, _ in assoc.send_c_move(ident, PEER, model)]
    finally:
        assoc.release()


@pytest.mark.usefixtures("no_spool_left_behind")
@pytest.mark.parametrize("source", ["jpeg-baseline", "rle"])
async def test_move_to_a_peer_taking_only_uncompressed_keeps_ybr_full(
    settings: Settings, samples: Path, tmp_path: Path, source: str
) -> None:
    """C-MOVE decodes for a destination that takes the SOP Class only uncompressed (PS3.4
    C.4.2.3.1): the YCbCr samples sent as stored, labelled YBR_FULL."""
    raw = SOURCES[source](samples)
    stored = dcmread(io.BytesIO(raw))
    with running_peer([ImplicitVRLittleEndian, ExplicitVRLittleEndian]) as only_native:
        async with archive_with_peer(settings, only_native, tmp_path) as archive:
            r = await archive.http.post(
                f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers()
            )
            assert r.status_code == 200, r.text
            ident = identifier("IMAGE", StudyInstanceUID=stored.StudyInstanceUID,
                               SeriesInstanceUID=stored.SeriesInstanceUID,
                               SOPInstanceUID=stored.SOPInstanceUID)  # fmt: skip
            statuses = await in_thread(_move, archive, ident)
    assert statuses[-1].Status == 0x0000, statuses[-1]
    sent_as = only_native.syntaxes[stored.SOPInstanceUID]
    got = as_part10(only_native.received[stored.SOPInstanceUID], sent_as)
    assert got.PhotometricInterpretation == "YBR_FULL"
    assert np.array_equal(pixel_array(got, as_rgb=False), pixel_array(stored, as_rgb=False))
    assert pydicom.uid.UID(sent_as) in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


async def test_rgb_instance_in_htj2k_says_ybr_rct(app_client: httpx.AsyncClient) -> None:
    """OpenJPH applies the reversible colour transform to RGB: a JPEG 2000 codestream with
    one means Photometric Interpretation YBR_RCT (PS3.5 8.2.4, 8.2.14), which decoders give
    back as the stored RGB. JPEG 2000 Lossless (pydicom's encoder: no transform) stays RGB."""
    ds = make_instance(rows=40, cols=48, modality="OT")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    rgb = np.random.default_rng(3).integers(0, 256, (40, 48, 3), np.uint8)
    ds.PixelData = rgb.tobytes()
    stored = await _stored(app_client, to_bytes(ds))
    for target, label, mct in (
        (HTJ2K_LOSSLESS, "YBR_RCT", 1),
        (HTJ2K_LOSSLESS_RPCL, "YBR_RCT", 1),
        (HTJ2K_ANY, "YBR_RCT", 1),
        (JPEG_2000_LOSSLESS, "RGB", 0),
    ):
        sent = dcmread(io.BytesIO((await _converted(app_client, stored, target)).content))
        frame = next(pydicom.encaps.generate_frames(sent.PixelData, number_of_frames=1))
        assert (sent.PhotometricInterpretation, _multi_component_transform(frame)) == (
            label,
            mct,
        ), target
        assert np.array_equal(pixel_array(sent), rgb), target
