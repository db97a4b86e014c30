"""create_app(settings) -> Starlette: routes, lifespan, the error handler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomweb_server.auditlog import running_audit_log
from dicomweb_server.auth import authenticator_for, describe
from dicomweb_server.blobstore.files import FileSystemBlobStore
from dicomweb_server.blobstore.lost import LostBlobError
from dicomweb_server.blobstore.reading import tune_allocator
from dicomweb_server.cache import ByteLRU
from dicomweb_server.config import CORS_MAX_AGE_S, LOCAL_ORIGINS_REGEX, Settings
from dicomweb_server.departure import ClientGone, Departure, watched
from dicomweb_server.dicomfile import configure_pydicom
from dicomweb_server.dimse.server import serve_dimse
from dicomweb_server.embedded_db import EmbeddedPostgres
from dicomweb_server.errors import DicomWebError, RequestTimeoutError
from dicomweb_server.guard import Guard, MatchedRouter, cut_by_server
from dicomweb_server.index.database import Index
from dicomweb_server.ingest import Services
from dicomweb_server.proxy import ProxyHeaders, parse_networks
from dicomweb_server.retrieve.instances import WADO_CONVERSIONS_AT_ONCE
from dicomweb_server.routes import ROUTE_ROLES, ROUTES
from dicomweb_server.routes.common import error_response, not_found

__all__ = [
    "DEFAULT_RESPONSE_HEADERS",
    "SCHEMA_PATH",
    "app_from_env",
    "create_app",
    "open_services",
    "recover",
]

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"
# Headers a browser-based viewer must be able to read (field notes 2).
EXPOSED_HEADERS = [
    "Content-Type",
    "Content-Location",
    "Content-Length",
    "ETag",
    "Warning",
    "Content-Range",
    "Accept-Ranges",
]


async def recover(index: Index, blobs: FileSystemBlobStore) -> int:
    """Roll back what crashed processes left: reserved blobs never committed, spool files.

    A process may only look dead: its lock is free, and a live process whose lock
    connection dropped (a database restart) has not taken it again yet. It is given
    RECOVERY_GRACE_S to take it again (Index.dead_owners). Should it be taken for dead all
    the same (its lock not taken again by then), its commit stores nothing once its
    reservation is gone (schema.sql, DW003), so each blob is deleted while its reservation is
    being dropped (Index.releasing): deleted first and released after, a commit in between
    found its reservation and stored a row whose file was gone."""
    keys = []
    reservations = await index.reservations()
    spooled = blobs.stale_tmp_owners()
    dead = await index.dead_owners([owner for _, owner in reservations] + spooled)
    for key in (key for key, owner in reservations if owner in dead):
        async with index.releasing(key) as ours:
            if ours and not blobs.is_key(key):  # not made here: no blob to look for
                log.warning("dropped the reservation of %r, which is not a blob key", key)
            elif ours:
                await blobs.delete(key)
                keys.append(key)
    for owner in spooled:
        if owner in dead:
            blobs.remove_tmp_of(owner)
    if keys:
        log.warning("rolled back %d blobs of interrupted stores", len(keys))
    return len(keys)


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Database (embedded when no URL is set), schema, blob store, recovery."""
    configure_pydicom()
    embedded = None
    dsn = settings.database_url
    if dsn is None:
        embedded = await anyio.to_thread.run_sync(EmbeddedPostgres, settings.pg_dir)
        dsn = embedded.dsn
    try:
        index = await Index.open(
            dsn, max_size=settings.pool_size, timeout_s=settings.query_timeout_s
        )
    except BaseException:  # the cluster started here is stopped here, not left running
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.stop)
        raise
    try:
        await index.apply_schema(SCHEMA_PATH.read_text())
        owner = await index.claim_owner(dsn)
        async with index.keeping_owner():
            blobs = FileSystemBlobStore(settings.blob_dir, owner)
            await recover(index, blobs)
            limiter = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))
            images = ByteLRU(settings.image_cache_bytes)
            frames = ByteLRU(settings.frame_cache_bytes)
            metadata = ByteLRU(settings.metadata_cache_bytes)
            try:
                converting = anyio.CapacityLimiter(WADO_CONVERSIONS_AT_ONCE)
                yield Services(
                    index, blobs, limiter, blobs.tmp_dir, images, frames, metadata, converting
                )
            finally:
                # Our spool directory goes while our lock is held: left behind, it made every
                # later start take us for an owner that looks dead and wait RECOVERY_GRACE_S
                # (Index.dead_owners), though nothing was left to recover.
                blobs.remove_tmp_of(owner)
    finally:
        await index.close()
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.stop)


