"""Limits and refusals of the rendered, thumbnail and bulk data resources: every bad request
is a 4xx with a reason, memory stays bounded, and a thumbnail is never an error."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from dicomweb_server.bulkvalue import read_bulk_value
from dicomweb_server.errors import BadRequestError
from dicomweb_server.render import MAX_ANIMATION_FRAMES
from dicomweb_server.rendered import (
    MAX_ANIMATION_PIXELS,
    MAX_REGION_EDGE,
    MAX_REGION_VALUE_CHARS,
    MAX_VIEWPORT_PIXELS,
    THUMBNAIL_SIZE,
    RenderParams,
    check_animation,
    output_size,
    parse_render_params,
    region_box,
)
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

VIDEO_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
VIDEO_MICROSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.2.1"
VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
MPEG4_AVC_HIGH = "1.2.840.10008.1.2.4.102"


async def stow(client: httpx.AsyncClient, *files: bytes) -> None:
    r = await client.post(f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers())
    assert r.status_code == 200, r.text


def image(r: httpx.Response, media: str = "image/jpeg") -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media
    return Image.open(io.BytesIO(r.content))


def refused(r: httpx.Response, status: int, *words: str) -> None:
    """A JSON error of `status` whose message says why (and names `words`)."""
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["message"]
    assert message
    for word in words:
        assert word in message, message


# Bulk data paths (PS3.18 8.4.1.3): a path that names no bulk data value is a 404.

NESTED_VALUE = bytes(range(256)) * 8  # 2048 bytes: over the bulk data threshold


def with_nested_bulk() -> Dataset:
    ds = make_instance(rows=32, cols=32)
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.EncapsulatedDocument = NESTED_VALUE  # (0042,0011) OB
    ds.ReferencedImageSequence = [item]  # (0008,1140)
    return ds


BAD_BULK_PATHS = [
    "00100010/1/00100010",  # walks into Patient's Name, not a sequence
    "7FE00010/0/00000000",  # walks into the Pixel Data bytes
    "7FE00010/0/7FE00010/0/7FE00010",
    "00081140/1/00420011",  # no item 1
    "00081140/999999/00420011",
    "00081140/0/00100010",  # no such element in the item
    "00081140/0/00420011/0/00420011",  # walks into a bulk value
    "00081140",  # a sequence, not a value
    "00100020",  # Patient ID: a string, not bulk data
    "00280010",  # Rows: a number
    "FFFFFFFF",
]
MALFORMED_BULK_PATHS = ["00081140/0", "0008114/0/00420011", "00081140/-1/00420011", "x", ""]


async def test_bulk_paths_that_name_no_value_are_404(app_client: httpx.AsyncClient) -> None:
    ds = with_nested_bulk()
    await stow(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/bulk"
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    uri = meta["00081140"]["Value"][0]["00420011"]["BulkDataURI"]
    assert uri.endswith(f"{url}/00081140/0/00420011")
    r = await app_client.get(uri)
    assert r.status_code == 200
    ((_, value),) = split_multipart(r.content, r.headers["content-type"])
    assert value == NESTED_VALUE
    assert (await app_client.get(f"{url}/7FE00010")).status_code == 200
    for path in BAD_BULK_PATHS + MALFORMED_BULK_PATHS:
        r = await app_client.get(f"{url}/{path}")
        refused(r, 404, "bulk data")


def test_read_bulk_value_returns_none_for_every_bad_path(tmp_path: Path) -> None:
    ds = with_nested_bulk()
    path = tmp_path / "x.dcm"
    path.write_bytes(to_bytes(ds))
    assert read_bulk_value(path, "00081140/0/00420011") == (NESTED_VALUE, "OB")
    for bad in BAD_BULK_PATHS + MALFORMED_BULK_PATHS:
        assert read_bulk_value(path, bad) is None, bad


# Viewport (PS3.18 8.3.5.1.3): output at most MAX_VIEWPORT_PIXELS a side, the source region
# inside the image.


def test_viewport_and_region_limits_at_the_edge() -> None:
    edge = MAX_VIEWPORT_PIXELS
    assert parse_render_params({"viewport": f"{edge},{edge}"}).viewport == (edge, edge)
    for over in (f"{edge + 1},1", f"1,{edge + 1}"):
        with pytest.raises(BadRequestError, match="viewport"):
            parse_render_params({"viewport": over})
    m = MAX_REGION_EDGE
    ok = parse_render_params({"viewport": f"8,8,0,0,{m},{m}"})
    assert ok.region == (Fraction(0), Fraction(0), Fraction(m), Fraction(m))
    assert parse_render_params({"viewport": f"8,8,{m - 1},{m - 1},1,1"}).region
    assert parse_render_params({"viewport": f"8,8,{m - 1},{m - 1},-1,-1"}).region
    for over in (f"8,8,0,0,{m + 1},1", f"8,8,1,0,{m},1", f"8,8,0,{m},1,1", f"8,8,1,0,-{m},1"):
        with pytest.raises(BadRequestError, match=str(m)):
            parse_render_params({"viewport": over})


def box(region: str, width: int = 48, height: int = 32) -> tuple[int, int, int, int]:
    """region_box of `viewport=8,8,<region>` on a width x height image."""
    parsed = parse_render_params({"viewport": f"8,8,{region}"}).region
    assert parsed is not None
    return region_box(parsed, width, height)


def test_region_box_inside_the_image() -> None:
    assert box("0,0,48,32") == (0, 0, 48, 32)  # the whole image
    assert box("47,31,1,1") == (47, 31, 48, 32)  # its last pixel
    assert box("0,0,-48,-32") == (0, 0, 48, 32)  # flipped, not moved
    assert box("10,4") == (10, 4, 48, 32)  # to the edges
    assert box("0.5,0,2.25,1") == (0, 0, 3, 1)  # the pixels it touches
    for region in [
        "0,0,49,32",
        "0,0,48,33",
        "48,0,1,1",
        "0,32,1,1",
        "1,0,48,1",
        "1,0,-48,1",
        "48,0,,1",
        "0,32,1",
        "47.5,0,1,1",
    ]:
        with pytest.raises(BadRequestError, match="48 x 32"):
            box(region)


def test_region_values_exact() -> None:
    """sx, sy, sw, sh are taken exactly as the decimal numbers they are written as: a value
    with a float's digits (`170.66666666666666`, a coordinate a viewer computed) is taken
    (6 fraction digits were the limit: a 400), and one just inside the edge stays inside it
    (47.99999999999999999 is 48.0 as a float: past the last column)."""
    assert box("170.66666666666666,0,170.66666666666669,1", 512, 1) == (170, 0, 342, 1)
    assert box("0.3333333333333333,0,47.6666666666666667,1") == (0, 0, 48, 1)
    assert box("47.99999999999999999,0,0.00000000000000001,1") == (47, 0, 48, 1)
    assert box("0.00000000000000000000000000001,0,47,1") == (0, 0, 48, 1)
    with pytest.raises(BadRequestError, match="48 x 32"):
        box("0.0000000000000000000000000001,0,48,1")


def test_region_value_length_limit() -> None:
    """A source region value is at most MAX_REGION_VALUE_CHARS characters (int() refuses to
    parse more than 4300 digits: a ValueError, a 500)."""
    edge = "0." + "0" * (MAX_REGION_VALUE_CHARS - 3) + "1"
    assert len(edge) == MAX_REGION_VALUE_CHARS
    assert box(f"{edge},0,1,1") == (0, 0, 2, 1)  # just past column 0: columns 0 and 1
    for over in ("0" + edge, "1" * 5000, "." + "1" * 5000):
        with pytest.raises(BadRequestError, match=f"at most {MAX_REGION_VALUE_CHARS} characters"):
            box(f"{over},0,1,1")


async def test_rendered_source_region(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(rows=32, cols=48)
    await stow(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/rendered"
    png = {"Accept": "image/png"}
    fixed = "window=767.5,1536,LINEAR_EXACT"  # one window for the whole image and a region
    whole = np.asarray(image(await app_client.get(f"{url}?{fixed}", headers=png), "image/png"))
    right = await app_client.get(f"{url}?{fixed}&viewport=24,32,24,0,24,32", headers=png)
    assert np.array_equal(np.asarray(image(right, "image/png")), whole[:, 24:])
    # A negative extent flips the region whose top-left corner is sx,sy (PS3.18 8.3.5.1.3).
    flipped = await app_client.get(f"{url}?{fixed}&viewport=24,32,24,0,-24,-32", headers=png)
    assert np.array_equal(np.asarray(image(flipped, "image/png")), whole[::-1, 24:][:, ::-1])
    for region in ("48,0,-1,32", "1,0,-48,32"):  # past the image's last column
        refused(await app_client.get(url, params={"viewport": f"8,8,{region}"}), 400, "48 x 32")
    at_edge = await app_client.get(f"{url}?viewport=96,64,0,0,48,32", headers=png)
    assert image(at_edge, "image/png").size == (96, 64)
    for region in ("0,0,49,32", "0,0,48,33", "48,0,1,1", "0,0,20000,20000", "0,0,10000,10000"):
        r = await app_client.get(url, params={"viewport": f"8,8,{region}"})
        refused(r, 400, "48 x 32")
    r = await app_client.get(url, params={"viewport": f"8,8,0,0,{MAX_REGION_EDGE + 1},1"})
    refused(r, 400, str(MAX_REGION_EDGE))


async def test_region_never_meets_pillows_decompression_bomb_check(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The region is cut from the decoded array, not by Pillow's crop, whose bomb check is
    for files of unknown size: a region of an image already decoded is never refused by it."""
    ds = make_instance(rows=32, cols=48)
    await stow(app_client, to_bytes(ds))
    with monkeypatch.context() as patched:
        patched.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # crops over 200 pixels raise
        r = await app_client.get(f"{inst_url(ds)}/rendered", params={"viewport": "24,16,0,0,48,30"})
    assert image(r).size == (24, 15)


