"""DICOM JSON (PS3.18 Annex F) both ways. The JSON documents the services answer with (the STOW-RS
response, BulkDataURIs made absolute) are response_json's."""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import struct
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.hooks import raw_element_vr as pydicom_raw_element_vr
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from dicomweb_server.attributes import tag_hex
from dicomweb_server.vr import swapped_words

__all__ = [
    "BINARY_FORMATS",
    "BULK_DATA_THRESHOLD_BYTES",
    "BULK_VRS",
    "IMPLICIT_VR_CACHE_SIZE",
    "IS_MAX",
    "IS_MIN",
    "JSON_EXACT_INTEGER",
    "NUMBER_STRING_VRS",
    "dataset_from_json",
    "dataset_to_json",
    "first_number",
    "lut_data_vr",
    "number_string_element",
    "number_string_json",
    "raw_vr",
    "simple_json",
    "tag_name",
]

# Binary values longer than this are replaced by a BulkDataURI (PS3.18 F.2.6).
BULK_DATA_THRESHOLD_BYTES = 1024
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

JsonDict = dict[str, Any]


def raw_vr(tag: int, raw: RawDataElement) -> str:
    """The VR of a raw element: explicit in the file, else from the data dictionary."""
    if raw.VR:
        return str(raw.VR)
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    if " or " in vr:  # e.g. "OB or OW": binary values are OW unless 8-bit (PS3.5 A.1)
        return "OW" if "OW" in vr else vr.split(" or ")[0]
    return vr


def tag_name(tag: int) -> str:
    """`(gggg,eeee) Keyword` for a reason given to a client; the keyword left out when the data
    dictionary has none (a private tag)."""
    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {keyword}" if keyword else "")


# LUT Data and the LUT Descriptor of its item, which says whether it is US or OW.
_LUT_DATA, _LUT_DESCRIPTOR = 0x00283006, 0x00283002


def lut_data_vr(raw: RawDataElement, data: dict[str, Any], **kwargs: Any) -> None:
    """pydicom's "raw_element_vr" hook (installed by dicomfile.configure_pydicom): pydicom's
    own, and a VR for LUT Data (0028,3006) read with implicit VR whatever its item holds. Its
    dictionary VR is "US or OW": US when the first value of the item's LUT Descriptor is 1
    (one entry, PS3.3 C.11.1.1.1), else OW, as pydicom resolves it. pydicom raised when the
    item has no LUT Descriptor (AttributeError, "Failed to resolve ambiguous VR") or one of a
    single value, and the instance was refused; invalid values are stored as sent, and such
    LUT Data is OW, as implicit VR gives the other binary values whose VR depends on the data
    set (PS3.5 A.1: Pixel Data, Overlay Data, Waveform Data)."""
    pydicom_raw_element_vr(raw, data, **kwargs)
    if raw.tag != _LUT_DATA or data.get("VR") != "US or OW":
        return
    ds = kwargs.get("ds")
    try:
        value = ds[_LUT_DESCRIPTOR].value if ds is not None and _LUT_DESCRIPTOR in ds else None
        first = value[0] if isinstance(value, list | MultiValue) and len(value) else value
    except Exception:  # a descriptor pydicom cannot read: nothing to decide by
        first = None
    data["VR"] = "US" if first == 1 else "OW"


def _is_deferred_bulk(tag: int, item: Any) -> bool:
    return (
        isinstance(item, RawDataElement)
        and item.value is None
        and item.length > 0
        and raw_vr(tag, item) in BULK_VRS
    )


def dataset_to_json(
    ds: Dataset,
    bulk_uri: Callable[[str], str],
    threshold: int = BULK_DATA_THRESHOLD_BYTES,
    *,
    fast: bool = True,
) -> JsonDict:
    """DICOM JSON of `ds`; large binary values become BulkDataURIs.

    `bulk_uri` maps a tag path (``"7FE00010"``, ``"54000100/0/54001010"``) to the URI. Binary
    values that pydicom deferred (read with `defer_size`) are never read: they are bulk data.
    With `fast`, common elements not yet converted by pydicom are rendered from their raw bytes
    (`simple_json`); without, pydicom renders every element (the reference the tests use) but
    DS and IS, which are always ours (`number_string_json`).
    """
    return _walk(ds, "", bulk_uri, threshold, fast)


