"""The HTTP server's protocol adjustments (httpd.py)."""

from __future__ import annotations

import asyncio
import random
import sys
from types import SimpleNamespace
from typing import Any

import h11
from hypercorn.asyncio.worker_context import EventWrapper
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER

from dicomweb_server.httpd import (
    HEAD_WITH_BODY_MAX_BYTES,
    TRANSPORT_HIGH_WATER_BYTES,
    _H11Protocol,
    _StreamBuffer,
)


class _Protocol(_H11Protocol):
    """_H11Protocol on an h11 connection that has read one request, its writes recorded."""

    def __init__(self) -> None:  # hypercorn's connection machinery is not needed here
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert isinstance(self.connection.next_event(), h11.Request)
        self._head = b""
        self.writes: list[bytes] = []

    async def send(self, event: Any) -> None:
        assert isinstance(event, RawData)
        self.writes.append(event.data)


async def _answer(body: bytes) -> list[bytes]:
    protocol = _Protocol()
    length = str(len(body)).encode()
    await protocol._send_h11_event(
        h11.Response(status_code=200, headers=[(b"content-length", length)])
    )
    assert protocol.writes == []  # held for the body
    if body:
        await protocol._send_h11_event(h11.Data(data=body))
    await protocol._send_h11_event(h11.EndOfMessage())
    return [w for w in protocol.writes if w]


async def test_a_small_response_is_one_write() -> None:
    """A STOW or QIDO answer: its head and its body reach the socket in one write (one send
    call, one TCP segment), not two."""
    writes = await _answer(b'{"a": 1}')
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b'\r\n\r\n{"a": 1}')


async def test_a_response_without_body_is_one_write() -> None:
    writes = await _answer(b"")
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n")


async def test_a_large_first_chunk_is_not_copied_behind_the_head() -> None:
    body = b"x" * (HEAD_WITH_BODY_MAX_BYTES + 1)
    writes = await _answer(body)
    assert len(writes) == 2 and writes[0].endswith(b"\r\n\r\n") and writes[1] == body
    assert len(await _answer(body[:-1])) == 1  # at the limit: one write


async def test_an_interim_response_is_not_held() -> None:
    protocol = _Protocol()
    protocol.connection = h11.Connection(h11.SERVER)
    protocol.connection.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n"
    )
    protocol.connection.next_event()
    await protocol._send_h11_event(h11.InformationalResponse(status_code=100, headers=[]))
    assert protocol.writes and protocol.writes[0].startswith(b"HTTP/1.1 100 ")


async def test_a_chunked_body_is_framed_without_copying_its_chunks() -> None:
    """A body without Content-Length (a converted retrieve) is sent in chunked coding: each
    chunk is written as the app gave it, its size line and CRLF in writes of their own.
    h11's `send` joined the three into a copy: a download held its chunk twice."""
    protocol = _Protocol()
    chunked = [(b"transfer-encoding", b"chunked")]
    await protocol._send_h11_event(h11.Response(status_code=200, headers=chunked))
    chunk = b"x" * (HEAD_WITH_BODY_MAX_BYTES + 1)
    await protocol._send_h11_event(h11.Data(data=chunk))
    assert any(write is chunk for write in protocol.writes)
    assert len(protocol.writes) == 3  # the head with the size line, the chunk, its CRLF
    assert b"".join(protocol.writes).endswith(b"\r\n\r\n%x\r\n" % len(chunk) + chunk + b"\r\n")
    await protocol._send_h11_event(h11.Data(data=b"small"))  # one write, as before
    assert protocol.writes[-1] == b"5\r\nsmall\r\n"


class _Transport:
    def __init__(self) -> None:
        self.limits: tuple[int, int] | None = None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.limits = (high, low)


class _TCPServer:
    """What hypercorn's TCPServer offers the protocol: its `protocol_send`, and its writer."""

    def __init__(self) -> None:
        self.writer = SimpleNamespace(transport=_Transport())

    async def protocol_send(self, event: Any) -> None:
        pass


def test_the_transport_takes_the_next_write_only_once_empty() -> None:
    """A write returned while the tail of a chunk (under the 16 KiB default low-water mark)
    was still queued, which kept the whole chunk held while the app read the next."""
    server = _TCPServer()
    context = SimpleNamespace(event_class=asyncio.Event)
    args = (None, Config(), context, None, None, False, None, None, server.protocol_send)
    _H11Protocol(*args)
    assert server.writer.transport.limits == (TRANSPORT_HIGH_WATER_BYTES, 0)


async def test_an_http2_stream_lets_go_of_a_chunk_for_its_tail() -> None:
    """The app's chunk is handed on once its stream's buffer is below the low-water mark,
    the app then reading its next one: the unsent tail is a copy, so that a stream whose
    client takes nothing more holds the next chunk only, not the one before too (which is
    no longer counted in the download budget, blobstore.budget)."""
    buffer = _StreamBuffer(EventWrapper, 60.0)
    chunk = bytes(range(256)) * (4 * 4096) + bytes(1000)  # 4 MiB and a tail
    unheld = sys.getrefcount(chunk)
    pushed = asyncio.create_task(buffer.push(chunk))
    await asyncio.sleep(0)
    assert not pushed.done()  # over the high-water mark: the app waits
    sent = []
    while buffer._size >= BUFFER_LOW_WATER:
        sent.append(await buffer.pop(16384))
    await asyncio.wait_for(pushed, 1)  # the app goes on to its next chunk
    assert 0 < buffer._size < BUFFER_HIGH_WATER
    assert sys.getrefcount(chunk) == unheld, "the buffer still holds the chunk"
    sent.append(await buffer.pop(BUFFER_HIGH_WATER))
    assert b"".join(sent) == chunk


async def test_an_http2_stream_buffer_sends_every_byte_in_order_whatever_the_windows() -> None:
    """Chunks of any size (under, at and over the high-water mark; bytes and memoryviews of
    larger buffers) taken out in frames of any size, some of 0 bytes (the window shut): the
    bytes that go out are the app's, in order, with or without the tail copy."""
    rng = random.Random(20261205)
    for _ in range(30):
        buffer = _StreamBuffer(EventWrapper, 60.0)
        sizes = [rng.choice([1, 7, int(BUFFER_LOW_WATER) - 1, BUFFER_HIGH_WATER,
                             BUFFER_HIGH_WATER + 1, 100_003, 1 << 20])
                 for _ in range(12)]  # fmt: skip
        chunks: list[bytes | memoryview] = []
        for n in sizes:
            data = rng.randbytes(n + 10)
            chunks.append(memoryview(data)[5 : 5 + n] if rng.random() < 0.3 else data[:n])

        pushing = asyncio.create_task(_pushed(buffer, chunks))
        sent = bytearray()
        async with asyncio.timeout(10):
            while not pushing.done() or buffer._size > 0:
                frame = rng.choice([0, 1, 9, 1000, 16_384, BUFFER_HIGH_WATER + 5])
                sent += await buffer.pop(frame)
                await asyncio.sleep(0)
            await pushing
        assert bytes(sent) == b"".join(bytes(c) for c in chunks)


async def _pushed(buffer: _StreamBuffer, chunks: list[bytes | memoryview]) -> None:
    """The app's side of a stream buffer: its chunks pushed in turn."""
    for chunk in chunks:
        await buffer.push(chunk)  # type: ignore[arg-type]  # an app may send a view
