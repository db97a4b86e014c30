"""QIDO-RS pages longer than a batch (search.QIDO_FETCH_ROWS) are read and sent a batch at a
time: the same bytes as a page read whole, the same Warning, 204 and gzip, in memory bounded
by the batch rather than by the page. A page of 1,000 instances with `includefield=all` was
built whole: 29 MB for 2.7 MB of JSON, up to the pool's 10 requests at once."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid
from starlette.applications import Starlette

from dicomweb_server import search
from dicomweb_server.dicom_json import dumps
from tests.helpers import asgi_get, make_instance, multipart_body, stow_headers, to_bytes

_N = 120  # instances stored: two series of one study, and one of another
_COMMENT = "x" * 6000  # ImageComments (LT): each instance's metadata about 7 KB
_MORE = "There are additional results"
_XML = 'multipart/related; type="application/dicom+xml"'


@pytest.fixture
async def stored(app_client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    studies = [generate_uid(), generate_uid()]
    series = [
        (studies[0], generate_uid()),
        (studies[0], generate_uid()),
        (studies[1], generate_uid()),
    ]
    parts = [
        to_bytes(make_instance(study=st, series=se, InstanceNumber=n, ImageComments=_COMMENT))
        for n in range(_N)
        for st, se in [series[n % 3]]
    ]
    for at in range(0, _N, 40):
        r = await app_client.post("/dicom-web/studies", content=multipart_body(parts[at : at + 40]),
                                  headers=stow_headers())  # fmt: skip
        assert r.status_code == 200, r.text
    yield app_client


async def _pages(client: httpx.AsyncClient, url: str, size: int) -> list[Any]:
    """Every result of `url`, read `size` at a time (each page one statement)."""
    out: list[Any] = []
    while True:
        r = await client.get(f"{url}&limit={size}&offset={len(out)}")
        if r.status_code == 204:
            return out
        out += r.json()


@pytest.mark.parametrize(
    "url",
    [
        "/dicom-web/instances?includefield=all",
        "/dicom-web/instances?includefield=00100010&Modality=CT",
        "/dicom-web/series?includefield=all",
        "/dicom-web/studies?includefield=all",
    ],
)
async def test_a_page_in_batches_is_the_page_read_whole(
    stored: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Pages of every length around the batch size, at every offset around the end, give
    the bytes the pages read in one statement give, and the Warning says whether more
    results exist exactly when there are (PS3.18 8.3.4.4.1); past the end, 204."""
    everything = await _pages(stored, url, 100)
    monkeypatch.setattr(search, "QIDO_FETCH_ROWS", 7)
    total = len(everything)
    for limit in (6, 7, 8, 13, 14, 15, 1000):
        for offset in {0, 1, max(total - 15, 0), max(total - 7, 0), total - 1, total}:
            r = await stored.get(f"{url}&limit={limit}&offset={offset}")
            want = everything[offset : offset + limit]
            if not want:
                assert r.status_code == 204 and not r.content
                continue
            assert r.status_code == 200 and r.content == dumps(want), (limit, offset)
            assert (_MORE in r.headers.get("warning", "")) == (offset + limit < total)
            assert r.headers["vary"].startswith("Accept, Accept-Encoding")


async def test_batches_gzip_and_xml(
    stored: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compressed as it is sent when the client accepts gzip; DICOM XML one part per data set,
    as a page read whole gives them."""
    url = "/dicom-web/instances?includefield=all&limit=1000"
    whole = await stored.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in whole.headers
    monkeypatch.setattr(search, "QIDO_FETCH_ROWS", 7)
    packed = await stored.get(url, headers={"Accept-Encoding": "gzip"})  # httpx inflates it
    assert packed.headers["content-encoding"] == "gzip" and packed.content == whole.content
    assert (
        "content-encoding"
        not in (await stored.get(url, headers={"Accept-Encoding": "identity"})).headers
    )
    xml_type = 'multipart/related; type="application/dicom+xml"'
    batched = await stored.get(url, headers={"Accept": xml_type})
    monkeypatch.setattr(search, "QIDO_FETCH_ROWS", 1000)
    read_whole = await stored.get(url, headers={"Accept": xml_type})
    assert batched.status_code == read_whole.status_code == 200
    assert _xml_parts(batched) == _xml_parts(read_whole) and len(_xml_parts(batched)) == _N


def _xml_parts(r: httpx.Response) -> list[bytes]:
    boundary = r.headers["content-type"].rpartition("boundary=")[2].encode()
    body = r.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    return body.split(b"--" + boundary)[1:-1]


async def test_a_long_page_takes_the_memory_of_a_batch(
    stored: httpx.AsyncClient, app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peak of a page is a few batches' worth, not the page's: the rows of a batch, their
    JSON, the data set being rendered. Read whole, the page took about 5 times its JSON."""
    monkeypatch.setattr(search, "QIDO_FETCH_ROWS", 10)
    await asgi_get(app, "/dicom-web/instances", query="includefield=all&limit=5")  # code paths warm
    tracemalloc.start()
    try:
        status, length, _ = await asgi_get(
            app, "/dicom-web/instances", query="includefield=all&limit=1000"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200 and length > _N * len(_COMMENT)
    row_bytes = length // _N
    assert peak < 8 * search.QIDO_FETCH_ROWS * row_bytes + 300_000, (peak, length)


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
@pytest.mark.parametrize("accept", ["application/dicom+json", _XML])
async def test_a_head_of_a_long_page_closes_its_batches(
    app: Starlette,
    stored: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    encoding: str,
    accept: str,
) -> None:
    """A HEAD of a page longer than a batch closes the page's batches before it ends, gzip
    or not: gzipped, the body was a gzip stream never started, whose closing closed nothing
    beneath it, and the page's generators were left to the garbage collector. (They are
    held here, so only the response can have closed them.) No batch statement runs."""
    made: list[Any] = []
    real = search._batches

    def watched(*args: Any) -> Any:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(search, "_batches", watched)
    monkeypatch.setattr(search, "QIDO_FETCH_ROWS", 7)
    statements = [0]
    index = app.state.services.index
    real_search = index.search

    async def counted(*args: Any) -> Any:
        statements[0] += 1
        return await real_search(*args)

    monkeypatch.setattr(index, "search", counted)
    headers = {"Accept": accept, "Accept-Encoding": encoding}
    r = await stored.head("/dicom-web/instances?limit=1000", headers=headers)
    assert r.status_code == 200 and not r.content
    assert (r.headers.get("content-encoding") == "gzip") == (encoding == "gzip")
    assert len(made) == 1 and made[0].ag_frame is None  # closed
    assert statements == [1]  # the first batch's: none of the rest
