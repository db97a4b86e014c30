"""`iccprofile` (PS3.18 8.3.5.1.5) meeting the media type and the profile: the media type
chosen to carry a profile, the largest profile a PNG carries, the profile classes used, and
a rendering that needs no profile reading none. Through the app, on real samples."""

from __future__ import annotations

import gc
import io
import struct
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from dicomweb_server.errors import BadRequestError, NotAcceptableError
from dicomweb_server.iccprofile import MAX_PNG_ICC_PROFILE_BYTES
from dicomweb_server.media.mediatypes import accept_then
from dicomweb_server.render import _encode, _frame_pixels, _image, render_frame
from dicomweb_server.rendered import RenderParams, negotiate_rendered
from dicomweb_server.transcode.frames import read_stored
from tests.test_rendered_icc import (
    JPEG,
    PNG,
    decoded,
    is_srgb,
    padded_profile,
    store,
    swapped_profile,
    variant,
)

pytestmark = pytest.mark.db


def test_negotiation_passes_over_gif_for_a_profile() -> None:
    """An `iccprofile` value other than "no" chooses the first acceptable type that can embed
    a profile: `image/gif, image/png` was a GIF, then a 400 for the GIF."""
    for wanted in ("yes", "srgb", "no,yes", "adobergb,srgb"):
        assert negotiate_rendered("image/gif, image/png", wanted) == "image/png"
        assert negotiate_rendered("image/gif, image/jpeg;q=0.5", wanted) == "image/jpeg"
        assert negotiate_rendered("image/gif, image/*", wanted) == "image/jpeg"
        # the `accept` query parameter's types first, then the header's (PS3.18 8.7.8.1)
        assert negotiate_rendered(accept_then("image/gif", "image/png"), wanted) == "image/png"
    for unwanted in (None, "no", "no,no"):
        assert negotiate_rendered("image/gif, image/png", unwanted) == "image/gif"
    with pytest.raises(BadRequestError) as refused:
        negotiate_rendered("image/gif, text/html", "yes")
    assert "image/gif cannot embed an ICC profile" in refused.value.message
    assert "image/jpeg and image/png can" in refused.value.message
    with pytest.raises(NotAcceptableError):
        negotiate_rendered("text/html", "yes")


async def test_profile_asked_of_gif_and_png(app_client: httpx.AsyncClient, samples: Path) -> None:
    """Through the app: the PNG with the instance's profile, the GIF without one."""
    profile = swapped_profile()
    url = await store(app_client, variant(samples, ICCProfile=profile))
    both = {"Accept": "image/gif, image/png"}
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=both)
    assert decoded(r, "image/png").info["icc_profile"] == profile
    r = await app_client.get(
        url, params={"iccprofile": "srgb", "accept": "image/gif"}, headers=JPEG
    )
    assert is_srgb(decoded(r, "image/jpeg").info["icc_profile"])
    r = await app_client.get(url, params={"iccprofile": "no"}, headers=both)
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers={"Accept": "image/gif"})
    assert r.status_code == 400 and "image/jpeg and image/png can" in r.json()["message"]


async def test_png_carries_what_pillow_reads(app_client: httpx.AsyncClient, samples: Path) -> None:
    """A PNG's iCCP chunk holds at most MAX_PNG_ICC_PROFILE_BYTES, what Pillow opens: a
    profile of that size is embedded; one byte more made a PNG Pillow refused to open (its
    MAX_TEXT_CHUNK). Asked for with "yes", that profile is applied instead: the pixels
    converted to sRGB, the sRGB profile embedded. A JPEG still carries it whole."""
    assert MAX_PNG_ICC_PROFILE_BYTES <= PngImagePlugin.MAX_TEXT_CHUNK
    edge = padded_profile(MAX_PNG_ICC_PROFILE_BYTES)
    url = await store(app_client, variant(samples, ICCProfile=edge))
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=PNG)
    assert decoded(r).info["icc_profile"] == edge
    over = padded_profile(MAX_PNG_ICC_PROFILE_BYTES + 1)
    url = await store(app_client, variant(samples, ICCProfile=over))
    plain = np.asarray(decoded(await app_client.get(url, headers=PNG))).astype(int)
    img = decoded(await app_client.get(url, params={"iccprofile": "yes"}, headers=PNG))
    assert is_srgb(img.info["icc_profile"])
    converted = np.asarray(img).astype(int)
    assert np.abs(converted - plain[..., ::-1]).max() <= 2  # red and blue swapped
    srgb_asked = await app_client.get(url, params={"iccprofile": "srgb"}, headers=PNG)
    assert np.array_equal(np.asarray(decoded(srgb_asked)), np.asarray(img))
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=JPEG)
    assert decoded(r, "image/jpeg").info["icc_profile"] == over


