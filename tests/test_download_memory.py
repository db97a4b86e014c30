"""Memory of a download over HTTP/1.1, through the server's whole protocol stack: hypercorn on
uvloop (as `serve` runs it) in a thread of the test process, a real socket. A download holds
one chunk (READ_CHUNK_MAX_BYTES) beyond the process's shared read-ahead
(READ_AHEAD_TOTAL_BYTES). Measured with tracemalloc (the bytes Python holds, not resident
memory, which the allocator blurs), the shared read-ahead set to nothing so that every chunk
is read when the sender asks for it: the moment a sent chunk and the next could be held
together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest
import uvloop
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomweb_server.app import create_app
from dicomweb_server.blobstore import reading
from dicomweb_server.blobstore.reading import READ_CHUNK_MAX_BYTES
from dicomweb_server.config import Settings
from dicomweb_server.httpd import hypercorn_config, prepare_process
from tests.helpers import inst_url, make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import free_port

pytestmark = pytest.mark.db

# What a download may hold besides its chunk: the response head, socket reads, bookkeeping.
SLACK_BYTES = 512 * 1024
EXPLICIT = str(ExplicitVRLittleEndian)


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The app served by hypercorn on uvloop in a thread; yields the server's address."""
    from hypercorn.asyncio import serve

    prepare_process()
    settings = dataclasses.replace(settings, host="127.0.0.1", port=free_port())
    config = hypercorn_config(settings)
    config.accesslog = None
    ready = threading.Event()
    loop_and_stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop_and_stop.append((asyncio.get_running_loop(), stop))
        ready.set()
        await serve(create_app(settings), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=uvloop.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            threading.Event().wait(0.05)
        yield url
    finally:
        loop, stop = loop_and_stop[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def download(url: str, path: str, accept: str) -> tuple[bytes, int, int]:
    """GET `path` over a socket, read as fast as it comes: (the response head, body bytes,
    the most bytes Python held meanwhile, counted from when the head came)."""
    port = int(url.rsplit(":", 1)[1])
    buf = bytearray(256 * 1024)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
        sock.sendall((request + "Connection: close\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(buf)
            assert n, "closed before the head"
            head += bytes(buf[:n])
        head, _, body = head.partition(b"\r\n\r\n")
        received = len(body)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            while n := sock.recv_into(buf):
                received += n
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    return head, received, peak


@pytest.fixture
def no_read_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "READ_AHEAD_TOTAL_BYTES", 0)


@pytest.mark.usefixtures("no_read_ahead")
@pytest.mark.parametrize(
    "transfer_syntax",
    [
        pytest.param("", id="as-stored-content-length"),
        pytest.param(EXPLICIT, id="converted-chunked"),
    ],
)
def test_a_download_holds_one_chunk(settings: Settings, transfer_syntax: str) -> None:
    """A 24 MiB instance, as stored (Content-Length) and converted (chunked transfer coding).
    Each sent chunk was held while the next was read (Starlette's loop and each generator
    passing chunks on kept it; so did the transport, for the tail its low-water mark left
    queued), the first chunk for the whole download, and h11 copied each chunk to frame it
    in chunked coding: 9 to 13 MiB for a 4 MiB chunk."""
    ds = make_instance(frames=48, rows=512, cols=512)
    if transfer_syntax:  # stored Implicit VR Little Endian, sent Explicit
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with serving(settings) as url:
        stow = httpx.post(
            f"{url}/dicom-web/studies",
            content=multipart_body([to_bytes(ds)]),
            headers=stow_headers(),
            timeout=60,
        )
        assert stow.status_code == 200, stow.text
        ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
        accept = f'multipart/related; type="application/dicom"{ts}'
        head, received, peak = download(url, inst_url(ds), accept)
    assert head.startswith(b"HTTP/1.1 200 ")
    chunked = b"transfer-encoding: chunked" in head.lower()
    assert chunked == bool(transfer_syntax)
    assert received > 48 * 512 * 512 * 2
    assert peak < READ_CHUNK_MAX_BYTES + SLACK_BYTES, f"{peak / 2**20:.1f} MiB held"
