"""Rendered images and thumbnails (PS3.18 10.4.1.1.3-4): right size, not blank, LUTs applied."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb_server.errors import BadRequestError
from dicomweb_server.rendered import THUMBNAIL_SIZE
from dicomweb_server.retrieve.frames import MAX_FRAMES_PER_REQUEST, parse_frame_list
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db


def image(r: httpx.Response, media: str = "image/jpeg") -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media
    return Image.open(io.BytesIO(r.content))


async def stow(client: httpx.AsyncClient, *files: bytes) -> None:
    r = await client.post(f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers())
    assert r.status_code == 200, r.text


async def test_rendered_media_types_window_viewport(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(rows=32, cols=48, frames=2)
    await stow(app_client, to_bytes(ds))
    url = inst_url(ds)
    jpeg = image(await app_client.get(f"{url}/rendered"))
    assert jpeg.size == (48, 32)
    png = image(
        await app_client.get(f"{url}/rendered", headers={"Accept": "image/png"}), "image/png"
    )
    px = np.asarray(png)
    assert px.min() == 0 and px.max() == 255  # min-max: the instance has no window
    gif = await app_client.get(f"{url}/rendered", params={"accept": "image/gif"})
    assert image(gif, "image/gif").size == (48, 32)
    narrow = np.asarray(
        image(
            await app_client.get(
                f"{url}/rendered", params={"window": "100,20", "accept": "image/png"}
            ),
            "image/png",
        )
    )
    assert (narrow == 255).sum() > (px == 255).sum()  # a narrow window saturates more pixels
    small = image(await app_client.get(f"{url}/rendered", params={"viewport": "24,24"}))
    assert small.size == (24, 16)  # fitted, aspect kept
    f1 = np.asarray(
        image(
            await app_client.get(
                f"{url}/frames/1/rendered", params={"accept": "image/png", "window": "1536,3072"}
            ),
            "image/png",
        )
    )
    f2 = np.asarray(
        image(
            await app_client.get(
                f"{url}/frames/2/rendered", params={"accept": "image/png", "window": "1536,3072"}
            ),
            "image/png",
        )
    )
    assert not np.array_equal(f1, f2)


async def test_monochrome1_is_inverted(app_client: httpx.AsyncClient) -> None:
    m2 = make_instance(rows=8, cols=8)
    m1 = make_instance(rows=8, cols=8, PhotometricInterpretation="MONOCHROME1")
    await stow(app_client, to_bytes(m2), to_bytes(m1))
    a = np.asarray(
        image(
            await app_client.get(f"{inst_url(m2)}/rendered", headers={"Accept": "image/png"}),
            "image/png",
        )
    )
    b = np.asarray(
        image(
            await app_client.get(f"{inst_url(m1)}/rendered", headers={"Accept": "image/png"}),
            "image/png",
        )
    )
    assert np.array_equal(a.astype(int) + b.astype(int), np.full(a.shape, 255))


async def test_thumbnails_at_every_level_and_icons(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    big = make_instance(rows=512, cols=256)
    sr = pydicom.dcmread(samples / "generated/coverage/sr_basic_text.dcm")
    await stow(
        app_client, to_bytes(big), (samples / "generated/coverage/sr_basic_text.dcm").read_bytes()
    )
    series = f"{ROOT}/studies/{big.StudyInstanceUID}/series/{big.SeriesInstanceUID}"
    for url in (f"{ROOT}/studies/{big.StudyInstanceUID}", series, inst_url(big)):
        thumb = image(await app_client.get(f"{url}/thumbnail"))
        assert thumb.size == (THUMBNAIL_SIZE // 2, THUMBNAIL_SIZE)
    assert image(
        await app_client.get(f"{inst_url(big)}/thumbnail", params={"viewport": "32,32"})
    ).size == (16, 32)
    icon = image(await app_client.get(f"{inst_url(sr)}/thumbnail"))
    assert icon.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    # the rendered report is text (tests/test_report.py), an image of it is not made
    assert (await app_client.get(f"{inst_url(sr)}/rendered")).status_code == 200
    r = await app_client.get(f"{inst_url(sr)}/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 406


@pytest.mark.parametrize(
    "params",
    [{"window": "abc,1"}, {"window": "40"}, {"window": "40,0"}, {"window": "40,400,CUBIC"},
     {"viewport": "0,10"}, {"viewport": "99999,10"}, {"viewport": "10,10,0,0,0,5"},
     {"quality": "0"}, {"quality": "101"}, {"quality": "high"},
     # finite numbers only: float() makes 1e309 infinite
     {"window": "1e309,10"}, {"window": "-1e309,1e309,SIGMOID"}, {"window": "40,1e999"},
     # ASCII digits only, nothing around them: int() and float() take other scripts' digits
     # (U+0661 Arabic-Indic one, U+FF11 fullwidth one) and whitespace
     {"quality": "\u0661"}, {"quality": "\uff19\uff10"}, {"viewport": "\uff11,1"},
     {"viewport": "8,8,0,0,\u0664,4"}, {"window": "\u0661,10"}, {"window": "40, 400"},
     {"window": "40,400,L\u0131NEAR"}, {"viewport": " 8,8"}],
)  # fmt: skip
async def test_bad_render_parameters(app_client: httpx.AsyncClient, params: dict[str, str]) -> None:
    ds = make_instance()
    await stow(app_client, to_bytes(ds))
    r = await app_client.get(f"{inst_url(ds)}/rendered", params=params)
    assert r.status_code == 400 and r.json()["message"]


async def test_rendered_not_acceptable_and_not_found(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    await stow(app_client, to_bytes(ds))
    assert (
        await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "text/html"})
    ).status_code == 406
    assert (await app_client.get(f"{inst_url(ds)}/frames/2/rendered")).status_code == 404
    assert (await app_client.get(f"{inst_url(ds)}/frames/1,2/rendered")).status_code == 400
    assert (await app_client.get(f"{ROOT}/studies/1.2.3/thumbnail")).status_code == 404


def window_saturates(path: Path) -> bool:
    """True when the file's own VOI window puts every pixel outside it (a uniform image is
    then the right rendering, e.g. pydicom's 16x16 CT test files with a 30/100 window)."""
    from pydicom.pixels.processing import apply_modality_lut

    ds = pydicom.dcmread(path)
    if "WindowCenter" not in ds:
        return False
    c = float(ds.WindowCenter if ds["WindowCenter"].VM == 1 else ds.WindowCenter[0])
    w = float(ds.WindowWidth if ds["WindowWidth"].VM == 1 else ds.WindowWidth[0])
    x = apply_modality_lut(ds.pixel_array, ds)
    return bool((x > c + w / 2).all() or (x < c - w / 2).all())


