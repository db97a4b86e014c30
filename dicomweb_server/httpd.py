"""The HTTP server's configuration: hypercorn's settings, its listening sockets and its logs
(`serve` runs it, cli.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import hypercorn.protocol as hypercorn_protocol
import hypercorn.protocol.h2 as hypercorn_h2
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, RawData, Updated
from hypercorn.events import Event as ConnectionEvent
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.protocol.events import (
    Body,
    Data,
    EndBody,
    EndData,
    Response,
    StreamClosed,
    Trailers,
)
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER, H2Protocol, StreamBuffer
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import (
    AppWrapper,
    ASGIReceiveCallable,
    ASGISendCallable,
    H11SendableEvent,
    ResponseSummary,
    Scope,
    WWWScope,
)

from dicomweb_server.config import SEND_STALL_TIMEOUT_S, Settings

__all__ = [
    "H2_MAX_CONCURRENT_STREAMS",
    "H2_MAX_HANDLERS",
    "H2_MAX_REFUSED_STREAMS",
    "KEEP_ALIVE_TIMEOUT_S",
    "AccessLog",
    "DroppedConnections",
    "access_fields",
    "hypercorn_config",
    "prepare_process",
    "quiet_dropped_connections",
]

# Seconds hypercorn keeps a connection with no request in progress: idle between requests, and
# from its start (or the previous response) until a request's head has come whole, however it
# trickles in (slowloris: a byte of headers every second is closed after these 5 s, as one
# that sends nothing). hypercorn's default, stated because the server relies on it. A request
# body is timed by config.BODY_IDLE_TIMEOUT_S, a response by config.SEND_STALL_TIMEOUT_S.
KEEP_ALIVE_TIMEOUT_S = 5.0

# Streams an HTTP/2 client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS; hypercorn's
# default, stated because the server relies on it), and requests one connection may have in
# the server's hands at once, those of streams it has reset included (_H2Protocol): past
# that a new stream is refused. Twice the first, so that a client keeping its streams full
# is not refused for the moment a finished request's handler takes to return.
H2_MAX_CONCURRENT_STREAMS = 100
H2_MAX_HANDLERS = 2 * H2_MAX_CONCURRENT_STREAMS
# Streams refused on one HTTP/2 connection (H2_MAX_HANDLERS) before it is closed: a client
# that keeps opening streams the server has no room for.
H2_MAX_REFUSED_STREAMS = 100


class AccessLog(HypercornLogger):
    """hypercorn's logger, with the fields of its default access line (the one this server
    writes) computed directly. hypercorn computes every field any format could name for each
    request, a copy of the process environment among them: about a tenth of the CPU of a
    small request (docs/benchmarks.md, 2026-12-03b). The line is the same.

    Its error logger writes with a handler of its own: it no longer also passes its lines to
    the root logger's, which printed each of them twice."""

    def __init__(self, config: HypercornConfig) -> None:
        super().__init__(config)
        if self.error_logger is not None:
            self.error_logger.propagate = False

    def atoms(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> Mapping[str, str]:
        return access_fields(request, response)


def access_fields(request: WWWScope, response: ResponseSummary | None) -> dict[str, str]:
    """hypercorn's default access format, `%(h)s %(l)s %(l)s %(t)s "%(r)s" %(s)s %(b)s
    "%(f)s" "%(a)s"`: client, time, request line, status, length, referer, user agent."""
    client = request.get("client")
    wanted = {b"referer": "f", b"user-agent": "a"}
    fields = {"l": "-", "b": "-", "f": "-", "a": "-"}
    for name, value in request["headers"]:
        if (key := wanted.get(name.lower())) is not None:
            fields[key] = value.decode("latin1")
    for name, value in response.get("headers", ()) if response is not None else ():
        if name.lower() == b"content-length":
            fields["b"] = value.decode("latin1")
    method = request["method"] if request["type"] == "http" else "GET"
    protocol = request.get("http_version", "ws")
    fields.update(
        h=":".join(map(str, client)) if client else "-",
        t=time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
        r=f"{method} {request['path']} {protocol}",
        s=str(response["status"]) if response is not None else "-",
    )
    return fields


class _ServerConfig(HypercornConfig):
    """hypercorn's configuration, whose listening TCP sockets carry TCP_USER_TIMEOUT (RFC 5482;
    Linux, where accepted connections inherit it): the kernel drops a connection once response
    bytes have waited `send_stall_timeout_s` for the client to take them. hypercorn has no
    write timeout (its read_timeout would end downloads too: their clients send nothing), and
    an ASGI app cannot tell a stalled client from a slow one: `send` returns only once a chunk
    of up to READ_CHUNK_MAX_BYTES is out. Without it, a client that stopped reading a
    download held its request, its blob file and up to a chunk of buffers until it went away
    (hypercorn's close waits for the buffers to be sent). A download read however slowly
    keeps going: the kernel counts from the last byte the client took."""

    send_stall_timeout_s: float = SEND_STALL_TIMEOUT_S

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)  # not on macOS or Windows
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            if option is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                millis = min(max(1, round(self.send_stall_timeout_s * 1000)), 2**31 - 1)
                sock.setsockopt(socket.IPPROTO_TCP, option, millis)
        return sockets