async def _dicomweb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DicomWebError)
    return _answered(exc)


def _answered(exc: DicomWebError) -> Response:
    """The response to a DicomWebError raised before the response started. A stored file
    lost or cut short (LostBlobError, a 500 telling the client to re-send the instance) is
    the operator's to know of too: one error line naming the instance and its file, no
    traceback (the state of the data directory, not a bug)."""
    if isinstance(exc, LostBlobError):
        log.error("%s", exc.log_message)
    return error_response(exc)


# Bytes a second a request body must bring, on average over each BODY_IDLE_TIMEOUT_S (config)
# of waiting for it: a body trickled slower is as idle as one that stopped (Apache's
# mod_reqtimeout asks 500 by default; a GPRS link carries about ten times that).
BODY_MIN_BYTES_PER_S = 512


def _has_body(scope: Scope) -> bool:
    """Whether the request may carry a body. HTTP/1.1 announces one by Content-Length or
    Transfer-Encoding (RFC 9112 6.3); HTTP/2 frames it by the stream, with or without a
    Content-Length (RFC 9113 8.1), so a request over it with none may have one. Found by
    review: an HTTP/2 STOW streamed without a Content-Length that stopped was waited for
    forever."""
    length = None
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            length = value
    if length is not None:
        return bool(length.strip(b"0 "))
    return scope.get("http_version") in ("2", "3")


class _Body:
    """One request's body as the app reads it (receive), and whether all of it was read.

    While the response has not started, the body is idle once the server has waited
    `idle_s` for it (waiting counts, not the time the app spends on what came) and it
    brought fewer than `idle_s * BODY_MIN_BYTES_PER_S` bytes meanwhile: receive raises
    RequestTimeoutError (408, RFC 9110 15.5.9), then and at every later call. The reader
    above (a STOW's multipart parser, ingest) discards the part it was spooling and keeps the
    parts it completed, as when the client goes away. A body that keeps coming, however
    slowly overall, is never cut: each quota it brings starts the clock again. Found by
    review: a client that stopped part-way, that sent `Expect: 100-continue` and then
    nothing, or that trickled a byte every few seconds held the request, its spool file and
    its connection forever (a STOW after 60 s of silence was the only one answered).

    A read already waiting when the response starts loses its clock then (answer): Starlette's
    streamed responses read `receive` for the disconnect from before their first byte, and a
    GET announcing a body it never sent (`Content-Length: 10`) whose client read its answer
    slowly had that read time out mid-answer: the body cut, a traceback, audited 500 (found by
    review)."""

    def __init__(self, receive: Receive, idle_s: float) -> None:
        self._receive = receive
        self._idle_s = idle_s
        self._quota = max(1, int(idle_s * BODY_MIN_BYTES_PER_S))
        self.read = False  # the whole body, or the disconnect, reached the app
        self.answered = False  # the response has started: no clock any more
        self._waited = 0.0  # seconds waited since the body last brought its quota
        self._brought = 0  # bytes it brought meanwhile
        self._timeout: RequestTimeoutError | None = None
        self._clocks: set[anyio.CancelScope] = set()  # the reads waiting with the clock

    def answer(self) -> None:
        """The response has started: no read times out any more, waiting or later."""
        self.answered = True
        for clock in self._clocks:
            clock.deadline = math.inf

    async def receive(self) -> Message:
        if self.read or self.answered:
            return await self.next()
        if self._timeout is None and self._waited < self._idle_s:
            started = anyio.current_time()
            with anyio.move_on_after(self._idle_s - self._waited) as clock:
                self._clocks.add(clock)
                try:
                    message = await self.next()
                finally:
                    self._clocks.discard(clock)
                self._count(message, anyio.current_time() - started)
                return message
            if self.answered:  # the clock ran out as the response started
                return await self.next()
        if self._timeout is None:
            self._timeout = RequestTimeoutError(self._why(), headers={"Connection": "close"})
            log.info("request body idle: %s", self._timeout.message)
        raise self._timeout

    async def next(self) -> Message:
        """The next message, without the clock (the drain after the answer)."""
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.read = True
        return message

    def _count(self, message: Message, waited_s: float) -> None:
        self._waited += waited_s
        self._brought += len(message.get("body", b""))
        if self._brought >= self._quota:
            self._waited, self._brought = 0.0, 0

    def _why(self) -> str:
        if not self._brought:
            return f"the request body stopped: nothing came for {self._idle_s:g} seconds"
        return (
            f"the request body came too slowly: {self._brought} of the {self._quota} bytes"
            f" it must bring in {self._idle_s:g} seconds ({BODY_MIN_BYTES_PER_S} a second)"
        )


