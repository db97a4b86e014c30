"""Media-type and transfer-syntax constants; Content-Type and Accept parsing.

Accept is parsed per RFC 9110 12.5.1: a comma list of media ranges, each with parameters whose
values may be quoted (commas and semicolons inside quotes are data) and a q-value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from dicomweb_server.errors import BadRequestError, UnsupportedMediaTypeError

__all__ = [
    "ACCEPT_CACHE_MAX_CHARS",
    "ACCEPT_CACHE_SIZE",
    "ACCEPT_FALLBACK",
    "APPLICATION_DICOM",
    "APPLICATION_DICOM_JSON",
    "APPLICATION_DICOM_XML",
    "APPLICATION_JSON",
    "APPLICATION_OCTET_STREAM",
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "MAX_ACCEPT_RANGES",
    "MULTIPART_RELATED",
    "NOT_FOR_WEB",
    "STORED",
    "VIDEO_TRANSFER_SYNTAXES",
    "MediaRange",
    "accept_then",
    "check_charset",
    "malformed_ranges",
    "parse_accept",
    "parse_content_type",
    "stow_boundary",
]

APPLICATION_DICOM = "application/dicom"
APPLICATION_DICOM_JSON = "application/dicom+json"
APPLICATION_DICOM_XML = "application/dicom+xml"
APPLICATION_JSON = "application/json"
APPLICATION_OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# "The Implicit VR Little Endian (1.2.840.10008.1.2), and Explicit VR Big Endian
# (1.2.840.10008.1.2.2 - Retired) Transfer Syntaxes shall not be used with Web Services"
# (PS3.18 8.7.3): instances stored so are sent in Explicit VR Little Endian, even as stored.
NOT_FOR_WEB = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN})
# `transfer-syntax=*` (PS3.18 8.7.3.5.2): send the instance in the transfer syntax it is stored in.
STORED = "*"

# Accept headers kept parsed (parse_accept): a client sends the same one or two with every
# request, and parsing one walks it character by character. Only headers up to
# ACCEPT_CACHE_MAX_CHARS are kept (a viewer's are a few hundred at most): a parsed header
# takes about 55 bytes per character, so the cache stays under 4 MiB whatever clients send.
ACCEPT_CACHE_SIZE = 128
ACCEPT_CACHE_MAX_CHARS = 512
# Media ranges in one Accept value (the `accept` query parameter's counted with the header's),
# at most; more is a 400. A viewer sends a handful, a client listing every transfer syntax it
# takes some 30. Negotiation weighs the ranges against each other: bounded, a header that an
# HTTP/2 connection may make 64 kB long cannot hold the event loop for seconds.
MAX_ACCEPT_RANGES = 256

# MPEG2, MPEG-4 AVC/H.264 and HEVC/H.265 transfer syntaxes, fragmentable ones (.1) too
# (PS3.6 Table A-1): whatever the SOP class, the pixel data is a video stream, in any number of
# fragments (PS3.5 8.2.5-8.2.8), not one frame or more per fragment.
VIDEO_TRANSFER_SYNTAXES = frozenset(
    [f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)]
    + [f"1.2.840.10008.1.2.4.{n}.1" for n in range(100, 107)]
)


@dataclass(frozen=True)
class MediaRange:
    type: str
    subtype: str
    params: Mapping[str, str] = field(default_factory=dict)  # read-only: ranges are shared
    q: float = 1.0
    # Types a more specific range of the same Accept gives q=0: not acceptable through this
    # wildcard (RFC 9110 12.5.1: `text/html;q=0, */*` accepts anything but text/html).
    # Concrete types or `type/*`, narrower than this wildcard (_Refused): a set, since a long
    # Accept gives one wildcard thousands and matches() is asked of every range.
    excludes: frozenset[str] = frozenset()
    # Ranges with parameters the same Accept gives q=0 that this wildcard covers
    # (`multipart/related; type="application/dicom"; q=0, */*`): which representations they
    # refuse depends on the parameters' meaning, which the negotiation knows (negotiate.py).
    refused: tuple[MediaRange, ...] = ()

    @property
    def essence(self) -> str:
        return f"{self.type}/{self.subtype}"

    def matches(self, media_type: str) -> bool:
        if not _covers(self.essence, media_type):
            return False
        # An exclusion (narrower than this wildcard) covers `media_type` when it is that type
        # or its `type/*`.
        t = media_type.partition("/")[0]
        return media_type not in self.excludes and f"{t}/*" not in self.excludes


def _covers(essence: str, media_type: str) -> bool:
    """Whether the range `essence` (`*/*`, `image/*`, `image/png`) takes `media_type`, a
    range too when it is one (`image/*` takes `image/*`)."""
    et, _, es = essence.partition("/")
    t, _, s = media_type.partition("/")
    return et in ("*", t) and es in ("*", s)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            buf.append(ch)
        elif ch == sep and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        it = iter(inner)
        for ch in it:
            out.append(next(it, "") if ch == "\\" else ch)
        return "".join(out)
    return value


def _parse_one(text: str) -> MediaRange | None:
    pieces = _split_outside_quotes(text, ";")
    essence = pieces[0].strip().lower()
    if not essence:
        return None
    t, slash, s = essence.partition("/")
    if not slash or not t or not s:
        raise BadRequestError(f"malformed media type {essence!r}")
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if not eq:
            raise BadRequestError(f"malformed media type parameter {piece.strip()!r}")
        if name == "q":
            try:
                q = float(value.strip())
            except ValueError:
                raise BadRequestError(f"malformed q-value {value.strip()!r}") from None
            continue
        params[name] = _unquote(value)
    return MediaRange(t, s, MappingProxyType(params), q)


def parse_content_type(value: str) -> MediaRange:
    rng = _parse_one(value)
    if rng is None:
        raise UnsupportedMediaTypeError("missing Content-Type")
    return rng


def parse_accept(value: str | None) -> tuple[MediaRange, ...]:
    """Media ranges in order of preference (q descending, then as written); q=0 dropped, and
    malformed ranges too. Kept for the next request with the same header when it is short
    enough."""
    if value is not None and len(value) > ACCEPT_CACHE_MAX_CHARS:
        return _parse_accept(value)
    return _parse_accept_kept(value)


@functools.lru_cache(maxsize=ACCEPT_CACHE_SIZE)
def _parse_accept_kept(value: str | None) -> tuple[MediaRange, ...]:
    return _parse_accept(value)


# Joins the `accept` query parameter and the Accept header (accept_then): every range of the
# first ranks before every range of the second, whatever their q-values (PS3.18 8.7.8.1).
ACCEPT_FALLBACK = "\n"


# A space between two token characters of the `accept` query parameter. White space in a
# media range stands only around `;`, `,` and `=` (RFC 9110 5.6.3, 12.5.1), so this one was
# a `+` written into the URL (`?accept=application/dicom+json`: a literal in an RFC 3986
# query, PS3.18 8.3), which form decoding had read as a space.
_PLUS_READ_AS_SPACE = re.compile(r"(?<=[-!#$%&'*+.^_`|~0-9A-Za-z]) (?=[-!#$%&'*+.^_`|~0-9A-Za-z])")


def accept_then(query: str | None, header: str | None) -> str | None:
    """The Accept value for a request with an `accept` query parameter: its media types first,
    then the header's, tried only when none of the parameter's is supported (PS3.18 8.7.8.1,
    steps 2 and 3)."""
    if not query:
        return header
    query = _PLUS_READ_AS_SPACE.sub("+", query)
    # no Accept header is taken as */* (the statement's choice), after the parameter's types
    return f"{query}{ACCEPT_FALLBACK}{'*/*' if header is None else header}"


# What the `charset` query parameter may name: every response here is UTF-8 (PS3.18 8.8).
_UTF8_NAMES = frozenset({"utf-8", "utf8", "iso_ir 192", "*"})


def check_charset(value: str | None) -> None:
    """The `charset` query parameter (PS3.18 8.3.3.2): a list of character sets, each with an
    optional q-value; "if this parameter has a value that is not a valid or supported
    character set, the origin server shall return a 400". Every answer here is UTF-8, so the
    list must allow it."""
    if value is None or not value.strip():
        return  # an empty parameter asks for nothing
    allowed = []
    for item in value.split(","):
        name, *params = item.split(";")
        weight = 1.0
        for param in params:
            key, _, q = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(q)
                except ValueError:
                    raise BadRequestError(f"malformed charset {item.strip()!r}") from None
        if name.strip() and weight > 0:
            allowed.append(name.strip().lower())
    if not allowed or not any(name in _UTF8_NAMES for name in allowed):
        raise BadRequestError(f"charset {value!r}: every response is UTF-8 (charset=utf-8)")


def _parse_accept(value: str | None) -> tuple[MediaRange, ...]:
    if value is None or not value.strip():
        return (MediaRange("*", "*"),)
    out: list[MediaRange] = []
    blocks = [_split_outside_quotes(block, ",") for block in value.split(ACCEPT_FALLBACK)]
    count = sum(1 for parts in blocks for part in parts if part.strip())
    if count > MAX_ACCEPT_RANGES:
        raise BadRequestError(
            f"the Accept value has {count} media ranges, more than {MAX_ACCEPT_RANGES}"
        )
    for parts in blocks:
        ranges = [r for part in parts if (r := _parse_valid(part))]
        ordered = sorted(enumerate(ranges), key=lambda ir: (-ir[1].q, ir[0]))
        refused = _Refused([r for r in ranges if r.q == 0])
        out += [refused.apply(r) for _, r in ordered if r.q > 0]
    return tuple(out)


class _Refused:
    """The q=0 ranges of one Accept, by the wildcard each is narrower than: a wildcard range
    takes those more specific than it as exclusions (RFC 9110 12.5.1: the most specific range
    gives a type its quality); those without parameters exclude their types, those with
    parameters are kept for the negotiation to read. Grouped by type and worked out once per
    wildcard: each wildcard range scanning every refused one took 0.6 s of the event loop for
    a 14 kB header of `*/*;q=.5` and `a/b;q=0` (800 of them), 12 s for 80 kB."""

    def __init__(self, refused: list[MediaRange]) -> None:
        self._by_type: dict[str, list[MediaRange]] = {}
        for r in refused:
            self._by_type.setdefault(r.type, []).append(r)
        self._all = refused
        self._done: dict[str, tuple[frozenset[str], tuple[MediaRange, ...]]] = {}

    def apply(self, rng: MediaRange) -> MediaRange:
        if rng.essence == MULTIPART_RELATED and "*" in rng.params.get("type", ""):
            return self._within_part_type(rng)
        if "*" not in (rng.type, rng.subtype):
            return rng
        if rng.essence not in self._done:
            candidates = self._all if rng.type == "*" else self._by_type.get(rng.type, [])
            narrower = [
                r for r in candidates
                if _covers(rng.essence, r.essence) and _specificity(r) > _specificity(rng)
            ]  # fmt: skip
            excludes = frozenset(r.essence for r in narrower if not r.params)
            self._done[rng.essence] = (excludes, tuple(r for r in narrower if r.params))
        excludes, with_params = self._done[rng.essence]
        if not excludes and not with_params:
            return rng
        return replace(rng, excludes=excludes, refused=with_params)

    def _within_part_type(self, rng: MediaRange) -> MediaRange:
        """A multipart/related range whose part type is a wildcard (`type="*/*"`,
        `type="image/*"`), with the q=0 multipart/related ranges of narrower part types as
        refused: `...type="application/octet-stream"; q=0, ...type="*/*"` takes no
        uncompressed frame, as `*/*` does not (RFC 9110 12.5.1)."""
        wild = rng.params["type"].lower()
        key = f"{MULTIPART_RELATED}; type={wild}"
        if key not in self._done:
            narrower = tuple(
                r for r in self._by_type.get("multipart", [])
                if r.essence == MULTIPART_RELATED
                and (part := r.params.get("type", "").lower()) not in ("", wild)
                and _covers(wild, part)
            )  # fmt: skip
            self._done[key] = (frozenset(), narrower)
        refused = self._done[key][1]
        return replace(rng, refused=refused) if refused else rng


def _specificity(rng: MediaRange) -> int:
    return (rng.type != "*") + (rng.subtype != "*")


def malformed_ranges(value: str | None) -> list[str]:
    """The media ranges of an Accept value that parse_accept ignores as malformed (PS3.18
    8.7.7), as written, for a 406 to name: `image/` (dicomweb-client passes it on when given
    it) is no media range, RFC 9110 12.5.1: type "/" subtype, the subtype a token of at
    least one character. At most MAX_ACCEPT_RANGES looked at."""
    if value is None:
        return []
    parts = [p for block in value.split(ACCEPT_FALLBACK) for p in _split_outside_quotes(block, ",")]
    return [p.strip() for p in parts[:MAX_ACCEPT_RANGES] if p.strip() and _parse_valid(p) is None]


def _parse_valid(text: str) -> MediaRange | None:
    """A media range of an Accept value, or None: "Accept Header Field values, including Media
    Type parameters, that are not valid or not supported shall be ignored" (PS3.18 8.7.7)."""
    try:
        rng = _parse_one(text)
    except BadRequestError:
        return None
    return rng if rng is None or 0 <= rng.q <= 1 else None


