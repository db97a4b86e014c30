"""Transcoding (issue 4): every decodable sample, frames and instances, to every lossless target
the registry offers, decodes back to exactly pydicom's pixels; lossy within a stated error.
Lossy Image Compression attributes: test_transcode_lossy.py; big endian and 1-bit data:
test_transcode_native.py; what frame reads keep: test_transcode_reads.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomweb_server.transcode import plugins as transcode_plugins
from dicomweb_server.transcode.codecs import ENCODERS, PixelInfo, keeps_ybr
from dicomweb_server.transcode.frames import decode_codestream
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
from tests.transcode_support import JPEG_BASELINE, available

pytestmark = pytest.mark.db

LOSSLESS = [uid for uid, c in ENCODERS.items() if not c.lossy and c.encode is not None]

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
