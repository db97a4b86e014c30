"""Response bodies shared by the handlers: DICOM JSON and XML data sets (whole, or
streamed a batch at a time), gzip (whole or as a stream), the cached metadata body with
its ETag, multipart/related and single part responses, byte ranges of a frame or bulk data
value, and StreamedResponse, which answers HEAD unread and closes its body however it ends.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import weakref
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from dicomweb_server.blobstore import budget
from dicomweb_server.dicom_json import dumps
from dicomweb_server.dicom_xml import dataset_xml
from dicomweb_server.media.headers import accepts_gzip, byte_range, none_match
from dicomweb_server.media.mediatypes import APPLICATION_DICOM_XML, MULTIPART_RELATED
from dicomweb_server.multipart import (
    Prefixed,
    close_all,
    close_delimiter,
    encode_body,
    encode_parts,
    encode_run,
    encoded_length,
    new_boundary,
    one_part_frame,
    stable_boundary,
)
from dicomweb_server.retrieve.frames import Sized
from dicomweb_server.retrieve.instances import Part, PartLength
from dicomweb_server.routes.common import request_field, services

__all__ = [
    "StreamedResponse",
    "cached_json_response",
    "gzip_stream",
    "gzipped",
    "json_response",
    "model_response",
    "multipart_response",
    "ranged_response",
    "single_part_response",
    "streamed_model_response",
    "xml_runs",
]

# Metadata bodies from this size on are gzip-compressed for clients that accept it, bytes.
GZIP_MIN_BYTES = 1024
# zlib level: 6 compresses DICOM JSON about 10x at a small CPU cost.
GZIP_LEVEL = 6
# zlib level of search results, compressed anew for each request (not cached): 1 made 546 KB
# of 1000 study matches 41 KB in 1.4 ms, where 6 made 31 KB in 3.6 ms.
GZIP_SEARCH_LEVEL = 1
# Bodies up to this size are compressed on the event loop (256 KiB: about 1 ms at level 1),
# larger ones in a worker thread, whose hand-off costs about 0.3 ms.
GZIP_INLINE_MAX_BYTES = 256 * 1024
# A multipart response whose length is known up front and at most this many bytes is built
# whole, then sent as one plain response: streaming costs a task group and a disconnect
# listener per response, a quarter of a small retrieve's instructions. Memory per response
# stays within the small-instance read (retrieve.instances.SMALL_RUN_BYTES) and its joined copy,
# and is held within the process's download budget until it is sent (budget.DOWNLOADS: a
# client that stops reading keeps it until SEND_STALL_TIMEOUT_S); without room there the
# response is streamed instead, in chunks the budget sizes.
INLINE_RESPONSE_BYTES = 1024 * 1024


# DICOM XML of at most this many data sets is made on the event loop (about 2 ms); more, in
# a worker thread.
XML_INLINE_DOCS = 50


def json_response(
    doc: Any, media_type: str, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = doc if isinstance(doc, bytes) else dumps(doc)
    return Response(body, status_code=status, media_type=media_type, headers=headers)


async def model_response(
    docs: Any, media: str, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """DICOM JSON data sets (one object, or a list) in the representation negotiated by
    media.negotiate.negotiate_dicom_model: JSON as they are, or DICOM XML (PS3.19 A.1), made in a
    worker thread when there are more than XML_INLINE_DOCS data sets (1000 QIDO matches
    take about 40 ms)."""
    if media not in (MULTIPART_RELATED, APPLICATION_DICOM_XML):
        return json_response(docs, media, status, headers)
    listed = docs if isinstance(docs, list) else [docs]
    if len(listed) > XML_INLINE_DOCS:
        body, media_type = await anyio.to_thread.run_sync(_xml_body, listed, media)
    else:
        body, media_type = _xml_body(listed, media)
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _xml_body(docs: list[Any], media: str, boundary: str | None = None) -> tuple[bytes, str]:
    """(body, Content-Type) of data sets in DICOM XML: one document (APPLICATION_DICOM_XML),
    or a multipart/related body of one `application/dicom+xml` part per data set."""
    if media == APPLICATION_DICOM_XML:
        return dataset_xml(docs[0] if docs else {}), APPLICATION_DICOM_XML
    parts = [dataset_xml(doc) for doc in docs]
    boundary = boundary or new_boundary()
    while any(boundary.encode("ascii") in part for part in parts):  # only if sent on purpose
        boundary = new_boundary()
    body = encode_body((({"Content-Type": APPLICATION_DICOM_XML}, p) for p in parts), boundary)
    return body, f'multipart/related; type="{APPLICATION_DICOM_XML}"; boundary={boundary}'


async def gzipped(request: Request, response: Response) -> Response:
    """`response` gzip-compressed (GZIP_SEARCH_LEVEL) when its body is GZIP_MIN_BYTES or more
    and the client accepts gzip (RFC 9110 12.5.3); search results, which a phone on a slow
    link pays for (1000 matches: 546 KB, 41 KB compressed). Vary names what chose the
    representation: Accept (JSON or XML) and Accept-Encoding."""
    response.headers["Vary"] = "Accept, Accept-Encoding"
    body = bytes(response.body)
    if len(body) < GZIP_MIN_BYTES or not accepts_gzip(request_field(request, "accept-encoding")):
        return response
    pack = functools.partial(gzip.compress, body, GZIP_SEARCH_LEVEL)
    if len(body) > GZIP_INLINE_MAX_BYTES:
        packed = await anyio.to_thread.run_sync(pack)
    else:
        packed = pack()
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    headers["Content-Encoding"] = "gzip"
    return Response(packed, status_code=response.status_code, headers=headers)


async def streamed_model_response(
    request: Request,
    batches: AsyncIterator[Iterable[Any]],
    media: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """DICOM JSON data sets coming in batches (a long QIDO-RS page, search.search_matches)
    as model_response and gzipped make them, the same body, sent a batch at a time: JSON
    array framing written here, or one multipart/related `application/dicom+xml` part per
    data set. Memory is that of a batch, not of the page. The first batch is encoded before
    the response starts. Compressed, when the client accepts gzip, as a stream (the body
    is over GZIP_MIN_BYTES: it is more than one batch)."""
    if media == MULTIPART_RELATED:
        boundary = new_boundary()
        chunks = xml_runs(batches, boundary)
        media = f'multipart/related; type="{APPLICATION_DICOM_XML}"; boundary={boundary}'
    else:
        assert media != APPLICATION_DICOM_XML  # one data set: not a batch
        chunks = _json_array(batches)
    headers = {**(headers or {}), "Vary": "Accept, Accept-Encoding"}
    chunks = await _started(chunks)
    if accepts_gzip(request_field(request, "accept-encoding")):
        chunks = Prefixed([], gzip_stream(chunks), chunks)  # a HEAD's closes the batches
        headers["Content-Encoding"] = "gzip"
    return StreamedResponse(chunks, media_type=media, headers=headers)


async def _json_array(batches: AsyncIterator[Iterable[Any]]) -> AsyncIterator[bytes]:
    """The body json_response gives for the data sets of `batches`, a batch at a time."""
    opening = b"["
    try:
        async for batch in batches:
            run = b",".join(dumps(doc) for doc in batch)
            if run:
                yield opening + run
                opening = b","
    finally:
        await close_all(batches)
    yield b"[]" if opening == b"[" else b"]"


async def xml_runs(batches: AsyncIterator[Iterable[Any]], boundary: str) -> AsyncIterator[bytes]:
    """The multipart body _xml_body gives for the data sets of `batches`, a batch at a time
    (made in a worker thread past XML_INLINE_DOCS data sets)."""
    try:
        async for batch in batches:
            docs = list(batch)
            if len(docs) > XML_INLINE_DOCS:
                yield await anyio.to_thread.run_sync(_xml_run, docs, boundary)
            elif docs:
                yield _xml_run(docs, boundary)
    finally:
        await close_all(batches)
    yield close_delimiter(boundary)


def _xml_run(docs: list[Any], boundary: str) -> bytes:
    parts = [dataset_xml(doc) for doc in docs]
    if any(boundary.encode("ascii") in part for part in parts):
        # 128 random bits (new_boundary), drawn after the data was stored: cannot happen
        # by chance, nor on purpose. A body under way cannot take another boundary.
        raise RuntimeError("a multipart boundary found in a part")
    return encode_run((({"Content-Type": APPLICATION_DICOM_XML}, p) for p in parts), boundary)


async def gzip_stream(
    chunks: AsyncIterator[bytes],
    packer: zlib._Compress | None = None,
    keep: tuple[int, Callable[[list[bytes]], None]] | None = None,
) -> AsyncIterator[bytes]:
    """`chunks` as one gzip member (RFC 1952) made by `packer` (default: GZIP_SEARCH_LEVEL);
    chunks past GZIP_INLINE_MAX_BYTES compressed in a worker thread. `keep` (most bytes,
    callback): the compressed body given to the callback once whole, when it is at most that
    many bytes (held meanwhile up to them, then dropped). Closed unstarted, it closes not
    `chunks`: close both (multipart.Prefixed's `owned`)."""
    if packer is None:
        packer = zlib.compressobj(GZIP_SEARCH_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    kept: list[bytes] | None = [] if keep is not None else None
    size = 0
    try:
        async for chunk in chunks:
            if len(chunk) > GZIP_INLINE_MAX_BYTES:
                packed = await anyio.to_thread.run_sync(packer.compress, chunk)
            else:
                packed = packer.compress(chunk)
            size += len(packed)
            if kept is not None and keep is not None and size > keep[0]:
                kept = None
            elif kept is not None:
                kept.append(packed)
            if packed:
                yield packed
    finally:
        await close_all(chunks)
    tail = packer.flush()
    if kept is not None and keep is not None:
        keep[1]([*kept, tail])
    yield tail


async def cached_json_response(request: Request, body: bytes, media_type: str) -> Response:
    """Metadata responses (field notes 1): a strong ETag over the body, 304 when the client
    already has it, gzip when the client accepts it (RFC 9110 8.8.3, 13.1.2, 12.5.3).

    `body` is a JSON array; DICOM XML (media_type MULTIPART_RELATED or APPLICATION_DICOM_XML)
    is made from it, off the event loop, and kept by the JSON's hash, with a boundary drawn
    from that hash: the same metadata is the same XML body, so its ETag holds too.

    If-None-Match uses the weak comparison (RFC 9110 13.1.2), so the ETag a compressing proxy
    weakened (`W/"..."`) still gives 304. The gzip body has an ETag of its own (the identity
    one with `-gzip`): a strong validator names one sequence of bytes, content coding
    included (RFC 9110 8.8.3.3), so a cache never takes one body for the other. Vary tells
    caches that Accept and Accept-Encoding pick between them, on 304 too (RFC 9110 15.4.5)."""
    if media_type in (MULTIPART_RELATED, APPLICATION_DICOM_XML):
        body, media_type = await _cached_xml(request, body, media_type)
    digest = hashlib.sha256(body).hexdigest()[:32]
    accepted = accepts_gzip(request_field(request, "accept-encoding"))
    gzipped = len(body) >= GZIP_MIN_BYTES and accepted
    etag = f'"{digest}-gzip"' if gzipped else f'"{digest}"'
    # The same URL answers JSON or XML (Accept) and identity or gzip (Accept-Encoding).
    headers = {"ETag": etag, "Vary": "Accept, Accept-Encoding"}
    if none_match(request_field(request, "if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if gzipped:
        # The same body compresses to the same bytes: kept by its ETag.
        cache = services(request).metadata
        packed = cache.get(("gzip", etag))
        if packed is None:
            # Off the event loop: a large study's metadata takes tens of milliseconds.
            packed = await anyio.to_thread.run_sync(
                functools.partial(gzip.compress, body, GZIP_LEVEL, mtime=0)
            )
            cache.put(("gzip", etag), packed)
        body = packed
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=media_type, headers=headers)


async def _cached_xml(request: Request, body: bytes, media: str) -> tuple[bytes, str]:
    digest = hashlib.sha256(body).hexdigest()[:32]
    cache = services(request).metadata
    key = ("xml", media, digest)
    packed = cache.get(key)
    if packed is not None:
        kept_type, _, kept = packed.partition(b"\n")
        return kept, kept_type.decode("ascii")
    xml, media_type = await anyio.to_thread.run_sync(_xml_body, json.loads(body), media, digest)
    cache.put(key, media_type.encode("ascii") + b"\n" + xml)
    return xml, media_type


async def multipart_response(
    parts: AsyncIterator[Part], part_type: str, lengths: list[PartLength] | None = None
) -> Response:
    """A multipart/related response. With the parts' `lengths` known up front it carries a
    Content-Length rather than chunked framing (clients see progress, and hypercorn sends
    large bodies about 30% faster without chunk framing), and up to INLINE_RESPONSE_BYTES it
    is built whole before it starts (so a blob found short is an error, not a cut body).
    Otherwise it streams, from its first piece on: that piece is made before the response
    starts, so a first blob that is missing or short (blobstore.reading.stream_path checks its
    size when it opens it), or a first conversion that fails, is an error status too."""
    boundary = new_boundary()
    media_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    headers = None
    if lengths is not None:
        length = encoded_length(lengths, boundary)
        downloads = budget.DOWNLOADS
        if length <= INLINE_RESPONSE_BYTES and downloads.hold(length):
            body = await _joined(encode_parts(parts, boundary), downloads, length)
            return HeldResponse(body, downloads, length, media_type=media_type)
        headers = {"Content-Length": str(length)}
    body_iterator = await _started(encode_parts(parts, boundary))
    return StreamedResponse(body_iterator, media_type=media_type, headers=headers)


async def single_part_response(
    parts: AsyncIterator[Part], lengths: list[PartLength] | None
) -> Response:
    """The one part of `parts` as a single part response (PS3.18 10.4.4: "a single part Media
    Type is permitted for resources which are a single response item"): its Content-Type the
    response's, its body the response's, with a Content-Length when known."""
    part = await anext(parts)
    headers, body = part
    sized = {"Content-Length": str(lengths[0][1])} if lengths else {}
    return StreamedResponse(
        await _started(_then_close(body, parts)),
        media_type=headers["Content-Type"],
        headers={**{k: v for k, v in headers.items() if k != "Content-Type"}, **sized},
    )


async def _then_close(
    body: AsyncIterable[bytes], parts: AsyncIterator[Part]
) -> AsyncIterator[bytes]:
    """`body`, then `parts` closed (what it holds open, a scratch file, goes)."""
    try:
        async for chunk in body:
            yield chunk
            del chunk  # sent: not held while the next one is read
    finally:
        await close_all(body, parts)


class StreamedResponse(StreamingResponse):
    """A streamed response that answers HEAD with its headers and closes its body unread.
    Starlette's iterates the whole body and drops it: a HEAD of a study read every blob and
    converted every instance that needed it.

    Its body is closed however the response ends. Starlette leaves a body it stopped
    iterating (the client went away, or was dropped after SEND_STALL_TIMEOUT_S) to the
    garbage collector: until it ran, the blob file stayed open and the chunks read ahead
    for it held their part of the process's READ_AHEAD_TOTAL_BYTES (found with clients that
    stopped reading: of 25 downloads dropped or given up, 20 held their blob minutes later).

    A chunk it has sent is dropped before it asks for the next: Starlette's loop held it
    while the next was read, so a download whose next chunk was not read ahead (the
    process's READ_AHEAD_TOTAL_BYTES spent) held two chunks (READ_CHUNK_MAX_BYTES each)."""

    async def stream_response(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            body = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
            del chunk
            await send({"type": "http.response.body", "body": body, "more_body": True})
            del body  # sent: not held while the next one is read
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope.get("method") != "HEAD":
                await super().__call__(scope, receive, send)
                return
            start = {"type": "http.response.start", "status": self.status_code}
            await send({**start, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await close_all(self.body_iterator)


class HeldResponse(Response):
    """A response built whole, `held` of its bytes counted in the download budget
    (budget.DownloadBudget.hold) until it has been sent or has failed; a response never
    sent gives them back when it is garbage."""

    def __init__(
        self, content: bytes, downloads: budget.DownloadBudget, held: int, **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._release = weakref.finalize(self, downloads.release, held)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()  # once: the finalizer is then dead


async def _joined(
    chunks: AsyncIterable[bytes], downloads: budget.DownloadBudget, held: int
) -> bytes:
    """The body of chunks, made whole; the `held` bytes given back if that fails."""
    try:
        return b"".join([chunk async for chunk in chunks])
    except BaseException:
        downloads.release(held)
        raise


async def _started(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks` with its first item already made (raising here if it cannot be)."""
    first = await anext(chunks, None)
    return Prefixed([] if first is None else [first], chunks)


async def ranged_response(request: Request, value: Sized, part_type: str | None) -> Response:
    """One frame or bulk data value as a one-part multipart/related response (`part_type`
    None: as a single part response, the value itself the body, PS3.18 10.4.4), cut to the
    bytes a Range header asks for.

    The range counts bytes of the response body, the representation a GET without Range
    gives (RFC 9110 14.1), and that body is byte-identical from one request to the next: its
    boundary is derived from the URL, the part's headers and the value's length. So ranges
    taken in several requests join into the whole body, which is what a progressive loader
    does (Cornerstone's HTJ2K range loading asks `bytes=0-65535`, then the rest, appends the
    raw bodies and parses the multipart message they make). The answer is 206 with
    `Content-Range` counting bytes of that body, whose total is the Content-Length of the
    whole response and of a HEAD. Frames and bulk data carry no validator, so a request with
    If-Range gets the whole body (RFC 9110 13.1.5).
    """
    head, tail, media_type, headers = _framing(request, value, part_type)
    total = len(head) + value.length + len(tail)
    header = None if "if-range" in request.headers else request.headers.get("range")
    span = byte_range(header, total)
    start, stop = span or (0, total)
    headers["Content-Length"] = str(stop - start)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
    status = 206 if span is not None else 200
    if request.method == "HEAD":  # the headers a GET would have, nothing read or decoded
        return Response(media_type=media_type, headers=headers, status_code=status)
    chunks = _body_slice(head, value, tail, start, stop)
    downloads, n = budget.DOWNLOADS, stop - start
    if n <= INLINE_RESPONSE_BYTES and downloads.hold(n):
        body = await _joined(chunks, downloads, n)
        return HeldResponse(
            body, downloads, n, status_code=status, media_type=media_type, headers=headers
        )
    return StreamedResponse(
        await _started(chunks), status_code=status, media_type=media_type, headers=headers
    )


def _framing(
    request: Request, value: Sized, part_type: str | None
) -> tuple[bytes, bytes, str, dict[str, str]]:
    """What comes before and after the value in the body of ranged_response, its media type,
    and the headers that go with it (Accept-Ranges first)."""
    headers = {"Accept-Ranges": "bytes"}
    if part_type is None:  # single part: the value's headers are the response's
        media_type = value.headers["Content-Type"]
        headers.update((k, v) for k, v in value.headers.items() if k != "Content-Type")
        return b"", b"", media_type, headers
    url = request.url
    parts = [f"{name}: {text}" for name, text in value.headers.items()]
    boundary = stable_boundary(value.secret, url.path, url.query, *parts, str(value.length))
    head, tail = one_part_frame(value.headers, boundary)
    return head, tail, f'multipart/related; type="{part_type}"; boundary={boundary}', headers


async def _body_slice(
    head: bytes, value: Sized, tail: bytes, start: int, stop: int
) -> AsyncIterator[bytes]:
    """Bytes [start, stop) of `head`, the value, `tail`; only the value bytes in the range are
    read (or decoded). The value's first chunk is made before `head` is given out: a
    streamed response starts once its first chunk is made (_started), and a value that
    cannot be made (a frame the decoder fails on, Pixel Data decoded as it is sent) is then
    still an error status, not a body cut off after the part's headers."""
    first, last = max(start - len(head), 0), min(stop - len(head), value.length)
    chunks = value.read(first, last) if last > first else None
    try:
        made = None if chunks is None else await anext(chunks, None)
        if start < len(head):
            yield head[start : min(stop, len(head))]
        if made is not None and chunks is not None:
            yield made
            del made  # sent: not held for the rest of the value (its first chunk was)
            async for chunk in chunks:
                yield chunk
                del chunk  # sent: not held while the next one is read
    finally:
        await close_all(chunks)  # a response cut short leaves no read open
    after = len(head) + value.length
    if stop > after:
        yield tail[max(start - after, 0) : stop - after]