class DroppedConnections(logging.Filter):
    """asyncio's log of the ETIMEDOUT that hypercorn (0.18) lets out of closing a connection
    the kernel dropped (SEND_STALL_TIMEOUT_S, or a client whose network went away): an ERROR
    with a traceback each time, though nothing failed (the request had already ended as a
    client disconnect). Made one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError) and record.getMessage().startswith(
            "Unhandled exception in client_connected_cb"
        ):
            record.msg, record.args = "connection dropped: %s", (exc,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_dropped_connections() -> None:
    """DroppedConnections on asyncio's logger, once."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, DroppedConnections) for f in logger.filters):
        logger.addFilter(DroppedConnections())


class _ClosedStream:
    """What hypercorn's HTTP/2 protocol finds for a stream it has closed: events for it are
    dropped (RFC 9113 5.1: frames on a closed stream may be ignored; their flow-control
    credit is still given back by the protocol)."""

    async def handle(self, event: object) -> None:
        return None


class _Streams(dict[int, Any]):
    def __missing__(self, stream_id: int) -> _ClosedStream:
        return _CLOSED_STREAM


_CLOSED_STREAM = _ClosedStream()


class _SendStalled(Exception):
    """A stream's response bytes waited `send_stall_timeout_s` for flow-control window."""


class _StreamBuffer(StreamBuffer):
    """hypercorn's (0.18) buffer of one HTTP/2 stream's response bytes, which let the app go
    on as soon as the sending task took fewer than BUFFER_LOW_WATER bytes out of it: also when
    it took none, the stream's flow-control window being shut. A client that opened no window
    (SETTINGS_INITIAL_WINDOW_SIZE 0) made the server read whole instances into memory, every
    stream of the connection at once: 12 GB for 100 streams on one connection, grown as fast
    as the disk gave it; a slow reader likewise. Here the app waits until the buffer itself
    is below the low-water mark, and gives up (_SendStalled) once no byte of it went out for
    `stall_s` (asyncio.timeout: the server runs on asyncio or uvloop). The buffer holds the
    app's messages themselves, not a copy of them (which doubled the memory of each
    download: a READ_CHUNK_MAX_BYTES chunk held twice)."""

    def __init__(self, event_class: Any, stall_s: float) -> None:
        super().__init__(event_class)
        self.stall_s = stall_s
        self.sent_at = time.monotonic()
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._size = 0

    @property
    def complete(self) -> bool:
        return self._complete and self._size == 0

    async def _wait(self, event: Any) -> None:
        while True:
            try:
                async with asyncio.timeout(self.stall_s):
                    await event.wait()
                return
            except TimeoutError:
                if time.monotonic() - self.sent_at >= self.stall_s:
                    raise _SendStalled from None

    async def drain(self) -> None:
        await self._wait(self._is_empty)

    async def close(self) -> None:
        self._chunks.clear()
        self._size = 0
        await super().close()

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise hypercorn_h2.BufferCompleteError()
        self._chunks.append(memoryview(data))
        self._size += len(data)
        await self._is_empty.clear()
        while self._size >= BUFFER_HIGH_WATER and not self._complete:
            await self._paused.clear()
            await self._wait(self._paused)

    async def pop(self, max_length: int) -> bytes:
        data = b""
        if self._chunks and max_length > 0:
            first = self._chunks[0]
            data = bytes(first[:max_length])
            if len(data) == len(first):
                self._chunks.popleft()
            else:
                rest = first[len(data) :]
                if len(rest) < BUFFER_HIGH_WATER < len(rest.obj):  # type: ignore[arg-type]
                    # The app's chunk is let go of for its tail: push returns below the
                    # low-water mark and the app reads its next chunk meanwhile, which a
                    # stream whose bytes stop there held beside it (two chunks, one of them
                    # past the download budget, blobstore.budget).
                    rest = memoryview(bytes(rest))
                self._chunks[0] = rest
            self._size -= len(data)
            self.sent_at = time.monotonic()
        if self._size < BUFFER_LOW_WATER:
            await self._paused.set()
        if self._size == 0:
            await self._is_empty.set()
        return data