async def test_largest_viewport_renders(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(rows=4, cols=4)
    await stow(app_client, to_bytes(ds))
    edge = MAX_VIEWPORT_PIXELS
    r = await app_client.get(f"{inst_url(ds)}/rendered", params={"viewport": f"{edge},{edge}"})
    assert image(r).size == (edge, edge)
    r = await app_client.get(f"{inst_url(ds)}/rendered", params={"viewport": f"{edge + 1},8"})
    refused(r, 400, str(edge))


# Animated GIF: frames x output pixels at most MAX_ANIMATION_PIXELS.


def test_output_size() -> None:
    p = RenderParams
    assert output_size(48, 32, p(), thumbnail=False) == (48, 32)
    assert output_size(48, 32, p(), thumbnail=True) == (THUMBNAIL_SIZE, THUMBNAIL_SIZE * 2 // 3)
    assert output_size(48, 32, p(viewport=(24, 24)), thumbnail=False) == (24, 16)
    region = parse_render_params({"viewport": "8,8,0,0,4,8"}).region
    assert output_size(48, 32, p(viewport=(8, 8), region=region), False) == (4, 8)


def test_check_animation_at_the_edge() -> None:
    side = 2048
    frames = MAX_ANIMATION_PIXELS // (side * side)
    assert frames * side * side == MAX_ANIMATION_PIXELS
    check_animation(frames, (side, side))  # exactly at the limit
    check_animation(frames, (side, side - 1))
    with pytest.raises(BadRequestError, match="viewport"):
        check_animation(frames + 1, (side, side))
    with pytest.raises(BadRequestError, match=str(MAX_ANIMATION_PIXELS)):
        check_animation(frames, (side, side + 1))
    check_animation(MAX_ANIMATION_FRAMES, (1, 1))


async def test_animated_gif_is_bounded(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(rows=16, cols=16, frames=4)
    await stow(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/rendered"
    gif = {"Accept": "image/gif"}
    # One window for every frame, so that they differ (min-max would make them all alike,
    # and the GIF encoder merges equal frames).
    window = {"window": "512,1024"}
    normal = image(await app_client.get(url, params=window, headers=gif), "image/gif")
    assert getattr(normal, "n_frames", 1) == 4 and normal.size == (16, 16)
    # The audited request: every frame at 8192 x 8192 (4 x 64 Mi pixels).
    edge = MAX_VIEWPORT_PIXELS
    r = await app_client.get(url, params={"viewport": f"{edge},{edge}"}, headers=gif)
    refused(r, 400, str(MAX_ANIMATION_PIXELS), "4 frames")
    # One frame of the same size is not an animation: it renders.
    one = await app_client.get(f"{inst_url(ds)}/frames/1/rendered", params={"viewport": "512,512"},
                               headers=gif)  # fmt: skip
    assert image(one, "image/gif").size == (512, 512)


# Thumbnails are never an error (field notes 7): video and undecodable pixel data get icons.


def video_instance(sop_class: str, ts: str = MPEG4_AVC_HIGH) -> Dataset:
    ds = make_instance(rows=480, cols=640, modality="ES")
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = UID(sop_class)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.NumberOfFrames = 30
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = 0x00181063
    # Not a playable stream: an H.264 start code and a sequence parameter set NAL header.
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67" + bytes(59)])
    ds["PixelData"].VR = "OB"
    return ds


def is_icon(r: httpx.Response, media: str = "image/jpeg") -> bool:
    return image(r, media).size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)


@pytest.mark.parametrize("sop_class", [VIDEO_ENDOSCOPIC, VIDEO_MICROSCOPIC, VIDEO_PHOTOGRAPHIC])
async def test_video_thumbnails_are_icons_at_every_level(
    app_client: httpx.AsyncClient, sop_class: str
) -> None:
    ds = video_instance(sop_class)
    await stow(app_client, to_bytes(ds))
    study = f"{ROOT}/studies/{ds.StudyInstanceUID}"
    series = f"{study}/series/{ds.SeriesInstanceUID}"
    for url in (study, series, inst_url(ds), f"{inst_url(ds)}/frames/1"):
        assert is_icon(await app_client.get(f"{url}/thumbnail")), url
    png = await app_client.get(f"{inst_url(ds)}/thumbnail", headers={"Accept": "image/png"})
    assert is_icon(png, "image/png")
    small = await app_client.get(f"{series}/thumbnail", params={"viewport": "64,64"})
    assert image(small).size == (64, 64)
    # The rendered resource is an image of the content: a video this server cannot decode is
    # not acceptable as one.
    refused(await app_client.get(f"{inst_url(ds)}/rendered"), 406)
    refused(await app_client.get(f"{inst_url(ds)}/frames/31/thumbnail"), 404)


async def test_video_icon_says_video(app_client: httpx.AsyncClient) -> None:
    video, other = video_instance(VIDEO_ENDOSCOPIC), undecodable_instance()
    mpeg_ct = video_instance(VIDEO_ENDOSCOPIC)  # any SOP class with a video transfer syntax
    mpeg_ct.SOPClassUID = mpeg_ct.file_meta.MediaStorageSOPClassUID = UID(
        "1.2.840.10008.5.1.4.1.1.2"
    )
    await stow(app_client, to_bytes(video), to_bytes(other), to_bytes(mpeg_ct))

    async def pixels(ds: Dataset) -> np.ndarray:
        r = await app_client.get(f"{inst_url(ds)}/thumbnail", headers={"Accept": "image/png"})
        return np.asarray(image(r, "image/png"))

    a, b, c = await pixels(video), await pixels(other), await pixels(mpeg_ct)
    assert a.shape == b.shape and not np.array_equal(a, b)  # VIDEO, not DICOM
    assert np.array_equal(a, c)


def undecodable_instance() -> Dataset:
    """A CT image whose JPEG Baseline data is not JPEG: this server cannot decode it."""
    ds = make_instance(rows=4, cols=8)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.50")
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    return ds


async def test_undecodable_pixel_data_thumbnail_is_an_icon(app_client: httpx.AsyncClient) -> None:
    broken = undecodable_instance()
    no_codec = make_instance(rows=4, cols=8)  # JPEG XL: no decoder installed here
    no_codec.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.110")
    no_codec.PixelData = encapsulate([b"\xff\x0a not a JPEG XL stream"])
    no_codec["PixelData"].VR = "OB"
    await stow(app_client, to_bytes(broken), to_bytes(no_codec))
    for ds in (broken, no_codec):
        study = f"{ROOT}/studies/{ds.StudyInstanceUID}"
        for url in (study, f"{study}/series/{ds.SeriesInstanceUID}", inst_url(ds)):
            assert is_icon(await app_client.get(f"{url}/thumbnail")), url
        refused(await app_client.get(f"{inst_url(ds)}/rendered"), 406, "decode")
        refused(await app_client.get(f"{inst_url(ds)}/frames/1/rendered"), 406, "decode")


async def test_thumbnail_viewport_has_no_source_region(app_client: httpx.AsyncClient) -> None:
    """PS3.18 8.3.5.1.3: the viewport of a thumbnail is vw,vh; "anything other than vw and vh"
    is a 400, for an icon too (it was applied to the image, ignored for an icon)."""
    video = video_instance(VIDEO_PHOTOGRAPHIC)
    ds = make_instance(rows=32, cols=48)
    await stow(app_client, to_bytes(video), to_bytes(ds))
    for url in (inst_url(video), inst_url(ds), f"{inst_url(ds)}/frames/1"):
        assert image(await app_client.get(f"{url}/thumbnail?viewport=64,64")).size[0] == 64
        for region in ("64,64,0,0,640,480", "64,64,0", "64,64,,,,"):
            r = await app_client.get(f"{url}/thumbnail", params={"viewport": region})
            refused(r, 400, "vw,vh only")
