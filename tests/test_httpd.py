"""The HTTP server's protocol adjustments (httpd.py)."""

from __future__ import annotations

from typing import Any

import h11
from hypercorn.events import RawData

from dicomweb_server.httpd import HEAD_WITH_BODY_MAX_BYTES, _H11Protocol


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
