"""create_app(settings) -> Starlette: routes, lifespan, the error handler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from dicomweb_server.blobstore import FileSystemBlobStore, tune_allocator
from dicomweb_server.cache import ByteLRU
from dicomweb_server.config import CORS_MAX_AGE_S, LOCAL_ORIGINS_REGEX, Settings
from dicomweb_server.dicomfile import configure_pydicom
from dicomweb_server.dimse import serve_dimse
from dicomweb_server.embedded_db import EmbeddedPostgres
from dicomweb_server.errors import DicomWebError
from dicomweb_server.guard import Guard, MatchedRouter
from dicomweb_server.index import Index
from dicomweb_server.ingest import Services
from dicomweb_server.proxy import ProxyHeaders, parse_networks
from dicomweb_server.routes import ROUTE_ROLES, ROUTES
from dicomweb_server.routes.common import error_response

__all__ = ["SCHEMA_PATH", "app_from_env", "create_app", "open_services", "recover"]

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
    connection dropped (a database restart) has not taken it again yet. Its commit stores
    nothing once its reservation is gone (schema.sql, DW003), so each blob is deleted while
    its reservation is being dropped (Index.releasing): deleted first and released after, a
    commit in between found its reservation and stored a row whose file was gone."""
    keys = []
    for key in await index.dead_reservations():
        async with index.releasing(key) as ours:
            if ours:
                await blobs.delete(key)
                keys.append(key)
    for owner in blobs.stale_tmp_owners():
        if await index.owner_is_dead(owner):
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
            yield Services(index, blobs, limiter, blobs.tmp_dir, images, frames, metadata)
    finally:
        await index.close()
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.stop)


async def _dicomweb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DicomWebError)
    return error_response(exc)


# Seconds a request waits, once answered, for the unread part of its body that the server had
# already queued to be drained (_UnreadBody). hypercorn ends that queue at once.
UNREAD_BODY_DRAIN_S = 5.0


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


class _UnreadBody:
    """A request answered before its body was read (a 401 or 415 to a STOW, a 413 part-way)
    is answered with `Connection: close`, and the part of its body already queued for the app
    is drained while the answer goes out.

    hypercorn (0.18) queues at most `max_app_queue_size` (10) body messages for the app, and
    once the answer is sent it queues `http.disconnect` for it, waiting for room inside the
    app's last `send`. With the queue full of a body nobody reads, that wait never ended: the
    request never finished, its socket and memory stayed, and its audit row was never written
    (found by review: an unknown key id and a 2 MB body left half the requests so). Closing
    the connection stops the rest of the body (RFC 9112 9.6: a server that does not read the
    body closes the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        read = False  # the whole body, or the disconnect, reached the app
        drain: asyncio.Task[None] | None = None

        async def tracked() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read = True
            return message

        async def drained() -> None:
            while not read:
                await tracked()

        async def answer(message: Message) -> None:
            nonlocal drain
            if message["type"] == "http.response.start" and not read:
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and not read
                and drain is None
            ):
                drain = asyncio.ensure_future(drained())
            await send(message)

        try:
            await self.app(scope, tracked, answer)
        finally:
            if drain is not None:
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(drain, UNREAD_BODY_DRAIN_S)


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
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            # The client went away mid-request (a STOW body cut off): nobody to answer, and not
            # a server error. 499 as nginx counts it, for the audit trail and the access log.
            log.info("client disconnected during %s", scope.get("path"))
            if not started:
                await JSONResponse({"status": 499, "message": "client disconnected"}, 499)(
                    scope, receive, send
                )
        except Exception:
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

    origins = settings.cors_origins
    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={DicomWebError: _dicomweb_error},
        middleware=[
            # Outermost: no request stays unfinished for a body it was answered without.
            Middleware(_UnreadBody),
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
        ],
    )
    # The Guard matches every request's route already; the router takes its match.
    app.router = MatchedRouter(ROUTES, lifespan=lifespan)
    app.state.settings = settings
    return app


def app_from_env() -> Starlette:
    """The app of a worker process of `serve --workers N` (settings come through the
    environment, see Settings.export)."""
    tune_allocator()
    return create_app(Settings.from_env())
