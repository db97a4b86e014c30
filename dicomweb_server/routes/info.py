"""The landing page (`/`) and the service root (`GET /dicom-web`): what is here, how much."""

from __future__ import annotations

import html

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from dicomweb_server.config import DICOMWEB_ROOT
from dicomweb_server.config import VERSION as __version__
from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.media.mediatypes import parse_accept
from dicomweb_server.openapi import WADL_MEDIA_TYPE, openapi_document, wadl_document
from dicomweb_server.routes.common import accept_of, base_url, services
from dicomweb_server.routes.roles import ROUTE_ROLES

__all__ = ["capabilities", "health", "landing_page", "openapi_json", "service_root"]


def _transactions(request: Request) -> list[dict[str, str]]:
    """Every DICOMweb route of the URL table: transaction name, method, path template."""
    out = []
    for mount in request.app.routes:
        if isinstance(mount, Mount) and mount.path == DICOMWEB_ROOT:
            for route in mount.routes:
                if isinstance(route, Route):
                    path = DICOMWEB_ROOT + route.path
                    for method in sorted((route.methods or set()) - {"HEAD"}):
                        out.append({"transaction": route.name, "method": method, "path": path})
    return out


def route_rows(routes: list[BaseRoute]) -> list[tuple[str, str, str, str | None]]:
    """(name, method, path template, role) of every route, through mounts."""
    rows = []
    for top in routes:
        inner, prefix = (top.routes, top.path) if isinstance(top, Mount) else ([top], "")
        for route in inner:
            if isinstance(route, Route):
                for method in sorted((route.methods or set()) - {"HEAD"}):
                    rows.append((route.name, method, prefix + route.path, ROUTE_ROLES[route.name]))
    return rows


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json: an OpenAPI 3.0 description built from the URL table (open)."""
    return JSONResponse(openapi_document(route_rows(request.app.routes)))


async def capabilities(request: Request) -> Response:
    """OPTIONS on the DICOMweb root: the Retrieve Capabilities transaction (PS3.18 8.9), a
    WADL Capabilities Description of every resource and method (Annex H), open as the OpenAPI
    description is. `application/vnd.sun.wadl+xml`, also for `application/xml`, `text/xml`
    and wildcards; anything else is a 406."""
    for rng in parse_accept(accept_of(request)):
        for media in (WADL_MEDIA_TYPE, "application/xml", "text/xml"):
            if rng.matches(media):
                rows = route_rows(request.app.routes)
                body = wadl_document(rows, DICOMWEB_ROOT, base_url(request))
                allow = "GET, HEAD, OPTIONS"
                return Response(body, media_type=media, headers={"Allow": allow})
    raise NotAcceptableError(f"acceptable: {WADL_MEDIA_TYPE}, application/xml")


async def health(request: Request) -> Response:
    """GET /health: 200 when the database answers, else 503 (open: no credentials needed)."""
    await services(request).index.ping()
    return JSONResponse({"status": "ok", "version": __version__})


async def service_root(request: Request) -> Response:
    """GET /dicom-web: the supported transactions (a discovery aid; PS3.18 defines none)."""
    return JSONResponse(
        {
            "server": "dicomweb-server",
            "version": __version__,
            "root": base_url(request),
            "transactions": _transactions(request),
        }
    )


async def landing_page(request: Request) -> Response:
    counts = await services(request).index.counts()
    root = html.escape(base_url(request))
    viewer = html.escape(request.app.state.settings.viewer_url)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicomweb-server</title>
<style>body{{font-family:system-ui,sans-serif;margin:3em;max-width:40em}}
td{{padding:.2em 1em}}code{{background:#eee;padding:.1em .3em}}</style></head>
<body><h1>dicomweb-server {html.escape(__version__)}</h1>
<p>DICOMweb root: <a href="{root}"><code>{root}</code></a>
(<a href="{root}">supported transactions</a>)</p>
<table>{rows}</table>
<p><a href="{root}/studies?limit=10">Latest studies (QIDO-RS)</a> &middot;
<a href="{viewer}">Viewer</a> (started with <code>make viewer</code>)</p>
</body></html>"""
    return HTMLResponse(body)
