"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3 and 10.4.1.1.4)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.errors import BadRequestError, NotAcceptableError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import MediaRange, parse_accept
from dicomweb_server.multipart import Prefixed
from dicomweb_server.rendered import (
    ignored_render_params,
    negotiate_rendered,
    parse_render_params,
    render_query,
)
from dicomweb_server.rendering import (
    REPORT_CLASS_PREFIX,
    rendered_image,
    rendered_report,
    representative,
)
from dicomweb_server.report import REPORT_MEDIA_TYPES
from dicomweb_server.retrieve.frames import parse_frame_list
from dicomweb_server.retrieve.instances import locate
from dicomweb_server.retrieve.pixeldata import stored_bulk_value
from dicomweb_server.routes.common import accept_of, services, uid_param, warning_header
from dicomweb_server.routes.responses import StreamedResponse

__all__ = ["retrieve_rendered", "retrieve_thumbnail"]


async def _image(request: Request, thumbnail: bool) -> Response:
    query = render_query(request.query_params.multi_items())
    response = await _rendered(request, query, thumbnail)
    response.headers.update(warning_header(ignored_render_params(query)))
    return response


async def _rendered(request: Request, query: dict[str, str], thumbnail: bool) -> Response:
    accept = accept_of(request)
    params = parse_render_params(query, thumbnail)
    p = request.path_params
    svc = services(request)
    found = await locate(
        svc,
        uid_param(request, "study"),
        uid_param(request, "series") if "series" in p else None,
        uid_param(request, "instance") if "instance" in p else None,
    )
    frame = 1
    if "frames" in p:
        frames = parse_frame_list(p["frames"])
        if len(frames) != 1:
            raise BadRequestError("a rendered frame resource names exactly one frame")
        frame = frames[0]
    inst = found[0] if "instance" in p else representative(found)
    if not thumbnail and "instance" in p and "frames" not in p and inst.number_of_frames == 0:
        document = await _document(svc, inst, accept)
        if document is not None:
            return document
    # An `iccprofile` value other than "no" passes over image/gif (PS3.18 8.3.5.1.5).
    media = negotiate_rendered(accept, query.get("iccprofile"))
    animate = "instance" in p and "frames" not in p
    data = await rendered_image(svc, inst, frame, params, media, thumbnail, animate)
    return Response(data, media_type=media, headers=_PRIVATE if "instance" in p else _CHANGING)


# Encapsulated documents rendered as the document they hold (PS3.18 Table 8.7.4-1).
_DOCUMENT_TYPES = {
    "1.2.840.10008.5.1.4.1.1.104.1": "application/pdf",  # Encapsulated PDF Storage
    "1.2.840.10008.5.1.4.1.1.104.2": "text/xml",  # Encapsulated CDA Storage
}
_ENCAPSULATED_DOCUMENT = "00420011"
# Every rendered response's type is chosen by Accept (or by the `accept` query parameter,
# part of the URL): Vary says so, so that a cache keeps one per type (RFC 9110 12.5.5). The
# CORS middleware adds Origin to it. An instance's or frame's image never changes (an instance
# is stored once): kept an hour. A study's or series' image is its representative instance's,
# chosen from what is stored when asked, and changes as instances arrive; with no validator
# to check it by, a cache must ask again before each use (no-cache, RFC 9111 5.2.2.4).
_PRIVATE = {"Cache-Control": "private, max-age=3600", "Vary": "Accept"}
_CHANGING = {"Cache-Control": "private, no-cache", "Vary": "Accept"}


async def _document(svc: Services, inst: StoredInstance, accept: str | None) -> Response | None:
    """A rendered instance that is a document, not an image: a Structured Report as text
    (text/html by default, or text/plain), an encapsulated PDF or CDA as the document it holds
    (its Encapsulated Document, cut to Encapsulated Document Length when given: the value is
    padded to even length). None when the client accepts none of these (the image rules then
    answer, with their 406)."""
    ranges = parse_accept(accept)
    if inst.sop_class_uid.startswith(REPORT_CLASS_PREFIX):
        media = next((m for r in ranges for m in REPORT_MEDIA_TYPES if r.matches(m)), None)
        if media is None:
            raise _not_acceptable(ranges, REPORT_MEDIA_TYPES)
        data = await rendered_report(svc, inst, media)
        return Response(data, media_type=f"{media}; charset=utf-8", headers=_DOCUMENT_HEADERS)
    media = _DOCUMENT_TYPES.get(inst.sop_class_uid)
    if media is None:
        return None
    if not any(r.matches(media) for r in ranges):
        raise _not_acceptable(ranges, (media,))
    uids = (inst.study_uid, inst.series_uid, inst.sop_instance_uid)
    entry = await svc.index.bulk_range(*uids, _ENCAPSULATED_DOCUMENT)
    value = await stored_bulk_value(svc, inst, _ENCAPSULATED_DOCUMENT, entry)
    ((_, text),) = await svc.index.metadata_texts(*uids)
    stated = json.loads(text).get("00420015", {}).get("Value", [None])[0]
    length = stated if isinstance(stated, int) and 0 <= stated <= value.length else value.length
    # The document's own Content-Type, no charset added: a CDA declares its encoding itself.
    headers = {**_DOCUMENT_HEADERS, "Content-Length": str(length), "Content-Type": media}
    # Its first chunk read before the response starts: a stored file missing or cut short
    # is a 500 that says so (blobstore.lost.LostBlobError), not a 200 whose body breaks off.
    chunks = value.read(0, length)
    first = await anext(chunks, b"")
    return StreamedResponse(Prefixed([first] if first else [], chunks), headers=headers)


# A document from the archive is shown, never run: one that holds script (a CDA in XHTML, a
# crafted report) must not act in the archive's origin when a browser opens its URL.
_DOCUMENT_HEADERS = {
    **_PRIVATE,
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


def _not_acceptable(ranges: tuple[MediaRange, ...], types: tuple[str, ...]) -> NotAcceptableError:
    """406 for a document asked for in a type it is not rendered in; an image type gets the
    image rules' answer (this instance has no pixel data to render)."""
    if any(r.type == "image" for r in ranges):
        return NotAcceptableError("the instance has no pixel data to render as an image")
    return NotAcceptableError(f"the document is rendered as {', '.join(types)}")


async def retrieve_rendered(request: Request) -> Response:
    return await _image(request, thumbnail=False)


async def retrieve_thumbnail(request: Request) -> Response:
    return await _image(request, thumbnail=True)
