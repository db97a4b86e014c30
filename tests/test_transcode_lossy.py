"""Lossy Image Compression of converted copies (PS3.3 C.7.6.1.1.5): whether a stored
codestream is lossy, read from the codestream itself (near-lossless JPEG-LS, irreversible
JPEG 2000), and the attributes a decoded or a lossy re-encoded copy carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from dicomweb_server.transcode.convert import converted_dataset, to_transfer_syntax
from dicomweb_server.transcode.lossy import _j2k_wavelet, lossy_method
from tests.transcode_support import JPEG_BASELINE

pytestmark = pytest.mark.db


def test_decoded_copy_of_jpeg_baseline_says_lossy(samples: Path, tmp_path: Path) -> None:
    """PS3.3 C.7.6.1.1.5: a copy decoded from a certainly lossy syntax is marked so, even when
    the original did not say it."""
    ds = pydicom.dcmread(samples / "generated/coverage/mg_jpeg_baseline_gray8.dcm")
    for kw in ("LossyImageCompression", "LossyImageCompressionMethod"):
        if kw in ds:
            delattr(ds, kw)
    src = tmp_path / "unmarked.dcm"
    ds.save_as(src, enforce_file_format=True)
    got = converted_dataset(src, ExplicitVRLittleEndian)
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == "ISO_10918_1"
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("generated/coverage/mr_jpegls_near_lossless.dcm", "ISO_14495_1"),  # NEAR 3
        ("real/pydicom/JPEGLSNearLossless_16.dcm", "ISO_14495_1"),  # NEAR 2
        ("real/pydicom/SC_rgb_jls_lossy_line.dcm", "ISO_14495_1"),
        ("generated/coverage/ect_15frames_jpegls_lossless.dcm", None),
        ("generated/coverage/mr_j2k_lossy.dcm", "ISO_15444_1"),  # 9-7 wavelet
        ("real/pydicom-data/MR2_J2KI.dcm", "ISO_15444_1"),
        ("real/pydicom/SC_rgb_gdcm_KY.dcm", None),  # JPEG 2000 with the 5-3 wavelet
        ("generated/coverage/ct_j2k_lossless_signed.dcm", None),
        ("real/pydicom-data/HTJ2KLossless_08_RGB.dcm", None),
        ("generated/coverage/mg_jpeg_baseline_gray8.dcm", "ISO_10918_1"),
    ],
)
def test_lossy_method_read_from_the_codestream(
    samples: Path, name: str, method: str | None
) -> None:
    """Near-lossless JPEG-LS (NEAR > 0) and irreversible JPEG 2000 are lossy whatever the
    data set says; the corpus's near-lossless files do not say it."""
    ds = pydicom.dcmread(samples / name)
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert lossy_method(ts, ds.PixelData) == method


def test_lossy_method_of_htj2k_and_of_damaged_codestreams(samples: Path) -> None:
    from pydicom.encaps import generate_fragments
    from pydicom.uid import HTJ2K, JPEG2000, JPEGLSNearLossless

    ds = pydicom.dcmread(samples / "generated/coverage/mr_j2k_lossy.dcm")
    # HTJ2K's main header codes its wavelet in the same COD segment (ISO 15444-15).
    assert lossy_method(HTJ2K, ds.PixelData) == "ISO_15444_15"
    boxed = pydicom.dcmread(samples / "real/pydicom/GDCMJ2K_TextGBR.dcm")
    first = list(generate_fragments(boxed.PixelData))[1]
    assert first[4:8] == b"jP  " and _j2k_wavelet(first) == 1  # inside a JP2 box
    for ts, stream in [
        (JPEGLSNearLossless, b"\xff\xd8\xff"),
        (JPEGLSNearLossless, b"\xff\xd8\xff\xf7\xff\xff"),  # a length past the end
        (JPEGLSNearLossless, b"\xff\xd8\xff\xda\x00\x08\x05"),  # NEAR past the end
        (JPEGLSNearLossless, b"\xff\xd8\xff\xda\x00\x08"),  # Ns past the end (review)
        (JPEG2000, b"\xff\x4f\xff\x51\x00"),
        (JPEG2000, b"\xff\x4f\xff\x51\x00\x04\xff\x90\x00\x0a"),  # no COD before SOT
        (JPEG2000, b"not a codestream"),
    ]:
        assert lossy_method(ts, encapsulate([stream])) is None
    assert lossy_method(JPEG2000, b"\xfe\xff\x00\xe0") is None  # no fragment


