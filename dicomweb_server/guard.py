"""ASGI middleware in front of every route: authenticate the caller, check the route's role,
and append one event per request to the audit trail.

The role of a request is the role of the route it matches (routes.ROUTE_ROLES); paths that
match no route need `read`, so that probing for URLs without credentials answers 401, not 404.
CORS preflights are answered by the CORS middleware outside this one and stay open. With
`--auth none`, requests must name this machine in their Host header (DNS rebinding).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.routing import BaseRoute, Match, Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomweb_server.audit import AuditEvent
from dicomweb_server.auditlog import AuditLog
from dicomweb_server.auth import Authenticator, Principal, require
from dicomweb_server.config import Settings
from dicomweb_server.errors import (
    DicomWebError,
    ForbiddenError,
    MethodNotAllowedError,
    UnauthorizedError,
)
from dicomweb_server.routes.common import error_response

__all__ = [
    "CUT_BY_CLIENT",
    "CUT_BY_SERVER",
    "ROUTE_DEPTH_CACHE",
    "Guard",
    "MatchedRouter",
    "RouteMatch",
    "RouteTable",
    "cut_by_server",
]

log = logging.getLogger(__name__)

_REALM = 'Bearer realm="dicomweb"'
# Characters of an unmatched path kept as the audited action.
_MAX_ACTION_CHARS = 200


# Scope key under which the Guard hands its full match to MatchedRouter.
_MATCH_KEY = "dicomweb.route_match"
# Scope key (of scope["state"]) that marks a response the archive broke off without raising
# past the Guard (cut_by_server).
_CUT_KEY = "dicomweb.cut_by_server"


@dataclass(frozen=True)
class RouteMatch:
    """The route a request reaches: its name and path parameters; for a full match also the
    route itself and the scope updates routing would make on the way to it (through mounts),
    so that MatchedRouter need not match the path again."""

    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    route: BaseRoute | None = None  # set for a full match only
    updates: dict[str, Any] = field(default_factory=dict)


# Path depths (number of "/") whose candidate routes a RouteTable keeps; deeper paths, which
# no route has, are filtered on each request instead (the table stays bounded).
ROUTE_DEPTH_CACHE = 32


class RouteTable:
    """Routes (and mounts, through their own tables) matched in Starlette's Router.app order,
    trying only the routes that could match: a route whose path parameters take no "/" fits
    only paths with as many "/" as its template (a mount, or a route with a `path` parameter,
    fits any). A retrieve path is tried against 2 routes instead of 20."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self._entries: list[tuple[BaseRoute, RouteTable | None, int | None]] = []
        for route in routes:
            if isinstance(route, Mount):
                if not isinstance(route.app, Router):
                    # MatchedRouter goes straight to a mount's routes, past anything the mount
                    # itself would run first (its middleware, a body limit): refused here.
                    raise ValueError(f"mount {route.path!r} runs its own middleware")
                self._entries.append((route, RouteTable(route.routes), None))
                continue
            depth = None  # any: a parameter of this route may take a "/"
            if isinstance(route, Route) and all(
                c.regex == "[^/]+" for c in route.param_convertors.values()
            ):
                depth = route.path.count("/")
            self._entries.append((route, None, depth))
        self._by_depth: dict[int, list[tuple[BaseRoute, RouteTable | None, int | None]]] = {}

    def _candidates(self, depth: int) -> list[tuple[BaseRoute, RouteTable | None, int | None]]:
        found = self._by_depth.get(depth)
        if found is None:
            found = [e for e in self._entries if e[2] is None or e[2] == depth]
            if depth <= ROUTE_DEPTH_CACHE:
                self._by_depth[depth] = found
        return found

    def match(self, scope: Scope) -> RouteMatch:
        """The route a request reaches (a full match first, else a path-only match, which
        routing answers with 405), through mounts: the route Starlette's routing finds."""
        partial = RouteMatch()
        for route, table, _ in self._candidates(_depth(scope)):
            match, child = route.matches(scope)
            if match == Match.NONE:
                continue
            if table is not None:
                found = table.match({**scope, **child})
                if found.route is not None:
                    updates = {**child, **found.updates}
                    return RouteMatch(found.name, found.params, found.route, updates)
                if found.name is not None:
                    return found
                continue
            name = getattr(route, "name", None)
            if match == Match.FULL:
                return RouteMatch(name, child.get("path_params", {}), route, dict(child))
            if partial.name is None:
                partial = RouteMatch(name, child.get("path_params", {}))
        return partial


