"""QIDO-RS handlers (PS3.18 10.6): parse, search, render."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.attributes import Level
from dicomweb_server.media.negotiate import negotiate_dicom_model
from dicomweb_server.multipart import Prefixed
from dicomweb_server.query import parse
from dicomweb_server.routes.common import accept_of, base_url, services, uid_param, warning_header
from dicomweb_server.routes.responses import gzipped, model_response, streamed_model_response
from dicomweb_server.search import search_matches

__all__ = ["search_for_instances", "search_for_series", "search_for_studies"]

# PS3.18 8.3.4.4.1 (the count is not computed: the page is fetched with one row more).
_MORE = "There are additional results that can be requested"


async def _search(request: Request, level: Level) -> Response:
    media = negotiate_dicom_model(accept_of(request), multipart=True, single=False)
    path_uids = {
        lvl: uid_param(request, name)
        for lvl, name in ((Level.STUDY, "study"), (Level.SERIES, "series"))
        if name in request.path_params
    }
    q = parse(level, request.query_params.multi_items(), path_uids)
    matches = await search_matches(services(request).index, q, base_url(request))
    # The paging warning first: the Warning header is capped (WARNING_HEADER_MAX_BYTES), and
    # a client must learn that results were cut even when it asked for 1000 unknown fields.
    warnings = [*([_MORE] if matches.more else []), *q.warnings]
    if matches.rest is not None:  # a page longer than a batch (search.QIDO_FETCH_ROWS)
        batches = Prefixed([matches.first], matches.rest)
        return await streamed_model_response(request, batches, media, warning_header(warnings))
    results = list(matches.first)
    if not results:  # PS3.18 8.3.4.4.1: no results is 204 (No Content), an empty payload
        return Response(status_code=204, headers=warning_header(warnings))
    response = await model_response(results, media, headers=warning_header(warnings))
    return await gzipped(request, response)


async def search_for_studies(request: Request) -> Response:
    return await _search(request, Level.STUDY)


async def search_for_series(request: Request) -> Response:
    return await _search(request, Level.SERIES)


async def search_for_instances(request: Request) -> Response:
    return await _search(request, Level.INSTANCE)