def _lut_profile(device_class: bytes) -> bytes:
    """A minimal ICC v2 profile of `device_class`, RGB to XYZ by an identity lut16Type AToB0
    (ICC.1 10.9): LittleCMS reads it and links it to sRGB whatever the class."""
    ramp = struct.pack(">2H", 0, 0xFFFF)
    clut = [round(v * 0x8000) for r in (0, 1) for g in (0, 1) for b in (0, 1) for v in (r, g, b)]
    a2b0 = (
        b"mft2" + bytes(4) + bytes([3, 3, 2, 0])
        + struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)
        + struct.pack(">HH", 2, 2) + ramp * 3 + struct.pack(">24H", *clut) + ramp * 3
    )  # fmt: skip
    text = b"test\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(78)
    tags = [(b"A2B0", a2b0), (b"desc", desc)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        data += bytes(-(offset + len(data)) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    head = (
        struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000)
        + device_class + b"RGB XYZ " + bytes(12) + b"acspAPPL" + bytes(24)
        + struct.pack(">iii", 63190, 65536, 54061) + b"test"
    )  # fmt: skip
    return head + bytes(128 - len(head)) + struct.pack(">I", len(tags)) + table + data


def _with_class(profile: bytes, device_class: bytes) -> bytes:
    return profile[:12] + device_class + profile[16:]


async def test_profile_classes(app_client: httpx.AsyncClient, samples: Path) -> None:
    """PS3.3 C.11.15.1.1: the ICC Profile is an input device profile. One of an input device
    ("scnr"), display ("mntr") or colour space ("spac") class is used; an abstract, device
    link or output profile, which LittleCMS links all the same, describes no image's colours
    and was embedded as the image's: taken as absent (sRGB, the pixels unchanged)."""
    used = [_with_class(swapped_profile(), c) for c in (b"scnr", b"mntr", b"spac")]
    for profile in [*used, _lut_profile(b"scnr")]:  # the last: as the abst and link below
        url = await store(app_client, variant(samples, ICCProfile=profile))
        r = await app_client.get(url, params={"iccprofile": "yes"}, headers=PNG)
        assert decoded(r).info["icc_profile"] == profile, profile[12:16]
    others = [_lut_profile(b"abst"), _lut_profile(b"link"), _with_class(swapped_profile(), b"prtr")]
    for profile in others:
        url = await store(app_client, variant(samples, ICCProfile=profile))
        plain = np.asarray(decoded(await app_client.get(url, headers=PNG)))
        for value in ("yes", "srgb"):
            for headers in (PNG, JPEG):
                r = await app_client.get(url, params={"iccprofile": value}, headers=headers)
                img = decoded(r, headers["Accept"])
                assert is_srgb(img.info["icc_profile"]), (profile[12:16], value)
                if headers is PNG:
                    assert np.array_equal(np.asarray(img), plain)


def test_profile_not_read_without_iccprofile(tmp_path: Path, samples: Path) -> None:
    """A rendering that embeds no profile does not read the instance's: each one read and held
    the whole ICC Profile value (32 MB here, a stored value may be of any length)."""
    size = 32 * 1024 * 1024
    path = tmp_path / "big.dcm"
    variant(samples, ICCProfile=padded_profile(size)).save_as(path, enforce_file_format=True)
    render_frame(path, 1, RenderParams(icc="no"), "image/png", False)
    gc.collect()
    tracemalloc.start()
    try:
        render_frame(path, 1, RenderParams(icc="no"), "image/png", False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


def test_deflated_header_inflated_to_its_pixel_data(tmp_path: Path, samples: Path) -> None:
    """The header of a Deflated file rendered is read as before, inflated only as far as its
    Pixel Data (read_stored), every value read (pydicom reads a deferred value at its offset
    in the file, which an inflated value has not): its profile is embedded. Asked for with
    values deferred, dcmread inflated the whole file first (40 MB held here, 3.4 MB now)."""
    profile = padded_profile(MAX_PNG_ICC_PROFILE_BYTES)
    ds = variant(samples, ICCProfile=profile, Rows=512, Columns=512, NumberOfFrames=16)
    ds.PixelData = np.random.default_rng(0).bytes(16 * 512 * 512 * 3)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    params = RenderParams(icc="yes")
    data = render_frame(path, 2, params, "image/png", False, scratch=tmp_path)
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == profile
    gc.collect()
    tracemalloc.start()
    try:
        render_frame(path, 2, RenderParams(icc="no"), "image/png", False, scratch=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak


def test_profile_not_read_by_a_first_rendering(tmp_path: Path, samples: Path) -> None:
    """The first rendering of a native file did read its ICC Profile (32 MB here): the place
    of its Pixel Data (_native_value_bytes, kept per file) was found by reading the header
    again, every value read. test_profile_not_read_without_iccprofile measures a second
    rendering; the rendered image is cached (rendering.py), so a first is the usual one."""
    profile = padded_profile(32 * 1024 * 1024)
    for name in ("warm.dcm", "big.dcm"):  # the same data set in two files
        variant(samples, ICCProfile=profile).save_as(tmp_path / name, enforce_file_format=True)
    del profile
    # imports, LittleCMS, Pillow's plugins: not the file measured, whose rendering is its first
    render_frame(tmp_path / "warm.dcm", 1, RenderParams(icc="no"), "image/png", False)
    gc.collect()
    tracemalloc.start()
    try:
        render_frame(tmp_path / "big.dcm", 1, RenderParams(icc="no"), "image/png", False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


def _frame_voi_lut(ds: Dataset) -> Dataset:
    """`ds` with its window in a shared functional group (PS3.3 C.7.6.16.2.10), as an
    enhanced multi-frame image has it."""
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    group = Dataset()
    group.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    return ds


def test_profile_not_read_for_frame_luts_or_palettes(tmp_path: Path, samples: Path) -> None:
    """A rendering that copies the header to give it a frame's LUTs (an enhanced image's
    functional groups) or a palette in little endian order read every value deferred
    (_copy iterated the data set): the 32 MB ICC Profile here, for iccprofile=no. Its LUTs
    and palette are read all the same (the images are those of the header read whole)."""
    ct = _frame_voi_lut(pydicom.dcmread(samples / "real/pydicom/CT_small.dcm"))
    palette = pydicom.dcmread(samples / "real/pydicom/examples_palette.dcm")
    palette.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    params = RenderParams(icc="no")
    for name, ds in (("ct", ct), ("palette", palette)):
        peaks: list[int] = []
        for profile in (None, padded_profile(32 * 1024 * 1024)):
            if profile is not None:
                ds.ICCProfile = profile
            path = tmp_path / f"{name}{len(peaks)}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            whole = read_stored(path, stop_before_pixels=True)
            pixels = _frame_pixels(path, whole, 1, None)
            expected = _encode(_image(pixels, params), "image/png", params.quality)
            del whole, pixels
            assert render_frame(path, 1, params, "image/png", False) == expected
            gc.collect()
            tracemalloc.start()
            try:
                render_frame(path, 1, params, "image/png", False)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        del ds["ICCProfile"]
        assert peaks[1] < peaks[0] + 4 * 1024 * 1024, (name, peaks)