class _RequestBody:
    """Requests with a body: an idle body ends in 408 (_Body), and a request answered before
    its body was read (a 401 or 415 to a STOW, a 413 or 408 part-way) is answered with
    `Connection: close`, while the part of its body already queued for the app is drained.

    hypercorn (0.18) queues at most `max_app_queue_size` (10) body messages for the app, and
    once the answer is sent it queues `http.disconnect` for it, waiting for room inside the
    app's last `send`. With the queue full of a body nobody reads, that wait never ended: the
    request never finished, its socket and memory stayed, and its audit row was never written
    (found by review: an unknown key id and a 2 MB body left half the requests so). Closing
    the connection stops the rest of the body (RFC 9112 9.6: a server that does not read the
    body closes the connection). The drain runs only while that last `send` does: it takes
    what is queued, never waits for the client after the answer (a stalled one would keep
    the request open), and its clock is off."""

    def __init__(self, app: ASGIApp, idle_s: float) -> None:
        self.app = app
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        body = _Body(receive, self.idle_s)

        async def drained() -> None:
            with contextlib.suppress(Exception):
                while not body.read:
                    await body.next()

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                body.answer()
                if not body.read:
                    headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and not body.read
            ):
                drain = asyncio.ensure_future(drained())
                try:
                    await send(message)
                finally:
                    drain.cancel()
                    await asyncio.wait([drain])
                return
            await send(message)

        await self.app(scope, body.receive, answer)


# Headers every response carries unless it names its own (found by review: only rendered
# documents had them). nosniff: a browser never takes a body for another type than the one
# stated (a Part-10 preamble, a bulk data value or an error message that looks like HTML).
# private: responses hold patient data, and a shared cache (a CDN, a proxy that ignores
# the Authorization rule of RFC 9111 3.5, one in front of `--auth none`) must not keep them
# for others; the client's own cache still may, and revalidates with the ETag (RFC 9111
# 5.2.2.7).
DEFAULT_RESPONSE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"private"))


class _ResponseHeaders:
    """DEFAULT_RESPONSE_HEADERS on every HTTP response, errors and CORS preflights included,
    each unless the response sets that header itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                named = {name.lower() for name, _ in headers}
                headers += [h for h in DEFAULT_RESPONSE_HEADERS if h[0] not in named]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, stamped)


# Requests whose handlers are stopped when their client goes (_Departures): the safe methods
# (RFC 9110 9.2.1), whose work left unfinished leaves nothing half done. A STOW is not: its
# body is its parser's to read, and a client leaving it part-way is a ClientDisconnect.
_WATCHED_METHODS = frozenset({"GET", "HEAD"})


class _Departures:
    """GET and HEAD requests served with their `receive` channel relayed by a Departure
    (departure.py): long work for a client that went away stops, or never begins, and the
    request ends as ClientGone (a 499 for the audit trail, _CatchAllMiddleware). Inside
    _CatchAllMiddleware, which answers that."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WATCHED_METHODS:
            await self.app(scope, receive, send)
            return
        departure = Departure(receive)
        try:
            with watched(departure):
                await self.app(scope, departure.receive, send)
        finally:
            if departure.watching:
                await departure.close()


def _client_error(exc: Exception) -> DicomWebError | None:
    """The DicomWebError an exception group holds, when it holds nothing else: a task group
    wraps what its tasks raise (an idle body's 408 raised where a task reads the body), and
    the client's error is still the client's error, not a 500."""
    if not isinstance(exc, BaseExceptionGroup):
        return None
    errors, rest = exc.split(DicomWebError)
    leaf: BaseException | None = errors
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if rest is None and isinstance(leaf, DicomWebError) else None


