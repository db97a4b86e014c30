"""The landing page, the service root, CORS (field notes 2) on answers and errors alike."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette

from tests.helpers import ROOT

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
