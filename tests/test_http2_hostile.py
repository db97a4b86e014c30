"""Hostile HTTP/2 clients against a real server (hypercorn in a subprocess, HTTP/2 in clear
text with prior knowledge, as hypercorn serves it beside TLS): a client that grants no
flow-control window, the rapid reset of CVE-2023-44487, and a connection left with only
reset streams (httpd._H2Protocol)."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest

from dicomweb_server.blobstore.reading import READ_AHEAD_TOTAL_BYTES, READ_CHUNK_MAX_BYTES
from dicomweb_server.httpd import H2_MAX_HANDLERS, H2_MAX_REFUSED_STREAMS, KEEP_ALIVE_TIMEOUT_S
from tests.helpers import make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import ServerProcess
from tests.test_slow_clients import clean_log, port_of, serving

pytestmark = pytest.mark.db

RETRIEVE = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


class Client:
    """A raw HTTP/2 client (the h2 library) on one connection."""

    def __init__(self, port: int, settings: dict[int, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path: str, accept: str = "application/dicom+json") -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        head = [(":method", "GET"), (":path", path), (":scheme", "http"),
                (":authority", "127.0.0.1"), ("accept", accept)]  # fmt: skip
        self.conn.send_headers(stream_id, head, end_stream=True)
        return stream_id

    def events(self, for_s: float) -> list[h2.events.Event | None]:
        """What came within `for_s`; [None] at the end if the server closed the connection."""
        got: list[h2.events.Event | None] = []
        deadline = time.monotonic() + for_s
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                return [*got, None]
            got += self.conn.receive_data(data)
            self.flush()
        return got


def _rss_kib(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _blob_fds(server: ServerProcess, data: Path) -> list[str]:
    fds = Path(f"/proc/{server.proc.pid}/fd")
    targets = [str(fd.readlink()) for fd in fds.iterdir() if fd.is_symlink()]
    return [t for t in targets if t.startswith(str((data / "blobs").resolve()))]


def _store(server: ServerProcess, raw: bytes) -> str:
    r = httpx.post(f"{server.url}/studies", content=multipart_body([raw]), headers=stow_headers(),
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    url: str = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    return url.split(f":{port_of(server)}", 1)[1]


def test_http2_downloads_with_no_window_hold_a_chunk_and_are_reset(
    tmp_path: Path, clean_db: str
) -> None:
    """A client that grants no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0) and asks
    for a 12.6 MB instance on 30 streams: the server holds at most a chunk for each and the
    read-ahead they share (hypercorn let the app go on while nothing was sent: it read all
    378 MB into memory), and resets each stream (CANCEL) once its bytes waited
    SEND_STALL_TIMEOUT_S (1 s), their requests ended and their blobs closed, while the
    connection serves on. The downloads
    were held for as long as the connection lived (the kernel's TCP_USER_TIMEOUT saw a
    client acknowledging every byte)."""
    streams, raw = 30, to_bytes(make_instance(rows=2048, cols=3072))
    data = tmp_path / "data"
    with serving(tmp_path, clean_db, DICOMWEB_SEND_STALL_TIMEOUT_S="1") as server:
        path = _store(server, raw)
        before = _rss_kib(server)
        client = Client(port_of(server), {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        with client.sock:
            asked = {client.request(path, RETRIEVE) for _ in range(streams)}
            client.flush()
            began, peak, reset = time.monotonic(), 0, set[int]()
            while reset != asked and time.monotonic() - began < 10:
                for event in client.events(0.2):
                    assert event is not None, "the server closed the connection"
                    if isinstance(event, h2.events.StreamReset):
                        assert event.error_code == h2.errors.ErrorCodes.CANCEL, event
                        reset.add(event.stream_id)
                peak = max(peak, _rss_kib(server) - before)
            took = time.monotonic() - began
            assert reset == asked, f"{len(reset)} of {streams} streams reset in {took:.1f} s"
            assert 0.9 < took < 5, took
            # a chunk each, the read-ahead all share, and room for the rest of the process
            bound = streams * READ_CHUNK_MAX_BYTES + READ_AHEAD_TOTAL_BYTES + 32 * 1024 * 1024
            assert peak * 1024 < bound < streams * len(raw), f"{peak} KiB held"
            deadline = time.monotonic() + 5
            while _blob_fds(server, data) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _blob_fds(server, data) == [], "a download's blob is still open"
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
            stream = client.request("/dicom-web/studies")
            client.flush()
            events = client.events(3)
            (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
            assert response.stream_id == stream and (b":status", b"200") in response.headers
        clean_log(server)


def _rapid_reset(port: int, path: str, count: int) -> list[h2.events.Event | None]:
    """`count` requests, each reset as soon as sent, in one write; then a request of
    /studies. What came in the next 3 s."""
    client = Client(port)
    with client.sock:
        for _ in range(count):
            client.conn.reset_stream(client.request(path), h2.errors.ErrorCodes.CANCEL)
        client.flush()
        events = client.events(2)
        if None not in events:
            client.request("/dicom-web/studies")
            client.flush()
            events += client.events(3)
        return events


def test_http2_rapid_reset_is_bounded(tmp_path: Path, clean_db: str) -> None:
    """The rapid reset (CVE-2023-44487): requests reset as soon as sent, in one write.
    Streams the client resets no longer count against its SETTINGS_MAX_CONCURRENT_STREAMS,
    but their handlers still run: at most H2_MAX_HANDLERS are started, the next
    H2_MAX_REFUSED_STREAMS refused (RST_STREAM REFUSED_STREAM) and the connection serves
    on; one stream more and it is closed (GOAWAY ENHANCE_YOUR_CALM). All were handled at
    once (and a 1001st ended the connection with a traceback, the priority tree's
    TooManyStreamsError)."""
    path, edge = "/dicom-web/studies/1.2.3.4.5.6/series", H2_MAX_HANDLERS + H2_MAX_REFUSED_STREAMS
    with serving(tmp_path, clean_db) as server:
        events = _rapid_reset(port_of(server), path, edge)
        assert None not in events, "the server closed the connection"
        (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert (b":status", b"204") in response.headers
        time.sleep(0.5)  # the access log lines: one at its reset for each stream handled
        handled = server.log.read_text().count(f'GET {path} 2" - -')
        assert 0 < handled <= H2_MAX_HANDLERS, handled
        events = _rapid_reset(port_of(server), path, edge + 1)
        (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert events[-1] is None
        time.sleep(0.5)
        assert server.log.read_text().count(f'GET {path} 2" - -') <= handled + H2_MAX_HANDLERS
        clean_log(server)


def test_http2_connection_serves_more_than_a_thousand_requests(
    tmp_path: Path, clean_db: str
) -> None:
    """An HTTP/2 connection has no limit on its number of requests: hypercorn's
    `keep_alive_max_requests` (1000) made it send a GOAWAY naming the 1001st request as
    processed and then not answer it, which clients failed (httpx: RemoteProtocolError; a
    viewer fetching a study's frames one by one over one connection)."""
    with serving(tmp_path, clean_db) as server:
        with httpx.Client(http1=False, http2=True, timeout=10) as client:
            for _ in range(1005):
                r = client.get(f"{server.url}/studies")
                assert (r.http_version, r.status_code) == ("HTTP/2", 204)
        clean_log(server)


def test_http2_connection_left_with_reset_streams_is_closed_idle(
    tmp_path: Path, clean_db: str
) -> None:
    """A connection whose client reset the download it was receiving and then sends nothing
    is closed after KEEP_ALIVE_TIMEOUT_S, as one whose response ended is. hypercorn restarts
    its idle timer only when a response ends: the connection stayed open for good."""
    with serving(tmp_path, clean_db) as server:
        path = _store(server, to_bytes(make_instance(rows=2048, cols=3072)))
        client = Client(port_of(server))
        with client.sock:
            stream = client.request(path, RETRIEVE)
            client.flush()
            events = client.events(1)
            assert any(isinstance(e, h2.events.DataReceived) for e in events), events
            client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
            client.flush()
            began = time.monotonic()
            events = client.events(KEEP_ALIVE_TIMEOUT_S + 5)
            assert events[-1:] == [None], "the connection is still open"
            assert time.monotonic() - began < KEEP_ALIVE_TIMEOUT_S + 1.5
        clean_log(server)


def test_http2_priority_frames_are_ignored(tmp_path: Path, clean_db: str) -> None:
    """PRIORITY frames naming 1100 streams not opened (RFC 9113 deprecates that priority
    scheme; they are ignored): the connection serves on and nothing is logged. hypercorn
    entered each into its priority tree, and the 1001st ended the connection with a
    TooManyStreamsError traceback in the error log."""
    with serving(tmp_path, clean_db) as server:
        client = Client(port_of(server))
        with client.sock:
            priority = b"".join(
                struct.pack(">I", 5)[1:] + bytes([2, 0]) + struct.pack(">IIB", stream, 0, 15)
                for stream in range(101, 101 + 2 * 1100, 2)
            )
            client.sock.sendall(priority)
            stream = client.request("/dicom-web/studies")
            client.flush()
            events = client.events(3)
            assert None not in events, "the server closed the connection"
            (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
            assert response.stream_id == stream and (b":status", b"204") in response.headers
        clean_log(server)
