"""C-FIND and C-MOVE/C-GET identifiers <-> the QIDO query model (PS3.4 C.4.1, C.4.2, C.6).

No second query engine: an identifier becomes the same `(keyword, value)` parameters a QIDO-RS
request has, and `query.parse` turns them into a `Query` that `sql.compile_search` compiles.
Pure: datasets in, a Query or a response dataset out.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydicom.charset import (  # the private ones replay encode_string's choice (_encodes)
    _encode_string_impl,
    _encode_string_parts,
    convert_encodings,
    default_encoding,
    encode_string,
)
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

from dicomweb_server.attributes import BY_TAG, ITEM_KEYS, PATIENT_MATCHING_TAGS, Level, tag_hex
from dicomweb_server.dicom_json import dataset_from_json
from dicomweb_server.dicomfile import InvalidInstanceError, check_whole
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import is_empty_name, is_universal
from dicomweb_server.query import QIDO_MAX_LIMIT as _QIDO_MAX_LIMIT
from dicomweb_server.query import Query, parse

__all__ = [
    "ERROR_COMMENT_MAX_CHARS",
    "FIND_PAGE_ROWS",
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "UNABLE_TO_PROCESS",
    "FindRequest",
    "IdentifierError",
    "Model",
    "decode",
    "find_response",
    "parse_find",
    "parse_retrieve",
]

# Rows fetched per database round trip while answering one C-FIND (it pages through every
# match: DIMSE has no result limit).
FIND_PAGE_ROWS = _QIDO_MAX_LIMIT
# PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.4 (C-GET): Failure, Identifier does not
# match SOP Class: a Query/Retrieve Level the model lacks, a key outside the level, a missing
# unique key.
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# Same tables: Failure, Unable to process: a value we cannot match on (malformed date, two
# items in a query sequence).
UNABLE_TO_PROCESS = 0xC000
# Error Comment (0000,0902) is LO (PS3.7 Annex C; PS3.5 Table 6.2-1): 64 characters at most.
ERROR_COMMENT_MAX_CHARS = 64
# What stands for the part of a value an error comment has no room for.
_ELLIPSIS = "..."

_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005
_RETRIEVE_AE_TITLE = 0x00080054
# What a response whose values its stored Specific Character Set cannot encode is sent in.
_UTF8 = {"vr": "CS", "Value": ["ISO_IR 192"]}
# pydicom's Python name for the default repertoire (ISO_IR 6, ISO 2022 IR 6): Latin-1's alias.
_DEFAULT_CODEC = default_encoding
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")
# ISO 2022 escape sequences designating G1 (PS3.3 Tables C.12-3, C.12-4): ESC - F (96-set),
# ESC ) F (94-set, ISO_IR 13), ESC $ ) F (multi-byte).
_G1_ESCAPE = re.compile(rb"\x1b(?:-|\)|\$\))")
_LEVELS = {
    "PATIENT": Level.PATIENT,
    "STUDY": Level.STUDY,
    "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}
# Unique key of each level (PS3.4 C.6.1.1.2-5 and C.6.2.1.2-4).
_UNIQUE_KEY = {
    Level.PATIENT: 0x00100020,  # PatientID
    Level.STUDY: 0x0020000D,  # StudyInstanceUID
    Level.SERIES: 0x0020000E,  # SeriesInstanceUID
    Level.INSTANCE: 0x00080018,  # SOPInstanceUID
}
_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE)


class Model(Enum):
    """The Query/Retrieve information model of the SOP Class used (PS3.4 C.6)."""

    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"


class IdentifierError(Exception):
    """An identifier we refuse, with the DIMSE failure status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class FindRequest:
    query: Query
    level_name: str  # Query/Retrieve Level as sent: PATIENT, STUDY, SERIES or IMAGE
    # Every key of the identifier (matching and return keys) with its VR, in tag order: what
    # each response carries (PS3.4 C.4.1.1.3.2), plus the unique key of the level.
    keys: tuple[tuple[int, str], ...]
    # Keys given a value the archive cannot match on, ignored for matching (and returned as
    # return keys): the pending responses say so, 0xFF01 (PS3.4 C.4.1.1.4, Table C.4-1).
    unsupported: tuple[str, ...] = ()


