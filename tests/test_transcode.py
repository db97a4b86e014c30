"""Transcoding (issue 4): every decodable sample, frames and instances, to every lossless target
the registry offers, decodes back to exactly pydicom's pixels; lossy within a stated error."""

from __future__ import annotations

import csv
import io
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import unpack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomweb_server.retrieve import pixeldata
from dicomweb_server.transcode import fragments, inflated
from dicomweb_server.transcode import frames as transcode_frames
from dicomweb_server.transcode import plugins as transcode_plugins
from dicomweb_server.transcode.codecs import ENCODERS, PixelInfo, keeps_ybr
from dicomweb_server.transcode.convert import (
    converted_dataset,
    one_bit_pixel_data,
    to_transfer_syntax,
)
from dicomweb_server.transcode.frames import decode_codestream, frame_array
from dicomweb_server.transcode.lossy import _j2k_wavelet, lossy_method
from dicomweb_server.transcode.plugins import decoding_plugin
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

pytestmark = pytest.mark.db

LOSSLESS = [uid for uid, c in ENCODERS.items() if not c.lossy and c.encode is not None]
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
# Largest mean absolute error allowed for JPEG Baseline at quality 90, in 8-bit levels.
JPEG_MEAN_ABS_ERROR = 3.0
# Frames checked per file and target (first and last), to bound the test time.
MEDIA = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    JPEG_BASELINE: "image/jpeg",
}


def decode(codestream: bytes, ds: pydicom.Dataset, ts: str) -> np.ndarray:
    """Decode one returned frame with pydicom, described as our converted output is: as the
    metadata says (YBR_FULL stays YBR_FULL, converted to RGB here as a client would), colour
    otherwise RGB."""
    spp = int(ds.SamplesPerPixel)
    ybr_full = keeps_ybr(PixelInfo.of(ds), ts)  # samples as the metadata says
    opts: dict[str, Any] = {
        "rows": int(ds.Rows), "columns": int(ds.Columns), "samples_per_pixel": spp,
        "bits_allocated": int(ds.BitsAllocated), "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation), "number_of_frames": 1,
        "photometric_interpretation": "RGB" if spp == 3 and not ybr_full
        else ds.PhotometricInterpretation,
        "planar_configuration": 0,
    }  # fmt: skip
    arr, _ = get_decoder(ts).as_array(encapsulate([codestream]), **opts)
    return arr


def frames_of(ds: pydicom.Dataset) -> np.ndarray:
    arr = ds.pixel_array
    return arr if int(ds.get("NumberOfFrames") or 1) > 1 else arr[np.newaxis]


async def available(client: httpx.AsyncClient, ds: pydicom.Dataset) -> list[str]:
    (meta,) = (await client.get(f"{inst_url(ds)}/metadata")).json()
    return list(meta["00083002"]["Value"])


