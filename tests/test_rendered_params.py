"""Rendered query parameters as PS3.18 (2024) 8.3.5.1 writes them: the viewport's elided and
decimal source region values and its flips, the window function keywords, `annotation` and
`iccprofile` values; on a real CT of the sample corpus."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.helpers import ROOT, inst_url, multipart_body, stow_headers

pytestmark = pytest.mark.db

CT = "real/pydicom/CT_small.dcm"  # 128 x 128, signed 16-bit, Rescale Intercept -1024
PNG = {"Accept": "image/png"}
# One window for every request compared (the instance's own one would apply otherwise too).
FIXED = "window=40,400,linear"


@pytest.fixture
async def ct_url(app_client: httpx.AsyncClient, samples: Path) -> str:
    data = (samples / CT).read_bytes()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    return f"{inst_url(pydicom.dcmread(io.BytesIO(data)))}/rendered"


def pixels(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)))


def refused(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    for word in words:
        assert word in r.json()["message"]


async def test_viewport_values_elided_as_the_standard_writes_them(
    app_client: httpx.AsyncClient, ct_url: str
) -> None:
    """`viewport=512,512,,,512,512`: sx and sy elided (0); `viewport=vw,vh,sx`: trailing
    values elided with their commas, sw and sh to the right and bottom edges. Both were 400."""
    whole = pixels(await app_client.get(f"{ct_url}?{FIXED}", headers=PNG))
    assert whole.shape == (128, 128)
    elided = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,,,64,64", headers=PNG)
    assert np.array_equal(pixels(elided), whole[:64, :64])
    trailing = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,64", headers=PNG)
    assert pixels(trailing).shape == (64, 32)  # 64 x 128 of the image fitted in 64 x 64
    named = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,64,0,64,128", headers=PNG)
    assert np.array_equal(pixels(trailing), pixels(named))
    corner = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,64,64", headers=PNG)
    assert np.array_equal(pixels(corner), whole[64:, 64:])
    same = await app_client.get(f"{ct_url}?{FIXED}&viewport=128,128,,,,", headers=PNG)
    assert np.array_equal(pixels(same), whole)


async def test_negative_extent_flips_the_region_at_sx_sy(
    app_client: httpx.AsyncClient, ct_url: str
) -> None:
    """sx,sy is the region's top-left corner, |sw| x |sh| its size; a negative sw (sh) flips it
    horizontally (vertically). `viewport=64,64,0,0,-64,64` was a 400 (taken as the 64 columns
    before column 0), and `64,0,-64,64` cut columns 0-63 rather than 64-127."""
    whole = pixels(await app_client.get(f"{ct_url}?{FIXED}", headers=PNG))
    left = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,0,0,-64,64", headers=PNG)
    assert np.array_equal(pixels(left), whole[:64, :64][:, ::-1])
    right = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,64,0,-64,64", headers=PNG)
    assert np.array_equal(pixels(right), whole[:64, 64:][:, ::-1])
    both = await app_client.get(f"{ct_url}?{FIXED}&viewport=128,128,0,0,-128,-128", headers=PNG)
    assert np.array_equal(pixels(both), whole[::-1, ::-1])
    flip = await app_client.get(f"{ct_url}?{FIXED}&viewport=128,128,,,,-128", headers=PNG)
    assert np.array_equal(pixels(flip), whole[::-1])
    refused(await app_client.get(f"{ct_url}?viewport=8,8,65,0,-64,64"), "128 x 128")


async def test_viewport_region_in_decimal_numbers(
    app_client: httpx.AsyncClient, ct_url: str
) -> None:
    """sx, sy, sw, sh are decimal numbers: a fractional edge takes the pixel it cuts; sx and
    sy are their absolute values."""
    whole = pixels(await app_client.get(f"{ct_url}?{FIXED}", headers=PNG))
    r = await app_client.get(f"{ct_url}?{FIXED}&viewport=33,33,0.5,0.5,32.25,32", headers=PNG)
    assert np.array_equal(pixels(r), whole[:33, :33])
    r = await app_client.get(f"{ct_url}?{FIXED}&viewport=64,64,-64,0,64,64", headers=PNG)
    assert np.array_equal(pixels(r), whole[:64, 64:])
    for bad in ("8,8,1e2,0,1,1", "8,8,0x1,0,1,1", "8,8,1,,,,,", "8,8.5", "8,8,0,0,0.0,1"):
        refused(await app_client.get(ct_url, params={"viewport": bad}), "viewport")


async def test_window_function_keywords(app_client: httpx.AsyncClient, ct_url: str) -> None:
    """PS3.18 8.3.5.1.4 names "linear", "linear-exact" and "sigmoid"; `linear-exact` was a
    400. The VOI LUT Function spellings are taken too."""
    exact = pixels(await app_client.get(f"{ct_url}?window=40,400,linear-exact", headers=PNG))
    same = pixels(await app_client.get(f"{ct_url}?window=40,400,LINEAR_EXACT", headers=PNG))
    assert np.array_equal(exact, same)
    sigmoid = pixels(await app_client.get(f"{ct_url}?window=40,400,Sigmoid", headers=PNG))
    assert not np.array_equal(exact, sigmoid)
    for bad in ("40,400,linear_exact_", "40,400,linear exact", "40,400,", "40,400,linear,1"):
        refused(await app_client.get(ct_url, params={"window": bad}), "window")


async def test_window_width_below_1(app_client: httpx.AsyncClient, ct_url: str) -> None:
    """PS3.3 C.11.2.1.2.1: a LINEAR width is at least 1; C.11.2.1.3.1 and C.11.2.1.3.2: a
    SIGMOID or LINEAR_EXACT one "shall always be greater than 0". `40,0.5,sigmoid` was a 400."""
    for ok in ("40,0.5,sigmoid", "40,0.5,linear-exact", "40,1,linear"):
        r = await app_client.get(ct_url, params={"window": ok}, headers=PNG)
        assert pixels(r).shape == (128, 128), ok
    for bad in ("40,0.5,linear", "40,0.5", "40,0,sigmoid", "40,-1,linear-exact", "40,-0,sigmoid"):
        refused(await app_client.get(ct_url, params={"window": bad}), "window width")


async def test_annotation_and_iccprofile_values(app_client: httpx.AsyncClient, ct_url: str) -> None:
    """`annotation` with no value or a value not a keyword is a 400 (8.3.5.1.1), unsupported
    keywords get the Warning 8.3.5.1.1 words; `iccprofile` takes its five values only, and
    with image/gif, which embeds no ICC profile, only "no" (8.3.5.1.5)."""
    r = await app_client.get(ct_url, params={"annotation": "patient,technique"})
    assert r.status_code == 200
    assert (
        "The following annotation values are not supported: patient,technique"
        in r.headers["warning"]
    )
    for bad in ("", "patient,", "pat ient", "patient,,technique"):
        refused(await app_client.get(ct_url, params={"annotation": bad}), "annotation")
    for bad in ("", "x", "YES", "srgb,"):
        refused(await app_client.get(ct_url, params={"iccprofile": bad}), "iccprofile")
    assert (await app_client.get(ct_url, params={"iccprofile": "srgb,no"})).status_code == 200
    gif = {"Accept": "image/gif"}
    assert (await app_client.get(ct_url, params={"iccprofile": "no"}, headers=gif)).is_success
    for value in ("yes", "srgb", "no,yes"):
        r = await app_client.get(ct_url, params={"iccprofile": value}, headers=gif)
        refused(r, "image/gif", "ICC")


async def test_openapi_window_is_what_the_server_takes(
    app_client: httpx.AsyncClient, ct_url: str
) -> None:
    """The OpenAPI description's `window` (GET /openapi.json) matches every form the server
    takes, the two-value one (read as linear) among them, and none it refuses as
    malformed: its pattern was center,width,function only, in words."""
    doc = (await app_client.get("/openapi.json")).json()
    (schema,) = {
        json.dumps(p["schema"], sort_keys=True)
        for path, ops in doc["paths"].items()
        if path.endswith("/rendered")
        for op in ops.values()
        for p in op["parameters"]
        if p["name"] == "window"
    }
    pattern = json.loads(schema)["pattern"]
    assert "center,width[,function]" in json.loads(schema)["description"]
    taken = ("40,400", "40,400,linear", "-1.5,2e2,SIGMOID", "40,400,Linear-Exact",
             "40,400,linear_exact", ".5,1.,sigmoid", "+1,1E+3")  # fmt: skip
    refused_ = ("40", "40,400,", "40,400,cubic", "a,400", "40,400,linear,1", "40,,linear",
                "1e,400", "40;400")  # fmt: skip
    for value in taken:
        assert re.fullmatch(pattern, value), value
        r = await app_client.get(ct_url, params={"window": value}, headers=PNG)
        assert r.status_code == 200, (value, r.text)
    for value in refused_:
        assert not re.fullmatch(pattern, value), value
        refused(await app_client.get(ct_url, params={"window": value}), "window")


async def test_repeated_parameters(app_client: httpx.AsyncClient, ct_url: str) -> None:
    """A rendering parameter given twice with different values is a 400 naming it (the last
    was taken silently: `quality=1&quality=90` was quality 90); twice alike, it is that
    value. `accept` given twice is one list, in order (RFC 9110 5.3, as the header field
    it mirrors, PS3.18 8.3.3.1): the first was dropped."""
    thumb = ct_url.replace("/rendered", "/thumbnail")
    for name, a, b in (
        ("window", "40,400", "50,350"),
        ("quality", "1", "90"),
        ("viewport", "64,64", "32,32"),
        ("iccprofile", "no", "srgb"),
        ("annotation", "patient", "technique"),
    ):
        for url in (ct_url, thumb):
            r = await app_client.get(f"{url}?{name}={a}&{name}={b}")
            refused(r, name, "twice", "give it once")
            r = await app_client.get(f"{url}?{name}={a}&{name}={a}", headers=PNG)
            assert r.status_code == 200, (name, r.text)
    r = await app_client.get(f"{ct_url}?viewport=32,32&viewport=32,32", headers=PNG)
    assert pixels(r).shape == (32, 32)
    r = await app_client.get(f"{ct_url}?accept=image/png&accept=image/gif")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    r = await app_client.get(f"{ct_url}?charset=utf-8&charset=latin1", headers=PNG)
    assert r.status_code == 200, r.text


async def test_accept_image_slash(app_client: httpx.AsyncClient, ct_url: str) -> None:
    """`Accept: image/` (dicomweb-client sends what it is given, `image/` among the types it
    lets through) is no media range (RFC 9110 12.5.1: type "/" subtype): ignored (PS3.18
    8.7.7), and with nothing else acceptable, a 406 that names it and the wildcard meant; it
    said only which types there are. Beside a valid range it is ignored."""
    for url in (ct_url, ct_url.replace("/rendered", "/thumbnail")):
        r = await app_client.get(url, headers={"Accept": "image/"})
        assert r.status_code == 406, r.text
        message = r.json()["message"]
        assert "'image/'" in message and "image/*" in message and "image/png" in message
        r = await app_client.get(url, headers={"Accept": "image/, image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    r = await app_client.get(ct_url, headers={"Accept": "image/*"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
