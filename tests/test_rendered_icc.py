"""`iccprofile` of the rendered resources (PS3.18 8.3.5.1.5), through the app on real samples:
"yes" embeds the instance's ICC Profile (0028,2000), "srgb" converts the pixels from it to sRGB
and embeds an sRGB profile, "no" (and no parameter) embeds none; Adobe RGB and ROMM RGB, which
this server has no profile of, are a 400 unless the request lists a value it applies."""

from __future__ import annotations

import gc
import io
import re
import struct
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageCms
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dicomweb_server.iccprofile import MAX_ICC_PROFILE_BYTES, colour_managed
from tests.helpers import ROOT, inst_url, multipart_body, stow_headers

pytestmark = pytest.mark.db

RGB = "real/pydicom-data/SC_rgb.dcm"  # 100 x 100, 8-bit RGB bars
CT = "real/pydicom/CT_small.dcm"
PNG = {"Accept": "image/png"}
JPEG = {"Accept": "image/jpeg"}


def srgb() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def is_srgb(profile: bytes) -> bool:
    """LittleCMS's sRGB profile: the same bytes but for its header's creation date and time
    (bytes 24 to 35), which it writes when the profile is made."""
    ours = srgb()
    return profile[:24] + profile[36:] == ours[:24] + ours[36:]