def stow_boundary(content_type: str | None) -> tuple[str, str]:
    """(boundary, part type) of a STOW-RS request body (PS3.18 10.5.1.4), or 415/400: parts
    of `application/dicom` (Part-10 instances), or `application/dicom+json` or
    `application/dicom+xml` metadata with its bulk data in the other parts."""
    if not content_type:
        raise UnsupportedMediaTypeError(
            'STOW-RS needs Content-Type: multipart/related; type="application/dicom"'
        )
    rng = parse_content_type(content_type)
    if rng.essence != MULTIPART_RELATED:
        raise UnsupportedMediaTypeError(
            f'STOW-RS accepts multipart/related; type="application/dicom", not {rng.essence}'
        )
    part_type = rng.params.get("type", APPLICATION_DICOM).lower()
    if part_type not in (APPLICATION_DICOM, APPLICATION_DICOM_JSON, APPLICATION_DICOM_XML):
        raise UnsupportedMediaTypeError(
            "STOW-RS here accepts parts of type application/dicom, or application/dicom+json "
            f"or application/dicom+xml metadata with bulk data; not {part_type}"
        )
    boundary = rng.params.get("boundary")
    if not boundary:
        raise BadRequestError("multipart/related Content-Type has no boundary parameter")
    return boundary, part_type