class _CatchAllMiddleware:
    """An unexpected exception becomes a 500 JSON answer here, inside the CORS middleware
    (Starlette's own 500 handler sits outside it, so browsers would see a CORS failure)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            try:
                await send(message)
            except OSError as exc:
                # The connection is gone: hypercorn passes on what its write met, other than
                # a ConnectionError (ETIMEDOUT: SEND_STALL_TIMEOUT_S dropped a client that
                # stopped reading). The client's doing, not a server error.
                raise ClientDisconnect from exc

        try:
            await self.app(scope, receive, watch)
        except (ClientDisconnect, ClientGone):
            # The client went away mid-request (a STOW body cut off, a conversion stopped for
            # it: departure.py): nobody to answer, and not a server error. 499 as nginx counts
            # it, for the audit trail and the access log.
            log.info("client disconnected during %s", scope.get("path"))
            if not started:
                await JSONResponse({"status": 499, "message": "client disconnected"}, 499)(
                    scope, receive, send
                )
        except Exception as exc:
            error = _client_error(exc)
            if error is not None and not started:
                await _answered(error)(scope, receive, send)
                return
            cut = error or exc.__cause__
            if started and isinstance(cut, LostBlobError):
                # A later file of a study or series found lost once the body was under way:
                # the body can only be cut. Not raised on: hypercorn would log a traceback
                # for the state of the data directory, and it ends an unfinished response
                # the same way either way (the connection closed; an HTTP/2 stream reset,
                # httpd._H2Protocol).
                # The audit trail still records the archive's failure (CUT_BY_SERVER).
                log.error("%s cut short: %s", scope.get("path"), cut.log_message)
                cut_by_server(scope)
                return
            if started and isinstance(cut, DicomWebError):
                # An error a streamed body met after it started (a metadata body whose series
                # changed, routes.metadata_body): the body is left unfinished, not a bug.
                log.warning("%s cut short: %s", scope.get("path"), cut.message)
                raise
            log.exception("unexpected error on %s", scope.get("path"))
            if started:
                raise
            response = JSONResponse({"status": 500, "message": "internal error"}, 500)
            await response(scope, receive, send)


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            svc = await stack.enter_async_context(open_services(settings))
            app.state.services = svc
            app.state.authenticator = authenticator_for(settings, svc.index)
            app.state.audit = None
            if settings.audit:
                app.state.audit = await stack.enter_async_context(running_audit_log(svc.index))
            # None unless a DIMSE port is configured.
            app.state.dimse = await stack.enter_async_context(
                serve_dimse(settings, svc, app.state.audit)
            )
            log.info("authentication: %s", describe(settings))
            yield

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={DicomWebError: _dicomweb_error},
        middleware=_middleware(settings),
    )
    # The Guard matches every request's route already; the router takes its match.
    # A path matching no route: a JSON 404, never a redirect (routes/common.not_found).
    app.router = MatchedRouter(ROUTES, lifespan=lifespan, redirect_slashes=False, default=not_found)
    app.state.settings = settings
    return app


def _middleware(settings: Settings) -> list[Middleware]:
    """The app's middleware, outermost first."""
    origins = settings.cors_origins
    return [
        # Outermost: nosniff and Cache-Control on every answer, whoever makes it.
        Middleware(_ResponseHeaders),
        # Then: an idle request body ends in 408, and no request stays unfinished
        # for a body it was answered without.
        Middleware(_RequestBody, idle_s=settings.body_idle_timeout_s),
        # Then: everything after sees the client, scheme and host a trusted reverse
        # proxy forwarded (field notes 13).
        Middleware(
            ProxyHeaders,
            networks=parse_networks(settings.trusted_proxies),
            family=settings.proxy_headers,
        ),
        # Field notes 2: CORS on every response, errors included, Authorization allowed.
        Middleware(
            CORSMiddleware,
            allow_origins=list(origins or []),
            allow_origin_regex=None if origins else LOCAL_ORIGINS_REGEX,
            # HEAD too: a browser's HEAD with Authorization is preflighted, and a
            # preflight naming a method not listed is a 400, which fails the fetch.
            allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials="*" not in (origins or ()),
            expose_headers=EXPOSED_HEADERS,
            max_age=CORS_MAX_AGE_S,
        ),
        # Inside CORS, so that a 401 or 403 carries CORS headers too (field notes 2).
        Middleware(Guard, routes=ROUTES, roles=ROUTE_ROLES),
        # Inside CORS, so that even an unexpected error answers with CORS headers.
        Middleware(_CatchAllMiddleware),
        # Innermost: long work of a GET or HEAD stops when its client goes (the 499 of
        # ClientGone is _CatchAllMiddleware's).
        Middleware(_Departures),
    ]


def app_from_env() -> Starlette:
    """The app of a worker process of `serve --workers N` (settings come through the
    environment, see Settings.export)."""
    settings = Settings.from_env()
    tune_allocator(settings.malloc_arena_max)
    return create_app(settings)