class _StreamBuffers(dict[int, StreamBuffer]):
    """The stream buffers of an _H2Protocol: hypercorn stores a StreamBuffer for each stream
    it opens, fresh and empty; a _StreamBuffer takes its place."""

    def __init__(self, event_class: Any, stall_s: float) -> None:
        super().__init__()
        self.event_class, self.stall_s = event_class, stall_s

    def __setitem__(self, stream_id: int, buffer: StreamBuffer) -> None:
        if not isinstance(buffer, _StreamBuffer):
            buffer = _StreamBuffer(self.event_class, self.stall_s)
        super().__setitem__(stream_id, buffer)


_BODY_EVENTS = (Body, Data, EndBody, EndData, Trailers)


class _CountedApp:
    """The app as one HTTP/2 connection runs it, counting the requests it is still handling:
    those whose streams the client has reset too (RFC 9113 5.1.2: they are closed for the
    protocol, not for the server, whose handler may still be at work)."""

    def __init__(self, app: AppWrapper) -> None:
        self.app = app
        self.running = 0

    async def __call__(
        self,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        try:
            await self.app(scope, receive, send, sync_spawn, call_soon)
        finally:
            self.running -= 1


class _H2Protocol(H2Protocol):
    """hypercorn's (0.18) HTTP/2 protocol, with these repairs.

    - It raised KeyError at a DATA frame for a stream it had closed: a request answered
      before its body was read (a 401, 413, 415 or 408 to an upload still coming) ended the
      whole connection, the other requests on it included, and its client never saw the
      answer (hypercorn#329, unfixed upstream).
    - Its response buffers did not hold the app back (_StreamBuffer).
    - A stream whose client grants it no window while the connection lives (the kernel's
      TCP_USER_TIMEOUT sees nothing wrong: the client acknowledges every byte) held its
      request, its blob and a chunk of buffers forever; and a connection that closed left
      every app blocked on a full buffer waiting forever (nothing wakes it once the sending
      task has ended), with that memory. A stream whose response bytes wait
      `send_stall_timeout_s` is reset (RST_STREAM CANCEL) and its request ends as a client
      disconnect; the buffers of a closed connection are closed, which releases their apps.
    - Streams the client opened and reset at once were each given a handler, without bound
      (the rapid reset of CVE-2023-44487: SETTINGS_MAX_CONCURRENT_STREAMS counts open
      streams only): a thousand requests in one 64 KiB read, all handled at once, and at
      the 1001st the priority tree's TooManyStreamsError ended the connection with a
      traceback. A request arriving while the connection's handlers still at work, reset
      or not, number H2_MAX_HANDLERS is refused (RST_STREAM REFUSED_STREAM, which a client
      may retry, RFC 9113 8.7); a connection refused more than H2_MAX_REFUSED_STREAMS
      times is closed (GOAWAY ENHANCE_YOUR_CALM).
    - It closed a connection after `keep_alive_max_requests` requests, failing the last
      (keep_alive_requests).
    - PRIORITY frames for streams not open yet filled its priority tree
      (_priority_updated).
    - A connection whose streams the client had reset, or that was refused, was never
      timed out idle: hypercorn restarts its idle timer only when a response ends. It is
      restarted whenever the connection has no stream left open (KEEP_ALIVE_TIMEOUT_S).
    - A response the app left unfinished (its status sent, its body cut by an error met on
      the way: a later file of a study found lost, app._CatchAllMiddleware) was neither
      ended nor reset: its client waited for the rest as long as the connection lived, for
      ever while it kept the connection busy. Its stream is reset (RST_STREAM
      INTERNAL_ERROR, RFC 9113 5.4.2), as HTTP/1.1 closes the connection (_unfinished).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams = _Streams()
        stall_s = getattr(self.config, "send_stall_timeout_s", SEND_STALL_TIMEOUT_S)
        self.stream_buffers = _StreamBuffers(self.context.event_class, stall_s)
        self.app = self.handlers = _CountedApp(self.app)
        self._maybe_idle = False
        self.refused = 0  # streams refused (H2_MAX_HANDLERS)
        self._unfinished: set[int] = set()  # streams whose response started and has not ended

    @property
    def keep_alive_requests(self) -> int:
        """hypercorn's count of the connection's requests, which it closes the connection at
        (`keep_alive_max_requests`): always 0, an HTTP/2 connection has no such limit. The
        GOAWAY hypercorn sent named the request that reached it as processed and left it
        unanswered: the 1001st request of every client (a viewer fetching a study's frames
        one by one) failed. Sent when a response ends, it meets the client's next request
        on the way, which clients fail too (curl 7.88; httpx while a stream is open)."""
        return 0

    @keep_alive_requests.setter
    def keep_alive_requests(self, value: int) -> None:
        pass

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        if self.connection.state_machine.state == h2.connection.ConnectionState.CLOSED:
            return  # after our GOAWAY: the rest of the client's read is dropped
        if self.handlers.running < H2_MAX_HANDLERS:
            self.handlers.running += 1
            try:
                await super()._create_stream(request)
            except BaseException:
                await self._answered_without_handler(request.stream_id)
                raise
            stream = self.streams.get(request.stream_id)  # None: its handler already ended
            if stream is not None and getattr(stream, "app_put", None) is None:
                await self._answered_without_handler(request.stream_id)
            return
        self.refused += 1
        if self.refused > H2_MAX_REFUSED_STREAMS:  # it goes on as if told nothing
            self.connection.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            await self._flush()
            await self.send(Closed())
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset by the client
            self.connection.reset_stream(request.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self._maybe_idle = True

    async def _answered_without_handler(self, stream_id: int) -> None:
        """A request hypercorn answered itself, no handler started (a CONNECT without a
        WebSocket handshake: 400): it is not counted as running, which made 200 of them
        refuse every later stream of the connection; and its stream, which hypercorn never
        closed, no longer keeps the connection from being timed out idle."""
        self.handlers.running -= 1
        await self._close_stream(stream_id)

    async def _priority_updated(self, event: h2.events.PriorityUpdated) -> None:
        """PRIORITY frames and priorities in HEADERS are ignored (RFC 9113 5.3.2 deprecates
        the scheme of RFC 7540, and its receiver may ignore them): hypercorn entered every
        stream one names into its priority tree, opened or not, and the 1001st such stream
        ended the connection with TooManyStreamsError and a traceback in the error log."""
        return None

    async def _close_stream(self, stream_id: int) -> None:
        self._unfinished.discard(stream_id)  # closed: the client reset it, or it ended
        await super()._close_stream(stream_id)
        self._maybe_idle = True

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        await super()._handle_events(events)
        if self._maybe_idle and not self.closed:
            self._maybe_idle = False
            if self.idle:
                await self.send(Updated(idle=True))

    async def handle(self, event: ConnectionEvent) -> None:
        await super().handle(event)
        if isinstance(event, Closed):
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200:
            self._unfinished.add(event.stream_id)
        elif isinstance(event, EndBody | EndData | Trailers):
            self._unfinished.discard(event.stream_id)
        elif isinstance(event, StreamClosed) and event.stream_id in self._unfinished:
            await self._cut(event)  # the app ended with its response unfinished
            return
        try:
            await super().stream_send(event)
            if isinstance(event, StreamClosed):
                self._maybe_idle = False  # hypercorn has said whether it is idle
        except _SendStalled:
            assert isinstance(event, _BODY_EVENTS)
            await self._reset_stalled(event.stream_id)

    async def _reset_stalled(self, stream_id: int) -> None:
        """As when the client resets the stream: the app is told of a disconnect, and the
        sending task, finding the stream closed, drops its buffer."""
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed meanwhile
            self.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await self._flush()
        await self._close_stream(stream_id)
        await self._window_updated(stream_id)
        if self.idle and not self.closed:  # no frame may come to restart the idle timer
            await self.send(Updated(idle=True))

    async def _cut(self, event: StreamClosed) -> None:
        """The end of a response whose app ended before its body did: RST_STREAM
        INTERNAL_ERROR (RFC 9113 5.4.2; a client takes the response for failed, as one whose
        HTTP/1.1 connection closed mid-body), then the stream closed as hypercorn closes
        it; the sending task, finding it reset, drops what its buffer still holds."""
        stream_id = event.stream_id
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed meanwhile
            self.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
        await self._flush()
        await super().stream_send(event)
        self._maybe_idle = False  # hypercorn has said whether it is idle
        await self._window_updated(stream_id)


# Bytes of a response's first body message sent in one write with its head (_H11Protocol);
# a larger first chunk (a retrieve's) goes in a write of its own, uncopied. The same bound
# for the framing of a chunked body: a larger chunk goes alone, its size line and CRLF in
# writes of their own.
HEAD_WITH_BODY_MAX_BYTES = 64 * 1024
# The high-water mark of a connection's transport (asyncio's and uvloop's default); its
# low-water mark is 0 (_H11Protocol).
TRANSPORT_HIGH_WATER_BYTES = 64 * 1024


class _H11Protocol(H11Protocol):
    """hypercorn's (0.18) HTTP/1.1 protocol, with these changes.

    - It wrote a response's head as soon as the app started the response and its body in a
      second write: two send calls and two TCP segments (the client woken twice) for every
      small answer, a STOW response or a QIDO's. The head is held here until the first body
      bytes (or the end of the response) and goes out with them when they are small.
      Nothing is held past the next message of the app: an interim 100 Continue is not a
      Response event and is still sent at once.
    - A body sent with chunked transfer coding (no Content-Length: a converted retrieve, a
      metadata response) was copied chunk by chunk to frame it (h11's `send` joins the
      size line, the chunk and its CRLF into one bytes): a download held each chunk twice
      while it was written, two READ_CHUNK_MAX_BYTES chunks instead of one. The framing
      goes in writes of its own and the chunk is written as the app gave it (h11's
      `send_with_data_passthrough`).
    - A write returned (the app went on to make its next chunk) while the transport still
      held the chunk written, as long as its tail was under the low-water mark (16 KiB by
      default): a download held two chunks, not one. The transport's low-water mark is 0
      here (the kernel's socket buffer keeps the connection busy meanwhile). uvloop may
      still hold a chunk's tail for a moment after it resumed the writer (seen once with a
      client window of 64 KiB): a download then holds two chunks for that moment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = b""
        # hypercorn's TCPServer (the `send` given) writes to an asyncio or uvloop transport.
        writer = getattr(getattr(self.send, "__self__", None), "writer", None)
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.set_write_buffer_limits(TRANSPORT_HIGH_WATER_BYTES, 0)

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        try:
            if isinstance(self.connection, h11.Connection):
                pieces = self.connection.send_with_data_passthrough(event) or []
            else:  # hypercorn's H11WSConnection: a WebSocket upgrade's
                pieces = [self.connection.send(event) or b""]
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            self._head += b"".join(pieces)
            return
        head, self._head = self._head, b""
        for data in _writes([head, *pieces]):
            await self.send(RawData(data=data))


def _writes(pieces: list[bytes]) -> list[bytes]:
    """`pieces` as socket writes: small neighbours joined into one, a piece over
    HEAD_WITH_BODY_MAX_BYTES alone and uncopied. At least one write (hypercorn's own sent
    one for every event, empty or not)."""
    writes: list[bytes] = []
    small: list[bytes] = []
    for piece in pieces:
        if len(piece) > HEAD_WITH_BODY_MAX_BYTES:
            if small:
                writes.append(b"".join(small))
                small = []
            writes.append(piece)
        elif piece:
            small.append(piece)
    if small or not writes:
        writes.append(b"".join(small))
    return writes


def prepare_process() -> None:
    """What every process serving HTTP needs before its first connection (the `serve`
    process and each of its workers): dropped connections logged as one line, and frames for
    closed HTTP/2 streams dropped (_H2Protocol, in place of the protocol hypercorn makes)."""
    quiet_dropped_connections()
    hypercorn_protocol.H2Protocol = _H2Protocol  # type: ignore[attr-defined]  # its module global
    hypercorn_protocol.H11Protocol = _H11Protocol  # type: ignore[attr-defined]


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """The configuration `serve` runs hypercorn with, one process or several."""
    config = _ServerConfig()
    config.send_stall_timeout_s = settings.send_stall_timeout_s
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.h2_max_concurrent_streams = H2_MAX_CONCURRENT_STREAMS
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = "-"
    config.logger_class = AccessLog
    config.errorlog = "-"
    if settings.certfile is not None and settings.keyfile is not None:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    return config
