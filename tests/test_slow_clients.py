"""Slow and hostile clients against a real server (hypercorn in a subprocess, real sockets):
bodies that stop or trickle (BODY_IDLE_TIMEOUT_S), downloads nobody reads
(SEND_STALL_TIMEOUT_S), request heads that trickle and idle connections (KEEP_ALIVE_TIMEOUT_S).
The limits are lowered through the settings' environment so that each test takes seconds."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from dicomweb_server.httpd import KEEP_ALIVE_TIMEOUT_S
from tests.helpers import BOUNDARY, make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import ServerProcess, start

pytestmark = pytest.mark.db

STOW_HEAD = (
    "POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
    "Accept: application/dicom+json\r\n"
)


@contextlib.contextmanager
def serving(tmp_path: Path, database_url: str, **env: str) -> Iterator[ServerProcess]:
    server = start(tmp_path / "data", database_url, extra_env=env)
    try:
        yield server
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def port_of(server: ServerProcess) -> int:
    return int(server.url.split(":")[2].split("/")[0])


def read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection (AssertionError if it does not
    within `within_s`), and when its first byte came."""
    sock.settimeout(within_s)
    data, began = b"", 0.0
    with contextlib.suppress(ConnectionResetError):  # it closed, then our bytes met no one
        while chunk := sock.recv(65536):
            began = began or time.monotonic()
            data += chunk
    return data, began


def parse(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers and body of the last response in `data` (after any 100)."""
    at = data.rfind(b"HTTP/1.1 ")
    head, _, body = data[at:].partition(b"\r\n\r\n")
    status, *lines = head.decode("latin1").split("\r\n")
    return status, dict(line.lower().split(": ", 1) for line in lines), body


def leftovers(data: Path) -> list[Path]:
    return [p for p in (data / "blobs" / "tmp").rglob("*") if p.is_file()]


async def counts(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        instances = await conn.fetchval("SELECT count(*) FROM instance")
        reservations = await conn.fetchval("SELECT count(*) FROM blob_reservation")
    finally:
        await conn.close()
    return int(instances), int(reservations)


def clean_log(server: ServerProcess) -> None:
    log = server.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


async def test_stalled_stow_is_a_408_and_keeps_the_parts_it_completed(
    tmp_path: Path, clean_db: str
) -> None:
    """A STOW whose body stops in its second part: 408 after BODY_IDLE_TIMEOUT_S with
    `Connection: close`, the first part stored and named, the second gone without a trace (no
    spool file, reservation or blob), and the connection closed at once (the drain after the
    answer does not wait for the stalled client). It was held until the client went away."""
    first, second = make_instance(), make_instance()
    body = multipart_body([to_bytes(first), to_bytes(second)])
    sent = body.index(to_bytes(second)) + 100
    with serving(tmp_path, clean_db, DICOMWEB_BODY_IDLE_TIMEOUT_S="1") as server:
        with socket.create_connection(("127.0.0.1", port_of(server))) as sock:
            sock.sendall(f"{STOW_HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
            stalled = time.monotonic()
            data, began = read_until_closed(sock, within_s=10)
            closed = time.monotonic()
        status, headers, text = parse(data)
        assert status.startswith("HTTP/1.1 408"), data
        assert 0.9 < began - stalled < 4, began - stalled
        assert closed - began < 1, "the connection stayed open after the answer"
        assert headers["connection"] == "close"
        assert "nothing came for 1 seconds" in headers["warning"]
        (stored,) = json.loads(text)["00081199"]["Value"]
        assert stored["00081155"]["Value"] == [first.SOPInstanceUID]
        clean_log(server)
    assert await counts(clean_db) == (1, 0)  # stopped: its spare reservations are gone
    assert leftovers(tmp_path / "data") == []
    blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1, blobs


def _expect_then_nothing(port: int, path: str, ctype: str) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            "Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        began = time.monotonic()
        data, _ = read_until_closed(sock, within_s=10)
        return data, time.monotonic() - began


def _trickle(port: int) -> tuple[bytes, float]:
    """A chunked STOW body, a byte every 0.1 s (10 bytes a second) for as long as it may."""
    raw = multipart_body([to_bytes(make_instance())])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"{STOW_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode())
        began = time.monotonic()
        sock.settimeout(0.1)
        reply = b""
        for byte in raw:
            with contextlib.suppress(OSError):
                sock.sendall(b"1\r\n" + bytes([byte]) + b"\r\n")
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                reply = sock.recv(65536)
            if reply:
                break
        rest, _ = read_until_closed(sock, within_s=10)
        return reply + rest, time.monotonic() - began


async def test_bodies_that_never_come_or_trickle_are_408(tmp_path: Path, clean_db: str) -> None:
    """`Expect: 100-continue` and then nothing, to a STOW and to an API key creation (which
    had no timeout of its own at all), and a STOW body trickled at 10 bytes a second (under
    BODY_MIN_BYTES_PER_S): each a 408 after about BODY_IDLE_TIMEOUT_S, nothing left behind.
    They were held forever (a STOW for 60 s when nothing came, forever when a byte did)."""
    stow_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    results: dict[str, tuple[bytes, float]] = {}
    with serving(tmp_path, clean_db, DICOMWEB_BODY_IDLE_TIMEOUT_S="1") as server:
        port = port_of(server)
        clients = {
            "stow": lambda: _expect_then_nothing(port, "/dicom-web/studies", stow_type),
            "apikey": lambda: _expect_then_nothing(port, "/admin/apikeys", "application/json"),
            "trickle": lambda: _trickle(port),
        }

        def run(name: str) -> None:
            results[name] = clients[name]()

        threads = [threading.Thread(target=run, args=(name,)) for name in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        clean_log(server)
    for name, why in (("stow", b"nothing came"), ("apikey", b"nothing came"),
                      ("trickle", b"came too slowly")):  # fmt: skip
        data, took = results[name]
        if name != "trickle":
            assert data.startswith(b"HTTP/1.1 100 "), (name, data)
        status, headers, text = parse(data)
        assert status.startswith("HTTP/1.1 408"), (name, data)
        assert headers["connection"] == "close" and why in text, (name, data)
        assert 0.9 < took < 4, (name, took)
    assert await counts(clean_db) == (0, 0)
    assert leftovers(tmp_path / "data") == []


def _h2_stow_that_stops(port: int, sent: bytes) -> tuple[dict[bytes, bytes], bytes, float]:
    """An HTTP/2 STOW (the client opens with the HTTP/2 preface, as hypercorn serves it in
    clear text too, and over TLS to any client that offers h2) with no Content-Length: `sent`,
    then nothing. Its response's headers and body, and when they ended."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = [
        (":method", "POST"),
        (":path", "/dicom-web/studies"),
        (":scheme", "http"),
        (":authority", "127.0.0.1"),
        *((k.lower(), v) for k, v in stow_headers().items()),
    ]
    conn.send_headers(1, head)
    conn.send_data(1, sent)
    headers: dict[bytes, bytes] = {}
    body = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(conn.data_to_send())
        began = time.monotonic()
        sock.settimeout(0.25)
        while time.monotonic() - began < 10:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "the server closed the connection without an answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    return headers, body, time.monotonic() - began
            sock.sendall(conn.data_to_send())
    raise AssertionError("no answer in 10 s")


