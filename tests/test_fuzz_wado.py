"""Fuzzing the WADO-RS retrieve surface (PS3.18 10.4) on stored real samples (multi-frame,
compressed, colour, a document): drawn Accept headers and `accept`/`charset` query
parameters, frame lists, rendered and thumbnail parameters (PS3.18 8.3.5.1), Range headers on
frames and bulk data, `includefield`, and percent-encoded path pieces, through the real app.
The answer is never a 5xx and never a hang; a 4xx names its reason."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import ROOT, multipart_body, stow_headers

pytestmark = pytest.mark.db

# Multi-frame (RLE, native 8-bit), compressed colour multi-frame (JPEG baseline YBR_FULL_422),
# colour native, colour JPEG 2000, a palette, an encapsulated PDF.
SAMPLES = [
    "generated/coverage/nm_10frames_rle.dcm",
    "generated/coverage/xa_20frames_8bit.dcm",
    "generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm",
    "real/pydicom-data/SC_rgb.dcm",
    "generated/coverage/xc_rgb_j2k_lossy.dcm",
    "generated/coverage/us_palette_color_rle.dcm",
    "generated/coverage/encapsulated_pdf.dcm",
]
# Every answer a retrieve may give here; 5xx never.
ANSWERS = {200, 204, 206, 304, 400, 404, 406, 416}
# A request that takes longer than this is a hang. The slowest seen in 8000 examples took
# 2 s (a rendered frame); once, on a machine at load 17, a bulk data listing waited 30 s on
# the database and was not seen again, so the bound leaves room for a loaded machine.
HANG_S = 60.0

_MEDIA = st.sampled_from([
    "*/*", "application/dicom", "application/octet-stream", "application/dicom+json",
    "application/json", "application/dicom+xml", "multipart/related", "multipart/*",
    "image/*", "image/jpeg", "image/png", "image/gif", "image/jp2", "image/jls", "image/jphc",
    "image/jpx", "image/dicom-rle", "image/x-dicom-rle", "video/mpeg", "application/pdf",
    "text/html", "text/plain", "text/xml", "x", "", "image/", "/png", "*/png", "**", "a/b/c",
])  # fmt: skip
_TS = st.sampled_from([
    "*", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.3", "", "1..2", "x" * 80,
])  # fmt: skip
_QUOTE = st.sampled_from(['"', "", "'", '"\\'])


def _param(name: str) -> st.SearchStrategy[str]:
    value = {
        "type": st.one_of(_MEDIA, st.just("application/dicom; x=1")),
        "transfer-syntax": _TS,
        "q": st.sampled_from(["1", "0", "0.5", "0.001", "1.0001", "-1", "x", "", "1e3", "0.9999"]),
        "charset": st.sampled_from(["utf-8", "UTF-8", "ISO_IR 192", "latin1", "", "*"]),
        "boundary": st.sampled_from(["x", ""]),
    }.get(name, st.text(st.characters(codec="ascii"), max_size=4))
    return st.builds(lambda q1, v, q2: f"{name}={q1}{v}{q2}", _QUOTE, value, _QUOTE)


_RANGE = st.builds(
    lambda media, params: "; ".join([media, *params]),
    _MEDIA,
    st.lists(
        st.sampled_from(
            ["type", "transfer-syntax", "q", "charset", "boundary", "x", "Type"]
        ).flatmap(_param),
        max_size=3,
    ),
)
_ACCEPT = st.one_of(
    st.none(),
    st.lists(_RANGE, min_size=1, max_size=4).map(", ".join),
    st.lists(_RANGE, min_size=30, max_size=60).map(",".join),  # many alternatives
    st.sampled_from([",".join(["*/*;q=.5", "a/b;q=0"] * 128), ",".join(["*/*"] * 257)]),
    st.sampled_from([",", ";", ";;", "*/*;q=", 'multipart/related; type="', "\x7f", "é/é",
                     "multipart/related;type=application/dicom;transfer-syntax=*,*/*;q=0.1"]),
)  # fmt: skip
_FRAMES = st.one_of(
    st.lists(st.integers(1, 25), min_size=1, max_size=5).map(lambda f: ",".join(map(str, f))),
    st.sampled_from(["0", "-1", "1,0", "1,1,1", "1, 2", " 1", "1,", ",1", "1,,2", "999999999",
                     "9999999999", "2147483648", "1.0", "1-3", "%31", "%2C", "\u0661", "a",
                     ",".join(["1"] * 10_001), ",".join(["1"] * 10_000),
                     ",".join(map(str, range(1, 10_001))), ",".join(map(str, range(1, 10_002)))]),
)  # fmt: skip
_NUMBERS = st.sampled_from(
    ["0", "1", "-1", "40", "1.5", "1e3", "1e309", "nan", "", " 1",
     "00", "100", "101", "65535", "65536", "8192", "8193", "-0", "+2"]
)  # fmt: skip
_QUERY_VALUES = {
    "window": st.builds(
        lambda c, w, f: ",".join(x for x in (c, w, f) if x is not None),
        _NUMBERS,
        _NUMBERS,
        st.one_of(
            st.none(), st.sampled_from(["linear", "LINEAR_EXACT", "SIGMOID", "x", "", "\u0131"])
        ),
    ),
    "viewport": st.lists(_NUMBERS, min_size=1, max_size=7).map(",".join),
    "quality": _NUMBERS,
    "annotation": st.sampled_from(["patient", "technique", "patient,technique", "x", ""]),
    "charset": st.sampled_from(["utf-8", "UTF-8", "ISO-8859-1", "x", "", "*"]),
    "iccprofile": st.sampled_from(["no", "yes", "srgb", "adobergb", "rommrgb", "x", ""]),
    "region": st.lists(_NUMBERS, min_size=1, max_size=5).map(",".join),
    "accept": st.one_of(_MEDIA, _RANGE),
    "includefield": st.sampled_from(["all", "00100010", "PatientName", "x", "", "7FE00010"]),
    "x": st.text(max_size=5),  # query values are percent-encoded: any text goes
}
_QUERY = st.lists(
    st.sampled_from(sorted(_QUERY_VALUES)).flatmap(
        lambda k: st.tuples(st.just(k), _QUERY_VALUES[k])
    ),
    max_size=4,
)
_BYTE_RANGES = st.one_of(
    st.none(),
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.sampled_from(["", "0", "1", "100", "999999999", "18446744073709551616"]),
        st.sampled_from(["", "0", "10", "99", "999999999"]),
    ),
    st.sampled_from(["bytes=-0", "bytes=-1", "bytes=-100", "bytes=-99999999", "bytes=0-1,5-6",
                     "bytes=0-0,-1", "items=0-1", "bytes=x", "bytes", "bytes=1-0", "=",
                     "bytes=\u0661-"]),
)  # fmt: skip
# Path pieces that are not the stored UIDs: odd characters, percent-encoded or not, and long
# (a bare `..` is not among them: httpx removes the dot segment before sending).
_ODD_UIDS = st.sampled_from(["1.2.3", "1.2.3 ", "1.2.3%00", "1.2.3%2F4", "1.2.3%5C4",
                             "%2E%2E", "1.2." + "9" * 62, "1." + "2" * 200, "1.2.%E2%82%AC",
                             "1.2.%FF", "%", "1.2.3;x=1", "1.2.3?x", "1.02.3", "-1", "1e3",
                             "1" * 10_000])  # fmt: skip
_RESOURCES = ["", "/metadata", "/rendered", "/thumbnail", "/bulkdata", "/pixeldata",
              "/frames/{f}", "/frames/{f}/rendered", "/frames/{f}/thumbnail",
              "/bulk/{b}", "/bulk/7FE00010/frames/{f}", "/bulk/{b}/x"]  # fmt: skip


async def _store(client: httpx.AsyncClient, samples: Path) -> list[tuple[str, str, str, list[str]]]:
    """The samples stored: their UIDs and the bulk data paths their metadata gives."""
    stored = []
    for name in SAMPLES:
        data = (samples / name).read_bytes()
        r = await client.post(f"{ROOT}/studies", content=multipart_body([data]),
                              headers=stow_headers())  # fmt: skip
        assert r.status_code == 200, (name, r.text)
        sop = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0].split("/studies/")[1]
        study, _, series, _, instance = sop.split("/")
        meta = await client.get(f"{ROOT}/studies/{study}/series/{series}/instances/{instance}"
                                "/metadata")  # fmt: skip
        text = json.dumps(meta.json())
        bulk = [u.split("/bulk/")[1] for u in _uris(text)]
        stored.append((study, series, instance, bulk or ["7FE00010"]))
    return stored


def _uris(text: str) -> list[str]:
    out = []
    for piece in text.split('"BulkDataURI": "')[1:]:
        out.append(piece.partition('"')[0])
    return out


@pytest.fixture
async def stored(
    app_client: httpx.AsyncClient, samples: Path
) -> list[tuple[str, str, str, list[str]]]:
    return await _store(app_client, samples)


def _url(uids: tuple[str, str, str], level: int, resource: str) -> str:
    parts = [f"{ROOT}/studies/{uids[0]}"]
    if level >= 1:
        parts.append(f"/series/{uids[1]}")
    if level >= 2:
        parts.append(f"/instances/{uids[2]}")
    return "".join(parts) + resource


async def _get(
    client: httpx.AsyncClient, url: str, headers: dict[str, str],
    params: list[tuple[str, str]], method: str = "GET",
) -> httpx.Response:  # fmt: skip
    request = client.request(method, url, headers=headers, params=tuple(params))
    return await asyncio.wait_for(request, HANG_S)


def _check(r: httpx.Response, what: object) -> None:
    assert r.status_code in ANSWERS, (what, r.status_code, r.text[:300])
    if 400 <= r.status_code < 500 and r.status_code != 404:
        # A 404 may be the router's (a path that names no resource); any other 4xx is ours,
        # with a reason.
        assert r.json()["message"], (what, r.status_code, r.text[:300])


# Request fields other than Accept and Range that choose a response (media/headers.py).
_OTHER_HEADERS = st.dictionaries(
    st.sampled_from(["If-Range", "If-None-Match", "Accept-Encoding", "Accept-Charset"]),
    st.sampled_from(['"x"', "*", "W/\"a\"", "gzip", "gzip;q=0, identity;q=0", "br", "",
                     "utf-8", "Sat, 01 Jan 2000 00:00:00 GMT"]),
    max_size=2,
)  # fmt: skip


@settings(
    # About 5 s; WADO_FUZZ_EXAMPLES=3000 for a longer run (90 s).
    max_examples=int(os.environ.get("WADO_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    which=st.integers(0, len(SAMPLES) - 1),
    level=st.sampled_from([2, 2, 2, 1, 0]),
    resource=st.sampled_from(_RESOURCES),
    frames=_FRAMES,
    bulk=st.integers(0, 50),
    accept=_ACCEPT,
    query=_QUERY,
    byte_range=_BYTE_RANGES,
    other=_OTHER_HEADERS,
    method=st.sampled_from(["GET", "GET", "GET", "HEAD"]),
)
async def test_retrieve_requests_never_5xx(
    app_client: httpx.AsyncClient, stored: list[tuple[str, str, str, list[str]]],
    which: int, level: int, resource: str, frames: str, bulk: int, accept: str | None,
    query: list[tuple[str, str]], byte_range: str | None, other: dict[str, str], method: str,
) -> None:  # fmt: skip
    study, series, instance, uris = stored[which]
    if "{" in resource:
        level = 2  # frames and bulk data are an instance's
    path = resource.format(f=frames, b=uris[bulk % len(uris)])
    headers = {k: v for k, v in (("Accept", accept), ("Range", byte_range)) if v is not None}
    headers.update(other)
    url = _url((study, series, instance), level, path)
    what = (method, SAMPLES[which], level, path[:80], headers, query)
    try:
        r = await _get(app_client, url, headers, query, method)
    except UnicodeEncodeError:
        return  # httpx refuses a header that is not Latin-1 before sending it
    event(f"{r.status_code}")  # --hypothesis-show-statistics: how many got past the checks
    if method == "HEAD":
        assert r.status_code < 500 and not r.content, (what, r.status_code)
        return
    _check(r, what)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, len(SAMPLES) - 1),
    position=st.integers(0, 2),
    odd=_ODD_UIDS,
    level=st.integers(0, 2),
    resource=st.sampled_from(["", "/metadata", "/rendered", "/thumbnail", "/frames/1",
                              "/bulk/7FE00010", "/pixeldata", "/bulkdata"]),
)  # fmt: skip
async def test_odd_uids_in_the_path_never_5xx(
    app_client: httpx.AsyncClient, stored: list[tuple[str, str, str, list[str]]],
    which: int, position: int, odd: str, level: int, resource: str,
) -> None:  # fmt: skip
    uids = list(stored[which][:3])
    uids[position] = odd
    if resource.startswith(("/frames", "/bulk/")):
        level = 2
    url = _url((uids[0], uids[1], uids[2]), max(level, position), resource)
    r = await _get(app_client, url, {}, [])
    what = (SAMPLES[which], position, odd[:80], resource)
    _check(r, what)
    assert r.status_code in (400, 404), what


async def test_the_samples_answer(
    app_client: httpx.AsyncClient, stored: list[tuple[str, str, str, list[str]]]
) -> None:
    """The fuzzers start from instances the server serves (else they test only refusals):
    each one's instance, metadata and first frame or rendering answer 200."""
    for study, series, instance, _ in stored:
        base = _url((study, series, instance), 2, "")
        for path in ("", "/metadata", "/thumbnail"):
            r = await app_client.get(base + path)
            assert r.status_code == 200, (base, path, r.status_code, r.text[:200])