def swapped_profile() -> bytes:
    """An RGB profile whose red and blue primaries are sRGB's blue and red: its image shown
    in sRGB has red and blue swapped, which no rounding can hide. The tag table of LittleCMS's
    sRGB profile, rXYZ pointing at bXYZ's data and the other way round."""
    data = bytearray(srgb())
    (count,) = struct.unpack_from(">I", data, 128)
    entries = {bytes(data[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red + 4 : red + 12], data[blue + 4 : blue + 12] = (
        data[blue + 4 : blue + 12],
        data[red + 4 : red + 12],
    )
    data[44:48] = b"test"  # not the sRGB profile's bytes, whatever its ID
    return bytes(data)


async def store(client: httpx.AsyncClient, ds: Dataset) -> str:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = await client.post(
        f"{ROOT}/studies", content=multipart_body([buf.getvalue()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    return f"{inst_url(ds)}/rendered"


def variant(samples: Path, **values: object) -> Dataset:
    """SC_rgb.dcm as another instance, with `values` set."""
    ds = pydicom.dcmread(samples / RGB)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def decoded(r: httpx.Response, media: str = "image/png") -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media
    return Image.open(io.BytesIO(r.content))


async def test_yes_embeds_the_instance_profile(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    profile = swapped_profile()
    url = await store(app_client, variant(samples, ICCProfile=profile))
    plain = decoded(await app_client.get(url, headers=PNG))
    assert "icc_profile" not in plain.info
    for headers, media in ((PNG, "image/png"), (JPEG, "image/jpeg")):
        r = await app_client.get(url, params={"iccprofile": "yes"}, headers=headers)
        img = decoded(r, media)
        assert img.info["icc_profile"] == profile
        assert "warning" not in r.headers
    # The pixels the profile describes: those sent without it.
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=PNG)
    assert np.array_equal(np.asarray(decoded(r)), np.asarray(plain))
    r = await app_client.get(url, params={"iccprofile": "no"}, headers=PNG)
    assert "icc_profile" not in decoded(r).info


async def test_srgb_converts_from_the_instance_profile(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    url = await store(app_client, variant(samples, ICCProfile=swapped_profile()))
    plain = np.asarray(decoded(await app_client.get(url, headers=PNG))).astype(int)
    img = decoded(await app_client.get(url, params={"iccprofile": "srgb"}, headers=PNG))
    assert is_srgb(img.info["icc_profile"])
    converted = np.asarray(img).astype(int)
    assert np.abs(converted - plain[..., ::-1]).max() <= 2  # red and blue swapped
    assert np.abs(converted - plain).max() > 100
    r = await app_client.get(url, params={"iccprofile": "srgb"}, headers=JPEG)
    assert is_srgb(decoded(r, "image/jpeg").info["icc_profile"])


async def test_without_an_instance_profile(app_client: httpx.AsyncClient, samples: Path) -> None:
    """No ICC Profile in the instance: "yes" and "srgb" embed sRGB, the pixels unchanged
    (8.3.5.1.5's last choice, a well-known color space appropriate to the image). A greyscale
    rendering comes as RGB, R = G = B, to carry the RGB profile."""
    url = await store(app_client, variant(samples))
    plain = np.asarray(decoded(await app_client.get(url, headers=PNG)))
    for value in ("yes", "srgb"):
        img = decoded(await app_client.get(url, params={"iccprofile": value}, headers=PNG))
        assert is_srgb(img.info["icc_profile"])
        assert np.array_equal(np.asarray(img), plain)
    data = (samples / CT).read_bytes()
    ct = await store(app_client, pydicom.dcmread(io.BytesIO(data)))
    grey = np.asarray(decoded(await app_client.get(ct, headers=PNG)))
    assert grey.ndim == 2
    for value in ("yes", "srgb"):
        img = decoded(await app_client.get(ct, params={"iccprofile": value}, headers=PNG))
        assert img.mode == "RGB" and is_srgb(img.info["icc_profile"])
        assert all(np.array_equal(np.asarray(img)[..., c], grey) for c in range(3))
    r = await app_client.get(ct, params={"iccprofile": "srgb"}, headers=JPEG)
    assert is_srgb(decoded(r, "image/jpeg").info["icc_profile"])


async def test_profile_of_the_frame_optical_path(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A whole slide image keeps its ICC Profile in the Optical Path Sequence item its frames'
    Optical Path Identification names (PS3.3 C.8.12.5, C.8.12.6.1)."""
    profile = swapped_profile()
    paths = Sequence([Dataset(), Dataset()])
    paths[0].OpticalPathIdentifier, paths[0].ICCProfile = "1", srgb()
    paths[1].OpticalPathIdentifier, paths[1].ICCProfile = "2", profile
    ident = Dataset()
    ident.OpticalPathIdentificationSequence = Sequence([Dataset()])
    ident.OpticalPathIdentificationSequence[0].OpticalPathIdentifier = "2"
    url = await store(
        app_client,
        variant(
            samples,
            OpticalPathSequence=paths,
            SharedFunctionalGroupsSequence=Sequence([ident]),
        ),
    )
    img = decoded(await app_client.get(url, params={"iccprofile": "yes"}, headers=PNG))
    assert img.info["icc_profile"] == profile


async def test_adobe_and_romm_rgb(app_client: httpx.AsyncClient, samples: Path) -> None:
    """No Adobe RGB or ROMM RGB profile here: a 400 naming what is applied; in a list, the
    first value applied is (the list is the client's order of preference)."""
    url = await store(app_client, variant(samples, ICCProfile=swapped_profile()))
    for value in ("adobergb", "rommrgb", "rommrgb,adobergb"):
        r = await app_client.get(url, params={"iccprofile": value}, headers=PNG)
        assert r.status_code == 400, r.text
        message = r.json()["message"]
        assert "iccprofile" in message and "not supported" in message and "srgb" in message
    r = await app_client.get(url, params={"iccprofile": "adobergb,srgb"}, headers=PNG)
    assert is_srgb(decoded(r).info["icc_profile"])
    r = await app_client.get(url, params={"iccprofile": "adobergb,no,srgb"}, headers=PNG)
    assert "icc_profile" not in decoded(r).info


async def test_openapi_iccprofile(app_client: httpx.AsyncClient) -> None:
    """The OpenAPI description lists `iccprofile`, now applied, with the values it takes."""
    doc = (await app_client.get("/openapi.json")).json()
    schemas = [
        p["schema"]
        for path, ops in doc["paths"].items()
        if path.endswith(("/rendered", "/thumbnail"))
        for op in ops.values()
        for p in op["parameters"]
        if p["name"] == "iccprofile"
    ]
    assert schemas
    for schema in schemas:
        for value in ("no", "yes", "srgb", "adobergb,srgb", "rommrgb"):
            assert re.fullmatch(schema["pattern"], value), value
        for value in ("", "YES", "srgb,", "x"):
            assert not re.fullmatch(schema["pattern"], value), value


def unlinkable_profile() -> bytes:
    """sRGB's profile without its colorant and curve tags (renamed): LittleCMS opens it, but
    cannot link it to another."""
    data = bytearray(srgb())
    (count,) = struct.unpack_from(">I", data, 128)
    for i in range(count):
        at = 132 + 12 * i
        if bytes(data[at + 1 : at + 4]) in (b"XYZ", b"TRC") and data[at] in b"rgb":
            data[at : at + 4] = b"zz%02d" % i
    return bytes(data)


async def test_unreadable_instance_profile(app_client: httpx.AsyncClient, samples: Path) -> None:
    """An ICC Profile LittleCMS cannot read (an RGB signature, garbage otherwise), or link to
    sRGB (opened, but "cannot build transform": a 500 for srgb), or one not of RGB, is taken
    as absent: sRGB, never a 5xx."""
    garbage = bytes(16) + b"RGB " + bytes(108)
    grey = b"\x00" * 16 + b"GRAY" + srgb()[20:]
    for profile in (garbage, unlinkable_profile(), grey):
        url = await store(app_client, variant(samples, ICCProfile=profile))
        for value in ("yes", "srgb"):
            for headers in (PNG, JPEG):
                r = await app_client.get(url, params={"iccprofile": value}, headers=headers)
                assert is_srgb(decoded(r, headers["Accept"]).info["icc_profile"])


async def test_large_instance_profile_in_jpeg(app_client: httpx.AsyncClient, samples: Path) -> None:
    """A profile larger than one JPEG APP2 segment (65519 bytes of profile, ISO 15076-1 B.4)
    is sent in several, read back whole."""
    profile = bytearray(swapped_profile())
    profile += bytes(200_000)
    profile[0:4] = struct.pack(">I", len(profile))
    url = await store(app_client, variant(samples, ICCProfile=bytes(profile)))
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=JPEG)
    assert decoded(r, "image/jpeg").info["icc_profile"] == bytes(profile)


async def test_icon_thumbnail(app_client: httpx.AsyncClient, samples: Path) -> None:
    """The icon that stands for an instance without pixel data (a report) is sRGB: asked for
    with `yes` or `srgb`, it carries the sRGB profile; with `no`, none."""
    ds = pydicom.dcmread(samples / "real/pydicom/reportsi.dcm")
    url = (await store(app_client, ds)).replace("/rendered", "/thumbnail")
    for value in ("yes", "srgb"):
        r = await app_client.get(url, params={"iccprofile": value}, headers=PNG)
        assert is_srgb(decoded(r).info["icc_profile"])
    r = await app_client.get(url, params={"iccprofile": "no"}, headers=PNG)
    assert "icc_profile" not in decoded(r).info


def padded_profile(size: int) -> bytes:
    """The swapped profile padded with zeros to `size` bytes, its header's Profile Size
    saying so: LittleCMS reads it (it reads the tags the tag table names)."""
    profile = bytearray(swapped_profile())
    profile += bytes(size - len(profile))
    profile[0:4] = struct.pack(">I", size)
    return bytes(profile)


async def test_instance_profile_at_most_what_a_jpeg_carries(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A JPEG carries 255 APP2 segments of profile (ISO 15076-1 B.4: a one-byte count): a
    profile of MAX_ICC_PROFILE_BYTES is sent whole; one byte more is taken as absent (sRGB),
    in PNG too. It was embedded in 256 segments, their count written as 0, and a reader found
    no profile in the JPEG."""
    edge = padded_profile(MAX_ICC_PROFILE_BYTES)
    url = await store(app_client, variant(samples, ICCProfile=edge))
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=JPEG)
    assert decoded(r, "image/jpeg").info["icc_profile"] == edge
    over = padded_profile(MAX_ICC_PROFILE_BYTES + 1)
    url = await store(app_client, variant(samples, ICCProfile=over))
    plain = np.asarray(decoded(await app_client.get(url, headers=PNG)))
    for headers in (JPEG, PNG):
        r = await app_client.get(url, params={"iccprofile": "yes"}, headers=headers)
        assert is_srgb(decoded(r, headers["Accept"]).info["icc_profile"])
    r = await app_client.get(url, params={"iccprofile": "srgb"}, headers=PNG)
    img = decoded(r)
    assert is_srgb(img.info["icc_profile"]) and np.array_equal(np.asarray(img), plain)


def test_judged_profiles_not_kept(samples: Path) -> None:
    """The profiles judged usable are remembered by digest, not kept: sixteen renderings of
    instances of 4 MB profiles left 64 MB held after their data sets were gone."""
    img = Image.new("RGB", (8, 8), (200, 40, 10))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(16):
            ds = variant(samples, ICCProfile=padded_profile(4_000_000 + 4 * n))
            out, profile = colour_managed(img, ds, 1, "yes", "image/jpeg")
            assert profile is not None and len(profile) == 4_000_000 + 4 * n
            del ds, out, profile
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4_000_000, held
