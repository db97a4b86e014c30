"""Memory of a download: one chunk (READ_CHUNK_MAX_BYTES) beyond the process's shared
read-ahead (READ_AHEAD_TOTAL_BYTES). The app is driven as an ASGI server drives it, the
shared read-ahead set to nothing so that every chunk is read when the sender asks for it:
the moment a sent chunk and the next could be held together. Measured with tracemalloc (the
bytes Python holds, not resident memory, which the allocator blurs). The HTTP/1.1 protocol's
part (no copy to frame a chunked body, a transport that lets go of what it wrote) is in
test_httpd.py."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server.blobstore import reading
from dicomweb_server.blobstore.reading import READ_CHUNK_MAX_BYTES
from tests.helpers import inst_url, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db

# What a download may hold besides its chunk: messages, bookkeeping.
SLACK_BYTES = 512 * 1024


async def download(app: Starlette, path: str, accept: str) -> tuple[int, int, int]:
    """GET `path` from the app, its body taken as it comes: (status, body bytes, the most
    bytes Python held meanwhile, counted from the first body message on)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"accept", accept.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    requested = False
    status, received, base = 0, 0, 0

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, received, base
        if message["type"] == "http.response.start":
            status = message["status"]
            return
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        received += len(message.get("body", b""))

    try:
        await app(scope, receive, send)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return status, received, peak


async def test_a_download_holds_one_chunk(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 24 MiB instance retrieved as stored. Each sent chunk was held while the next was
    read (Starlette's response loop, multipart.encode_parts and stream_path kept it), and
    stream_path held the first chunk for the whole download: 8 MiB counted here (the first
    chunk comes before the count starts), 9 in all."""
    ds = make_instance(frames=48, rows=512, cols=512)
    body = multipart_body([to_bytes(ds)])
    stow = await app_client.post("/dicom-web/studies", content=body, headers=stow_headers())
    assert stow.status_code == 200, stow.text
    monkeypatch.setattr(reading, "READ_AHEAD_TOTAL_BYTES", 0)
    accept = 'multipart/related; type="application/dicom"'
    status, received, peak = await download(app, inst_url(ds), accept)
    assert status == 200
    assert received > 48 * 512 * 512 * 2
    assert peak < READ_CHUNK_MAX_BYTES + SLACK_BYTES, f"{peak / 2**20:.1f} MiB held"