async def test_http2_body_without_length_that_stops_is_a_408(tmp_path: Path, clean_db: str) -> None:
    """HTTP/2 frames a request body by its stream: a STOW over it need not carry a
    Content-Length (browsers and httpx send none for a streamed body). One that stops after
    its first instance is a 408 after BODY_IDLE_TIMEOUT_S, naming the instance it stored, as
    over HTTP/1.1; nothing of the second is left. Only bodies with a Content-Length or a
    Transfer-Encoding were timed: this one was waited for forever (the STOW-only timeout it
    replaced cut it after 60 s). HTTP/2 requests without a body are served as before."""
    first, second = make_instance(), make_instance()
    body = multipart_body([to_bytes(first), to_bytes(second)])
    sent = body[: body.index(to_bytes(second)) + 100]
    with serving(tmp_path, clean_db, DICOMWEB_BODY_IDLE_TIMEOUT_S="1") as server:
        headers, text, took = _h2_stow_that_stops(port_of(server), sent)
        assert headers[b":status"] == b"408", (headers, text)
        assert 0.9 < took < 4, took
        assert b"nothing came for 1 seconds" in headers[b"warning"]
        (stored,) = json.loads(text)["00081199"]["Value"]
        assert stored["00081155"]["Value"] == [first.SOPInstanceUID]
        with httpx.Client(http1=False, http2=True, timeout=10) as client:
            r = client.get(
                f"{server.url}/studies", params={"StudyInstanceUID": first.StudyInstanceUID}
            )
            assert (r.http_version, r.status_code) == ("HTTP/2", 200), r.text
            r = client.post(f"{server.url}/studies", content=iter([body]), headers=stow_headers())
            assert (r.http_version, r.status_code) == ("HTTP/2", 200), r.text
        clean_log(server)
    assert await counts(clean_db) == (2, 0)
    assert leftovers(tmp_path / "data") == []