def _depth(scope: Scope) -> int:
    """Number of "/" in the path routes at this level match: below the root_path only where
    the path continues with a "/" after it (or is it), as Starlette's routes read it."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    if root and path.startswith(root) and (path == root or path[len(root)] == "/"):
        path = path[len(root) :]
    return path.count("/")


class MatchedRouter(Router):
    """Starlette's Router, except that a request the Guard matched in full goes straight to
    that route with the scope routing would have given it (Router.app, then Mount.handle and
    the mount's own Router.app): the path is matched once per request, not twice (route
    matching was 13% of the event loop's time on a small retrieve). Anything else (a path
    matching no route or only by path, 405, a lifespan) is routed as Starlette does."""

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        found: RouteMatch | None = scope.pop(_MATCH_KEY, None)
        if found is None or found.route is None:
            allowed = allowed_methods(self.routes, scope) if scope["type"] == "http" else set()
            if allowed and scope["method"] not in allowed:
                # Every method the path takes, not only the first route's (Starlette's): POST
                # and GET /studies are two routes. RFC 9110 15.5.6 wants the full list.
                allow = ", ".join(sorted(allowed))
                error = MethodNotAllowedError(
                    f"{scope['method']} is not allowed here; allowed: {allow}",
                    headers={"Allow": allow},
                )
                await error_response(error)(scope, receive, send)
                return
            await super().app(scope, receive, send)
            return
        if "router" not in scope:
            scope["router"] = self
        scope["route"] = found.route
        scope.update(found.updates)
        await found.route.handle(scope, receive, send)


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> set[str]:
    """The methods of every route whose path matches the request's (through mounts); GET
    brings HEAD, as Starlette's routes take it."""
    allowed: set[str] = set()
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            allowed |= allowed_methods(route.routes, {**scope, **child})
        elif isinstance(route, Route) and route.methods:
            allowed |= set(route.methods)
    return allowed


class Guard:
    def __init__(
        self, app: ASGIApp, routes: Sequence[BaseRoute], roles: Mapping[str, str | None]
    ) -> None:
        self.app = app
        self.routes = RouteTable(routes)
        self.roles = roles

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Every method is checked, OPTIONS included: CORS preflights are answered outside
        # (CORSMiddleware) and never get here; any other request must not probe for free.
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.routes.match(scope)
        if found.route is not None:
            scope[_MATCH_KEY] = found  # for MatchedRouter
        name = found.name
        role = self.roles.get(name, "read") if name else "read"
        if role is None:  # open: the health check, the OpenAPI description
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        tally = _Tally(receive, send, head=scope["method"] == "HEAD")
        # A path some route takes by another method (a DELETE of a study) is audited as
        # sent, as a path no route takes: not as that route's transaction (found by audit
        # review: a DELETE refused 403 was recorded as a store_study_instances).
        action = name if found.route is not None else None
        event = _Event(datetime.now(UTC), scope, action, found.params)
        try:
            try:
                principal = await _authenticate(state, scope)
                event.caller = principal.name
                require(principal, role)
            except DicomWebError as exc:
                tally.status = exc.status
                await error_response(exc)(scope, receive, tally.send)
                return
            scope.setdefault("state", {})["principal"] = principal
            await self.app(scope, tally.receive, tally.send)
            tally.failed = bool(scope["state"].get(_CUT_KEY))
        except Exception:
            tally.failed = True  # raised past a started response (_CatchAllMiddleware)
            raise
        finally:  # allowed or refused, completed or not: one audit event
            await _record(state, event, tally)


async def _authenticate(state: Any, scope: Scope) -> Principal:
    settings: Settings = state.settings
    if settings.auth == "none":
        refusal = _foreign_host(settings, _header(scope, b"host"))
        if refusal:
            raise ForbiddenError(refusal)
    authenticator: Authenticator = state.authenticator
    try:
        return await authenticator.authenticate(_header(scope, b"authorization"))
    except DicomWebError:
        raise
    except Exception:  # a bug in a credential check must refuse, not answer 500
        log.exception("authentication failed unexpectedly")
        raise UnauthorizedError(
            "credentials could not be checked", headers={"WWW-Authenticate": _REALM}
        ) from None


