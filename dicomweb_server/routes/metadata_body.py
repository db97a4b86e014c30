"""Study and series metadata responses (PS3.18 10.4.1.1.2, field notes 1): a strong entity tag
known before the body is read, a 304 that reads nothing else, a small body built whole (with
its length) and a large one sent a run of instances at a time, compressed as it goes.

A study's metadata was built whole, hashed for its entity tag and compressed whole: 55 MB per
request for 5,000 instances (a 13 MB body), 110 MB for 10,000. The entity tag is now a digest
of what makes the body (metadata.metadata_digest: the series and their versions, the base
URL, the media type, the server), so the body can be sent as it is read: its memory is that of
a batch of METADATA_FETCH_ROWS instances or of one cached series."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.index.rows import SeriesState
from dicomweb_server.ingest import Services
from dicomweb_server.media.headers import accepts_gzip, none_match
from dicomweb_server.media.mediatypes import APPLICATION_DICOM_XML, MULTIPART_RELATED
from dicomweb_server.metadata import (
    METADATA_FETCH_ROWS,
    MetadataChangedError,
    metadata_digest,
    metadata_runs,
    series_states,
)
from dicomweb_server.multipart import Prefixed, close_all, stable_boundary
from dicomweb_server.routes.common import base_url, request_field, services
from dicomweb_server.routes.responses import (
    GZIP_INLINE_MAX_BYTES,
    GZIP_LEVEL,
    StreamedResponse,
    gzip_stream,
    xml_runs,
)

__all__ = [
    "METADATA_ATTEMPTS",
    "METADATA_GZIP_CACHE_MAX_BYTES",
    "METADATA_INLINE_BYTES",
    "metadata_response",
]

# A body of at most this many bytes is built whole before the response starts: it carries a
# Content-Length, and a series that changes while it is read is read again (the response has
# not started). A longer one is streamed. 1 MiB: OHIF's usual series (up to about 400
# instances) keep their Content-Length.
METADATA_INLINE_BYTES = 1024 * 1024
# A gzip-compressed body of at most this many bytes is kept in the metadata cache by its entity
# tag, whether it was built whole or streamed (while streamed, it is kept up to this size, then
# dropped): the next request for it compresses nothing. DICOM JSON compresses about 10 times,
# so this holds the compressed metadata of about 15,000 instances.
METADATA_GZIP_CACHE_MAX_BYTES = 4 * 1024 * 1024
# Times a metadata body is begun before a 503: a series whose rows `reindex` rewrites while
# they are read before the response starts begins it again from the new state.
METADATA_ATTEMPTS = 3


async def metadata_response(
    request: Request, media: str, study: str, series: str | None
) -> Response:
    """Study (`series` None) or series metadata in `media` (media.negotiate.
    negotiate_dicom_model, JSON or multipart XML), gzip-compressed whenever the client accepts
    gzip (the entity tag, and so the 304, is decided before the body's size is known).

    RFC 9110 8.8.3: the identity and gzip bodies have entity tags of their own (the gzip one
    ends `-gzip"`), and If-None-Match takes the weak comparison (13.1.2). Vary: Accept and
    Accept-Encoding pick the representation, on 304 too (15.4.5)."""
    svc, base = services(request), base_url(request)
    gzipped = accepts_gzip(request_field(request, "accept-encoding"))
    for _ in range(METADATA_ATTEMPTS):
        states = await series_states(svc, study, series)
        digest = metadata_digest(states, base, media)
        etag = f'"{digest}-gzip"' if gzipped else f'"{digest}"'
        headers = {"ETag": etag, "Vary": "Accept, Accept-Encoding"}
        if none_match(request_field(request, "if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
            kept = svc.metadata.get(("gzip", etag))
            if kept is not None:
                media_type, _, body = kept.partition(b"\n")
                return Response(body, media_type=media_type.decode("ascii"), headers=headers)
        try:
            return await _made(svc, states, digest, media, base, headers)
        except MetadataChangedError:
            continue  # nothing is sent yet: begun again from the series as they are now
    raise MetadataChangedError


async def _made(
    svc: Services,
    states: list[SeriesState],
    digest: str,
    media: str,
    base: str,
    headers: dict[str, str],
) -> Response:
    """The body of `states` as a response: whole up to METADATA_INLINE_BYTES, else its first
    METADATA_INLINE_BYTES made before the response starts and the rest streamed. A
    MetadataChangedError before then is raised here; after it, it ends the response
    unfinished (what a client may see: conformance/STATEMENT.md)."""
    media_type = media
    runs = metadata_runs(svc, states, base)
    if media == MULTIPART_RELATED:
        # The boundary, like the body, is the same for the same digest; a stored value cannot
        # hold it: it is derived from a value only the server knows (a blob key).
        boundary = stable_boundary(await svc.index.series_secret(states[0].pk), digest)
        chunks = xml_runs(_docs(runs), boundary)
        media_type = f'multipart/related; type="{APPLICATION_DICOM_XML}"; boundary={boundary}'
    else:
        chunks = _json_array(runs)
    head: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            head.append(chunk)
            size += len(chunk)
            if size > METADATA_INLINE_BYTES:
                break
        else:
            return await _whole(svc, b"".join(head), media_type, headers)
    except BaseException:
        await close_all(chunks)
        raise
    body: AsyncIterator[bytes] = Prefixed(head, chunks)
    if "Content-Encoding" in headers:
        etag = headers["ETag"]
        keep = (METADATA_GZIP_CACHE_MAX_BYTES, lambda b: _keep(svc, etag, media_type, b))
        # closed unstarted (a HEAD's), the metadata read is closed too
        body = Prefixed([], gzip_stream(body, _packer(), keep), body)
    return StreamedResponse(body, media_type=media_type, headers=headers)


async def _whole(svc: Services, body: bytes, media_type: str, headers: dict[str, str]) -> Response:
    if "Content-Encoding" in headers:
        packer = _packer()
        if len(body) > GZIP_INLINE_MAX_BYTES:
            body = await anyio.to_thread.run_sync(packer.compress, body) + packer.flush()
        else:
            body = packer.compress(body) + packer.flush()
        _keep(svc, headers["ETag"], media_type, [body])
    return Response(body, media_type=media_type, headers=headers)


def _packer() -> zlib._Compress:
    """One gzip member (RFC 1952) at GZIP_LEVEL: its header has no time or name in it, so the
    same body is always the same bytes (gzip.compress writes the time)."""
    return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)


def _keep(svc: Services, etag: str, media_type: str, packed: list[bytes]) -> None:
    if sum(len(p) for p in packed) <= METADATA_GZIP_CACHE_MAX_BYTES:
        svc.metadata.put(("gzip", etag), media_type.encode("ascii") + b"\n" + b"".join(packed))


async def _json_array(runs: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The runs of DICOM JSON objects as one JSON array."""
    opening = b"["
    try:
        async for run in runs:
            yield opening + run
            opening = b","
    finally:
        await close_all(runs)
    yield b"[]" if opening == b"[" else b"]"


async def _docs(runs: AsyncIterator[bytes]) -> AsyncIterator[list[object]]:
    """The data sets of the runs, METADATA_FETCH_ROWS at a time at most (a cached series is
    one run, of up to METADATA_PART_CACHE_MAX_BYTES, but not parsed whole)."""
    decoder = json.JSONDecoder()
    try:
        async for run in runs:
            text = run.decode("utf-8")
            at, docs = 0, []
            while at < len(text):
                doc, at = decoder.raw_decode(text, at)
                docs.append(doc)
                at += 1  # the comma between two objects
                if len(docs) == METADATA_FETCH_ROWS:
                    yield docs
                    docs = []
            if docs:
                yield docs
    finally:
        await close_all(runs)