def _walk(
    ds: Dataset, prefix: str, bulk_uri: Callable[[str], str], threshold: int, fast: bool = True
) -> JsonDict:
    out: JsonDict = {}
    little = ds.original_encoding[1] is True  # unknown: numbers go through pydicom
    for tag in sorted(ds.keys()):
        if not tag & 0xFFFF:
            # "Group Length (gggg,0000) attributes shall not be included" (PS3.18 F.2.2).
            continue
        key = tag_hex(tag)
        # A deferred value stays unread here: bulk data is never read to be described.
        item = ds.get_item(tag, keep_deferred=True)
        if fast and isinstance(item, RawDataElement) and item.value is not None:
            simple = simple_json(item, little)
            if simple is not None:
                out[key] = simple
                continue
        out[key] = _element_json(ds, tag, item, prefix + key, bulk_uri, threshold, fast)
    return out


def _element_json(
    ds: Dataset,
    tag: int,
    item: DataElement | RawDataElement,
    path: str,
    bulk_uri: Callable[[str], str],
    threshold: int,
    fast: bool,
) -> JsonDict:
    """The DICOM JSON of an element of `ds` that _walk's fast path (simple_json) left: bulk
    data, DS and IS, sequences (walked, at `path`), person names, and pydicom's for the rest."""
    if _is_deferred_bulk(tag, item):
        assert isinstance(item, RawDataElement)
        return {"vr": raw_vr(tag, item), "BulkDataURI": bulk_uri(path)}
    if isinstance(item, RawDataElement) and raw_vr(tag, item) in NUMBER_STRING_VRS:
        # Ours on either path, not pydicom's, which refuses values it cannot convert.
        if item.value is None and item.length:  # deferred: a long multi-valued DS
            item = read_deferred_data_element(
                ds.fileobj_type, ds.filename or ds.buffer, ds.timestamp, item
            )
        return number_string_json(raw_vr(tag, item), item.value or b"")
    if isinstance(item, RawDataElement) and (
        cut := _cut_numbers_json(raw_vr(tag, item), item.value)
    ):
        return cut
    elem = ds[tag]
    if cut := _cut_numbers_json(elem.VR, elem.value):  # one converted before, read as bytes
        return cut
    if elem.VR in NUMBER_STRING_VRS:
        return _number_string_element(elem)
    if elem.VR == "SQ":
        items = [
            _walk(sub, f"{path}/{i}/", bulk_uri, threshold, fast)
            for i, sub in enumerate(elem.value)
        ]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if elem.VR == "PN":
        return _person_name_element(elem)
    if elem.VR == "AT":
        return _tags_element(elem)
    entry = _json_values(_pydicom_json(elem, bulk_uri, path, threshold))
    if ds.original_encoding[1] is False and "InlineBinary" in entry:
        entry["InlineBinary"] = _little_endian_base64(elem)
    return entry


def _cut_numbers_json(vr: str, value: object) -> JsonDict | None:
    """A binary number value whose length is no multiple of its VR's size (PS3.5 6.2: a US of
    3 bytes, a private UL of 2), as UN with its bytes (PS3.18 F.2.7), or None for any other.
    pydicom refuses to convert one ("Expected total bytes to be an even multiple of bytes per
    value"), and the instance was refused for it, a private element's too (dcmtk reads it,
    Orthanc stores it). Invalid values are stored as sent; the metadata says what the bytes
    are rather than guess whole numbers from them."""
    fmt = BINARY_FORMATS.get(vr)
    if fmt is None or not isinstance(value, bytes) or len(value) % struct.calcsize(fmt) == 0:
        return None
    return {"vr": "UN", "InlineBinary": base64.b64encode(value).decode("ascii")}


def _tags_element(elem: DataElement) -> JsonDict:
    """An AT element's JSON: each tag 8 hex digits (PS3.18 F.2.3). pydicom reads a value whose
    length is not a multiple of 4 (PS3.5 6.2) as the whole tags it holds; one of 6 bytes, a
    single tag, came as a list within its value, which pydicom's JSON could not format
    ("unsupported format string passed to MultiValue.__format__") and the instance was
    refused. Invalid values are stored as sent: the metadata gives the whole tags, as for a
    value of 10 bytes (two) or 2 (none)."""
    value = elem.value
    tags = list(value) if isinstance(value, list | MultiValue) else [value]
    flat = [t for v in tags for t in (v if isinstance(v, list | MultiValue) else [v])]
    values = [f"{int(t):08X}" for t in flat if t is not None and t != ""]
    return {"vr": "AT", "Value": values} if values else {"vr": "AT"}