async def test_every_decodable_sample_to_every_lossless_target(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    with (samples / "MANIFEST.tsv").open() as fh:
        rows = [
            r for r in csv.DictReader(fh, delimiter="\t")
            if r["decodes"] == "yes" and not r["path"].startswith("generated/archive/")
        ]  # fmt: skip
    for i in range(0, len(rows), 40):
        body = multipart_body((samples / r["path"]).read_bytes() for r in rows[i : i + 40])
        r = await app_client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
        assert r.status_code == 200
    problems: list[str] = []
    checked = 0
    for row in rows:
        ds = pydicom.dcmread(samples / row["path"])
        expected = frames_of(ds)
        last = len(expected)
        # the first and last frames; a frame list names each frame once (PS3.18)
        frame_list, wanted = (
            ("1", expected[:1]) if last == 1 else (f"1,{last}", expected[:: last - 1])
        )
        targets = await available(app_client, ds)
        for ts in LOSSLESS:
            if ts not in targets or ts == ds.file_meta.TransferSyntaxUID:
                continue
            accept = f'multipart/related; type="{MEDIA[ts]}"; transfer-syntax={ts}'
            r = await app_client.get(
                f"{inst_url(ds)}/frames/{frame_list}", headers={"Accept": accept}
            )
            try:
                assert r.status_code == 200, r.text
                parts = split_multipart(r.content, r.headers["content-type"])
                assert parts[0][0]["content-type"] == f"{MEDIA[ts]}; transfer-syntax={ts}"
                for (_, data), want in zip(parts, wanted, strict=True):
                    assert np.array_equal(decode(data, ds, ts), want), "pixels differ"
                checked += 1
            except AssertionError as exc:
                problems.append(f"{row['path']} -> {ts}: {exc}")
    assert not problems, "\n".join(problems[:20])
    assert checked > 200


@pytest.mark.parametrize("ts", LOSSLESS)
async def test_whole_instance_in_each_lossless_syntax(
    app_client: httpx.AsyncClient, samples: Path, ts: str
) -> None:
    path = samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm"
    ds = pydicom.dcmread(path)
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={ts}'
    r = await app_client.get(inst_url(ds), headers={"Accept": accept})
    assert r.status_code == 200
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
    out = pydicom.dcmread(io.BytesIO(body))
    assert out.file_meta.TransferSyntaxUID == ts
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(out.pixel_array, ds.pixel_array)


async def test_jpeg_baseline_only_by_name_and_within_error(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    path = samples / "generated/coverage/xa_20frames_8bit.dcm"
    ds = pydicom.dcmread(path)
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    r = await app_client.get(
        f"{inst_url(ds)}/frames/3", headers={"Accept": "multipart/related; type=image/*"}
    )
    assert "image/jpeg" not in r.headers.get("content-type", "")  # never lossy unless named
    # image/jpeg alone is JPEG Lossless SV1, its default (PS3.18 Table 8.7.3-5): exact pixels
    r = await app_client.get(
        f"{inst_url(ds)}/frames/3", headers={"Accept": 'multipart/related; type="image/jpeg"'}
    )
    ((headers, data),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.70"
    assert np.array_equal(decode(data, ds, "1.2.840.10008.1.2.4.70"), ds.pixel_array[2])
    accept = f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_BASELINE}'
    r = await app_client.get(f"{inst_url(ds)}/frames/3", headers={"Accept": accept})
    assert r.status_code == 200
    ((headers, data),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    got = decode(data, ds, JPEG_BASELINE).astype(float)
    err = np.abs(got - ds.pixel_array[2].astype(float)).mean()
    assert err <= JPEG_MEAN_ABS_ERROR, err
    r = await app_client.get(
        inst_url(ds),
        headers={
            "Accept": f"multipart/related; type=application/dicom; transfer-syntax={JPEG_BASELINE}"
        },
    )
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    out = pydicom.dcmread(io.BytesIO(body))
    assert out.LossyImageCompression == "01" and out.SOPInstanceUID == ds.SOPInstanceUID


async def test_impossible_conversions_are_406(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(rows=8, cols=8)  # 16-bit
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    for accept in (
        # JPEG Baseline needs 8-bit data
        f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_BASELINE}',
        'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.91',  # lossy
        'multipart/related; type="video/mp4"',
    ):
        r = await app_client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": accept})
        assert r.status_code == 406, accept
        assert "converted:" in r.json()["message"]


async def test_frame_cache_serves_repeats(app: object, app_client: httpx.AsyncClient) -> None:
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    ds = make_instance(rows=64, cols=64, frames=3)
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    accept = 'multipart/related; type="image/jls"'
    frames = app.state.services.frames
    first = await app_client.get(f"{inst_url(ds)}/frames/2", headers={"Accept": accept})
    assert len(frames) == 1
    again = await app_client.get(f"{inst_url(ds)}/frames/2", headers={"Accept": accept})
    assert len(frames) == 1
    assert split_multipart(first.content, first.headers["content-type"]) == split_multipart(
        again.content, again.headers["content-type"]
    )


async def test_instance_conversion_failure_is_406_not_a_broken_stream(
    app: object, app_client: httpx.AsyncClient
) -> None:
    """W1: the first instance that must be converted is converted before the response starts."""
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    good = make_instance(rows=8, cols=8)
    bad = make_instance(rows=8, cols=8, study=good.StudyInstanceUID)
    bad.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.90")  # JPEG 2000 Lossless
    bad.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # not a codestream
    bad["PixelData"].VR = "OB"
    r = await app_client.post(
        f"{ROOT}/studies",
        content=multipart_body([to_bytes(good), to_bytes(bad)]),
        headers=stow_headers(),
    )
    assert r.status_code == 200
    explicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    for url in (inst_url(bad), f"{ROOT}/studies/{good.StudyInstanceUID}"):
        r = await app_client.get(url, headers={"Accept": explicit})
        assert r.status_code == 406, url
        assert "convert" in r.json()["message"]
    r = await app_client.get(inst_url(good), headers={"Accept": explicit})
    assert r.status_code == 200
    scratch = app.state.services.scratch_dir
    assert [p for p in scratch.iterdir() if p.suffix == ".dcm"] == []


@pytest.mark.parametrize("plugin", ["pyjpegls", "no-such-plugin"])
def test_jpeg_ls_decoded_by_the_preferred_plugin_or_any(
    samples: Path, monkeypatch: pytest.MonkeyPatch, plugin: str
) -> None:
    """JPEG-LS frames decode with pyjpegls (transcode.plugins.PREFERRED_DECODERS), to the same
    pixels as pydicom's own choice; a preferred plugin that fails falls back to any other."""
    ds = pydicom.dcmread(samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm")
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert decoding_plugin(ts) == "pyjpegls"
    monkeypatch.setattr(transcode_plugins, "decoding_plugin", lambda _ts: plugin)
    info = PixelInfo.of(ds)
    codestreams = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    for k in (0, 7):
        got = decode_codestream(codestreams[k], ts, info)
        assert np.array_equal(got, ds.pixel_array[k])


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


@pytest.mark.parametrize(
    "name",
    ["generated/coverage/cr_mono1_explicit_be.dcm", "real/pydicom/SC_rgb_small_odd_big_endian.dcm",
     "real/pydicom-data/gdcm-US-ALOKA-16_big.dcm"],
)  # fmt: skip
def test_big_endian_to_explicit_little_endian(samples: Path, tmp_path: Path, name: str) -> None:
    """A big endian instance asked for in Explicit VR Little Endian: every element re-encoded,
    the pixels swapped (pydicom's save_as refuses to change endianness)."""
    src = samples / name
    dst = tmp_path / "le.dcm"
    to_transfer_syntax(src, dst, ExplicitVRLittleEndian)
    got, original = pydicom.dcmread(dst), pydicom.dcmread(src)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)
    for elem in original:
        if elem.tag.element != 0 and elem.tag != 0x7FE00010:  # group lengths are dropped
            assert same_value(got[elem.tag], elem), elem


# Binary VRs whose words follow the byte order of the transfer syntax (PS3.5 7.3), by width.
WORDS = {"OW": "u2", "OF": "f4", "OL": "u4", "OD": "f8", "OV": "u8"}


def same_value(le: pydicom.DataElement, be: pydicom.DataElement) -> bool:
    """A little endian element holds the big endian one's value: pydicom reads numbers as
    numbers, and keeps OW, OF, OL, OD and OV as the bytes read, each in its own order."""
    if be.VR == "SQ":
        return len(le.value) == len(be.value) and all(
            all(same_value(a[e.tag], e) for e in b if e.tag.element != 0)
            for a, b in zip(le.value, be.value, strict=True)
        )
    if be.VR in WORDS and isinstance(be.value, bytes):
        kind = WORDS[be.VR]
        return bool(
            np.array_equal(np.frombuffer(le.value, f"<{kind}"), np.frombuffer(be.value, f">{kind}"))
        )
    return bool(le.value == be.value)


def test_big_endian_binary_values_swapped(samples: Path, tmp_path: Path) -> None:
    """The OW palette of a big endian instance, and OW, OF, OL, OD and OV values nested in
    items, come out little endian (they were copied as read: a palette's [0 256 256] came out
    [0 1 1]); the result equals the same image stored little endian."""
    dst = tmp_path / "le.dcm"
    pydicom_data = samples / "real/pydicom-data"
    to_transfer_syntax(pydicom_data / "OBXXXX1A_expb.dcm", dst, ExplicitVRLittleEndian)
    got, stored_le = pydicom.dcmread(dst), pydicom.dcmread(pydicom_data / "OBXXXX1A.dcm")
    assert np.frombuffer(got.RedPaletteColorLookupTableData, "<u2")[:3].tolist() == [0, 256, 256]
    for elem in stored_le:
        if elem.tag.element != 0 and elem.keyword != "SOPInstanceUID":
            assert got[elem.tag].value == elem.value, elem
    # Nested values, written big endian by hand (pydicom writes bytes values as given).
    ds = make_instance(rows=4, cols=4)
    item = pydicom.Dataset()
    values = {
        0x00640009: ("OF", np.array([1.5, -2.25], ">f4")),  # Vector Grid Data
        0x00660040: ("OL", np.array([1, 70000], ">u4")),  # Long Primitive Point Index List
        0x00660022: ("OD", np.array([0.5, 3e9], ">f8")),  # Double Point Coordinates Data
        0x00720081: ("OV", np.array([1, 2**40], ">u8")),  # Selector OV Value
        0x00281201: ("OW", np.array([0, 256, 65280], ">u2")),  # Red Palette ... Data
    }
    for tag, (vr, arr) in values.items():
        item.add_new(tag, vr, arr.tobytes())
    ds.add_new(0x00081115, "SQ", [item])  # Referenced Series Sequence
    src = tmp_path / "be.dcm"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    pydicom.dcmwrite(src, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    to_transfer_syntax(src, dst, ExplicitVRLittleEndian)
    out = pydicom.dcmread(dst)
    (nested,) = out[0x00081115].value
    for tag, (_, arr) in values.items():
        assert np.frombuffer(nested[tag].value, arr.dtype.newbyteorder("<")).tolist() == (
            arr.tolist()
        ), hex(tag)
    assert np.array_equal(out.pixel_array, pydicom.dcmread(src).pixel_array)


# 1-bit instances compressed, and the same image stored uncompressed (PS3.5 8.1.1: bit-packed,
# the frames following each other with no padding, 510 x 510 not ending on a byte).
ONE_BIT = {
    "liver_j2k.dcm": "liver.dcm",
    "liver_nonbyte_aligned_j2k.dcm": "liver_nonbyte_aligned.dcm",
    "liver_rle.dcm": "liver.dcm",  # 1-bit RLE: pydicom's decoders refuse it
    "liver_nonbyte_aligned_rle.dcm": "liver_nonbyte_aligned.dcm",
}


@pytest.mark.parametrize("name", ONE_BIT)
def test_one_bit_compressed_decoded_bit_packed(samples: Path, name: str) -> None:
    """A 1-bit instance decoded (WADO and DIMSE conversions) is bit-packed as Bits Allocated 1
    says; it held a byte per pixel (pydicom's decompress), and 1-bit RLE was not decoded."""
    pydicom_data = samples / "real/pydicom-data"
    native = pydicom.dcmread(pydicom_data / ONE_BIT[name])
    got = converted_dataset(pydicom_data / name, ExplicitVRLittleEndian)
    assert got.BitsAllocated == 1 and got["PixelData"].VR == "OB"
    assert got.PixelData == native.PixelData
    assert np.array_equal(got.pixel_array, native.pixel_array)
    header = pydicom.dcmread(pydicom_data / name, stop_before_pixels=True)
    frame = frame_array(pydicom_data / name, header, 2)  # rendered, frames
    assert np.array_equal(frame, native.pixel_array[1])


async def test_one_bit_rle_retrieved_as_its_metadata_offers(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A 1-bit RLE instance's metadata offers Explicit VR Little Endian, and the instance and
    its frames are sent so (it was a 406): the frames bit-packed each on its own."""
    pydicom_data = samples / "real/pydicom-data"
    path = pydicom_data / "liver_nonbyte_aligned_rle.dcm"
    ds = pydicom.dcmread(path)
    native = pydicom.dcmread(pydicom_data / "liver_nonbyte_aligned.dcm")
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200
    assert ExplicitVRLittleEndian in await available(app_client, ds)
    r = await app_client.get(
        inst_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    out = pydicom.dcmread(io.BytesIO(body))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(out.pixel_array, native.pixel_array)
    accept = 'multipart/related; type="application/octet-stream"'
    r = await app_client.get(f"{inst_url(ds)}/frames/3", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((_, frame),) = split_multipart(r.content, r.headers["content-type"])
    pixels = int(ds.Rows) * int(ds.Columns)
    assert np.array_equal(unpack_bits(frame)[:pixels], native.pixel_array[2].ravel())


@pytest.mark.parametrize(
    "name", [*ONE_BIT, "liver.dcm", "liver_nonbyte_aligned.dcm", "liver_expb.dcm"]
)
async def test_one_bit_pixel_data_bulk_value_is_its_uncompressed_value(
    app_client: httpx.AsyncClient, samples: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PS3.18 8.7.3.3: the uncompressed bulk value of Pixel Data is the element's value in
    Explicit VR Little Endian, for 1-bit data the frames bit-packed as one run (PS3.5 8.1.1,
    510 x 510 frames not starting on a byte): what the same image stored uncompressed holds.
    It was a 406 ("no byte-aligned uncompressed form") for 1-bit data stored compressed;
    stored uncompressed it is the stored value (byte-swapped from big endian: OB, none)."""
    pydicom_data = samples / "real/pydicom-data"
    path = pydicom_data / name
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    native = pydicom.dcmread(pydicom_data / ONE_BIT.get(name, name.replace("_expb", "")))
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    value = f"{inst_url(ds)}/bulk/7FE00010"
    with monkeypatch.context() as m:  # a HEAD decodes nothing
        m.setattr(pixeldata, "one_bit_pixel_data", None)
        r = await app_client.head(value, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-length"] == str(len(native.PixelData))
    r = await app_client.get(value, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.content == native.PixelData
    r = await app_client.get(
        value, headers={"Accept": "application/octet-stream", "Range": "bytes=40000-40009"}
    )
    assert r.status_code == 206 and r.content == native.PixelData[40000:40010]
    for url in (value, f"{inst_url(ds)}/pixeldata", f"{inst_url(ds)}/bulkdata"):
        r = await app_client.get(
            url, headers={"Accept": 'multipart/related; type="application/octet-stream"'}
        )
        assert r.status_code == 200, (url, r.text)
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert body == native.PixelData, url
        assert headers["content-location"].endswith(f"{ds.SOPInstanceUID}/bulk/7FE00010"), url


def test_one_bit_pixel_data_made_whole(samples: Path) -> None:
    """one_bit_pixel_data: the frames decoded and bit-packed as one run, padded to an even
    length (510 x 510 x 3 bits are 97537.5 bytes: 97538)."""
    pydicom_data = samples / "real/pydicom-data"
    for name, stored in ONE_BIT.items():
        data = one_bit_pixel_data(pydicom_data / name)
        assert data == pydicom.dcmread(pydicom_data / stored).PixelData, name
        assert len(data) % 2 == 0


async def test_undecodable_instances_as_stored_when_the_client_names_no_type(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A SEG in Deflated Image Frame Compression (no decoder here): its frames as stored are
    octet-stream with their transfer syntax, never a 406 (field notes 3), and a retrieve with
    no Accept sends the instance as stored instead of refusing it."""
    path = samples / "real/pydicom-data/liver_deflate.dcm"
    data = path.read_bytes()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200
    ds = pydicom.dcmread(path)
    ts = "1.2.840.10008.1.2.8.1"
    stored = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = await app_client.get(f"{inst_url(ds)}/frames/2", headers={"Accept": stored})
    assert r.status_code == 200, r.text
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={ts}"
    assert body == list(generate_frames(ds.PixelData, number_of_frames=3))[1]
    for accept in ({}, {"Accept": "*/*"}):
        r = await app_client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}", headers=accept)
        assert r.status_code == 200, (accept, r.text)
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
        assert body == data
    # Named application/dicom means Explicit VR Little Endian (PS3.18 8.7.3.5.2): 406, why.
    r = await app_client.get(
        inst_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert r.status_code == 406 and ts in r.json()["message"]


async def test_instances_a_decoder_fails_on_go_as_stored_when_the_client_names_no_type(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A 12-bit JPEG Extended instance that the installed decoders refuse, although its
    transfer syntax has decoders (found by interop review: `curl {study}` broke off mid-body
    at it, curl exit 18, and its instance and frame URLs were 406). With no Accept or `*/*`
    it is sent as stored, as when no decoder exists (field notes 3); the other instances of
    the study still converted. Named Explicit VR Little Endian stays a 406 for it. (The
    file itself is decoded now, by the fallback's libjpeg-turbo: its scan header is damaged
    here, component 9 named, which every installed decoder refuses.)"""
    raw = undecodable_jpeg((samples / "real" / "pydicom" / "JPEG-lossy.dcm").read_bytes())
    lossy = pydicom.dcmread(io.BytesIO(raw))
    stored_ts = lossy.file_meta.TransferSyntaxUID
    # Before it in the study (Instance Number 1 < 5), one that converts: the failure comes
    # after the response has started.
    before = make_instance(
        study=lossy.StudyInstanceUID, series=lossy.SeriesInstanceUID, rows=8, cols=8
    )
    before.compress(pydicom.uid.RLELossless)
    r = await app_client.post(
        f"{ROOT}/studies",
        content=multipart_body([to_bytes(before), raw]),
        headers=stow_headers(),
    )
    assert r.status_code == 200, r.text
    for accept in ({}, {"Accept": "*/*"}):
        r = await app_client.get(f"{ROOT}/studies/{lossy.StudyInstanceUID}", headers=accept)
        assert r.status_code == 200 and r.content.endswith(b"--\r\n"), accept  # whole
        parts = split_multipart(r.content, r.headers["content-type"])
        assert [h["content-type"] for h, _ in parts] == [
            f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}",
            f"application/dicom; transfer-syntax={stored_ts}",
        ], accept
        assert parts[1][1] == raw
        r = await app_client.get(inst_url(lossy), headers=accept)
        assert r.status_code == 200, (accept, r.text)
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert headers["content-type"] == f"application/dicom; transfer-syntax={stored_ts}"
        r = await app_client.get(f"{inst_url(lossy)}/frames/1", headers=accept)
        assert r.status_code == 200, (accept, r.text)
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert headers["content-type"] == f"image/jpeg; transfer-syntax={stored_ts}"
        assert body == next(generate_frames(lossy.PixelData, number_of_frames=1))
    for url, accept_ in (
        (inst_url(lossy), 'multipart/related; type="application/dicom"'),
        (f"{inst_url(lossy)}/frames/1", 'multipart/related; type="application/octet-stream"'),
    ):
        r = await app_client.get(url, headers={"Accept": accept_})
        assert r.status_code == 406 and "cannot" in r.json()["message"], url


def _cod(codestream: bytes) -> tuple[int, int]:
    """(progression order, decomposition levels) of a JPEG 2000 codestream's COD segment."""
    at = codestream.index(b"\xff\x52")  # ISO/IEC 15444-1 A.6.1: Lcod, Scod, SGcod, SPcod
    return codestream[at + 5], codestream[at + 9]


@pytest.mark.parametrize(("rows", "cols", "decompositions"), [(8, 8, 5), (2, 4100, 7)])
async def test_htj2k_rpcl_for_progressive_loading(
    app_client: httpx.AsyncClient, rows: int, cols: int, decompositions: int
) -> None:
    """HTJ2K Lossless RPCL (PS3.5 10.18, field notes 6): RPCL order, Tile Length Markers, a
    tile-part per resolution, the lowest resolution at most 64 pixels a side; lossless."""
    import imagecodecs

    from dicomweb_server.transcode.codecs import HTJ2K_DECOMPOSITIONS, HTJ2K_RPCL_BASE_PIXELS

    ds = make_instance(rows=rows, cols=cols)
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    rpcl = "1.2.840.10008.1.2.4.202"
    accept = f'multipart/related; type="image/jphc"; transfer-syntax={rpcl}'
    r = await app_client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((headers, codestream),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == f"image/jphc; transfer-syntax={rpcl}"
    order, levels = _cod(codestream)
    assert order == 2  # RPCL (ISO/IEC 15444-1 Table A.16)
    assert levels == decompositions == max(HTJ2K_DECOMPOSITIONS, levels)
    assert max(rows, cols) / 2**levels <= HTJ2K_RPCL_BASE_PIXELS
    assert codestream.count(b"\xff\x55") >= 1  # TLM
    assert codestream.count(b"\xff\x90") == levels + 1  # a tile-part (SOT) per resolution
    assert np.array_equal(imagecodecs.htj2k_decode(codestream), ds.pixel_array)
    any_htj2k = 'multipart/related; type="image/jphc"; transfer-syntax=1.2.840.10008.1.2.4.203'
    r = await app_client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": any_htj2k})
    ((_, codestream),) = split_multipart(r.content, r.headers["content-type"])
    assert np.array_equal(imagecodecs.htj2k_decode(codestream), ds.pixel_array)


async def test_image_wildcard_gets_a_lossless_image_type(app_client: httpx.AsyncClient) -> None:
    """`type=image/*` on native frames names no syntax: a lossless image type is made (it was
    a 406), never JPEG Baseline."""
    ds = make_instance(rows=16, cols=16)
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    r = await app_client.get(
        f"{inst_url(ds)}/frames/1", headers={"Accept": 'multipart/related; type="image/*"'}
    )
    assert r.status_code == 200, r.text
    ((headers, data),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    assert np.array_equal(decode(data, ds, "1.2.840.10008.1.2.4.80"), ds.pixel_array)


def test_frames_of_a_deflated_file_inflate_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every frame of a Deflated file converted one at a time (a frame list, the frames of
    one request each) inflates the file once, into its copy (transcode.inflated), never
    whole by pydicom: the header each conversion reads inflates only the data set before
    the Pixel Data. dcmread inflated the whole file for it: a 120-frame instance was
    inflated 121 times (51 s)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_instance(frames=16, rows=64, cols=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(inflated, "_copies", type(inflated._copies)())
    inflated_whole = 0  # bytes made by pydicom's inflate of the whole data set
    real = zlib.decompress

    def counting(*args: Any, **kwargs: Any) -> bytes:
        nonlocal inflated_whole
        out = real(*args, **kwargs)
        inflated_whole += len(out)
        return out

    monkeypatch.setattr(zlib, "decompress", counting)
    expected = ds.pixel_array
    for n in range(1, 17):
        (frame,) = transcode_frames.decode_frames(path, [n], tmp_path)
        assert frame == expected[n - 1].tobytes()
    assert inflated_whole == 0
    (copy,) = inflated._copies.values()
    assert copy.path.parent == tmp_path
    # The header alone inflates nothing whole, and is the header dcmread reads.
    head = transcode_frames.read_stored(path, stop_before_pixels=True)
    assert inflated_whole == 0
    whole = pydicom.dcmread(path, stop_before_pixels=True)
    assert head == whole and head.file_meta == whole.file_meta
    assert head.original_encoding == whole.original_encoding == (False, True)
    assert head.preamble == whole.preamble and "PixelData" not in head


def test_deflated_header_keeps_the_end_of_the_stream(tmp_path: Path) -> None:
    """A Deflated data set without Pixel Data ending in zeros: the header read inflated step
    by step (_Inflating) holds all of it, as dcmread does. Once the file was all read, the
    inflater's last output was left in it when a step's output was full: the private value
    below came back 65,464 bytes of 65,516, silently (found by review). A stream cut short
    is an error, as it is for dcmread."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = "1.2.3"
    ds.StudyDescription = ""
    ds.add_new(0x00091011, "OB", bytes(65516))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    head = transcode_frames.read_stored(path, stop_before_pixels=True)
    assert head == pydicom.dcmread(path, stop_before_pixels=True)
    assert len(head[0x00091011].value) == 65516
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(zlib.error):
        pydicom.dcmread(path, stop_before_pixels=True)
    with pytest.raises(zlib.error):
        transcode_frames.read_stored(path, stop_before_pixels=True)


def test_files_decoded_whole_are_kept_up_to_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files decoded whole for their frames (1-bit RLE, files pydicom reads only whole) are
    kept, least recently used dropped, WHOLE_FILE_KEEP_MAX_BYTES in all: one file was kept,
    so the frames of two such files read in turn (two clients) decoded each file again for
    every frame. At the edge: two files of 2048 decoded bytes are both kept at 4096, and at
    a byte less each frame decodes its file again."""
    reads = 0
    real = pydicom.dcmread

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return real(*args, **kwargs)

    files = []
    for k, name in enumerate(("a.dcm", "b.dcm")):
        ds = make_instance(frames=16, rows=8, cols=8)
        rng = np.random.default_rng(k)
        ds.PixelData = rng.integers(0, 4096, (16, 8, 8), dtype=np.uint16).tobytes()
        ds.save_as(tmp_path / name, enforce_file_format=True)
        files.append((tmp_path / name, ds.pixel_array))
    monkeypatch.setattr(pydicom, "dcmread", counting)
    both = sum(expected.nbytes for _, expected in files)
    for limit, decodes in ((both, 2), (both - 1, 32)):
        monkeypatch.setattr(transcode_frames, "_whole", type(transcode_frames._whole)())
        monkeypatch.setattr(transcode_frames, "WHOLE_FILE_KEEP_MAX_BYTES", limit)
        reads = 0
        for n in range(1, 17):
            for path, expected in files:
                frame = transcode_frames._whole_file_frame(path, n, True)
                assert np.array_equal(frame, expected[n - 1])
                frame[...] = 0  # a copy: the decoded file is not changed for the next caller
        assert reads == decodes, limit


def test_frame_maps_are_kept_for_frame_map_files_files(tmp_path: Path, samples: Path) -> None:
    """frame_map keeps the places it found for FRAME_MAP_FILES files, the least recently
    used dropped for one more (the limit at its edge); a place is an item run whose values
    are the frame (15 frames of two fragments each, no offset table)."""
    ds = pydicom.dcmread(samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=15))
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    paths = [tmp_path / f"{n}.dcm" for n in range(fragments.FRAME_MAP_FILES + 1)]
    for path in paths:
        ds.save_as(path, enforce_file_format=True)
    cached = fragments._frame_map_of
    cached.cache_clear()
    found = fragments.frame_map(paths[0])
    assert found is not None
    data = paths[0].read_bytes()
    for frame, offset, length in zip(frames, *found, strict=True):
        run = data[offset : offset + length] + b"\xfe\xff\xdd\xe0"  # its items, delimited
        assert b"".join(generate_fragments(run)) == frame
    for path in paths[1:-1]:
        assert fragments.frame_map(path) == found
    for path in paths[:-1]:
        fragments.frame_map(path)
    info = cached.cache_info()
    assert (info.misses, info.hits, info.currsize) == (
        len(paths) - 1,
        len(paths) - 1,
        len(paths) - 1,
    )
    fragments.frame_map(paths[-1])  # one more: paths[0], used least recently, dropped
    fragments.frame_map(paths[1])
    assert cached.cache_info().hits == len(paths)
    fragments.frame_map(paths[0])
    assert cached.cache_info().misses == len(paths) + 1