def test_slow_stow_that_keeps_coming_is_not_cut(tmp_path: Path, clean_db: str) -> None:
    """The timeout is on idleness, not on duration: a STOW sent at 64 KiB a second, with
    pauses of an eighth of a second, for six times BODY_IDLE_TIMEOUT_S (0.5 s), is stored."""
    ds = make_instance(rows=256, cols=384)  # 196 KB: 3 s at 64 KiB a second
    body = multipart_body([to_bytes(ds)])

    def paced() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            time.sleep(0.125)
            yield body[i : i + 8192]

    with serving(tmp_path, clean_db, DICOMWEB_BODY_IDLE_TIMEOUT_S="0.5") as server:
        started = time.monotonic()
        r = httpx.post(f"{server.url}/studies", content=paced(), headers=stow_headers(), timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started > 6 * 0.5
        clean_log(server)


def _server_side_open(server_port: int, client_port: int) -> bool:
    """Whether the kernel still has the server's end of a connection (Linux /proc/net/tcp)."""
    local, remote = f":{server_port:04X}", f":{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(local) and fields[2].endswith(remote):
            return True
    return False


def _blob_fds(server: ServerProcess, data: Path) -> list[str]:
    """The server's open descriptors on files of its blob store."""
    fds = Path(f"/proc/{server.proc.pid}/fd")
    targets = [str(fd.readlink()) for fd in fds.iterdir() if fd.is_symlink()]
    return [t for t in targets if t.startswith(str((data / "blobs").resolve()))]


def test_download_nobody_reads_is_dropped_one_read_slowly_is_not(
    tmp_path: Path, clean_db: str
) -> None:
    """SEND_STALL_TIMEOUT_S (1 s): a client that asks for a 12.6 MB instance and reads
    nothing is dropped by the kernel once its window stayed shut that long, and its request
    ends, its blob closed, without a traceback. It held the request, its open blob and a
    chunk of buffers for as long as it kept the connection open. A client that reads a 2 MB
    instance in 64 KiB gulps ten times a second (its window shut between them), for over
    three times the timeout, gets all of it. Neither these nor a client that goes away
    part-way leave a blob open (they did until the garbage collector ran)."""
    big, small = (
        to_bytes(make_instance(rows=2048, cols=3072)),
        to_bytes(make_instance(rows=1024, cols=1024)),
    )
    data = tmp_path / "data"
    with serving(tmp_path, clean_db, DICOMWEB_SEND_STALL_TIMEOUT_S="1") as server:
        port = port_of(server)
        paths = []
        for raw in (big, small):
            body = multipart_body([raw])
            r = httpx.post(
                f"{server.url}/studies", content=body, headers=stow_headers(), timeout=60
            )
            assert r.status_code == 200, r.text
            paths.append(
                r.json()["00081199"]["Value"][0]["00081190"]["Value"][0].split(f":{port}", 1)[1]
            )
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        gone = socket.socket()
        with stalled, slow:
            for sock, path in ((stalled, paths[0]), (slow, paths[1]), (gone, paths[0])):
                sock.connect(("127.0.0.1", port))
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: multipart/related;"
                    ' type="application/dicom"; transfer-syntax=*\r\n\r\n'.encode()
                )
            with gone:  # a client that goes away part-way: its blob is closed too
                assert len(gone.recv(65536)) > 0
            began = time.monotonic()
            slow.settimeout(10)
            received = b""
            while not received.endswith(b"--\r\n"):  # the closing delimiter
                time.sleep(0.1)
                chunk = slow.recv(64 * 1024)
                assert chunk, f"the slow reader was cut after {len(received)} bytes"
                received += chunk
            took = time.monotonic() - began
            assert small in received and took > 3, took
            client = stalled.getsockname()[1]
            deadline = time.monotonic() + 10
            while _blob_fds(server, data) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _blob_fds(server, data) == [], "a download's blob is still open"
            assert not _server_side_open(port, client), "the stalled download is still open"
        time.sleep(0.5)  # the access log line of the dropped request
        log = server.log.read_text()
        assert f"127.0.0.1:{client} - - " in log and f"GET {paths[0]} 1.1" in log, log[-3000:]
        clean_log(server)