def _pydicom_json(
    elem: DataElement, bulk_uri: Callable[[str], str], path: str, threshold: int
) -> JsonDict:
    """pydicom's JSON of an element, a binary value longer than `threshold` bytes a
    BulkDataURI, as on the raw path (a value pydicom deferred, read with that defer_size).
    pydicom's own threshold counts the base64 text: given 1024 it made every value over 768
    bytes bulk data, so it gets the handler only for a value past ours (PS3.18 F.2.6 leaves
    the threshold to the server; BULK_DATA_THRESHOLD_BYTES is ours)."""
    value = elem.value
    large = isinstance(value, bytes | bytearray) and len(value) > threshold
    return elem.to_json_dict(_uri_for(bulk_uri, path) if large else None, 0)


def _json_values(entry: JsonDict) -> JsonDict:
    """pydicom's JSON of an element made as on the raw path: the binary numbers JSON cannot
    hold as strings (big endian files, long deferred values, elements after Pixel Data), and
    an empty string value among several as null: "If a multi-valued attribute has one or
    more empty values these are represented as 'null' array elements" (PS3.18 F.2.5)."""
    vr, values = entry.get("vr"), entry.get("Value")
    if values and vr in ("FL", "FD"):
        entry["Value"] = [v if v is None else _float_json(v) for v in values]
    elif values and vr in ("SV", "UV"):
        entry["Value"] = [v if v is None else _integer_json(v) for v in values]
    elif values and vr in _MULTI_TEXT_VRS and "" in values:
        entry["Value"] = [v or None for v in values]
    return entry


def _person_name_element(elem: DataElement) -> JsonDict:
    """The JSON of a PN element pydicom converted: each value an object of its non-empty
    component groups only ("Alphabetic", "Ideographic", "Phonetic", PS3.18 F.2.2: `=山田^太郎`
    has no "Alphabetic"); an empty value among several is null (F.2.5), and so is one of
    delimiters only (`==`), which names no one. pydicom's own to_json_dict writes empty
    groups, and fails on an empty value among several."""
    value = elem.value
    values = list(value) if isinstance(value, list | MultiValue) else [value]
    out = []
    for v in values:
        groups = zip(_PN_GROUPS, v.components, strict=False) if v else ()
        out.append({g: c for g, c in groups if c} or None)
    if out == [None]:
        return {"vr": "PN"}
    return {"vr": "PN", "Value": out}


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _little_endian_base64(elem: DataElement) -> str:
    """The InlineBinary of an element of a big endian data set: DICOM JSON carries binary
    values little endian (PS3.18 F.2.7 encodes the value as Explicit VR Little Endian does), so
    the words of OW, OF, OL, OD and OV values are swapped (OB and UN are bytes: as they are)."""
    return base64.b64encode(swapped_words(bytes(elem.value), str(elem.VR))).decode("ascii")


# The VRs `simple_json` renders straight from the raw bytes, the fast path of the DICOM JSON
# walk: pydicom converts each element to a DataElement and then to JSON; for the dozens of
# short text and number elements of a typical header that is most of the cost of a STOW's
# parse. Only the plain cases are: a VR from these tables, a value of printable ASCII (the same
# characters in every DICOM character set, PS3.5 6.1) and no leading or trailing spaces inside
# a multi-value. Anything else goes through pydicom (tests/test_dicom_json.py checks both give
# the same JSON on the sample corpus).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI"})
# String VRs that may hold several values (PS3.5 6.4): an empty one among them is null.
_MULTI_TEXT_VRS = _TEXT_VRS | {"UC"}
BINARY_FORMATS = {
    "US": "H",
    "SS": "h",
    "UL": "I",
    "SL": "i",
    "FL": "f",
    "FD": "d",
    "SV": "q",
    "UV": "Q",
}
# DS and IS: JSON Numbers when valid and exact, else strings (number_string_json).
NUMBER_STRING_VRS = frozenset({"DS", "IS"})
# The range of an IS value (PS3.5 6.2); a value outside is invalid and kept as a string.
IS_MIN, IS_MAX = -(2**31), 2**31 - 1
# Integers that a JSON reader holding numbers as IEEE 754 doubles keeps exactly (SV, UV).
JSON_EXACT_INTEGER = 2**53
_SIMPLE_VRS = _TEXT_VRS | NUMBER_STRING_VRS | {"PN"} | BINARY_FORMATS.keys()
# Tags whose implicit VR `_implicit_vr` remembers: a file may carry any number of distinct tags.
IMPLICIT_VR_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=IMPLICIT_VR_CACHE_SIZE)
def _implicit_vr(tag: int) -> str | None:
    """The VR an element of an implicit VR data set takes from the data dictionary, as pydicom
    gives it (PS3.5 7.1.3), when that is one VR `simple_json` renders; None leaves the element to
    pydicom: private tags, group lengths, unknown tags and ambiguous VRs ("US or SS", whose
    choice depends on other elements)."""
    if (tag >> 16) % 2 or not tag & 0xFFFF:
        return None
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return None
    return vr if vr in _SIMPLE_VRS else None


