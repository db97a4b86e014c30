"""Every way a download ends gives its share of the process's download budget back
(blobstore.budget.DOWNLOADS): after many downloads driven through the app and ended every way
a client or the archive ends them (taken whole, HEAD, ranges, a client that leaves before the
answer or part-way, a task cancelled while its chunk is read, a blob found cut short before or
while it is sent), no download is counted in flight and no byte held. A leak would shrink
every later download's chunks for the life of the process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import socket
import struct
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import hypercorn.protocol as hypercorn_protocol
import pytest
from hypercorn.asyncio import serve
from pydicom.encaps import encapsulate
from pydicom.uid import UID
from starlette.applications import Starlette

from dicomweb_server.blobstore import budget, reading
from dicomweb_server.config import Settings
from dicomweb_server.httpd import _H2Protocol, _H11Protocol, hypercorn_config
from tests.helpers import inst_url, make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import free_port

pytestmark = pytest.mark.db

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
DICOM = 'multipart/related; type="application/dicom"'
OCTET = 'multipart/related; type="application/octet-stream"'
AS_STORED = 'multipart/related; type="image/jls"; transfer-syntax=*'


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


async def _drive(
    app: Starlette,
    path: str,
    accept: str,
    *,
    method: str = "GET",
    extra: list[tuple[bytes, bytes]] | None = None,
    taken: int | None = None,
    how: str = "oserror",
    cut: Path | None = None,
) -> None:
    """A request whose client takes `taken` body messages (None: all of them) and then
    leaves `how`: "oserror" (the server's write fails, as hypercorn's does on a closed
    socket), "disconnect" (the receive channel says so, the send blocks), "cancel" (the
    handler's task is cancelled while its send blocks), "gone" (left before the answer);
    after "disconnect", what is sent is dropped, as hypercorn does for a closed stream."""
    headers = [(b"accept", accept.encode()), *(extra or [])]
    gone = asyncio.Event()
    if how == "gone":
        gone.set()
    left = taken

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal left, cut
        if message["type"] == "http.response.body" and cut is not None:
            os.truncate(cut, os.path.getsize(cut) // 2)  # cut short while it is read
            cut = None
        if message["type"] != "http.response.body" or left is None:
            return
        if left == 0:
            if how == "oserror":
                raise ConnectionResetError("client gone")
            gone.set()
            if how == "cancel":
                await asyncio.Event().wait()  # the write never ends: cancelled
            return  # hypercorn drops what is sent for a stream it closed
        left -= 1

    task = asyncio.create_task(app(_scope(method, path, headers), receive, send))
    if how == "cancel":
        for _ in range(200):
            await asyncio.sleep(0.005)
            if gone.is_set() or task.done():
                break
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # the request's end
        await asyncio.wait_for(task, 10)


async def _settled(downloads: budget.DownloadBudget) -> tuple[int, int]:
    """(downloads in flight, bytes held) once reads under way ended and garbage went."""
    for _ in range(100):
        gc.collect()
        await asyncio.sleep(0.02)
        if reading._READERS.busy == 0 and downloads.active == 0 and downloads.held == 0:
            break
    return downloads.active, downloads.held


async def _store(client: httpx.AsyncClient, *datasets: Any) -> None:
    body = multipart_body([to_bytes(ds) for ds in datasets])
    r = await client.post("/dicom-web/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


def _fragmented(frames: int, frame_bytes: int, fragments: int) -> Any:
    """An encapsulated (JPEG-LS, not decoded here) instance whose frames are `fragments`
    items each."""
    ds = make_instance(frames=frames, rows=4, cols=4)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS_LOSSLESS)
    streams = [os.urandom(frame_bytes - 2) + b"\xff\xd9" for _ in range(frames)]
    ds.PixelData = encapsulate(streams, fragments_per_frame=fragments, has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


async def test_every_way_a_download_ends_gives_its_budget_back(
    app: Starlette,
    app_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Instances, a study and a series (small instances read in one call, bodies held whole),
    frames, ranges of them, bulk data, frames of several fragments: each asked for and ended
    every way, one at a time and all at once; then a blob cut short while it is sent and
    one found short before."""
    big = make_instance(frames=8, rows=1024, cols=1024)  # 16 MiB
    study, series = big.StudyInstanceUID, big.SeriesInstanceUID
    small = [make_instance(study=study, series=series, rows=64, cols=64) for _ in range(3)]
    other = make_instance(rows=64, cols=64)
    fragmented = _fragmented(3, 6 * 1024 * 1024, 3)
    cut = make_instance(frames=4, rows=1024, cols=1024)
    await _store(app_client, big, *small, other, fragmented, cut)
    downloads = budget.DownloadBudget()
    monkeypatch.setattr(budget, "DOWNLOADS", downloads)
    study_url = f"/dicom-web/studies/{study}"
    series_url = f"{study_url}/series/{series}"
    targets = [
        (inst_url(big), DICOM, []),
        (study_url, DICOM, []),
        (series_url, DICOM, []),
        (inst_url(small[0]), DICOM, []),
        (inst_url(big), "application/dicom", []),
        (inst_url(big) + "/frames/3", OCTET, []),
        (inst_url(big) + "/frames/3", OCTET, [(b"range", b"bytes=100-200")]),
        (inst_url(big) + "/frames/3", OCTET, [(b"range", b"bytes=1000-")]),
        (inst_url(big) + "/frames/2,5", OCTET, []),
        (inst_url(big) + "/bulk/7FE00010", OCTET, []),
        (inst_url(fragmented) + "/frames/2", AS_STORED, []),
        (inst_url(fragmented) + "/frames/2", AS_STORED, [(b"range", b"bytes=10-3000000")]),
        (inst_url(fragmented) + "/frames/1,3", AS_STORED, []),
        (inst_url(fragmented), DICOM, []),
    ]
    exits: list[dict[str, Any]] = [
        {},
        {"method": "HEAD"},
        {"taken": 0, "how": "gone"},
        *({"taken": n, "how": how} for n in (0, 1, 2) for how in ("oserror", "disconnect")),
        {"taken": 1, "how": "cancel"},
        {"taken": 0, "how": "cancel"},
    ]
    for path, accept, extra in targets:
        for kw in exits:
            await _drive(app, path, accept, extra=extra, **kw)
        assert await _settled(downloads) == (0, 0), (path, extra)
    # Several at once, ended every way, while the others read.
    async with asyncio.TaskGroup() as group:
        for path, accept, extra in targets:
            for kw in exits:
                group.create_task(_drive(app, path, accept, extra=extra, **kw))
    assert await _settled(downloads) == (0, 0)
    # A blob cut short while it is sent (LostBlobError where it ends), and one found short
    # before (at its first chunk).
    svc = app.state.services
    (inst,) = await svc.index.locate(study, series, big.SOPInstanceUID)
    blob = svc.blobs.local_path(inst.blob_key)
    original = blob.read_bytes()
    for path, accept, extra in [*targets[:3], targets[4], targets[9]]:  # 16 MiB read
        blob.write_bytes(original)
        caplog.clear()
        await _drive(app, path, accept, extra=extra, cut=blob)
        assert "cut short" in caplog.text, path  # LostBlobError where the file now ends
        await _drive(app, path, accept, extra=extra)
        assert await _settled(downloads) == (0, 0), (path, extra)


async def _in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking client's call, in a worker thread: the server runs in this event loop."""
    return await anyio.to_thread.run_sync(functools.partial(call, *args, **kwargs))


def _no_lifespan(app: Starlette) -> Any:
    """The app without its lifespan (the fixture entered it already)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await app(scope, receive, send)

    return wrapped


def _h1(port: int, path: str, accept: str, *, take: int | None, method: str = "GET",
        extra: str = "", abort: bool = False) -> bytes:  # fmt: skip
    """An HTTP/1.1 request; the response's first `take` bytes (None: all of it, by its
    Content-Length; all of it if shorter), then the connection closed (`abort`: reset)."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: testserver\r\nAccept: {accept}\r\n"
                f"{extra}\r\n")  # fmt: skip
        sock.sendall(head.encode())
        sock.settimeout(20)
        data = b""
        while take is None or len(data) < take:
            got = sock.recv(65536)
            if not got:
                break
            data += got
            header, found, body = data.partition(b"\r\n\r\n")
            if found:
                fields = dict(
                    line.lower().split(": ", 1)
                    for line in header.decode("latin1").split("\r\n")[1:]
                )
                if method == "HEAD" or len(body) >= int(fields.get("content-length", -1)):
                    break  # the whole response came
        return data
    finally:
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _h2(port: int, path: str, accept: str, streams: int, *, window: int, ack: int,
        reset: set[int], leave_after: int | None) -> dict[int, bytes]:  # fmt: skip
    """`streams` GETs on one HTTP/2 connection opened with an initial stream window of
    `window` bytes, the client giving credit back `ack` bytes at a time (odd sizes: frames cut
    anywhere); the streams numbered in `reset` are reset after their first bytes, and the
    connection is closed once `leave_after` bytes came (None: when all have ended). The
    bodies of the streams that ended."""
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    conn.increment_flow_control_window(2**30)  # only the streams' windows hold bytes back
    ids = []
    for _ in range(streams):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                      (":authority", "testserver"), ("accept", accept)],
                          end_stream=True)  # fmt: skip
        ids.append(stream_id)
    bodies: dict[int, bytearray] = {i: bytearray() for i in ids}
    owed: dict[int, int] = dict.fromkeys(ids, 0)
    ended: set[int] = set()
    total = 0
    try:
        sock.sendall(conn.data_to_send())
        sock.settimeout(20)
        while len(ended) < len(ids):
            if leave_after is not None and total >= leave_after:
                break
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    sid = event.stream_id
                    bodies[sid] += event.data
                    total += len(event.data)
                    if ids.index(sid) in reset and sid not in ended:
                        with contextlib.suppress(h2.exceptions.StreamClosedError):  # ended
                            conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                        ended.add(sid)
                        continue
                    owed[sid] += event.flow_controlled_length
                    while owed[sid] >= ack or (owed[sid] and event.stream_ended):
                        step = min(ack, owed[sid])
                        conn.acknowledge_received_data(step, sid)
                        owed[sid] -= step
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended.add(event.stream_id)
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return {i: bytes(bodies[i]) for i in ids if i in ended and ids.index(i) not in reset}


