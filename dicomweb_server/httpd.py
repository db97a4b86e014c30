"""The HTTP server's configuration: hypercorn's settings, its listening sockets and its logs
(`serve` runs it, cli.py)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

import h11
import hypercorn.protocol as hypercorn_protocol
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import RawData
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import H11SendableEvent, ResponseSummary, WWWScope

from dicomweb_server.config import SEND_STALL_TIMEOUT_S, Settings

__all__ = [
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


class _H2Protocol(H2Protocol):
    """hypercorn's (0.18) HTTP/2 protocol, which raised KeyError at a DATA frame for a stream
    it had closed: a request answered before its body was read (a 401, 413, 415 or 408 to an
    upload still coming) ended the whole connection, the other requests on it included, and
    its client never saw the answer (hypercorn#329, unfixed upstream)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams = _Streams()


# Bytes of a response's first body message sent in one write with its head (_H11Protocol);
# a larger first chunk (a retrieve's) goes in a write of its own, uncopied.
HEAD_WITH_BODY_MAX_BYTES = 64 * 1024


class _H11Protocol(H11Protocol):
    """hypercorn's (0.18) HTTP/1.1 protocol, which wrote a response's head as soon as the app
    started the response and its body in a second write: two send calls and two TCP segments
    (the client woken twice) for every small answer, a STOW response or a QIDO's. The head
    is held here until the first body bytes (or the end of the response) and goes out with
    them when they are small. Nothing is held past the next message of the app: an
    interim 100 Continue is not a Response event and is still sent at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = b""

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            self._head += data or b""
            return
        head, self._head = self._head, b""
        if head and data and len(data) > HEAD_WITH_BODY_MAX_BYTES:
            await self.send(RawData(data=head))
            head = b""
        await self.send(RawData(data=head + (data or b"")))


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
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = "-"
    config.logger_class = AccessLog
    config.errorlog = "-"
    if settings.certfile is not None and settings.keyfile is not None:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    return config