_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_INTEGER = re.compile(r"[+-]?[0-9]{1,12}")  # IS: 12 bytes at most (PS3.5 6.2)
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def simple_json(raw: RawDataElement, little: bool) -> JsonDict | None:
    """The DICOM JSON of a common element read from its raw bytes, or None to let pydicom do it
    (the plain cases only: see the comment at _TEXT_VRS). An empty value among several is null
    (PS3.18 F.2.5); DS and IS are always rendered here (number_string_json), binary numbers
    that JSON cannot hold exactly as strings (_float_json, _integer_json). In an implicit VR
    data set, an element takes its VR from the data dictionary when unambiguous (_implicit_vr)."""
    vr = raw.VR or _implicit_vr(raw.tag)
    value = raw.value
    if vr is None or not isinstance(value, bytes):
        return None
    if vr in NUMBER_STRING_VRS:
        return number_string_json(vr, value)
    fmt = BINARY_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if not little or len(value) % size:
            return None
        if not value:
            return {"vr": vr}
        numbers = struct.unpack(f"<{len(value) // size}{fmt}", value)
        if (wide := _WIDE_NUMBER_JSON.get(vr)) is not None:  # FL, FD, SV, UV: not every value fits
            return {"vr": vr, "Value": list(map(wide, numbers))}
        return {"vr": vr, "Value": list(numbers)}
    if vr not in _TEXT_VRS and vr != "PN":
        return None
    value = value.rstrip(b"\x00 ")
    if not _PRINTABLE.fullmatch(value):
        return None
    text = value.decode("ascii")
    if not text:
        return {"vr": vr}
    items = text.split("\\")
    if any(v != v.strip() for v in items):
        return None
    values: list[Any] = [v or None for v in items] if "" in items else items  # PS3.18 F.2.5
    if vr in _TEXT_VRS:
        return {"vr": vr, "Value": values}
    if "=" in text:
        return None
    return {"vr": vr, "Value": [{"Alphabetic": v} if v else None for v in values]}


def number_string_json(vr: str, value: bytes) -> JsonDict:
    """The DICOM JSON of a DS or IS element from its raw bytes: each value a JSON Number when
    it is valid and the number says exactly what the string does, else the string as it came
    (PS3.18 F.2.3: "a JSON String representation can be used to preserve the original format
    ... or if needed to avoid losing precision"; field notes 12). An archive keeps what it is
    sent: `1,5`, `NaN` or `abc` in a DS is stored and shown, never a reason to refuse the
    instance. An empty value among several is null (PS3.18 F.2.5)."""
    # The default repertoire only (PS3.5 6.2); a stray byte is shown as U+FFFD.
    text = value.decode("ascii", "replace").rstrip("\x00 ")
    if not text:
        return {"vr": vr}
    return {"vr": vr, "Value": [_number_string_value(vr, v) for v in text.split("\\")]}


def _number_string_value(vr: str, text: str) -> int | float | str | None:
    v = text.strip(" ")  # leading and trailing spaces are padding (PS3.5 6.2)
    if not v:
        return None
    if vr == "IS":
        if _INTEGER.fullmatch(v) and IS_MIN <= (n := int(v)) <= IS_MAX:
            return n
        return text  # out of range or not an integer string ("12.0"): as sent
    if _DECIMAL.fullmatch(v):
        f = float(v)
        if math.isfinite(f) and _exact(v, f):
            return f
    return text


def _exact(v: str, f: float) -> bool:
    """Whether the JSON number written for `f` (its shortest repr) is the decimal `v`: any
    decimal of at most 15 significant digits is (IEEE 754 binary64); longer ones are checked."""
    if "e" not in v and "E" not in v and len(v.lstrip("+-0.").replace(".", "")) <= 15:
        return True
    return Decimal(v) == Decimal(repr(f))


