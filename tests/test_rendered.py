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

from dicomweb_server.rendered import THUMBNAIL_SIZE
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
     {"quality": "0"}, {"quality": "101"}, {"quality": "high"}],
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
