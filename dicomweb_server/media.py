"""Media types, transfer syntaxes, Content-Type / Accept parsing and negotiation.

Accept is parsed per RFC 9110 12.5.1: a comma list of media ranges, each with parameters whose
values may be quoted (commas and semicolons inside quotes are data) and a q-value. Negotiation
follows PS3.18 8.7 (acceptable media types and transfer syntaxes). The other request fields
that choose a response are parsed here too: Range (RFC 9110 14.2), If-None-Match (13.1.2) and
Accept-Encoding (12.5.3).
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from dicomweb_server.errors import (
    BadRequestError,
    NotAcceptableError,
    RangeNotSatisfiableError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "ACCEPT_CACHE_MAX_CHARS",
    "ACCEPT_CACHE_SIZE",
    "ACCEPT_FALLBACK",
    "APPLICATION_DICOM",
    "APPLICATION_DICOM_JSON",
    "APPLICATION_DICOM_XML",
    "APPLICATION_JSON",
    "APPLICATION_OCTET_STREAM",
    "BULKDATA_ACCEPTABLE",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "FILE_META_MAX_BYTES",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "LONG_LENGTH_VRS",
    "MULTIPART_RELATED",
    "NOT_FOR_WEB",
    "STORED",
    "VIDEO_TRANSFER_SYNTAXES",
    "MediaRange",
    "accept_then",
    "accepts_bulkdata",
    "accepts_gzip",
    "byte_range",
    "check_charset",
    "file_meta_end",
    "frame_media_type",
    "frame_part_type",
    "frame_syntax",
    "names_instances",
    "negotiate_bulkdata",
    "negotiate_dicom_model",
    "negotiate_frames",
    "negotiate_instances",
    "none_match",
    "parse_accept",
    "parse_content_type",
    "single_parts",
    "stow_boundary",
    "wants_bulkdata",
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

# PS3.18 Table 8.7.3-2 (media types of compressed pixel data, i.e. single frames).
_FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
# MPEG2, MPEG-4 AVC/H.264 and HEVC/H.265 transfer syntaxes, fragmentable ones (.1) too
# (PS3.6 Table A-1): whatever the SOP class, the pixel data is a video stream, in any number of
# fragments (PS3.5 8.2.5-8.2.8), not one frame or more per fragment.
VIDEO_TRANSFER_SYNTAXES = frozenset(
    [f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)]
    + [f"1.2.840.10008.1.2.4.{n}.1" for n in range(100, 107)]
)
# PS3.5 7.1.2: the VRs whose explicit length is 4 bytes after 2 reserved ones.
LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# PS3.18 Table 8.7.3-5 (RESTful column, "D"): the transfer syntax an image media type means
# when none is given. image/jpeg is JPEG Lossless SV1, not Baseline: lossless data is never
# made lossy unless a client names a lossy syntax.
_DEFAULT_FRAME_TS: dict[str, str] = {
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}
# Lossy JPEG: frames stored so are sent as stored for image/jpeg without a transfer syntax,
# since the archive "has only access to the pixel data in lossy compressed form" (PS3.18 8.7.3).
_LOSSY_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
# What `image/*` gets for frames that must be encoded, in order of preference: lossless only.
_WILDCARD_FRAME_TS = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless: fast and compact
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_NATIVE = {
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
}


@dataclass(frozen=True)
class MediaRange:
    type: str
    subtype: str
    params: Mapping[str, str] = field(default_factory=dict)  # read-only: ranges are shared
    q: float = 1.0
    # Types a more specific range of the same Accept gives q=0: not acceptable through this
    # wildcard (RFC 9110 12.5.1: `text/html;q=0, */*` accepts anything but text/html).
    excludes: tuple[str, ...] = ()

    @property
    def essence(self) -> str:
        return f"{self.type}/{self.subtype}"

    def matches(self, media_type: str) -> bool:
        return _covers(self.essence, media_type) and not any(
            _covers(excluded, media_type) for excluded in self.excludes
        )


def _covers(essence: str, media_type: str) -> bool:
    """Whether the range `essence` (`*/*`, `image/*`, `image/png`) takes `media_type`, a
    range too when it is one (`image/*` takes `image/*`)."""
    et, _, es = essence.partition("/")
    t, _, s = media_type.partition("/")
    return et in ("*", t) and es in ("*", s)


def frame_syntax(media_type: str) -> str | None:
    """The transfer syntax a frame of this media type is in, as a STOW-RS bulk data part
    says it (`image/jls; transfer-syntax=...`), or by the media type's default (PS3.18 Table
    8.7.3-2); octet-stream is native little endian; None for anything else."""
    rng = parse_content_type(media_type)
    named = rng.params.get("transfer-syntax")
    if rng.essence == APPLICATION_OCTET_STREAM:  # native: little endian (PS3.18 10.5.1.4)
        return EXPLICIT_VR_LITTLE_ENDIAN if named in (None, EXPLICIT_VR_LITTLE_ENDIAN) else None
    if named and frame_media_type(named) == rng.essence:
        return named
    return None if named else _DEFAULT_FRAME_TS.get(rng.essence)


def frame_media_type(transfer_syntax_uid: str) -> str:
    """The media type of one frame stored in `transfer_syntax_uid` (octet-stream if native)."""
    if transfer_syntax_uid in _NATIVE:
        return APPLICATION_OCTET_STREAM
    return _FRAME_MEDIA_TYPES.get(transfer_syntax_uid, APPLICATION_OCTET_STREAM)


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
    for block in value.split(ACCEPT_FALLBACK):
        ranges = [r for part in _split_outside_quotes(block, ",") if (r := _parse_valid(part))]
        ordered = sorted(enumerate(ranges), key=lambda ir: (-ir[1].q, ir[0]))
        refused = [r for r in ranges if r.q == 0 and not r.params]
        out += [_without(r, refused) for _, r in ordered if r.q > 0]
    return tuple(out)


def _without(rng: MediaRange, refused: list[MediaRange]) -> MediaRange:
    """`rng` with the q=0 ranges more specific than it as exclusions (RFC 9110 12.5.1: the
    most specific range gives a type its quality)."""
    if "*" not in (rng.type, rng.subtype):
        return rng
    narrower = tuple(
        r.essence for r in refused
        if _covers(rng.essence, r.essence) and _specificity(r) > _specificity(rng)
    )  # fmt: skip
    return replace(rng, excludes=narrower) if narrower else rng


def _specificity(rng: MediaRange) -> int:
    return (rng.type != "*") + (rng.subtype != "*")


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


# Part types of a multipart/related range that take DICOM instances.
_INSTANCE_PARTS = (APPLICATION_DICOM, "*/*", "application/*")


def _related_type(rng: MediaRange, default: str) -> str | None:
    """The part media type a range accepts, or None when the range is not multipart/related
    (a wildcard whose header refuses multipart/related with q=0 is not)."""
    if rng.essence in ("*/*", "multipart/*"):
        if not rng.matches(MULTIPART_RELATED):
            return None
        return rng.params.get("type", default).lower()
    if rng.essence == MULTIPART_RELATED:
        return rng.params.get("type", default).lower()
    return None


def _names_no_type(rng: MediaRange, part: str, default: str) -> bool:
    """Whether a range leaves the part type open: a wildcard part type (`type=*/*`,
    `type=application/*`), or `*/*` or `multipart/*` with no type parameter (the part type
    then defaults to `default`, which the client did not name)."""
    if part in ("*/*", "application/*"):
        return True
    return part == default and rng.essence in ("*/*", "multipart/*") and "type" not in rng.params


def _options(stored_ts: str, targets: Collection[str]) -> str:
    others = [t for t in targets if t != stored_ts]
    converted = f"; converted: {', '.join(others)}" if others else "; no conversion available"
    if stored_ts in NOT_FOR_WEB:  # "as stored" is Explicit VR Little Endian (PS3.18 8.7.3)
        return f"stored {stored_ts}, sent as {EXPLICIT_VR_LITTLE_ENDIAN}{converted}"
    return f"as stored ({stored_ts}, transfer-syntax=*){converted}"


def negotiate_instances(
    accept: str | None, stored_ts: str, targets: Collection[str], why: str = ""
) -> str:
    """Transfer syntax for study/series/instance retrieval: STORED or one of `targets`.

    PS3.18 8.7.3.5.2: without a transfer-syntax parameter application/dicom means Explicit VR
    Little Endian; `transfer-syntax=*` means as stored. Ranges are tried in q-value order.
    `*/*` (or no Accept at all) names no media type, let alone a transfer syntax: Explicit VR
    Little Endian when it can be made, else the instance as stored, which such a client
    accepts too (RFC 9110 12.5.1; field notes 3: 406 only when nothing acceptable can be made).
    A study of instances some of which cannot be decoded is then sent, not refused.
    """
    for rng in parse_accept(accept):
        part = _related_type(rng, APPLICATION_DICOM)
        if part not in _INSTANCE_PARTS:
            continue
        if "transfer-syntax" not in rng.params and _names_no_type(rng, part, APPLICATION_DICOM):
            if stored_ts != EXPLICIT_VR_LITTLE_ENDIAN and EXPLICIT_VR_LITTLE_ENDIAN in targets:
                return EXPLICIT_VR_LITTLE_ENDIAN
            return STORED
        requested = rng.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
        if requested in NOT_FOR_WEB:
            continue  # "shall not be used with Web Services" (PS3.18 8.7.3)
        if requested in (STORED, stored_ts):
            if stored_ts in NOT_FOR_WEB and EXPLICIT_VR_LITTLE_ENDIAN in targets:
                return EXPLICIT_VR_LITTLE_ENDIAN  # what "as stored" may be on the web
            return STORED
        if requested in targets:
            return requested
    raise NotAcceptableError(
        f'acceptable: multipart/related; type="application/dicom" '
        f"{_options(stored_ts, targets)}{'; ' + why if why else ''}"
    )


def negotiate_frames(
    accept: str | None, stored_ts: str, targets: Collection[str], why: str = ""
) -> str:
    """Transfer syntax for frames: STORED or one of `targets`.

    PS3.18 8.7.3.3.2: the default for frames is application/octet-stream, uncompressed (Explicit
    VR Little Endian); `transfer-syntax=*` returns the frames as stored with the media type of
    Table 8.7.3-2; an image media type without a transfer syntax means its default one.
    `*/*` (or no Accept at all) names no part type: uncompressed when that can be made, else
    the frames as stored (as negotiate_instances).
    """
    stored_type = frame_media_type(stored_ts)
    for rng in parse_accept(accept):
        part = _related_type(rng, APPLICATION_OCTET_STREAM)
        if part is None:
            continue
        ts = rng.params.get("transfer-syntax")
        if ts is None and _names_no_type(rng, part, APPLICATION_OCTET_STREAM):
            return EXPLICIT_VR_LITTLE_ENDIAN if EXPLICIT_VR_LITTLE_ENDIAN in targets else STORED
        if part in ("*/*", "application/*", APPLICATION_OCTET_STREAM):
            # OHIF asks octet-stream with transfer-syntax=* and expects the stored frames.
            if ts in (STORED, stored_ts):
                return STORED
            if (ts or EXPLICIT_VR_LITTLE_ENDIAN) == EXPLICIT_VR_LITTLE_ENDIAN and (
                EXPLICIT_VR_LITTLE_ENDIAN in targets
            ):
                return EXPLICIT_VR_LITTLE_ENDIAN
            continue
        if _type_matches(part, stored_type) and (
            ts in (STORED, stored_ts)
            or (ts is None and _DEFAULT_FRAME_TS.get(part, stored_ts) == stored_ts)
            or (ts is None and stored_ts in _LOSSY_JPEG)
        ):
            return STORED
        want = ts or _DEFAULT_FRAME_TS.get(part)
        if want in targets and want is not None and _type_matches(part, frame_media_type(want)):
            return want
        if want is None and part.endswith("/*"):
            # `image/*` names no syntax: the first lossless one that can be made, never a
            # lossy one (field notes 3: 406 only when nothing acceptable can be made).
            for choice in _WILDCARD_FRAME_TS:
                if choice in targets and _type_matches(part, frame_media_type(choice)):
                    return choice
    raise NotAcceptableError(
        f'acceptable: multipart/related; type="application/octet-stream" (uncompressed) or an '
        f"image type, {_options(stored_ts, targets)}{'; ' + why if why else ''}"
    )


def _type_matches(requested: str, media: str) -> bool:
    return requested == media or (requested.endswith("/*") and media.startswith(requested[:-1]))


BULKDATA_ACCEPTABLE = 'acceptable: multipart/related; type="application/octet-stream"'


def accepts_bulkdata(accept: str | None) -> bool:
    """Whether bulk data, sent as multipart/related; type="application/octet-stream" (PS3.18
    8.7.3.4), is acceptable."""
    for rng in parse_accept(accept):
        part = _related_type(rng, APPLICATION_OCTET_STREAM)
        if part in ("*/*", APPLICATION_OCTET_STREAM, "application/*") and rng.params.get(
            "transfer-syntax"
        ) in (None, STORED, EXPLICIT_VR_LITTLE_ENDIAN):
            return True
    return False


def negotiate_bulkdata(accept: str | None) -> None:
    """406 unless bulk data is acceptable (accepts_bulkdata)."""
    if not accepts_bulkdata(accept):
        raise NotAcceptableError(BULKDATA_ACCEPTABLE)


def single_parts(
    accept: str | None, allowed: Callable[[str], bool]
) -> list[tuple[str, str | None, str]]:
    """The ranges of the Accept, in order of preference, that name a single part media type
    the resource may be sent as (`allowed(essence)`, concrete types only; PS3.18 10.4.4: "a
    single part Media Type is permitted for resources which are a single response item"), as
    (media type, transfer-syntax, the equivalent multipart/related range to negotiate the one
    part with); up to the first range that takes a multipart response (`*/*`, `multipart/*`,
    multipart/related). Each is tried in turn, then the multipart negotiation with the whole
    Accept (8.7.8.1: a range that cannot be met passes to the next)."""
    out = []
    for rng in parse_accept(accept):
        if rng.type == "multipart" or (rng.type == "*" and rng.matches(MULTIPART_RELATED)):
            break
        if "*" not in (rng.type, rng.subtype) and allowed(rng.essence):
            ts = rng.params.get("transfer-syntax")
            as_part = f'{MULTIPART_RELATED}; type="{rng.essence}"'
            out.append((rng.essence, ts, as_part + (f"; transfer-syntax={ts}" if ts else "")))
    return out


def frame_part_type(essence: str) -> bool:
    """Whether `essence` is a media type one frame can be sent in as a single part."""
    return essence == APPLICATION_OCTET_STREAM or essence in _FRAME_MEDIA_TYPES.values()


def names_instances(accept: str | None) -> bool:
    """Whether some range of the Accept takes DICOM instances (application/dicom parts, or
    any part type)."""
    return any(
        _related_type(rng, APPLICATION_DICOM) in _INSTANCE_PARTS for rng in parse_accept(accept)
    )


def wants_bulkdata(accept: str | None) -> bool:
    """Whether a Study, Series or Instance resource is asked for as bulk data rather than as
    DICOM instances: the first range (in q-value order) that names either is multipart/related
    with an octet-stream, image or video part (PS3.18 10.4.1.1.1, B.10 "Retrieve Instance as
    Bulk Data"). `*/*`, `multipart/*` and `type=application/*` mean instances."""
    for rng in parse_accept(accept):
        part = _related_type(rng, APPLICATION_DICOM)
        if part is None:
            continue
        if part in _INSTANCE_PARTS:
            return False
        if part == APPLICATION_OCTET_STREAM or part.startswith(("image/", "video/")):
            return True
    return False


def negotiate_dicom_model(accept: str | None, *, multipart: bool, single: bool) -> str:
    """APPLICATION_DICOM_JSON (the default), APPLICATION_JSON, or DICOM XML (PS3.19 A.1):
    MULTIPART_RELATED when `multipart` allows each data set as its own `application/dicom+xml`
    part (metadata and QIDO: PS3.18 Table 10.4.4-1 requires it), APPLICATION_DICOM_XML when
    `single` allows one bare document (the STOW response, an instance's metadata: "a single
    part Media Type is permitted for resources which are a single response item", 10.4.4).

    `*/*` and `application/*` get JSON; `multipart/related` with no type gets XML parts; a
    bare `application/dicom+xml` where several data sets answer is ignored (10.4.4, note).
    """
    for rng in parse_accept(accept):
        if rng.matches(APPLICATION_DICOM_JSON):
            return APPLICATION_DICOM_JSON
        if rng.matches(APPLICATION_JSON):
            return APPLICATION_JSON
        if single and rng.essence == APPLICATION_DICOM_XML:
            return APPLICATION_DICOM_XML
        part = _related_type(rng, APPLICATION_DICOM_XML)
        if multipart and part in (APPLICATION_DICOM_XML, "*/*", "application/*"):
            return MULTIPART_RELATED
    xml = [
        *(['multipart/related; type="application/dicom+xml"'] if multipart else []),
        *([APPLICATION_DICOM_XML] if single else []),
    ]
    raise NotAcceptableError(
        "acceptable: " + ", ".join([APPLICATION_DICOM_JSON, APPLICATION_JSON, *xml])
    )


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


# PS3.10 7.1: a Part-10 file is a 128-byte preamble, "DICM", then the File Meta Information,
# group 0002 in explicit VR little endian. Real meta information is a few hundred bytes; one
# that does not end within this many is not looked into (FileMeta gives up).
FILE_META_MAX_BYTES = 64 * 1024
_META_AT = 132


def file_meta_end(head: bytes | bytearray) -> tuple[int, bytes] | None:
    """Where the File Meta Information of a Part-10 file beginning with `head` ends, walked
    element by element (its group length is not trusted), and its Transfer Syntax UID value
    as written. None when `head` is too short to tell; (0, b"") when it is not a Part-10
    header or its meta information is malformed or longer than FILE_META_MAX_BYTES."""
    if len(head) < _META_AT:
        return None
    if head[128:_META_AT] != b"DICM":
        return 0, b""
    pos, syntax = _META_AT, b""
    while pos <= FILE_META_MAX_BYTES:
        if len(head) < pos + 8:
            return None
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return pos, syntax
        vr = bytes(head[pos + 4 : pos + 6])
        if not vr.isalpha():
            return 0, b""
        if vr in LONG_LENGTH_VRS:
            if len(head) < pos + 12:
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_at = pos + 8
        if elem == 0x0010:
            if len(head) < value_at + length:
                return None
            syntax = bytes(head[value_at : value_at + length])
        pos = value_at + length
    return 0, b""