def decode(data: bytes, implicit_vr: bool, little_endian: bool, deflated: bool,
           max_bytes: int) -> Dataset:  # fmt: skip
    """An identifier as received -> its data set, or IdentifierError (0xC000) when it is cut
    short (PS3.5 7.1: whole data elements; dicomfile.check_whole, as for a C-STORE's data
    set) or, Deflated (PS3.5 A.5), inflates past `max_bytes`. pynetdicom's own decoding
    (event.identifier) reads a value the data ends inside of as the bytes there are and stops
    silently at a header cut short: found by review, `PatientID` declared 4 bytes and sent 2
    was matched as the 2, and a C-FIND answered Success."""
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data, max_bytes + 1)
        except zlib.error as exc:
            reason = f"cannot inflate the identifier: {exc}"
            raise IdentifierError(UNABLE_TO_PROCESS, reason) from None
        if len(data) > max_bytes:
            raise IdentifierError(UNABLE_TO_PROCESS, f"identifier inflates past {max_bytes} bytes")
    if not data:
        return Dataset()
    fp = io.BytesIO(data)
    ds = read_dataset(fp, implicit_vr, little_endian)
    try:
        check_whole(ds, fp.tell(), len(data))
    except InvalidInstanceError as exc:
        raise IdentifierError(UNABLE_TO_PROCESS, exc.message) from None
    ds.set_original_encoding(implicit_vr, little_endian)
    return ds


def _level(ds: Dataset, model: Model) -> tuple[Level, str]:
    name = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
    level = _LEVELS.get(name)
    if level is None:
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"Query/Retrieve Level {name!r} is not PATIENT, STUDY, SERIES or IMAGE",
        )
    if level is Level.PATIENT and model is Model.STUDY_ROOT:
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "the Study Root model has no PATIENT level"
        )
    return level, name


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _text(elem: DataElement) -> str:
    """A string value as sent; several values joined with a backslash (PS3.5 6.4). pydicom's
    IS and DS keep the text they were read from (`original_string`; an IS of 100 nines is
    otherwise the float `1e+100`)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        raise IdentifierError(UNABLE_TO_PROCESS, f"cannot match on binary {_name(elem.tag)}")
    if isinstance(value, MultiValue | list):
        return "\\".join(_as_sent(v) for v in value)
    return _as_sent(value)


def _as_sent(value: object) -> str:
    original = getattr(value, "original_string", None)  # a PersonName's is bytes
    return original if isinstance(original, str) else str(value)


def _comment_quoting(before: str, value: str, after: str) -> str:
    """`before 'value' after` in at most ERROR_COMMENT_MAX_CHARS characters: the value whole
    when it fits, else its start and `...` (the text around it is kept)."""
    room = ERROR_COMMENT_MAX_CHARS - len(before) - len(after) - 2
    if len(value) > room:
        value = value[: max(room - len(_ELLIPSIS), 0)] + _ELLIPSIS
    return f"{before}'{value}'{after}"


def _check_integer(level: Level, keyword: str, value: str) -> None:
    """An IS matching key as query.parse takes it (PS3.5 Table 6.2-1: an integer in
    -2^31..2^31-1), else IdentifierError with a reason that fits an error comment and quotes
    the value: query.parse's own reason, made for a QIDO 400, left room for three digits."""
    try:
        parse(level, [(keyword, value)], {})
    except BadRequestError:
        reason = _comment_quoting(f"{keyword} ", value.strip(), " is no integer in -2^31..2^31-1")
        raise IdentifierError(UNABLE_TO_PROCESS, reason) from None


def _allowed(tag: int, level: Level) -> bool:
    attr = BY_TAG[tag]
    if level is Level.PATIENT:
        return tag in PATIENT_MATCHING_TAGS
    return _ORDER.index(attr.level) <= _ORDER.index(level)


def _has_values(seq: Iterable[Dataset]) -> bool:
    return any(e.value not in (None, "", b"") for item in seq for e in item)