def test_decoded_copy_of_near_lossless_jpeg_ls_says_lossy(samples: Path, tmp_path: Path) -> None:
    """The corpus's near-lossless JPEG-LS file does not say it is lossy: its decoded copy does;
    a copy of a lossless JPEG 2000 file is not marked."""
    src = samples / "generated/coverage/mr_jpegls_near_lossless.dcm"
    assert "LossyImageCompression" not in pydicom.dcmread(src, stop_before_pixels=True)
    got = converted_dataset(src, ExplicitVRLittleEndian)
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == "ISO_14495_1"
    plain = converted_dataset(
        samples / "generated/coverage/ct_j2k_lossless_signed.dcm", ExplicitVRLittleEndian
    )
    assert "LossyImageCompression" not in plain


def _ratio_of(ds: pydicom.Dataset) -> float:
    """Bytes of the decoded frames over bytes of their JPEG Baseline codestreams."""
    frames = generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)))
    return float(ds.pixel_array.nbytes) / sum(len(f) for f in frames)


def _values(ds: pydicom.Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]


LOSSY_JPEG_LS = "real/pydicom/SC_rgb_jls_lossy_line.dcm"  # 8-bit RGB, NEAR > 0, unmarked


@pytest.mark.parametrize(
    ("name", "earlier", "methods", "ratios"),
    [
        # Lossless before (RLE, 2 frames): one step, with its ratio.
        ("real/pydicom/SC_rgb_rle_2frame.dcm", {}, ["ISO_10918_1"], 1),
        # Near-lossless JPEG-LS that does not say so: its step has no ratio, so none is given.
        (LOSSY_JPEG_LS, {}, ["ISO_14495_1", "ISO_10918_1"], 0),
        # A data set that names its earlier step and its ratio: one more of each.
        (
            LOSSY_JPEG_LS,
            {"LossyImageCompressionMethod": "ISO_14495_1", "LossyImageCompressionRatio": "2.5"},
            ["ISO_14495_1", "ISO_10918_1"],
            2,
        ),
        # Two earlier steps, one ratio: the ratios cannot be kept in step, none is added.
        (
            LOSSY_JPEG_LS,
            {
                "LossyImageCompressionMethod": ["ISO_15444_1", "ISO_14495_1"],
                "LossyImageCompressionRatio": "2.5",
            },
            ["ISO_15444_1", "ISO_14495_1", "ISO_10918_1"],
            1,
        ),
    ],
)
def test_jpeg_baseline_copy_adds_its_lossy_step(
    samples: Path,
    tmp_path: Path,
    name: str,
    earlier: dict[str, Any],
    methods: list[str],
    ratios: int,
) -> None:
    """PS3.3 C.7.6.1.1.5: a lossy re-encoding is one more value of Lossy Image Compression
    Method, after the earlier steps', with its Lossy Image Compression Ratio (it replaced the
    earlier method and gave no ratio). In memory and streamed, the same bytes."""
    ds = pydicom.dcmread(samples / name)
    if earlier:
        ds.LossyImageCompression = "01"
        for keyword, value in earlier.items():
            setattr(ds, keyword, value)
    src = tmp_path / "src.dcm"
    ds.save_as(src, enforce_file_format=True)
    whole, streamed = tmp_path / "whole.dcm", tmp_path / "streamed.dcm"
    converted_dataset(src, JPEG_BASELINE).save_as(
        whole, implicit_vr=False, little_endian=True, enforce_file_format=True
    )
    to_transfer_syntax(src, streamed, JPEG_BASELINE)
    assert streamed.read_bytes() == whole.read_bytes()
    got = pydicom.dcmread(streamed)
    assert got.LossyImageCompression == "01"
    assert _values(got, "LossyImageCompressionMethod") == methods
    stated = _values(got, "LossyImageCompressionRatio")
    assert len(stated) == ratios
    if ratios == len(methods):  # this step's ratio is the last value
        assert float(stated[-1]) == pytest.approx(_ratio_of(got), abs=0.01)
        assert float(stated[-1]) > 1
        assert stated[:-1] == _values(ds, "LossyImageCompressionRatio")