async def test_every_decodable_sample_renders(app_client: httpx.AsyncClient, samples: Path) -> None:
    with (samples / "MANIFEST.tsv").open() as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["decodes"] == "yes"]
    rows = [r for r in rows if not r["path"].startswith("generated/archive/")] + [
        r for r in rows if r["path"].startswith("generated/archive/")
    ][:10]
    for i in range(0, len(rows), 40):
        await stow(app_client, *((samples / r["path"]).read_bytes() for r in rows[i : i + 40]))
    problems = []
    for row in rows:
        ds = pydicom.dcmread(samples / row["path"], stop_before_pixels=True)
        r = await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "image/png"})
        try:
            img = image(r, "image/png")
            assert img.size == (int(row["cols"]), int(row["rows"])), img.size
            px = np.asarray(img)
            assert px.max() > px.min() or window_saturates(samples / row["path"]), "blank"
        except AssertionError as exc:
            problems.append(f"{row['path']}: {exc}")
    assert not problems, "\n".join(problems)


async def test_multiframe_gif_is_animated(app_client: httpx.AsyncClient, samples: Path) -> None:
    path = samples / "generated/coverage/xa_20frames_8bit.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    await stow(app_client, path.read_bytes())
    gif = image(
        await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "image/gif"}),
        "image/gif",
    )
    assert getattr(gif, "n_frames", 1) == 20
    one = image(
        await app_client.get(f"{inst_url(ds)}/frames/5/rendered", headers={"Accept": "image/gif"}),
        "image/gif",
    )
    assert getattr(one, "n_frames", 1) == 1


