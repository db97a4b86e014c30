"""DICOM JSON (PS3.18 Annex F) both ways, and the JSON documents the services answer with."""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from dicomweb_server.attributes import tag_hex
from dicomweb_server.errors import FailureReason, WarningReason

__all__ = [
    "BULK_DATA_THRESHOLD_BYTES",
    "BULK_VRS",
    "IMPLICIT_VR_CACHE_SIZE",
    "InstanceOutcome",
    "absolutize_bulk_uris",
    "absolutize_bulk_uris_bytes",
    "dataset_to_json",
    "raw_vr",
    "simple_json",
    "stow_response",
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

    `bulk_uri` maps a tag path (``"7FE00010"``, ``"54000100/0/54001010"``) to the URI. Values that
    pydicom deferred (read with `defer_size`) are never read: they are bulk data by definition.
    With `fast`, common elements not yet converted by pydicom are rendered from their raw bytes
    (`simple_json`); without, pydicom renders every element (the reference the tests use).
    """
    return _walk(ds, "", bulk_uri, threshold, fast)


def _walk(
    ds: Dataset, prefix: str, bulk_uri: Callable[[str], str], threshold: int, fast: bool = True
) -> JsonDict:
    out: JsonDict = {}
    little = ds.original_encoding[1] is True  # unknown: numbers go through pydicom
    for tag in sorted(ds.keys()):
        key = tag_hex(tag)
        path = prefix + key
        item = ds.get_item(tag)
        if fast and isinstance(item, RawDataElement) and item.value is not None:
            simple = simple_json(item, little)
            if simple is not None:
                out[key] = simple
                continue
        if _is_deferred_bulk(tag, item):
            assert isinstance(item, RawDataElement)
            out[key] = {"vr": raw_vr(tag, item), "BulkDataURI": bulk_uri(path)}
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            items = [
                _walk(sub, f"{path}/{i}/", bulk_uri, threshold, fast)
                for i, sub in enumerate(elem.value)
            ]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        else:
            out[key] = elem.to_json_dict(_uri_for(bulk_uri, path), threshold)
    return out


# The VRs `simple_json` renders straight from the raw bytes, and how (see there).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI"})
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_SIMPLE_VRS = _TEXT_VRS | {"IS", "DS", "PN"} | _BINARY_FORMATS.keys()
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
_INTEGER = re.compile(r"[+-]?[0-9]{1,10}")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def simple_json(raw: RawDataElement, little: bool) -> JsonDict | None:
    """The DICOM JSON of a common element read from its raw bytes, or None to let pydicom do it.

    pydicom converts each element to a DataElement and then to JSON; for the dozens of short
    text and number elements of a typical header that is most of the cost of a STOW's parse.
    Only the plain cases are handled here: a VR from the table above, a value of
    printable ASCII (the same characters in every DICOM character set, PS3.5 6.1), no empty
    value in a multi-value and no leading or trailing spaces inside one, numbers that Python
    reads exactly as pydicom does. Anything else goes through pydicom (tests/test_dicom_json.py
    checks both give the same JSON on the sample corpus). An element of an implicit VR data set
    (no VR in the file) takes its VR from the data dictionary when that is unambiguous.
    """
    vr = raw.VR or _implicit_vr(raw.tag)
    value = raw.value
    if vr is None or not isinstance(value, bytes):
        return None
    fmt = _BINARY_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if not little or len(value) % size:
            return None
        if not value:
            return {"vr": vr}
        numbers = struct.unpack(f"<{len(value) // size}{fmt}", value)
        return {"vr": vr, "Value": [float(n) for n in numbers] if fmt in "fd" else list(numbers)}
    if vr not in _TEXT_VRS and vr not in ("IS", "DS", "PN"):
        return None
    value = value.rstrip(b"\x00 ")
    if not _PRINTABLE.fullmatch(value):
        return None
    text = value.decode("ascii")
    if not text:
        return {"vr": vr}
    items = text.split("\\")
    if any(not v or v != v.strip() for v in items):
        return None
    if vr in _TEXT_VRS:
        return {"vr": vr, "Value": items}
    if vr == "PN":
        if "=" in text:
            return None
        return {"vr": vr, "Value": [{"Alphabetic": v} for v in items]}
    if vr == "IS":
        if not all(_INTEGER.fullmatch(v) for v in items):
            return None
        return {"vr": vr, "Value": [int(v) for v in items]}
    if not all(_DECIMAL.fullmatch(v) for v in items):
        return None
    return {"vr": vr, "Value": [float(v) for v in items]}


def _uri_for(bulk_uri: Callable[[str], str], path: str) -> Callable[[DataElement], str]:
    def handler(_elem: DataElement) -> str:
        return bulk_uri(path)

    return handler


def absolutize_bulk_uris(json_text: str, base_url: str) -> str:
    """Prefix the root-relative BulkDataURIs of stored JSON text with the public base URL.

    In JSON text produced by PostgreSQL's jsonb output, the sequence ``"BulkDataURI": "`` can only
    be a key followed by its value: quotes inside string values are escaped.
    """
    return json_text.replace(f"{_BULK_URI_KEY}/", f"{_BULK_URI_KEY}{base_url}/")


def absolutize_bulk_uris_bytes(json_bytes: bytes, base_url: str) -> bytes:
    """`absolutize_bulk_uris` of UTF-8 JSON bytes."""
    key = _BULK_URI_KEY.encode("ascii")
    return json_bytes.replace(key + b"/", key + base_url.encode("utf-8") + b"/")


_BULK_URI_KEY = '"BulkDataURI": "'


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one part of a STOW-RS request."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: FailureReason | None = None
    warning: WarningReason | None = None
    retrieve_path: str | None = None  # root-relative RetrieveURL of a stored instance
    duplicate: bool = False  # the same bytes were already stored: nothing new was written
    reason: str = ""  # human-readable, sent as a Warning header text too


def _sop_ref(o: InstanceOutcome) -> JsonDict:
    item: JsonDict = {}
    if o.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
    if o.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
    return item


def stow_response(
    outcomes: Iterable[InstanceOutcome], base_url: str, study_path: str | None
) -> JsonDict:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-3)."""
    referenced: list[JsonDict] = []
    failed: list[JsonDict] = []
    for o in outcomes:
        item = _sop_ref(o)
        if o.failure is not None:
            item["00081197"] = {"vr": "US", "Value": [int(o.failure)]}
            failed.append(item)
            continue
        if o.retrieve_path:
            item["00081190"] = {"vr": "UR", "Value": [base_url + o.retrieve_path]}
        if o.warning is not None:
            item["00081196"] = {"vr": "US", "Value": [int(o.warning)]}
        referenced.append(item)
    doc: JsonDict = {}
    if study_path:
        doc["00081190"] = {"vr": "UR", "Value": [base_url + study_path]}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        doc["00081199"] = {"vr": "SQ", "Value": referenced}
    return doc


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
