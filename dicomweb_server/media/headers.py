"""The request fields, other than Accept, that choose a response.

Range (RFC 9110 14.2), If-None-Match (13.1.2) and Accept-Encoding (12.5.3); and the
Content-Encoding of a request body (8.4), which must be none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dicomweb_server.errors import RangeNotSatisfiableError, UnsupportedMediaTypeError

__all__ = [
    "accepts_gzip",
    "byte_range",
    "check_body_coding",
    "none_match",
]


# One byte-range-spec of RFC 9110 14.1.1: `first-last`, `first-` or `-suffix`.
_BYTE_RANGE = re.compile(r"\s*bytes\s*=\s*(?:(\d{1,18})-(\d{1,18})?|-(\d{1,18}))\s*", re.I)


def byte_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The bytes [start, stop) of a body of `length` bytes that a Range header asks for.

    None means "send the whole body" (RFC 9110 14.2: a server may ignore Range): no header, a
    unit other than bytes, a malformed or backwards range, or several ranges (only one is
    served, as a multipart/byteranges body inside a multipart/related one would help nobody).
    A range that starts past the end is refused with 416 and `Content-Range: bytes */length`.
    """
    if header is None:
        return None
    m = _BYTE_RANGE.fullmatch(header)
    if m is None:
        return None
    first, last, suffix = m.groups()
    if suffix is not None:
        if int(suffix) == 0 or length == 0:
            raise _unsatisfiable(header, length)
        return max(0, length - int(suffix)), length
    start = int(first)
    if last is not None and int(last) < start:
        return None
    if start >= length:
        raise _unsatisfiable(header, length)
    stop = length if last is None else min(int(last) + 1, length)
    return start, stop


def _unsatisfiable(header: str, length: int) -> RangeNotSatisfiableError:
    return RangeNotSatisfiableError(
        f"{header.strip()[:60]!r} asks for no byte of a {length}-byte body",
        headers={"Content-Range": f"bytes */{length}"},
    )


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text
# (commas may appear inside one), as one element of a comma list (RFC 9110 5.6.1: empty
# elements are allowed and skipped). The weak indicator is case-sensitive.
_ETAG_ELEMENT = re.compile(r'[ \t]*(?:(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*)?(?:,|\Z)')


def none_match(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match field value matches `etag` (RFC 9110 13.1.2), i.e. whether a
    GET gets 304 Not Modified.

    The comparison is the weak one (RFC 9110 8.8.3.2): `W/"x"` matches `"x"` and the other way
    round, as a reverse proxy that compresses responses (nginx with gzip on) weakens the ETag
    it passes on. `*` matches any current representation. A field value that is not `*` or a
    list of entity tags is ignored, as if absent (the full response is always a safe answer).
    """
    if header is None:
        return False
    value = header.strip(" \t")
    if value == "*":
        return True
    wanted = _opaque_tag(etag)
    pos = 0
    found = False
    while pos < len(value):
        m = _ETAG_ELEMENT.match(value, pos)
        if m is None:
            return False  # not a list of entity tags: ignored
        found = found or m.group(1) == wanted
        pos = m.end()
    return found


def _opaque_tag(etag: str) -> str:
    return etag[2:] if etag.startswith("W/") else etag


# RFC 9110 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ).
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
# RFC 9110 8.4.1.3: a recipient SHOULD consider "x-gzip" to be equivalent to "gzip".
_CODING_ALIASES = {"x-gzip": "gzip"}


def accepts_gzip(header: str | None) -> bool:
    """Whether a response may be gzip-compressed under this Accept-Encoding (RFC 9110 12.5.3).

    A comma list of codings, case-insensitive, each with an optional q-value; q=0 means "not
    acceptable". `*` stands for every coding not listed, gzip and identity included; identity
    (no coding) not listed at all is acceptable but not preferred. gzip is chosen when its
    weight is above 0 and not below identity's. An element that does not parse (a bad
    q-value) is skipped; no header at all means no compression (a client that never asked may
    not decompress, although RFC 9110 would allow any coding).
    """
    if header is None:
        return False
    weights = _coding_weights(header)
    star = weights.get("*")
    gzip_q = weights.get("gzip", 0.0 if star is None else star)
    identity_q = weights.get("identity", 0.0 if star is None else star)
    return gzip_q > 0 and gzip_q >= identity_q


def _coding_weights(header: str) -> dict[str, float]:
    """coding -> q of an Accept-Encoding value; the first element naming a coding wins."""
    weights: dict[str, float] = {}
    for element in header.split(","):
        coding, *params = (p.strip(" \t") for p in element.split(";"))
        coding = coding.lower()
        if not coding:
            continue
        q: float | None = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip(" \t").lower() == "q":
                value = value.strip(" \t")
                q = float(value) if _QVALUE.fullmatch(value) else None
        if q is not None:
            weights.setdefault(_CODING_ALIASES.get(coding, coding), q)
    return weights


def check_body_coding(field_lines: Iterable[str]) -> None:
    """415 with `Accept-Encoding: identity` unless a request body has no content coding (RFC
    9110 15.5.16, 12.5.3). Request bodies are not decoded here (no decompression bomb can be
    sent), so a body said to be gzip or deflate was taken as its coded bytes: a part of
    another length, or a "malformed multipart" 400 that did not say why (found by review).
    `field_lines`: every Content-Encoding line of the request, which make one list (RFC 9110
    5.3: the first alone let `identity` then `gzip` through, found by review)."""
    codings = [c.strip().lower() for line in field_lines for c in line.split(",")]
    named = [c for c in codings if c and c != "identity"]
    if named:
        raise UnsupportedMediaTypeError(
            f"request bodies are accepted without a content coding, not {named[0][:40]!r}",
            headers={"Accept-Encoding": "identity"},
        )