@pytest.mark.parametrize("frames", ["%D9%A1", "%EF%BC%91", "%201", "1%20", "1,%202", "%E2%80%A91"])
async def test_frame_numbers_are_ascii_digits(app_client: httpx.AsyncClient, frames: str) -> None:
    """`\\d` and int() take other scripts' digits and whitespace: `frames/\u0661` was frame 1."""
    ds = make_instance(frames=2)
    await stow(app_client, to_bytes(ds))
    for resource in ("", "/rendered", "/thumbnail"):
        r = await app_client.get(f"{inst_url(ds)}/frames/{frames}{resource}")
        assert r.status_code == 400 and "frame list" in r.json()["message"], (resource, r.text)
    assert parse_frame_list("1,2") == [1, 2]
    for text in ("\u0661", "\uff11", " 1", "1 ", "1, 2", "1\n"):
        with pytest.raises(BadRequestError):
            parse_frame_list(text)


def test_frames_per_request_limit() -> None:
    """MAX_FRAMES_PER_REQUEST frames may be asked for in one request; one more is a 400."""
    most = range(1, MAX_FRAMES_PER_REQUEST + 1)
    assert parse_frame_list(",".join(map(str, most))) == list(most)
    with pytest.raises(BadRequestError, match=f"at most {MAX_FRAMES_PER_REQUEST} frames"):
        parse_frame_list(",".join(map(str, range(1, MAX_FRAMES_PER_REQUEST + 2))))


@pytest.mark.parametrize("frames", ["1,1", "2,1,2", ",".join(["1"] * 10_000)])
async def test_a_frame_list_names_each_frame_once(
    app_client: httpx.AsyncClient, frames: str
) -> None:
    """PS3.18 (2017b 6.5.4) has a frame list of "non duplicate frame numbers": a frame listed
    twice is a 400 with the reason. It was sent as often as listed, so that one request of
    `1,1,...` (10,000 allowed) sent a frame 10,000 times (a 2 GB body from the 230 kB
    frames of a small ultrasound run)."""
    ds = make_instance(frames=2)
    await stow(app_client, to_bytes(ds))
    for resource in ("", "/rendered", "/thumbnail"):
        r = await app_client.get(f"{inst_url(ds)}/frames/{frames}{resource}")
        assert r.status_code == 400 and "listed twice" in r.json()["message"], (resource, r.text)
    r = await app_client.get(f"{inst_url(ds)}/bulk/7FE00010/frames/{frames}")
    assert r.status_code == 400 and "listed twice" in r.json()["message"], r.text
    assert parse_frame_list("2,1") == [2, 1]  # any order, as before


def functional_groups(
    rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None
) -> Dataset:
    """A functional groups item: Pixel Value Transformation and Frame VOI LUT (PS3.3
    C.7.6.16.2.9-10), a Frame Content Sequence always (as every per-frame item has)."""
    item = Dataset()
    item.FrameContentSequence = Sequence([Dataset()])
    if rescale is not None:
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = rescale[0], rescale[1], "US"
        item.PixelValueTransformationSequence = Sequence([pvt])
    if window is not None:
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = window
        item.FrameVOILUTSequence = Sequence([voi])
    return item


