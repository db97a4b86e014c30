"""The Guard matches each request's route once and MatchedRouter routes by that match: the
endpoint must get exactly the scope Starlette's own routing would give it, on every route."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Message, Scope

from dicomweb_server.guard import ROUTE_DEPTH_CACHE, MatchedRouter, RouteTable
from dicomweb_server.routes import ROUTES

# What routing puts in the scope for an endpoint.
_ROUTING_KEYS = ("endpoint", "path_params", "root_path", "app_root_path", "route")


def _capturing(routes: list[BaseRoute], seen: list[Scope]) -> list[BaseRoute]:
    """`routes` with the same paths, methods and names, each endpoint recording its scope."""

    async def capture(request: Request) -> Response:
        seen.append(dict(request.scope))
        return PlainTextResponse("ok")

    out: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, Mount):
            out.append(Mount(route.path, routes=_capturing(list(route.routes), seen)))
        else:
            assert isinstance(route, Route)
            out.append(Route(route.path, capture, methods=route.methods, name=route.name))
    return out


def _requests() -> list[tuple[str, str]]:
    """Every route of ROUTES as a request (its path with sample parameters, each method),
    plus paths that match only by path (405) or not at all (404)."""
    out: list[tuple[str, str]] = []

    def walk(routes: Any, prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
                continue
            path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: f"1.2.{len(m.group(1))}", route.path)
            for method in sorted(route.methods or {"GET"}):
                out.append((method, prefix + path))

    walk(ROUTES, "")
    out += [("DELETE", "/dicom-web/studies"), ("PUT", "/health"), ("GET", "/nowhere"),
            ("GET", "/dicom-web/nowhere"), ("GET", "/dicom-web/studies/1.2/frames/1")]  # fmt: skip
    return out


async def _route(
    router: Router, routes: list[BaseRoute], seen: list[Scope], method: str, path: str, hint: bool
) -> tuple[int, Scope | None]:
    """Status of `method path` through `router` over `routes`, and the scope its endpoint got."""
    router.routes = routes
    seen.clear()
    scope: Scope = {"type": "http", "method": method, "path": path, "root_path": "",
                    "query_string": b"", "headers": []}  # fmt: skip
    if hint:  # as the Guard does
        found = RouteTable(routes).match(scope)
        if found.route is not None:
            scope["dicomweb.route_match"] = found
    status: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await router(scope, receive, send)
    return status[0], (seen[0] if seen else None)


@pytest.mark.parametrize(("method", "path"), _requests())
async def test_matched_routing_gives_the_scope_starlette_gives(method: str, path: str) -> None:
    seen: list[Scope] = []
    routes = _capturing(list(ROUTES), seen)
    plain_status, plain = await _route(Router(), routes, seen, method, path, hint=False)
    matched_status, matched = await _route(MatchedRouter(), routes, seen, method, path, hint=True)
    assert matched_status == plain_status
    if plain is None:
        assert matched is None and plain_status in (404, 405)
        return
    assert matched is not None
    for key in _ROUTING_KEYS:
        assert matched.get(key) is plain.get(key) or matched.get(key) == plain.get(key), key
    assert "dicomweb.route_match" not in matched


async def test_a_matched_request_is_matched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Guard's table tries only the routes of the path's depth, and with its match the
    router matches no route again."""
    calls = {"n": 0}
    original = Route.matches

    def counted(self: Route, scope: Scope) -> Any:
        calls["n"] += 1
        return original(self, scope)

    monkeypatch.setattr(Route, "matches", counted)
    seen: list[Scope] = []
    routes = _capturing(list(ROUTES), seen)
    path = "/dicom-web/studies/1.2/series/1.3/instances/1.4"
    assert (await _route(Router(), routes, seen, "GET", path, hint=False))[1]
    starlette, calls["n"] = calls["n"], 0
    scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
    assert RouteTable(routes).match(scope).name == "retrieve_instance"
    table, calls["n"] = calls["n"], 0
    assert (await _route(MatchedRouter(), routes, seen, "GET", path, hint=True))[1]
    assert calls["n"] == table  # the table's pass only, none in the router
    assert table <= 3 < starlette


def test_route_table_keeps_candidates_of_bounded_depths() -> None:
    table = RouteTable(ROUTES)
    for depth in range(ROUTE_DEPTH_CACHE + 20):
        found = table.match({"type": "http", "method": "GET", "path": "/a" * depth})
        assert found.route is None
    assert len(table._by_depth) == ROUTE_DEPTH_CACHE + 1  # depths 0 to ROUTE_DEPTH_CACHE
    deep = "/dicom-web/studies/1.2/series/1.3/instances/1.4/bulk" + "/x" * 40
    found = table.match({"type": "http", "method": "GET", "path": deep, "root_path": ""})
    assert found.name == "retrieve_bulkdata" and found.params["path"] == "x" + "/x" * 39


@pytest.mark.parametrize(
    ("root_path", "path", "name"),
    [("/h", "/health", "health"), ("/openapi", "/openapi.json", "openapi"),
     ("/dicom", "/dicom-web", "service_root"), ("/pacs", "/pacs/health", "health")],
)  # fmt: skip
def test_a_root_path_is_stripped_only_before_a_slash(root_path: str, path: str, name: str) -> None:
    """As Starlette reads paths: a root_path that is only a prefix of the first segment
    stays, so the route (and its role) is the one routing finds."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path}
    assert RouteTable(ROUTES).match(scope).name == name


def test_a_mount_with_its_own_middleware_is_refused() -> None:
    """MatchedRouter would go past a mount's own middleware: such a table is refused."""
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    mount = Mount(
        "/m", routes=[Route("/x", PlainTextResponse("x"))], middleware=[Middleware(GZipMiddleware)]
    )
    with pytest.raises(ValueError, match="own middleware"):
        RouteTable([mount])
