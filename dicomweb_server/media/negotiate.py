"""Negotiation of a response's media type and transfer syntax with an Accept (PS3.18 8.7).

Follows PS3.18 8.7 (acceptable media types and transfer syntaxes): instances, frames, bulk
data and the DICOM data model (JSON or XML), and the media types of single frames (PS3.18
Table 8.7.3-2); the transfer syntax of a JPEG frame, from its markers (jpeg_process).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from typing import BinaryIO

from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.media.mediatypes import (
    APPLICATION_DICOM,
    APPLICATION_DICOM_JSON,
    APPLICATION_DICOM_XML,
    APPLICATION_JSON,
    APPLICATION_OCTET_STREAM,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MULTIPART_RELATED,
    NOT_FOR_WEB,
    STORED,
    MediaRange,
    parse_accept,
    parse_content_type,
)

__all__ = [
    "BULKDATA_ACCEPTABLE",
    "bulkdata_unacceptable",
    "frame_media_type",
    "frame_part_type",
    "frame_syntax",
    "jpeg_process",
    "names_instances",
    "negotiate_bulkdata",
    "negotiate_dicom_model",
    "negotiate_frames",
    "negotiate_instances",
    "refused_to",
    "single_parts",
    "wants_bulkdata",
]

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
# Encapsulated transfer syntaxes of one fragment per frame with no media type of their own
# (PS3.18 Table 8.7.3-5 names none; 8.7.3.3: an origin server may support others): their
# frames are sent as stored as application/octet-stream with the transfer-syntax parameter
# (frame_media_type), and a STOW-RS bulk data part so named is taken back as one frame
# (frame_syntax). Deflated Image Frame Compression (PS3.5 A.4.13, each frame deflated on its
# own) and Encapsulated Uncompressed Explicit VR Little Endian (A.4.11).
_OCTET_STREAM_FRAMES = frozenset({"1.2.840.10008.1.2.8.1", "1.2.840.10008.1.2.1.98"})


def frame_syntax(media_type: str) -> str | None:
    """The transfer syntax a frame of this media type is in, as a STOW-RS bulk data part
    says it (`image/jls; transfer-syntax=...`), or by the media type's default (PS3.18 Table
    8.7.3-2); octet-stream is native little endian, or a frame of a syntax the archive sends
    as octet-stream (_OCTET_STREAM_FRAMES) when it names one; None for anything else."""
    rng = parse_content_type(media_type)
    named = rng.params.get("transfer-syntax")
    if rng.essence == APPLICATION_OCTET_STREAM:  # native: little endian (PS3.18 10.5.1.4)
        if named in _OCTET_STREAM_FRAMES:
            return named
        return EXPLICIT_VR_LITTLE_ENDIAN if named in (None, EXPLICIT_VR_LITTLE_ENDIAN) else None
    if named and frame_media_type(named) == rng.essence:
        return named
    return None if named else _DEFAULT_FRAME_TS.get(rng.essence)


def frame_media_type(transfer_syntax_uid: str) -> str:
    """The media type of one frame stored in `transfer_syntax_uid` (octet-stream if native)."""
    if transfer_syntax_uid in _NATIVE:
        return APPLICATION_OCTET_STREAM
    return _FRAME_MEDIA_TYPES.get(transfer_syntax_uid, APPLICATION_OCTET_STREAM)


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
            explicit = EXPLICIT_VR_LITTLE_ENDIAN
            options = [explicit] if stored_ts != explicit and explicit in targets else []
            choice = _open_choice(rng, [*options, STORED], stored_ts, lambda _: APPLICATION_DICOM)
            if choice is not None:
                return choice
            continue
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
    # Native frames as stored are sent uncompressed, octet-stream in Explicit VR Little
    # Endian (retrieve/frames.py): that is what a q=0 range refusing them refuses.
    sent_as = EXPLICIT_VR_LITTLE_ENDIAN if stored_ts in _NATIVE else stored_ts
    allowed: dict[int, list[str]] = {}
    for rng in parse_accept(accept):
        part = _related_type(rng, APPLICATION_OCTET_STREAM)
        if part is None:
            continue
        ts = rng.params.get("transfer-syntax")
        if ts is None and _names_no_type(rng, part, APPLICATION_OCTET_STREAM):
            options = [EXPLICIT_VR_LITTLE_ENDIAN] if EXPLICIT_VR_LITTLE_ENDIAN in targets else []
            choice = _open_choice(rng, [*options, STORED], sent_as, frame_media_type)
            if choice is not None:
                return choice
            continue
        # What no q=0 range with parameters refuses to this one (`type="image/*"`); ranges
        # of one part type share their refused ranges: worked out once (MAX_ACCEPT_RANGES).
        if id(rng.refused) not in allowed:
            allowed[id(rng.refused)] = [
                t for t in targets if _open_choice(rng, [t], sent_as, frame_media_type)
            ]
        choice = _named_frames(part, ts, stored_ts, allowed[id(rng.refused)])
        if choice is not None and _open_choice(rng, [choice], sent_as, frame_media_type):
            return choice
    raise NotAcceptableError(
        f'acceptable: multipart/related; type="application/octet-stream" (uncompressed) or an '
        f"image type, {_options(stored_ts, targets)}{'; ' + why if why else ''}"
    )


def _open_choice(
    rng: MediaRange, options: list[str], stored_ts: str, part_type: Callable[[str], str]
) -> str | None:
    """The first of `options` (transfer syntaxes, or STORED) that a range naming no part type
    (`*/*`) takes: one that no q=0 multipart/related range of the same Accept refuses
    (`multipart/related; type="application/octet-stream"; q=0, */*` takes no uncompressed
    frame: RFC 9110 12.5.1, the most specific range gives a representation its quality).
    `part_type(ts)`: the part media type of the resource in that transfer syntax."""
    for choice in options:
        concrete = stored_ts if choice == STORED else choice
        if not refused_to(rng, part_type(concrete), concrete, stored_ts):
            return choice
    return None


def refused_to(rng: MediaRange, part: str, ts: str, stored_ts: str) -> bool:
    """Whether a q=0 multipart/related range of the Accept refuses to the range `rng` (a
    wildcard: `*/*`, `type="*/*"`) parts of media type `part` in transfer syntax `ts`, the
    resource being stored in `stored_ts` (_refuses; RFC 9110 12.5.1)."""
    return any(_refuses(r, part, ts, stored_ts) for r in rng.refused)


def _refuses(refused: MediaRange, part: str, ts: str, stored_ts: str) -> bool:
    """Whether a q=0 multipart/related range refuses parts of media type `part` in transfer
    syntax `ts`: its type covers `part`, and its transfer syntax (`*`: as stored) is `ts`.
    With none, application/dicom and octet-stream mean Explicit VR Little Endian (PS3.18
    8.7.3.5.2, 8.7.3.3.2); an image or video type is refused in any syntax (a lossy JPEG
    frame is sent as stored for image/jpeg with none, _image_frames)."""
    if refused.essence != MULTIPART_RELATED:
        return False
    named = refused.params.get("type", part).lower()
    if not _type_matches(named, part):
        return False
    wanted = refused.params.get("transfer-syntax")
    if wanted is None:
        return part.startswith(("image/", "video/")) or ts == EXPLICIT_VR_LITTLE_ENDIAN
    return (stored_ts if wanted == STORED else wanted) == ts


def _named_frames(part: str, ts: str | None, stored_ts: str, targets: list[str]) -> str | None:
    """What a range naming part type `part` (octet-stream, an image or video type, or a
    wildcard with a transfer syntax) with transfer syntax `ts` takes, or None."""
    if part in ("*/*", "application/*", APPLICATION_OCTET_STREAM):
        return _uncompressed_frames(ts, stored_ts, targets)
    return _image_frames(part, ts, stored_ts, frame_media_type(stored_ts), targets)


def _uncompressed_frames(ts: str | None, stored_ts: str, targets: Collection[str]) -> str | None:
    """What an octet-stream part type (or `*/*`, `application/*`) with transfer syntax `ts`
    takes: the frames as stored, or uncompressed; None when neither is acceptable."""
    # OHIF asks octet-stream with transfer-syntax=* and expects the stored frames.
    if ts in (STORED, stored_ts):
        return STORED
    if (ts or EXPLICIT_VR_LITTLE_ENDIAN) == EXPLICIT_VR_LITTLE_ENDIAN and (
        EXPLICIT_VR_LITTLE_ENDIAN in targets
    ):
        return EXPLICIT_VR_LITTLE_ENDIAN
    return None


def _image_frames(
    part: str, ts: str | None, stored_ts: str, stored_type: str, targets: Collection[str]
) -> str | None:
    """What an image or video part type (`image/jls`, `image/*`, ...) with transfer syntax
    `ts` takes: the frames as stored, or one of `targets`; None when none is acceptable."""
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
    return None


def _type_matches(requested: str, media: str) -> bool:
    return requested == media or (requested.endswith("/*") and media.startswith(requested[:-1]))


BULKDATA_ACCEPTABLE = 'acceptable: multipart/related; type="application/octet-stream"'


def bulkdata_unacceptable(accept: str | None) -> str | None:
    """Why bulk data, sent as multipart/related; type="application/octet-stream" uncompressed
    (PS3.18 8.7.3.4; 8.7.3.3.2: octet-stream with no transfer syntax, or `*`, is Explicit VR
    Little Endian), is not acceptable, or None when it is. A wildcard range takes it unless a
    q=0 range of the same Accept refuses it (`type="application/octet-stream"; q=0, */*`:
    RFC 9110 12.5.1)."""
    refused = False
    for rng in parse_accept(accept):
        part = _related_type(rng, APPLICATION_OCTET_STREAM)
        if part in ("*/*", APPLICATION_OCTET_STREAM, "application/*") and rng.params.get(
            "transfer-syntax"
        ) in (None, STORED, EXPLICIT_VR_LITTLE_ENDIAN):
            # as stored is the value as it is sent: little endian (retrieve.pixeldata)
            explicit = EXPLICIT_VR_LITTLE_ENDIAN
            if not refused_to(rng, APPLICATION_OCTET_STREAM, explicit, explicit):
                return None
            refused = True
    return BULKDATA_ACCEPTABLE + ("; the Accept refuses it (q=0)" if refused else "")


def negotiate_bulkdata(accept: str | None) -> None:
    """406 unless bulk data is acceptable (bulkdata_unacceptable)."""
    why = bulkdata_unacceptable(accept)
    if why is not None:
        raise NotAcceptableError(why)


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


# Start Of Frame markers of the JPEG processes DICOM has transfer syntaxes for (PS3.5 A.4.1).
_SOF_SYNTAX = {0xC0: "1.2.840.10008.1.2.4.50", 0xC1: "1.2.840.10008.1.2.4.51"}
_SOF_LOSSLESS = 0xC3
# Markers without a length (ISO 10918-1 B.1.1.3): TEM, RSTn, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
# Segments walked before giving up on finding the frame header.
_JPEG_MAX_SEGMENTS = 64


def jpeg_process(fh: BinaryIO) -> str | None:
    """Baseline (.4.50), Extended (.4.51), Lossless (.4.57) or Lossless SV1 (.4.70: the scan's
    predictor selection value is 1) from a JPEG codestream's markers; None when it is none
    of these (progressive, arithmetic, hierarchical or not JPEG)."""
    if fh.read(2) != b"\xff\xd8":
        return None
    lossless = False
    for _ in range(_JPEG_MAX_SEGMENTS):
        marker = fh.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if marker[1] in _STANDALONE or marker[1] == 0xFF:
            continue
        head = fh.read(2)
        if len(head) < 2:
            return None
        length = struct.unpack(">H", head)[0]
        body = fh.read(max(length - 2, 0))
        if marker[1] in _SOF_SYNTAX:
            return _SOF_SYNTAX[marker[1]]
        if marker[1] == _SOF_LOSSLESS:
            lossless = True
        elif 0xC0 <= marker[1] <= 0xCF and marker[1] not in (0xC4, 0xC8, 0xCC):
            return None  # another process: progressive, hierarchical, arithmetic
        elif marker[1] == 0xDA:  # start of scan: Ss, the predictor, follows the components
            if not lossless or len(body) < 1 + 2 * body[0] + 1:
                return None
            selection = body[1 + 2 * body[0]]
            return "1.2.840.10008.1.2.4.70" if selection == 1 else "1.2.840.10008.1.2.4.57"
    return None