async def test_downloads_over_a_real_server_give_the_budget_back(
    app: Starlette,
    app_client: httpx.AsyncClient,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through hypercorn with the server's protocols (httpd), over real sockets: HTTP/1.1
    clients that close or reset their connection after a few bytes, a HEAD, a Range; HTTP/2
    clients on odd stream windows, given back in odd steps (frames cut anywhere), that reset
    some streams after their first bytes and close the connection part-way. Every body
    taken whole is the one an in-process client gets, to the byte (the HTTP/2 buffer copies
    a chunk's unsent tail, httpd._StreamBuffer), and the budget is all given back."""
    big = make_instance(frames=8, rows=1024, cols=1024)  # 16 MiB
    odd = make_instance(rows=16, cols=117)  # an odd length, small enough for 1-byte frames
    fragmented = _fragmented(3, 6 * 1024 * 1024, 3)
    await _store(app_client, big, odd, fragmented)
    wanted = {}
    for ds, sub, accept in ((big, "", "application/dicom"), (odd, "", "application/dicom"),
                            (fragmented, "/frames/2", AS_STORED)):  # fmt: skip
        r = await app_client.get(inst_url(ds) + sub, headers={"Accept": accept})
        assert r.status_code == 200
        wanted[inst_url(ds) + sub] = (accept, r.content)
    downloads = budget.DownloadBudget()
    monkeypatch.setattr(budget, "DOWNLOADS", downloads)
    monkeypatch.setattr(hypercorn_protocol, "H2Protocol", _H2Protocol)
    monkeypatch.setattr(hypercorn_protocol, "H11Protocol", _H11Protocol)
    port = free_port()
    config = hypercorn_config(settings)
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(_no_lifespan(app), config, shutdown_trigger=shutdown.wait))
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port)).close()
                break
            await asyncio.sleep(0.05)
        for path, (accept, body) in wanted.items():
            h1 = functools.partial(_h1, port, path, accept)
            for take in (0, 1000, 70_000, 3_000_000):
                for abort in (False, True):
                    await _in_thread(h1, take=take, abort=abort)
            got = await _in_thread(h1, take=None)
            assert got.partition(b"\r\n\r\n")[2] == body
            await _in_thread(h1, take=None, method="HEAD")
            await _in_thread(h1, take=None, extra="Range: bytes=5-70000\r\n")
            for window, ack in ((65_535, 16_384), (12_345, 7_777), (1, 1), (100_003, 99_991)):
                if window == 1 and len(body) > 10_000:
                    continue
                h2 = functools.partial(_h2, port, path, accept, window=window, ack=ack)
                bodies = await _in_thread(h2, 4, reset={1}, leave_after=None)
                assert len(bodies) == 3 and set(bodies.values()) == {body}, (path, window)
                await _in_thread(h2, 5, reset={0, 3}, leave_after=200_000)
        assert await _settled(downloads) == (0, 0)
    finally:
        shutdown.set()
        await asyncio.wait_for(server, 30)


async def test_a_body_held_whole_and_never_sent_gives_its_bytes_back() -> None:
    """A response built whole within the budget (routes.responses.HeldResponse) that is never
    sent (the handler failed after making it: a header it then added could not be encoded)
    gives its bytes back once it is garbage, in a reference cycle too; one sent gives them
    back once, when it is sent."""
    from dicomweb_server.routes.responses import HeldResponse

    downloads = budget.DownloadBudget()
    assert downloads.hold(1000)
    response = HeldResponse(bytes(1000), downloads, 1000)
    response.cycle = response  # type: ignore[attr-defined]
    del response
    gc.collect()
    assert downloads.held == 0
    assert downloads.hold(1000)
    sent = HeldResponse(bytes(1000), downloads, 1000)

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    await sent(_scope("GET", "/", []), _never, send)
    assert downloads.held == 0
    del sent
    gc.collect()
    assert downloads.held == 0  # not given back twice


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")
