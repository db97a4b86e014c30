"""The landing page, the service root, CORS (field notes 2) on answers and errors alike."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from dicomweb_server.config import Settings
from tests.helpers import (
    ROOT,
    TEST_HOSTS,
    inst_url,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

VIEWER = "http://localhost:3000"


async def test_landing_page_and_service_root(app_client: httpx.AsyncClient) -> None:
    r = await app_client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "studies" in r.text and "/dicom-web" in r.text
    r = await app_client.get(ROOT)
    doc = r.json()
    names = {t["transaction"] for t in doc["transactions"]}
    assert {"store_instances", "search_for_studies", "retrieve_instance_frames"} <= names
    assert {"path": f"{ROOT}/studies", "method": "POST", "transaction": "store_instances"} in doc[
        "transactions"
    ]


async def test_service_root_with_a_trailing_slash(app_client: httpx.AsyncClient) -> None:
    """`/dicom-web/` is the service root as `/dicom-web` is (it was a 405: only the Retrieve
    Capabilities OPTIONS took the slash). Other methods stay refused there, with the Allow
    of both spellings."""
    bare = await app_client.get(ROOT)
    slash = await app_client.get(f"{ROOT}/")
    assert slash.status_code == 200 and slash.json() == bare.json()
    assert (await app_client.head(f"{ROOT}/")).status_code == 200
    for method in ("POST", "DELETE"):
        for url in (ROOT, f"{ROOT}/"):
            r = await app_client.request(method, url)
            assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, OPTIONS", url


async def test_cors_on_success_error_and_preflight(app_client: httpx.AsyncClient) -> None:
    r = await app_client.get(f"{ROOT}/studies", headers={"Origin": VIEWER})
    assert r.headers["access-control-allow-origin"] == VIEWER
    assert "Warning" in r.headers["access-control-expose-headers"]
    r = await app_client.get(f"{ROOT}/studies?limit=x", headers={"Origin": VIEWER})
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == VIEWER
    r = await app_client.options(
        f"{ROOT}/studies/1.2/series/1.3/instances/1.4/frames/1",
        headers={
            "Origin": VIEWER,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "accept, authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-max-age"] == "86400"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = await app_client.get(f"{ROOT}/studies", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_preflight_of_head(app_client: httpx.AsyncClient) -> None:
    """A browser preflights a HEAD that carries Authorization; the preflight was a 400
    "Disallowed CORS method" (found by interop review), so the HEAD failed in the browser."""
    r = await app_client.options(
        f"{ROOT}/studies/1.2/series/1.3/instances/1.4/frames/1",
        headers={
            "Origin": VIEWER,
            "Access-Control-Request-Method": "HEAD",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == VIEWER
    assert "HEAD" in r.headers["access-control-allow-methods"]


async def test_unexpected_error_is_500_with_cors(
    app: Starlette, app_client: httpx.AsyncClient
) -> None:
    async def boom(*_args: object) -> None:
        raise RuntimeError("simulated bug")

    app.state.services.index.counts = boom
    r = await app_client.get("/", headers={"Origin": VIEWER})
    assert r.status_code == 500 and r.json()["message"] == "internal error"
    assert r.headers["access-control-allow-origin"] == VIEWER


async def test_every_response_is_nosniff_and_private(app_client: httpx.AsyncClient) -> None:
    """Found by review: only rendered documents said `X-Content-Type-Options: nosniff`, and
    no metadata, search or retrieve response said `Cache-Control`, so a shared cache that
    does not see an Authorization header (one in front of `--auth none`, one configured to
    ignore it) could keep patient data for others. Every answer now carries both, errors and
    preflights included; a response's own Cache-Control (rendered images) stays."""
    ds = make_instance()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 200
    preflight = {"Origin": VIEWER, "Access-Control-Request-Method": "GET"}
    answers = [
        r,
        await app_client.get(f"{ROOT}/studies?PatientID=PAT-1"),
        await app_client.get(f"{inst_url(ds)}/metadata"),
        await app_client.get(f"{inst_url(ds)}/metadata", headers={"Accept-Encoding": "gzip"}),
        await app_client.get(inst_url(ds), headers={"Accept": "multipart/related; type=*/*"}),
        await app_client.get(f"{inst_url(ds)}/frames/1"),
        await app_client.get(f"{ROOT}/studies?limit=x"),
        await app_client.get("/no/such/path"),
        await app_client.get("/"),
        await app_client.get("/health"),
        await app_client.options(f"{ROOT}/studies", headers=preflight),
    ]
    etag = answers[2].headers["etag"]
    answers.append(
        await app_client.get(f"{inst_url(ds)}/metadata", headers={"If-None-Match": etag})
    )
    assert [a.status_code for a in answers] == [200] * 6 + [400, 404, 200, 200, 200, 304]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["cache-control"] == "private", answer.url
    rendered = await app_client.get(f"{inst_url(ds)}/rendered")
    assert rendered.headers["cache-control"] == "private, max-age=3600"
    assert rendered.headers.get_list("x-content-type-options") == ["nosniff"]


