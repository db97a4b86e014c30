"""The benchmarks' raw HTTP client (benchmarks.common.raw_get): a miscount would skew every
large-retrieve figure, ours and Orthanc's alike."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.common import GET_BUFFER_BYTES, raw_get
from benchmarks.sendfile_server import sendfile_server


@pytest.fixture
def keep_alive_server() -> Iterator[str]:
    """A server that keeps the connection open after a response with a Content-Length (the
    body must end there, not at a close), and closes after one without."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = self.headers["Accept"].encode() * 1000
            self.send_response(404 if "missing" in self.path else 200)
            if "sized" in self.path:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_raw_get_counts_a_large_body(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * GET_BUFFER_BYTES + 17))
    with sendfile_server(path) as url:
        status, nbytes, seconds = raw_get(url, "*/*")
    assert (status, nbytes) == (200, path.stat().st_size)
    assert seconds > 0


@pytest.mark.parametrize("path", ["/sized", "/closed?x=1", "/missing/sized"])
def test_raw_get_ends_at_the_length_or_the_close(keep_alive_server: str, path: str) -> None:
    status, nbytes, _ = raw_get(keep_alive_server + path, "ab")
    assert (status, nbytes) == (404 if "missing" in path else 200, 2000)