def _matching_params(ds: Dataset, level: Level, unsupported: list[str]) -> list[tuple[str, str]]:
    """The QIDO parameters of the identifier's matching keys. A value on an attribute the
    archive cannot match on (not a matching key, a sequence without keys to match) is an
    Optional Key not supported for matching: left out of the matching, named in
    `unsupported` (PS3.4 C.4.1.1.4: Pending 0xFF01), as Orthanc and dcm4chee ignore them. It
    was refused with 0xC000, so any SCU sending one (PatientWeight, InstitutionName) found
    nothing."""
    params = []
    for elem in ds:
        tag = int(elem.tag)
        if tag in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET, _RETRIEVE_AE_TITLE):
            continue
        if elem.tag.is_private_creator:  # names the block of a private key, always has a value
            continue
        if elem.VR == "SQ":
            if _has_values(elem.value):  # PS3.4 C.2.2.2.6 sequence matching
                params += _sequence_params(tag, elem.value, level, unsupported)
            continue
        value = _text(elem)
        if _is_return_key(elem.VR, value):
            continue
        attr = BY_TAG.get(tag)
        if attr is None or attr.column is None:
            unsupported.append(_name(tag))
            continue
        if not _allowed(tag, level):
            raise IdentifierError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"{attr.keyword} cannot be matched at the {level.value} level",
            )
        if attr.vr == "IS":
            _check_integer(level, attr.keyword, value)
        params.append((attr.keyword, value))
    return params


def _is_return_key(vr: str, value: str) -> bool:
    """A value that is universal matching (PS3.4 C.2.2.2.3): empty or only `*`s, or a PN of
    delimiters only (`^^^^`, the zero-length name): a return key, not an Optional Key not
    supported for matching, and never a 0xFF01 warning (`OtherPatientNames=^^^^` was)."""
    return is_universal(value) or (vr == "PN" and is_empty_name(value))


def _sequence_params(
    tag: int, items: Sequence[Dataset], level: Level, unsupported: list[str]
) -> list[tuple[str, str]]:
    """The keys of a sequence's one item as QIDO attribute paths `Sequence.Key` (query.py
    matches them as keys of one item). Only the sequences and keys attributes.py lists; a
    value in another sequence, or on another key in the item, is an unsupported Optional Key
    (_matching_params)."""
    seq = BY_TAG.get(tag)
    if seq is None or not seq.items:
        unsupported.append(_name(tag))
        return []
    if len(items) != 1:  # PS3.4 C.2.2.2.6: a query sequence holds a single item
        raise IdentifierError(
            UNABLE_TO_PROCESS, f"{seq.keyword} must hold one item to match on, not {len(items)}"
        )
    if not _allowed(tag, level):
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"{seq.keyword} cannot be matched at the {level.value} level",
        )
    params = []
    for elem in items[0]:
        value = _text(elem)
        if _is_return_key(elem.VR, value):  # inside the item
            continue
        key = ITEM_KEYS.get((tag, int(elem.tag)))
        if key is None:  # not a key to match on in this sequence: unsupported, as above
            unsupported.append(f"{seq.keyword}.{_name(int(elem.tag))}")
            continue
        params.append((f"{seq.keyword}.{key.keyword}", value))
    return params


def _parse(level: Level, params: list[tuple[str, str]]) -> Query:
    try:
        return parse(level, [("limit", str(FIND_PAGE_ROWS)), *params], {})
    except BadRequestError as exc:
        raise IdentifierError(UNABLE_TO_PROCESS, exc.message) from None


def parse_find(ds: Dataset, model: Model) -> FindRequest:
    """A C-FIND identifier -> the Query of its level and the keys to return, or
    IdentifierError. Keys above the level may be matched too (relational-style); keys below
    it may only be return keys (they come back empty)."""
    level, name = _level(ds, model)
    unsupported: list[str] = []
    params = _matching_params(ds, level, unsupported)
    keys = {
        int(e.tag): str(e.VR)
        for e in ds
        if int(e.tag) not in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET)
    }
    keys.setdefault(_UNIQUE_KEY[level], "LO" if level is Level.PATIENT else "UI")
    include = ",".join(tag_hex(t) for t in sorted(keys))
    query = _parse(level, [*params, ("includefield", include)])
    return FindRequest(query, name, tuple(sorted(keys.items())), tuple(unsupported))


def parse_retrieve(ds: Dataset, model: Model) -> Query:
    """A C-MOVE/C-GET identifier -> an instance-level Query over the unique keys it gives
    (PS3.4 C.4.2.2.1: the unique key of the level, single value or UID list; unique keys of
    levels above it narrow the match when present)."""
    level, _ = _level(ds, model)
    top = Level.PATIENT if model is Model.PATIENT_ROOT else Level.STUDY
    params = []
    for lvl in _ORDER[_ORDER.index(top) : _ORDER.index(level) + 1]:
        tag = _UNIQUE_KEY[lvl]
        value = _text(ds[tag]).strip() if tag in ds else ""
        if any(c in value for c in "*?"):
            raise IdentifierError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{_name(tag)} must not hold a wildcard"
            )
        if value:
            params.append((_name(tag), value))
        elif lvl is level:
            raise IdentifierError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"{_name(tag)}, the unique key of the {level.value} level, is required",
            )
    return _parse(Level.INSTANCE, params)


