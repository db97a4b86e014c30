"""QIDO-RS handlers (PS3.18 10.6): parse, search, render."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.attributes import Level
from dicomweb_server.media import negotiate_json
from dicomweb_server.query import parse
from dicomweb_server.routes.common import (
    base_url,
    json_response,
    services,
    uid_param,
    warning_header,
)
from dicomweb_server.search import search

__all__ = ["search_for_instances", "search_for_series", "search_for_studies"]

_MORE = "There are more results than returned; ask again with a larger offset"


async def _search(request: Request, level: Level) -> Response:
    media = negotiate_json(request.headers.get("accept"))
    path_uids = {
        lvl: uid_param(request, name)
        for lvl, name in ((Level.STUDY, "study"), (Level.SERIES, "series"))
        if name in request.path_params
    }
    q = parse(level, request.query_params.multi_items(), path_uids)
    results, more = await search(services(request).index, q, base_url(request))
    warnings = [*q.warnings, *([_MORE] if more else [])]
    return json_response(results, media, headers=warning_header(warnings))


async def search_for_studies(request: Request) -> Response:
    return await _search(request, Level.STUDY)


async def search_for_series(request: Request) -> Response:
    return await _search(request, Level.SERIES)


async def search_for_instances(request: Request) -> Response:
    return await _search(request, Level.INSTANCE)
