"""Memory of a download: one chunk (READ_CHUNK_MAX_BYTES) beyond the process's shared
read-ahead (READ_AHEAD_TOTAL_BYTES). The app is driven as an ASGI server drives it, the
shared read-ahead set to nothing so that every chunk is read when the sender asks for it:
the moment a sent chunk and the next could be held together. Measured with tracemalloc (the
bytes Python holds, not resident memory, which the allocator blurs). The HTTP/1.1 protocol's
part (no copy to frame a chunked body, a transport that lets go of what it wrote) is in
test_httpd.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tracemalloc
from collections.abc import Callable, MutableMapping
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRBigEndian
from starlette.applications import Starlette

from dicomweb_server.blobstore import budget, reading
from dicomweb_server.blobstore.reading import READ_CHUNK_MAX_BYTES
from tests.helpers import inst_url, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db

# What a download may hold besides its chunk: messages, bookkeeping.
SLACK_BYTES = 512 * 1024
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
OCTET_STREAM = 'multipart/related; type="application/octet-stream"'


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


# The download budget of test_stalled_downloads_through_the_app_hold_at_most_the_budget:
# small, so that its bound is far below what the downloads held without it.
LIMIT = 4 * 1024 * 1024
STALLED = 24
# What each download holds besides its chunks (its request, response, generators, tasks).
PER_DOWNLOAD_SLACK_BYTES = 96 * 1024


def _scope(path: str, accept: str) -> dict[str, Any]:
    return {
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


async def stalled_download(app: Starlette, path: str, accept: str, taken: int) -> None:
    """GET `path` from the app by a client that takes `taken` body messages and then no
    more (its server's `send` never returns again, as hypercorn's does not while the
    client's window is shut); runs until cancelled."""
    requested = False
    stalled = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal taken
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
            return
        if taken == 0:
            await stalled.wait()  # for ever: the body message stays in the server's hands
        taken -= 1

    await app(_scope(path, accept), receive, send)


async def test_stalled_downloads_through_the_app_hold_at_most_the_budget(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 downloads whose clients stop after a message or two, half of them instances (a
    multipart retrieve of a 16 MiB instance), half frames (a 2 MiB frame of it, one part):
    what they hold, counted by tracemalloc, stays within the download budget
    (budget.DOWNLOADS, made small here) plus its least chunk each, the chunks and their
    read-ahead included. Each held a chunk of 1 to 4 MiB, whatever their number: 24 MiB
    and more here. The budget is all given back when they end."""
    ds = make_instance(frames=8, rows=1024, cols=1024)
    body = multipart_body([to_bytes(ds)])
    stow = await app_client.post("/dicom-web/studies", content=body, headers=stow_headers())
    assert stow.status_code == 200, stow.text
    downloads = budget.DownloadBudget(limit=LIMIT)
    monkeypatch.setattr(budget, "DOWNLOADS", downloads)
    monkeypatch.setattr(reading, "_READ_AHEAD", reading._Budget())
    instance = ('multipart/related; type="application/dicom"', inst_url(ds))
    frame = ('multipart/related; type="application/octet-stream"', inst_url(ds) + "/frames/3")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(stalled_download(app, path, accept, 1 + k % 2))
                for k, (accept, path) in enumerate([instance, frame] * (STALLED // 2))
            ]
            for _ in range(500):  # until every one has stalled and its reads have ended
                await asyncio.sleep(0.02)
                if downloads.active == STALLED and reading._READERS.busy == 0:
                    break
            await asyncio.sleep(0.2)
            held = tracemalloc.get_traced_memory()[0] - base
            for task in running:
                task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        tracemalloc.stop()
    bound = LIMIT + STALLED * (budget.DOWNLOAD_CHUNK_MIN_BYTES + PER_DOWNLOAD_SLACK_BYTES)
    assert held < bound, f"{held / 2**20:.1f} MiB held"
    assert downloads.held == 0 and downloads.active == 0


async def first_message_held(
    app: Starlette, path: str, accept: str, downloads: budget.DownloadBudget
) -> tuple[int, int]:
    """GET `path` from the app by a client that takes nothing: (the bytes of the response's
    first body message, the bytes the download budget holds while that message waits)."""
    got: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and not got.done():
            got.set_result((len(message["body"]), downloads.held))
            await asyncio.Event().wait()  # the client takes nothing

    task = asyncio.create_task(app(_scope(path, accept), receive, send))
    try:
        return await asyncio.wait_for(got, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def whole_body(app: Starlette, path: str, accept: str) -> list[bytes]:
    """The body messages of a GET of `path`, taken as they come."""
    messages: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            messages.append(message["body"])

    await app(_scope(path, accept), receive, send)
    return messages


async def test_bodies_built_whole_are_held_within_the_budget(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series of small instances (read in one call, sent as one body) and a frame (one
    body): their bytes count in the download budget while the client has not taken them,
    and not after. Without room in the budget each is streamed instead, the same bytes, in
    chunks the budget sizes. They held their body (up to INLINE_RESPONSE_BYTES) outside it,
    however many clients stopped reading."""
    first = make_instance(rows=64, cols=64)
    study, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID
    series = [
        first,
        *(make_instance(study=study, series=series_uid, rows=64, cols=64) for _ in range(2)),
    ]
    body = multipart_body([to_bytes(ds) for ds in series])
    stow = await app_client.post("/dicom-web/studies", content=body, headers=stow_headers())
    assert stow.status_code == 200, stow.text
    paths = {
        "series": (
            f"/dicom-web/studies/{study}/series/{series_uid}",
            'multipart/related; type="application/dicom"',
        ),
        "frame": (
            inst_url(series[0]) + "/frames/1",
            'multipart/related; type="application/octet-stream"',
        ),
    }
    downloads = budget.DownloadBudget()
    monkeypatch.setattr(budget, "DOWNLOADS", downloads)
    whole = {}
    for name, (path, accept) in paths.items():
        length, held = await first_message_held(app, path, accept, downloads)
        assert length > 0 and held >= length, name
        assert downloads.held == 0 and downloads.active == 0, name
        whole[name] = await whole_body(app, path, accept)
        assert len(whole[name]) == 1, name
    spent = budget.DownloadBudget(limit=0)
    monkeypatch.setattr(budget, "DOWNLOADS", spent)
    for name, (path, accept) in paths.items():
        streamed = await whole_body(app, path, accept)
        assert len(streamed) > 1 and max(map(len, streamed)) <= 4 * spent.least, name
        assert _unbound(b"".join(streamed)) == _unbound(b"".join(whole[name])), name
        assert spent.held == 0 and spent.active == 0, name


def _unbound(body: bytes) -> bytes:
    """A multipart body with its boundary (drawn anew for each response) replaced."""
    boundary = body.split(b"\r\n", 1)[0]
    return body.replace(boundary, b"--BOUNDARY")


def _fragmented_frame() -> tuple[bytes, str, str]:
    """(an instance whose one frame of 12 MiB is four fragments of 3 MiB (PS3.5 A.4,
    JPEG-LS, not decoded here), the URL of its frame, the Accept for it as stored)."""
    ds = make_instance(frames=1, rows=4, cols=4)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS_LOSSLESS)
    frame = bytes(range(256)) * (3 * 16 * 1024 - 1) + b"\x00\x00\xff\xd9"
    ds.PixelData = encapsulate([frame], fragments_per_frame=4, has_bot=True)
    ds["PixelData"].VR = "OB"
    accept = 'multipart/related; type="image/jls"; transfer-syntax=*'
    return to_bytes(ds), inst_url(ds) + "/frames/1", accept


def _big_endian_pixels() -> tuple[bytes, str, str]:
    """(a big endian instance of 12 MiB of pixels, the BulkDataURI of its Pixel Data, whose
    words are swapped as they are sent, the Accept for it)."""
    ds = make_instance(rows=2048, cols=3072)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = np.arange(2048 * 3072, dtype=">u2").tobytes()
    ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=False, enforce_file_format=True)
    return buf.getvalue(), inst_url(ds) + "/bulk/7FE00010", OCTET_STREAM