def find_response(req: FindRequest, result: Mapping[str, Any], ae_title: str) -> Dataset:
    """One C-FIND match (a QIDO result in DICOM JSON) as the response identifier: exactly
    the keys asked for, empty when the archive has no value (PS3.4 C.4.1.1.3.2), plus the
    Query/Retrieve Level and the Specific Character Set of the values."""
    doc: dict[str, Any] = {}
    for tag, vr in req.keys:
        key = tag_hex(tag)
        found = result.get(key)
        if tag == _RETRIEVE_AE_TITLE:
            doc[key] = {"vr": "AE", "Value": [ae_title]}
        elif found is not None and "BulkDataURI" not in found:
            doc[key] = found
        else:
            doc[key] = {"vr": found["vr"] if found else vr}
    charset = result.get(tag_hex(_SPECIFIC_CHARACTER_SET))
    if not _encodable(doc, charset):
        charset = _UTF8
    if charset is not None:
        doc[tag_hex(_SPECIFIC_CHARACTER_SET)] = charset
    doc[tag_hex(_QUERY_RETRIEVE_LEVEL)] = {"vr": "CS", "Value": [req.level_name]}
    return dataset_from_json(doc)  # a DS or IS kept as a string is sent as its text


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _encodable(doc: Mapping[str, Any], charset: Mapping[str, Any] | None) -> bool:
    """Whether every value of a response can be encoded in the Specific Character Set of its
    result (PS3.5 6.1.2.5: it must cover the whole data set). It need not: a series result
    carries the study's PatientName, stored under the character set of the study's first
    instance, with the Specific Character Set of the series' first instance (found by
    differential testing against Orthanc: a Greek name in a series stored as ISO_IR 100 was
    sent as `?????????`). Then the response is sent in UTF-8, which encodes anything."""
    names = [str(v or "") for v in (charset or {}).get("Value", [])]
    if not any(names):  # the default repertoire (PS3.5 6.1.2.1)
        return all(value.isascii() for value in _strings(doc))
    codecs = convert_encodings(names)
    return all(value.isascii() or _encodes(value, codecs) for value in _strings(doc))


def _encodes(value: str, codecs: list[str]) -> bool:
    """Whether pydicom writes a non-ASCII `value` under `codecs` (its Python names for the
    Specific Character Set) as DICOM reads it back. Not merely whether a codec encodes it
    (found by review): pydicom encodes ISO_IR 13 (JIS X 0201) with its own encoder, which
    has no kanji although Python's shift_jis has (`??^??` was sent), and its name for
    ISO_IR 6 / ISO 2022 IR 6 is an alias of Latin-1, so `Müller` went out as Latin-1 bytes
    under a character set that is ASCII. pydicom's choice is replayed: one codec for the
    whole value, else its parts in several (pydicom.charset.encode_string)."""
    if not any(_encodes_whole(value, c) for c in codecs):
        try:
            _encode_string_parts(value, codecs)
        except (ValueError, UnicodeError):
            return False
    # encode_string now succeeds without replacement characters.
    return codecs[0] != _DEFAULT_CODEC or _g1_designated(encode_string(value, codecs))


def _encodes_whole(value: str, codec: str) -> bool:
    try:
        _encode_string_impl(value, codec)
    except (UnicodeError, LookupError):
        return False
    return True


def _g1_designated(encoded: bytes) -> bool:
    """Whether every byte from 0x80 up follows an escape sequence designating G1 (ESC - F,
    ESC ) I, ESC $ ) C...): under ISO 2022 IR 6 first (or ISO_IR 6) G1 starts undesignated
    and G0 is ASCII (PS3.5 6.1.2.5.3), so pydicom's Latin-1 bytes there, or its GB2312 bytes
    of ISO 2022 IR 58 written without their escape sequence, are not DICOM."""
    high = _HIGH_BYTE.search(encoded)
    return high is None or _G1_ESCAPE.search(encoded, 0, high.start()) is not None