def windowed(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR to 0..255."""
    return np.round(np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)


async def test_enhanced_frames_use_their_functional_groups(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """An enhanced multi-frame image keeps each frame's rescale and window in functional
    groups (PS3.3 C.7.6.16, PS3.4 N.2): the frame's own item first, then the shared one."""
    path = samples / "real/pydicom-data/eCT_Supplemental.dcm"  # shared groups only
    ect = pydicom.dcmread(path)
    ds = make_instance(rows=8, cols=8, frames=3)  # frame n holds 64 (n - 1) .. 64 n - 1
    ds.SharedFunctionalGroupsSequence = Sequence([functional_groups((2, -100), (100, 200))])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [functional_groups(), functional_groups(window=(100, 50)), functional_groups((1, 0))]
    )
    ds.WindowCenter, ds.WindowWidth = 5000, 10  # top level: applies to no frame
    await stow(app_client, path.read_bytes(), to_bytes(ds))
    shared = ect.SharedFunctionalGroupsSequence[0]
    voi, pvt = shared.FrameVOILUTSequence[0], shared.PixelValueTransformationSequence[0]
    stored = ds.pixel_array.astype(np.float64)
    expected = [
        (
            ect,
            1,
            windowed(
                ect.pixel_array[0] * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept),
                float(voi.WindowCenter),
                float(voi.WindowWidth),
            ),
        ),
        (ds, 1, windowed(stored[0] * 2 - 100, 100, 200)),  # shared rescale and window
        (ds, 2, windowed(stored[1] * 2 - 100, 100, 50)),  # its own window
        (ds, 3, windowed(stored[2], 100, 200)),  # its own rescale, the shared window
    ]
    for inst, n, want in expected:
        r = await app_client.get(
            f"{inst_url(inst)}/frames/{n}/rendered", headers={"Accept": "image/png"}
        )
        got = np.asarray(image(r, "image/png")).astype(np.float64)
        assert np.abs(got - want).max() <= 1, (inst.SOPInstanceUID, n)


async def test_colour_above_8_bits_scaled_by_bits_stored(app_client: httpx.AsyncClient) -> None:
    """Samples are scaled by 2**Bits Stored - 1, not by the frame's own largest value: a
    dark frame stays dark."""
    ds = make_instance(rows=4, cols=4, frames=2, SamplesPerPixel=3, PlanarConfiguration=0)
    ds.PhotometricInterpretation, ds.BitsStored, ds.HighBit = "RGB", 12, 11
    pixels = np.full((2, 4, 4, 3), 1000, np.uint16)
    pixels[0, 0, 0] = 2000
    pixels[1] = 4095
    ds.PixelData = pixels.tobytes()
    await stow(app_client, to_bytes(ds))
    for n, want in ((1, round(1000 / 4095 * 255)), (2, 255)):
        r = await app_client.get(
            f"{inst_url(ds)}/frames/{n}/rendered", headers={"Accept": "image/png"}
        )
        assert np.asarray(image(r, "image/png"))[2, 2].tolist() == [want] * 3


def vary(r: httpx.Response) -> list[str]:
    return [v.strip() for v in r.headers.get("vary", "").split(",")]


