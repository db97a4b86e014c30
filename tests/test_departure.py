"""A request's `receive` channel relayed and watched while it does long work (departure.py):
what the watcher reads is the handler's still, one watcher at most per request, none left
once the request is over; and, through the app, a frame or an image waiting for a worker
thread is never made for a client that went away (live conversions: test_client_gone)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server.departure import ClientGone, Departure, Message, stopped_if_gone, watched
from tests.helpers import ROOT, inst_url, multipart_body, stow_headers

_FINAL = {"type": "http.request", "body": b"", "more_body": False}
_GONE = {"type": "http.disconnect"}


def _watchers() -> int:
    """Watcher tasks alive (Departure._watch), in this test's event loop."""
    return sum(
        getattr(t.get_coro(), "__qualname__", "") == "Departure._watch" for t in asyncio.all_tasks()
    )


async def _long_work(began: list[bool]) -> None:
    async with stopped_if_gone():
        began.append(True)
        await anyio.sleep(30)


async def test_work_stops_when_the_client_goes_and_the_handler_still_gets_its_messages() -> None:
    channel: asyncio.Queue[Message] = asyncio.Queue()
    channel.put_nowait(_FINAL)
    departure = Departure(channel.get)
    began: list[bool] = []
    with watched(departure):
        work = asyncio.create_task(_long_work(began))
        await asyncio.sleep(0.05)
        assert began == [True] and not work.done()
        assert channel.empty()  # the watcher read the end of the (empty) body, and holds it
        channel.put_nowait(_GONE)
        with pytest.raises(ClientGone):
            await asyncio.wait_for(work, 5)
    assert await departure.receive() == _FINAL
    assert await departure.receive() == _GONE
    assert await departure.receive() == _GONE  # and again, as ASGI has it
    await departure.close()


async def test_work_for_a_client_gone_already_never_begins() -> None:
    """The disconnect queued before the work (the client left while the request waited for
    the database): the work does not begin, whatever it would have waited for."""
    channel: asyncio.Queue[Message] = asyncio.Queue()
    for message in (_FINAL, _GONE):
        channel.put_nowait(message)
    departure = Departure(channel.get)
    began: list[bool] = []
    with watched(departure):
        with pytest.raises(ClientGone):
            await _long_work(began)
        with pytest.raises(ClientGone):  # later work neither
            await _long_work(began)
    assert began == []
    await departure.close()


async def test_a_body_still_coming_is_left_to_the_handler() -> None:
    """The watcher reads no further than one body message that is not the last: a body is
    not read ahead into memory behind the handler's back, and none of it is lost."""
    channel: asyncio.Queue[Message] = asyncio.Queue()
    first = {"type": "http.request", "body": b"a", "more_body": True}
    last = {"type": "http.request", "body": b"b", "more_body": False}
    for message in (first, last):
        channel.put_nowait(message)
    departure = Departure(channel.get)
    began: list[bool] = []
    with watched(departure):
        work = asyncio.create_task(_long_work(began))
        await asyncio.sleep(0.05)
        assert channel.qsize() == 1  # `last` not read by the watcher
        assert await departure.receive() == first
        assert await departure.receive() == last
        work.cancel()
        await asyncio.wait([work])
    await departure.close()


async def test_an_empty_body_message_before_the_last_does_not_stop_the_watching() -> None:
    """An HTTP/2 GET ended by an empty DATA frame (END_STREAM not on its HEADERS): hypercorn
    relays it as an empty body message with more to come. Nothing is read ahead by going
    on, and the client leaving after it is seen; the watcher stopped there (found by review:
    a conversion for such a client ran to its end)."""
    channel: asyncio.Queue[Message] = asyncio.Queue()
    for message in ({"type": "http.request", "body": b"", "more_body": True}, _FINAL):
        channel.put_nowait(message)
    departure = Departure(channel.get)
    began: list[bool] = []
    with watched(departure):
        work = asyncio.create_task(_long_work(began))
        await asyncio.sleep(0.05)
        assert began == [True] and channel.empty()
        channel.put_nowait(_GONE)
        with pytest.raises(ClientGone):
            await asyncio.wait_for(work, 5)
    assert await departure.receive() == _FINAL  # the body as it was: empty, and its end
    assert await departure.receive() == _GONE
    await departure.close()


async def test_one_watcher_per_request_and_none_left_after_it() -> None:
    channel: asyncio.Queue[Message] = asyncio.Queue()
    channel.put_nowait(_FINAL)
    departure = Departure(channel.get)
    began: list[bool] = []
    with watched(departure):
        works = [asyncio.create_task(_long_work(began)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert len(began) == 5
        assert _watchers() == 1
        # The handler reading the channel meanwhile (Starlette's listener for a streamed
        # response) waits for the watcher: not a second reader, which would wait for ever.
        listener = asyncio.create_task(departure.receive())
        assert await asyncio.wait_for(listener, 1) == _FINAL
        listener = asyncio.create_task(departure.receive())
        await asyncio.sleep(0.05)
        assert not listener.done()
        channel.put_nowait(_GONE)
        assert await asyncio.wait_for(listener, 1) == _GONE
        for work in works:
            with pytest.raises(ClientGone):
                await asyncio.wait_for(work, 5)
    await departure.close()
    assert _watchers() == 0


async def test_a_request_doing_no_long_work_starts_no_watcher() -> None:
    channel: asyncio.Queue[Message] = asyncio.Queue()
    departure = Departure(channel.get)
    with watched(departure):
        await asyncio.sleep(0)
        assert _watchers() == 0
    await departure.close()
    async with stopped_if_gone():  # outside a watched request: nothing watched
        assert _watchers() == 0


@pytest.mark.db
@pytest.mark.parametrize("resource", ["/frames/1", "/rendered"])
async def test_a_frame_waiting_for_a_worker_thread_is_never_made_for_a_client_gone(
    app: Starlette, app_client: httpx.AsyncClient, samples: Path, resource: str
) -> None:
    """Every shared worker thread busy, a client asks for a frame decoded (or an image
    rendered) and goes: the request ends at once, 499, and the frame is never decoded (not
    in the cache once the threads are free again). It waited for a thread, then decoded the
    frame for nobody."""
    path = samples / "real/pydicom-data/MR2_J2KI.dcm"
    ds = pydicom.dcmread(path)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    svc = app.state.services
    tokens = [object() for _ in range(int(svc.limiter.total_tokens))]
    for token in tokens:
        await svc.limiter.acquire_on_behalf_of(token)
    leave = anyio.Event()
    messages = [_FINAL]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await leave.wait()
        return _GONE

    async def send(message: Message) -> None:
        sent.append(message)

    url = inst_url(ds) + resource
    accept = b"image/jpeg" if resource == "/rendered" else b"application/octet-stream"
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": url, "raw_path": url.encode(), "root_path": "",
        "query_string": b"", "headers": [(b"host", b"testserver"), (b"accept", accept)],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            with anyio.fail_after(10):
                while svc.limiter.statistics().tasks_waiting == 0:
                    await anyio.sleep(0.01)
            leave.set()
            with anyio.fail_after(5):  # it waited for a thread until one was free
                while not sent or sent[-1].get("more_body", False):
                    await anyio.sleep(0.01)
    finally:
        for token in tokens:
            svc.limiter.release_on_behalf_of(token)
    assert sent[0]["status"] == 499
    assert svc.limiter.statistics().tasks_waiting == 0
    await anyio.sleep(0.2)
    assert len(svc.frames) == 0 and len(svc.images) == 0  # nothing was made