def _number_string_element(elem: DataElement) -> JsonDict:
    """number_string_json of a DS or IS element pydicom already converted (or built): its
    values as they were written (pydicom keeps the original string), else as pydicom has them."""
    value = elem.value
    values = list(value) if isinstance(value, list | MultiValue) else [value]
    texts = ["" if v is None else str(getattr(v, "original_string", None) or v) for v in values]
    if texts == [""]:
        return {"vr": elem.VR}
    return {"vr": elem.VR, "Value": [_number_string_value(elem.VR, t) for t in texts]}


def _float_json(n: float) -> float | str:
    """An FL or FD value: JSON has no NaN or infinity (RFC 8259 6), and PostgreSQL refuses
    them in jsonb; they are written as the strings "NaN", "Infinity" and "-Infinity"."""
    if math.isfinite(n):
        return float(n)
    return "NaN" if math.isnan(n) else ("Infinity" if n > 0 else "-Infinity")


def _integer_json(n: int) -> int | str:
    """An SV or UV value: a JSON Number when a reader holding numbers as IEEE 754 doubles
    (JavaScript) keeps it exactly, else its decimal string (PS3.18 F.2.3)."""
    return n if -JSON_EXACT_INTEGER <= n <= JSON_EXACT_INTEGER else str(n)


# The binary numbers JSON cannot hold exactly as they are (simple_json).
_WIDE_NUMBER_JSON: dict[str, Callable[[Any], float | int | str]] = {
    "FL": _float_json,
    "FD": _float_json,
    "SV": _integer_json,
    "UV": _integer_json,
}


def _uri_for(bulk_uri: Callable[[str], str], path: str) -> Callable[[DataElement], str]:
    def handler(_elem: DataElement) -> str:
        return bulk_uri(path)

    return handler


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def number_string_element(tag: int, entry: JsonDict) -> RawDataElement | None:
    """The element of a DS or IS attribute whose DICOM JSON keeps a value as a string (as
    number_string_json writes, or as a client sends: PS3.18 F.2.3 allows both), written as its
    values' text; None when every value is a number (pydicom converts those). pydicom would
    refuse to convert an invalid string (`1,5`); the archive keeps it as it came."""
    values = entry.get("Value") or []
    if entry.get("vr") not in NUMBER_STRING_VRS or not any(isinstance(v, str) for v in values):
        return None
    texts = ("" if v is None else v if isinstance(v, str) else repr(v) for v in values)
    value = "\\".join(texts).encode("ascii", "replace")
    value += b" " * (len(value) % 2)  # even length, space padded (PS3.5 7.1.1, 6.2)
    return RawDataElement(BaseTag(tag), entry["vr"], len(value), value, 0, False, True)


def dataset_from_json(
    doc: JsonDict, bulk: Callable[[str, str, str], bytes | None] | None = None
) -> Dataset:
    """A data set from DICOM JSON, numbers given as numbers or strings (PS3.18 F.2.3, field
    notes 12: accept both), at any depth; `bulk(tag, vr, uri)` gives a BulkDataURI's value.
    ValueError (or pydicom's own errors) when the document is not DICOM JSON."""
    if not isinstance(doc, dict):
        raise ValueError("a DICOM JSON data set must be an object")
    plain: JsonDict = {}
    sequences: dict[int, list[Dataset]] = {}
    texts: dict[int, RawDataElement] = {}
    for key, entry in doc.items():
        if not isinstance(entry, dict):
            raise ValueError(f"attribute {key!r} is not an object")
        tag = int(key, 16)
        if entry.get("vr") == "SQ":
            sequences[tag] = [dataset_from_json(item, bulk) for item in entry.get("Value") or []]
        elif (raw := number_string_element(tag, entry)) is not None:
            texts[tag] = raw
        else:
            plain[key] = entry
    ds = Dataset.from_json(plain, bulk) if bulk else Dataset.from_json(plain)
    for tag, items in sequences.items():
        ds[tag] = DataElement(tag, "SQ", Sequence(items))
    for tag, raw in texts.items():
        ds._dict[BaseTag(tag)] = raw
    return ds


def first_number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a possibly multi-valued numeric attribute (Window Center and Width
    may have several); None when absent or not a finite number. The archive keeps invalid
    values as they were sent (`1,5`, `NaN`): whoever reads them does without them."""
    try:
        value = ds.get(keyword)
        if isinstance(value, MultiValue | list | tuple):
            value = value[0]
        number = None if value is None or value == "" else float(value)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return number if number is not None and math.isfinite(number) else None