async def test_rendered_cache_headers(app_client: httpx.AsyncClient, samples: Path) -> None:
    """Accept chooses the type of every rendered response: Vary says so, merged with the
    Origin the CORS middleware adds (RFC 9110 12.5.5). A study's or series' image changes as
    instances arrive: never fresh without asking (no-cache); an instance's or frame's never
    changes (an hour)."""
    first = make_instance(rows=8, cols=8, InstanceNumber=1)
    await stow(app_client, to_bytes(first))
    study = f"{ROOT}/studies/{first.StudyInstanceUID}"
    series = f"{study}/series/{first.SeriesInstanceUID}"
    origin = {"Origin": "http://localhost:3000"}
    for url, cache in (
        (study, "private, no-cache"),
        (series, "private, no-cache"),
        (inst_url(first), "private, max-age=3600"),
        (f"{inst_url(first)}/frames/1", "private, max-age=3600"),
    ):
        for resource in ("rendered", "thumbnail"):
            for accept in ("image/png", "image/gif"):
                r = await app_client.get(f"{url}/{resource}", headers={"Accept": accept})
                assert r.status_code == 200 and r.headers["content-type"] == accept
                assert r.headers["cache-control"] == cache, (url, resource)
                assert vary(r) == ["Accept", "Origin"], (url, resource)
            r = await app_client.get(f"{url}/{resource}", headers=origin)
            assert r.headers["access-control-allow-origin"] == origin["Origin"]
            assert vary(r) == ["Accept", "Origin"]
    before = (await app_client.get(f"{study}/rendered", headers={"Accept": "image/png"})).content
    later = make_instance(
        study=first.StudyInstanceUID, series=first.SeriesInstanceUID, rows=8, cols=4
    )
    later.InstanceNumber = 2
    await stow(app_client, to_bytes(later))
    after = (await app_client.get(f"{study}/rendered", headers={"Accept": "image/png"})).content
    assert after != before  # the representative is now the second instance: why no-cache
    sr = pydicom.dcmread(samples / "generated/coverage/sr_basic_text.dcm", stop_before_pixels=True)
    await stow(app_client, (samples / "generated/coverage/sr_basic_text.dcm").read_bytes())
    for accept in ("text/html", "text/plain"):
        r = await app_client.get(f"{inst_url(sr)}/rendered", headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith(accept)
        assert vary(r) == ["Accept", "Origin"]
        assert r.headers["cache-control"] == "private, max-age=3600"


# (center, width, function) -> the grey of pixels 0..15 (make_instance's 4 x 4 ramp): far
# off windows and extreme widths saturate as PS3.3 C.11.2.1.2.1 and C.11.2.1.3.1 do in the
# limit, where float64 arithmetic on them overflows.
EXTREME_WINDOWS = [
    (("1e300", "1", "SIGMOID"), [0] * 16),
    (("-1e300", "1", "SIGMOID"), [255] * 16),
    (("40", "1e300", "SIGMOID"), [128] * 16),  # the middle of an endless window
    (("1.7e308", "1e300", "SIGMOID"), [0] * 16),
    (("-1.7e308", "1.7e308", "SIGMOID"), [250] * 16),  # one width above: 1 / (1 + exp(-4))
    (("200", "1", "SIGMOID"), [0] * 16),  # an everyday window: exp(-4 * (0 - 200)) overflowed
    (("-1.7e308", "2", "LINEAR"), [255] * 16),
    (("1.7e308", "1.7e308", "LINEAR"), [0] * 16),
    (("-1.7e308", "1.7e308", "LINEAR_EXACT"), [255] * 16),
    # the least width there is (subnormal): the value at the center is mid grey, the rest
    # saturate (its half was 0, and the center's 0 / 0 NaN, black)
    (("0", "5e-324", "LINEAR_EXACT"), [128] + [255] * 15),
    (("5", "5e-324", "SIGMOID"), [0] * 5 + [128] + [255] * 10),
]


@pytest.mark.parametrize(("window", "grey"), EXTREME_WINDOWS)
async def test_extreme_windows_saturate_without_overflow(
    app_client: httpx.AsyncClient, window: tuple[str, str, str], grey: list[int]
) -> None:
    """A finite window (the request's, or the instance's Window Center and Width with its
    VOI LUT Function) far off the values, or of a huge width, renders black, white or mid
    grey without a numpy overflow (warnings are errors in tests). It used to warn, and a
    narrow SIGMOID window overflowed exp() for values a few hundred widths off."""
    ds = make_instance()
    own = make_instance(WindowCenter=window[0], WindowWidth=window[1], VOILUTFunction=window[2])
    await stow(app_client, to_bytes(ds), to_bytes(own))
    for url, params in ((inst_url(ds), {"window": ",".join(window)}), (inst_url(own), {})):
        r = await app_client.get(f"{url}/rendered", params={**params, "accept": "image/png"})
        assert np.asarray(image(r, "image/png")).ravel().tolist() == grey, (url, params)


async def test_rescale_beyond_float64_saturates(app_client: httpx.AsyncClient) -> None:
    """A Rescale Slope of 1e308 (a valid DS) takes pixels 2..15 past float64: they saturate
    at its largest value, and the instance's window, the request's or min-max apply to
    finite values (it was a numpy overflow, a 500 here where warnings are errors)."""
    ds = make_instance(
        RescaleSlope="1e308", RescaleIntercept="-1e308", WindowCenter="0", WindowWidth="100"
    )
    await stow(app_client, to_bytes(ds))
    for params, grey in (
        ({}, [0, 129] + [255] * 14),  # -1e308, 0, then past the window
        ({"window": "-1.7e308,2"}, [255] * 16),
        # 0 is 1.7e308 below the center, one width: 1 / (1 + exp(4)) of the way, 5 / 255;
        # the others 0.057 widths above.
        ({"window": "1.7e308,1.7e308,SIGMOID"}, [0, 5] + [142] * 14),
    ):
        r = await app_client.get(
            f"{inst_url(ds)}/rendered", params={**params, "accept": "image/png"}
        )
        assert np.asarray(image(r, "image/png")).ravel().tolist() == grey, params


def test_min_max_of_the_widest_float_range() -> None:
    """Min-max over values whose range is no float64 (-1.7e308 to 1.7e308): 0 to 255."""
    from dicomweb_server.render import _normalise

    x = np.array([-1.7e308, 0.0, 1.7e308])
    assert _normalise(x).tolist() == [0.0, 0.5, 1.0]


@pytest.mark.db
async def test_identical_renderings_at_once_are_made_once(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six identical rendered requests at once: one decode and render, six equal images; a
    rendering whose request is cancelled is made by a request that waited for it."""
    import asyncio
    import time

    from dicomweb_server import rendering
    from dicomweb_server.render import render_frame as real

    made: list[int] = []

    def counted(*args: object) -> bytes:
        made.append(1)
        time.sleep(0.3)  # long enough for the others to arrive
        return real(*args)  # type: ignore[arg-type]  # render_frame's own arguments

    monkeypatch.setattr(rendering, "render_frame", counted)
    ds = make_instance(rows=64, cols=64)
    await stow(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/rendered"
    rs = await asyncio.gather(*(app_client.get(url) for _ in range(6)))
    assert [r.status_code for r in rs] == [200] * 6
    assert len({r.content for r in rs}) == 1 and len(made) == 1
    assert rendering._MAKING == {}

    other = f"{url}?viewport=32,32"
    first = asyncio.ensure_future(app_client.get(other))
    while not made[1:]:  # the first request is rendering
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(app_client.get(other))
    await asyncio.sleep(0.05)
    first.cancel()
    r = await second
    assert r.status_code == 200 and image(r).size == (32, 32)
    assert len(made) == 3  # the cancelled one's, then the second's own
    assert rendering._MAKING == {}


async def test_parameters_not_applied_are_named_in_a_warning(
    app_client: httpx.AsyncClient,
) -> None:
    """PS3.18 8.3.1: unsupported query parameters are ignored; STYLE rule 5: never silently.
    `annotation` (8.3.5.1.1) is not applied, an unknown name is not one of the resource's:
    each gets a Warning; those applied (`iccprofile` among them, 8.3.5.1.5) get none."""
    ds = make_instance(rows=8, cols=8)
    await stow(app_client, to_bytes(ds))
    url = inst_url(ds)
    quiet = await app_client.get(
        f"{url}/rendered", params={"window": "100,20", "quality": "80", "iccprofile": "no"}
    )
    image(quiet)
    assert "warning" not in quiet.headers
    for resource in ("rendered", "thumbnail"):
        r = await app_client.get(
            f"{url}/{resource}",
            params={"annotation": "patient", "iccprofile": "srgb", "foo": "1", "viewport": "4,4"},
        )
        assert image(r).size == (4, 4)
        warning = r.headers["warning"]
        assert warning.count("299 ") == 2, warning
        # PS3.18 8.3.5.1.1 gives the annotation Warning's text
        assert "The following annotation values are not supported: patient" in warning
        assert "iccprofile" not in warning
        assert "foo is not a parameter of this resource" in warning