def test_trickled_request_heads_and_idle_connections_are_closed(
    tmp_path: Path, clean_db: str
) -> None:
    """KEEP_ALIVE_TIMEOUT_S (5 s): request heads trickled a byte every 0.25 s (slowloris),
    connections that send nothing, and kept-alive connections after a request are all closed
    by the server within it, while a normal request meanwhile is answered at once."""
    head = b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 100
    closed_after: dict[str, list[float]] = {"trickled": [], "silent": [], "kept-alive": []}
    lock = threading.Lock()

    def client(kind: str, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            began = time.monotonic()
            if kind == "kept-alive":
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                began = time.monotonic()
            sock.settimeout(0.25)
            for i in range(200):  # 50 s: far longer than the timeout
                if kind == "trickled" and i < len(head):
                    with contextlib.suppress(OSError):
                        sock.send(head[i : i + 1])
                try:
                    if sock.recv(65536) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            with lock:
                closed_after[kind].append(time.monotonic() - began)

    with serving(tmp_path, clean_db) as server:
        port = port_of(server)
        threads = [
            threading.Thread(target=client, args=(kind, port))
            for kind in closed_after
            for _ in range(10)
        ]
        for t in threads:
            t.start()
        time.sleep(1)
        started = time.monotonic()
        assert httpx.get(f"{server.url}/studies", timeout=5).status_code == 204
        # At once: well within KEEP_ALIVE_TIMEOUT_S, which a server the clients held up
        # would take (1 s of it gone already), with room for a loaded machine.
        assert time.monotonic() - started < KEEP_ALIVE_TIMEOUT_S / 2
        for t in threads:
            t.join(timeout=60)
        clean_log(server)
    for kind, times in closed_after.items():
        assert len(times) == 10, kind
        assert max(times) < KEEP_ALIVE_TIMEOUT_S + 1.5, (kind, times)


def test_http2_answer_before_the_body_keeps_the_connection(tmp_path: Path, clean_db: str) -> None:
    """Over HTTP/2 a request answered before its body was read (a 415 here; a 401, 413 or 408
    alike) has its stream closed while the client is still sending it. hypercorn (0.18) met
    the DATA frames that follow with a KeyError that ended the whole connection, the other
    requests on it included, and the client never saw its 415 (hypercorn#329). They are
    dropped, as RFC 9113 5.1 allows for a closed stream."""
    big = b"x" * (3 * 1024 * 1024)
    with (
        serving(tmp_path, clean_db) as server,
        httpx.Client(http1=False, http2=True, timeout=10) as client,
    ):
        r = client.post(
            f"{server.url}/studies", content=iter([big]), headers={"Content-Type": "text/plain"}
        )
        assert (r.http_version, r.status_code) == ("HTTP/2", 415), r.text
        r = client.get(f"{server.url}/studies")
        assert (r.http_version, r.status_code) == ("HTTP/2", 204), r.text
        clean_log(server)


def test_get_announcing_a_body_it_never_sends_is_answered_whole_to_a_slow_reader(
    tmp_path: Path, clean_db: str
) -> None:
    """A GET with `Content-Length: 10` and no body, of a 12.6 MB instance whose client
    reads nothing for three times BODY_IDLE_TIMEOUT_S (1 s) and then all of it: the whole
    answer, no traceback. Starlette's streamed response waits on `receive` for the
    disconnect from before its first byte, and that wait kept the idle-body clock after the
    response started: it ran out mid-answer, the body was cut with a traceback and the
    request audited 500 (found by review)."""
    raw = to_bytes(make_instance(rows=2048, cols=3072))
    with serving(tmp_path, clean_db, DICOMWEB_BODY_IDLE_TIMEOUT_S="1") as server:
        port = port_of(server)
        r = httpx.post(
            f"{server.url}/studies", content=multipart_body([raw]), headers=stow_headers(),
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        path = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0].split(f":{port}", 1)[1]
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
            sock.connect(("127.0.0.1", port))
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n"
                'Accept: multipart/related; type="application/dicom"; transfer-syntax=*\r\n'
                "Connection: close\r\n\r\n".encode()
            )
            time.sleep(3)
            data, _ = read_until_closed(sock, within_s=30)
        status, _, body = parse(data)
        assert status.startswith("HTTP/1.1 200"), data[:300]
        assert raw in body and body.rstrip().endswith(b"--"), len(body)
        clean_log(server)