def _paced(*steps: bytes | float) -> AsyncIterator[bytes]:
    """A request body: each bytes item sent, each float a pause in seconds."""

    async def chunks() -> AsyncIterator[bytes]:
        for step in steps:
            if isinstance(step, float):
                await anyio.sleep(step)
            else:
                yield step

    return chunks()


async def test_body_must_bring_its_quota_in_each_idle_timeout(
    tmp_path: Path, clean_db: str
) -> None:
    """BODY_IDLE_TIMEOUT_S and BODY_MIN_BYTES_PER_S at their edge (0.5 s: 256 bytes): a body
    that brings its 256th byte within 0.5 s of waiting starts the clock again, and is read
    to the end, over pauses that add up to more; one that brings 255 is idle at 0.5 s. A
    body trickled a byte every few seconds held its request forever."""
    from dicomweb_server.app import BODY_MIN_BYTES_PER_S, create_app

    assert BODY_MIN_BYTES_PER_S == 512
    doc = b'{"role": "read", "name": "edge"}'.ljust(600)
    settings = Settings(
        data_dir=tmp_path / "d",
        database_url=clean_db,
        allowed_hosts=TEST_HOSTS,
        body_idle_timeout_s=0.5,
    )
    application = create_app(settings)
    transport = httpx.ASGITransport(app=application)
    headers = {"Content-Type": "application/json"}
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        body = _paced(doc[:255], 0.3, doc[255:256], 0.3, doc[256:])
        r = await client.post("/admin/apikeys", content=body, headers=headers)
        assert r.status_code == 201, r.text
        body = _paced(doc[:254], 0.3, doc[254:255], 0.3, doc[255:])
        r = await client.post("/admin/apikeys", content=body, headers=headers)
        assert r.status_code == 408, r.text
        assert r.headers["connection"] == "close"
        assert r.json()["message"] == (
            "the request body came too slowly: 255 of the 256 bytes it must bring in 0.5"
            " seconds (512 a second)"
        )


async def test_idle_body_read_inside_a_task_group_is_a_408() -> None:
    """A body read by a task of a task group: its 408 arrives wrapped in an ExceptionGroup,
    and is still a 408 (it was a 500, logged as a server error). The answer does not wait
    for the stalled client again (its drain did, for what came next)."""
    from dicomweb_server.app import _CatchAllMiddleware, _RequestBody

    async def reader(scope: Scope, receive: Receive, send: Send) -> None:
        async def read_all() -> None:
            while (await receive()).get("more_body"):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})

    app = _RequestBody(_CatchAllMiddleware(reader), idle_s=0.3)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/", content=_paced(b"x" * 200, 0.1, b"y"))).text == "read"
        started = time.monotonic()
        r = await client.post("/", content=_paced(b"x" * 200, 3.0, b"y"))
        assert time.monotonic() - started < 2.5  # not the 3 s pause (idle_s 0.3; a loaded box)
    assert r.status_code == 408
    assert r.headers["connection"] == "close"
    assert r.json()["message"] == "the request body stopped: nothing came for 0.3 seconds"


@pytest.mark.parametrize(
    "path",
    [
        "/nowhere",
        f"{ROOT}/nowhere",
        f"{ROOT}/studies/",
        f"{ROOT}/studies/1.2/series/",
        f"{ROOT}/studies/1.2/series/1.3/instances/1.4/frames/",
        "/health/",
    ],
)
async def test_unknown_path_is_a_json_404_never_a_redirect(
    app_client: httpx.AsyncClient, path: str
) -> None:
    """Found by review: a path matching no route had Starlette's plain-text 404, or, for a
    route's path with a trailing slash, a 307 to it whose Location used the client's Host,
    where every other error is the JSON of routes/common.error_response. DICOMweb clients
    (OHIF, dicomweb-client) never add the slash: it is a 404 naming the path."""
    r = await app_client.get(path)
    assert r.status_code == 404, r.headers
    assert "location" not in r.headers
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"status": 404, "message": f"no resource at {path}"}