def _foreign_host(settings: Settings, host: str | None) -> str | None:
    """Without authentication, only requests addressed to this machine by name are served: a
    web page whose DNS name was re-pointed at 127.0.0.1 (DNS rebinding) must not reach it."""
    if host is None or settings.insecure or "*" in settings.allowed_hosts:
        return None  # --insecure: another layer protects the server, as its operator said
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    allowed = {"localhost", "127.0.0.1", "::1", *settings.allowed_hosts}
    if settings.public_url:
        allowed.add((urlsplit(settings.public_url).hostname or "").lower())
    if name in allowed or name.endswith(".localhost"):
        return None
    return (
        f"Host {host!r} is not this server's name; without authentication only localhost"
        " names are served (set DICOMWEB_ALLOWED_HOSTS or DICOMWEB_PUBLIC_URL, or turn"
        " authentication on)"
    )


# The outcome audited of a response that broke off after its status was sent: the client
# went away (as _CatchAllMiddleware counts a request whose client left, nginx's 499), or the
# archive failed mid-body (a blob that could not be read, a conversion that failed). Found by
# audit review: both were recorded as the 200 their status line said, a complete transfer.
CUT_BY_CLIENT = 499
CUT_BY_SERVER = 500


def cut_by_server(scope: Scope) -> None:
    """Mark a response the archive broke off (its status sent, its body left unfinished) as
    its failure for the audit trail (CUT_BY_SERVER), when the error that cut it is not
    raised on to the server (app._CatchAllMiddleware: a stored file found lost)."""
    scope.setdefault("state", {})[_CUT_KEY] = True


class _Tally:
    """Counts the body bytes a request brings and its response carries (those handed on
    without error; none for a HEAD, whose body never goes on the wire, RFC 9110 9.3.2),
    and the status; whether the response was sent to its end."""

    def __init__(self, receive: Receive, send: Send, head: bool = False) -> None:
        self._receive, self._send = receive, send
        self._head = head
        self.status = 500  # until a response starts
        self.received = self.sent = 0
        self.started = self.finished = False
        self.failed = False  # the app raised (past _CatchAllMiddleware: after the start)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
        await self._send(message)
        if message["type"] == "http.response.body":
            if not self._head:
                self.sent += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)

    @property
    def outcome(self) -> int:
        """The status answered, or how a response that never reached its end broke off."""
        if self.started and not self.finished:
            return CUT_BY_SERVER if self.failed else CUT_BY_CLIENT
        return self.status


class _Event:
    def __init__(self, at: datetime, scope: Scope, name: str | None, params: dict[str, Any]):
        self.at, self.scope, self.params = at, scope, params
        self.action = name or f"{scope['method']} {_as_sent(scope)}"[:_MAX_ACTION_CHARS]
        self.caller = "-"

    def build(self, tally: _Tally) -> AuditEvent:
        scope = self.scope
        path = "/".join(str(self.params[k]) for k in ("study", "series", "instance")
                        if k in self.params)  # fmt: skip
        state = scope.get("state", {})
        extra: list[str] = list(state.get("audit_uids", ()))
        client = scope.get("client")
        received = scope["method"] == "POST"
        return AuditEvent(
            time=self.at,
            caller=self.caller,
            client=client[0] if client else "-",
            action=self.action,
            uids=tuple(([path] if path else []) + extra),
            outcome=tally.outcome,
            nbytes=tally.received if received else tally.sent,
            detail=state.get("audit_detail") or scope.get("query_string", b"").decode("latin-1"),
            # Set by a STOW (its data sets name them); of a retrieve, the audit writer looks
            # them up (auditlog.py).
            patients=tuple(state.get("audit_patients", ())),
        )


def _as_sent(scope: Scope) -> str:
    """The path of a request no route serves, as sent (percent-encoded: `%0D%0A` decoded
    would put line breaks into the audit trail, found by review), control characters of a
    decoded path escaped."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else str(scope["path"])
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


async def _record(state: Any, event: _Event, tally: _Tally) -> None:
    audit: AuditLog | None = getattr(state, "audit", None)
    if audit is not None:
        await audit.record(event.build(tally))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