@pytest.mark.parametrize("make", [_fragmented_frame, _big_endian_pixels])
async def test_stalled_downloads_of_values_sent_as_copies_hold_at_most_the_budget(
    app: Starlette,
    app_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], tuple[bytes, str, str]],
) -> None:
    """Downloads of values sent as copies made from the chunks read, whose clients stop
    after four messages: a frame of several fragments (values cut out of a chunk between
    item headers: the fifth message is the second fragment, cut from the middle of the
    third chunk) and big endian Pixel Data (each chunk's words swapped). What they hold is
    what the budget counts, so within the budget plus its least chunk each, as any
    download's. Each held the chunk read beside the copy it was sending of it (stream_path
    kept every chunk it had yielded until the next was asked for, strip_items the chunk it
    was cutting until its last value was sent): up to a chunk more each, outside the budget
    (44 to 64 MiB here for a bound of 33.3)."""
    raw, path, accept = make()
    body = multipart_body([raw])
    stow = await app_client.post("/dicom-web/studies", content=body, headers=stow_headers())
    assert stow.status_code == 200, stow.text
    limit, stalled = 32 * 1024 * 1024, 8  # chunks of the largest size, READ_CHUNK_MAX_BYTES
    downloads = budget.DownloadBudget(limit=limit)
    monkeypatch.setattr(budget, "DOWNLOADS", downloads)
    monkeypatch.setattr(reading, "_READ_AHEAD", reading._Budget())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(stalled_download(app, path, accept, 4)) for k in range(stalled)
            ]
            for _ in range(500):  # until every one has stalled and its reads have ended
                await asyncio.sleep(0.02)
                if downloads.active == stalled and reading._READERS.busy == 0:
                    break
            await asyncio.sleep(0.2)
            held = tracemalloc.get_traced_memory()[0] - base
            counted = downloads.held
            for task in running:
                task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        tracemalloc.stop()
    bound = limit + stalled * (budget.DOWNLOAD_CHUNK_MIN_BYTES + PER_DOWNLOAD_SLACK_BYTES)
    assert held < bound, f"{held / 2**20:.1f} MiB held"
    assert held < counted + stalled * PER_DOWNLOAD_SLACK_BYTES, (held, counted)
    assert downloads.held == 0 and downloads.active == 0
