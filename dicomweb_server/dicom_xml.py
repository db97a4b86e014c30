"""DICOM XML: the Native DICOM Model of PS3.19 A.1 (`application/dicom+xml`), both ways.

The archive keeps DICOM JSON (PS3.18 Annex F); XML is made from it on request (metadata,
QIDO results, the STOW response) and read into it for STOW-RS of XML metadata and bulk
data. The mapping is mechanical (PS3.18 F.1 and PS3.19 A.1.5 describe the same model):

- `DicomAttribute` carries `tag` (upper case), `vr`, the PS3.6 `keyword` of a public tag and, for a
  private data element, the `privateCreator` of its block (the value of (gggg,00xx) in the
  same data set); attributes are written in tag order.
- `Value number="n"` per value (1-based); an empty value among several is a `Value` element
  with no text, as a JSON `null` is in F.2.5. DS and IS are their text; AT is `ggggeeee`.
- `PersonName number="n"` with `Alphabetic`, `Ideographic` and `Phonetic` groups, each split
  at `^` into FamilyName, GivenName, MiddleName, NamePrefix and NameSuffix; empty components
  are left out.
- `Item number="n"` per sequence item; `BulkData uri="..."` and `InlineBinary` (base64) as
  in JSON. Group lengths (gggg,0000) are left out (A.1.1).

XML 1.0 cannot carry the C0 controls but tab, line feed and carriage return, not even as
character references: such characters in a value are written as U+FFFD (the stored data
set keeps them; the JSON representation carries them exactly).
"""

from __future__ import annotations

import functools
import re
from typing import Any
from xml.parsers import expat

from pydicom.datadict import keyword_for_tag
from pydicom.valuerep import format_number_as_ds

from dicomweb_server.errors import BadRequestError

__all__ = [
    "MAX_XML_DEPTH",
    "NATIVE_DICOM_NS",
    "dataset_from_xml",
    "dataset_xml",
]

JsonDict = dict[str, Any]

NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
# Deepest element nesting read from an XML metadata part, the parser's hard limit (checked as
# each element starts, before the document is built): deeper, the request is a 400. A
# sequence level is two elements (DicomAttribute, Item), under NativeDicomModel and above at
# most four of the innermost value (DicomAttribute, PersonName, Alphabetic, FamilyName): 256
# takes sequences nested 125 deep. STOW-RS takes at most stow_json.MAX_JSON_SEQUENCE_DEPTH
# (64) levels, as for JSON, and fails only the instance nested deeper than that (0xC000);
# 128 elements, the limit before, allowed 62 levels and refused the whole request past them.
MAX_XML_DEPTH = 256

_HEAD = (
    f'<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel xmlns="{NATIVE_DICOM_NS}"'
    ' xml:space="preserve">\n'
)
_TAIL = "</NativeDicomModel>\n"
_DS_MAX_CHARS = 16
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
# Characters XML 1.0 cannot carry (2.2 Char), and those its parsers would not keep as sent.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\t": "&#9;", "\n": "&#10;",
     "\r": "&#13;"}
)  # fmt: skip


def dataset_xml(doc: JsonDict) -> bytes:
    """One data set in DICOM JSON as a NativeDicomModel document, UTF-8."""
    out = [_HEAD]
    _dataset(doc, out)
    out.append(_TAIL)
    return "".join(out).encode("utf-8")


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value).translate(_TEXT_ESCAPES)


def _attr(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value).translate(_ATTR_ESCAPES)


@functools.lru_cache(maxsize=4096)
def _keyword(tag: str) -> str:
    """The PS3.6 keyword of a public tag (repeating groups included), '' for private ones."""
    number = int(tag, 16)
    return "" if (number >> 16) % 2 else keyword_for_tag(number)


def _private_creator(tag: str, doc: JsonDict) -> str | None:
    """The creator of a private data element's block: (gggg,10xx-FFxx) is reserved by the
    value of (gggg,00xx) in the same data set (PS3.5 7.8.1)."""
    number = int(tag, 16)
    group, element = number >> 16, number & 0xFFFF
    if group % 2 == 0 or element < 0x1000:
        return None
    entry = doc.get(f"{group:04X}{element >> 8:04X}")
    values = entry.get("Value") if isinstance(entry, dict) else None
    return values[0] if values and isinstance(values[0], str) else None


def _dataset(doc: JsonDict, out: list[str]) -> None:
    for tag in sorted(doc):
        if tag.endswith("0000"):  # "Group Length (gggg,0000) attributes shall not be included"
            continue
        entry = doc[tag]
        vr = str(entry.get("vr", "UN"))
        valid = _is_tag(tag)
        creator = _private_creator(tag, doc) if valid else None
        if creator is None:
            head = f'<DicomAttribute tag="{_attr(tag.upper())}" vr="{_attr(vr)}"'
            keyword = _keyword(tag) if valid else ""
            if keyword:
                head += f' keyword="{keyword}"'
        else:  # (gggg,xxee) of the block `creator` reserved is written gggg00ee
            head = (
                f'<DicomAttribute tag="{tag[:4].upper()}00{tag[6:].upper()}" vr="{_attr(vr)}"'
                f' privateCreator="{_attr(creator)}"'
            )
        body = _attribute_body(vr, entry)
        if body is None:
            out.append(head + "/>\n")
            continue
        out.append(head + ">\n")
        if isinstance(body, str):
            out.append(body)
        else:
            for number, item in body:
                if item:
                    out.append(f'<Item number="{number}">\n')
                    _dataset(item, out)
                    out.append("</Item>\n")
                else:
                    out.append(f'<Item number="{number}"/>\n')
        out.append("</DicomAttribute>\n")


def _is_tag(tag: str) -> bool:
    return len(tag) == 8 and all(c in "0123456789abcdefABCDEF" for c in tag)


def _attribute_body(vr: str, entry: JsonDict) -> str | list[tuple[int, JsonDict]] | None:
    """What goes inside one DicomAttribute: text, the items of a sequence, or None (empty)."""
    if "BulkDataURI" in entry:
        return f'<BulkData uri="{_attr(str(entry["BulkDataURI"]))}"/>\n'
    if "InlineBinary" in entry:
        return f"<InlineBinary>{_text(str(entry['InlineBinary']))}</InlineBinary>\n"
    values = entry.get("Value")
    if not values:
        return None
    if vr == "SQ":
        return [(n, item if isinstance(item, dict) else {}) for n, item in enumerate(values, 1)]
    if vr == "PN":
        return "".join(_person_name(n, v) for n, v in enumerate(values, 1))
    return "".join(_value(n, v, vr) for n, v in enumerate(values, 1))


def _value(number: int, value: Any, vr: str) -> str:
    if value is None:
        return f'<Value number="{number}"/>\n'
    if isinstance(value, bool):  # not DICOM JSON, but never "True"
        value = int(value)
    text = str(value)
    if vr == "DS" and isinstance(value, float) and len(text) > _DS_MAX_CHARS:
        text = format_number_as_ds(value)  # a DS value is at most 16 characters (PS3.5 6.2)
    return f'<Value number="{number}">{_text(text)}</Value>\n'


def _person_name(number: int, value: Any) -> str:
    if not isinstance(value, dict):
        return f'<PersonName number="{number}"/>\n'
    groups = []
    for group in _PN_GROUPS:
        text = value.get(group)
        if not isinstance(text, str):
            continue
        parts = text.split("^")
        components = "".join(
            f"<{name}>{_text(part)}</{name}>"
            for name, part in zip(_PN_COMPONENTS, parts, strict=False)
            if part
        )
        groups.append(f"<{group}>{components}</{group}>" if components else f"<{group}/>")
    if not groups:
        return f'<PersonName number="{number}"/>\n'
    return f'<PersonName number="{number}">' + "".join(groups) + "</PersonName>\n"


# -- reading ------------------------------------------------------------------------------

# VRs whose XML text becomes a JSON number (PS3.18 F.2.3); DS and IS stay text, which
# dicom_json.dataset_from_json accepts as it is (and keeps when it is not a valid number).
_INTEGER_VRS = frozenset({"SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_VR = re.compile(r"[A-Z]{2}")


class _Reader:
    """expat handlers building DICOM JSON from one NativeDicomModel document. No DTD is
    accepted (so no entity can be declared, let alone expanded), nor any element but the
    model's; depth is bounded by MAX_XML_DEPTH."""

    def __init__(self) -> None:
        self.root: JsonDict | None = None
        self.stack: list[tuple[str, Any]] = []  # (element name, what it builds)
        self.text: list[str] = []
        # Private attributes written gggg00ee with their privateCreator, per data set.
        self.private: dict[int, list[tuple[int, str, JsonDict]]] = {}

    def start(self, name: str, attrs: dict[str, str]) -> None:
        local = name.rpartition(" ")[2]  # "namespace local" (namespace_separator=" ")
        if len(self.stack) >= MAX_XML_DEPTH:
            raise BadRequestError(f"XML metadata nested deeper than {MAX_XML_DEPTH} elements")
        parent = self.stack[-1] if self.stack else None
        self.text = []
        if parent is None:
            if local != "NativeDicomModel" or self.root is not None:
                raise BadRequestError(f"XML metadata must be a NativeDicomModel, not {local}")
            self.root = {}
            self.stack.append((local, self.root))
        elif local == "DicomAttribute" and parent[0] in ("NativeDicomModel", "Item"):
            self._start_attribute(parent[1], attrs)
        elif local in ("Value", "PersonName", "Item") and parent[0] == "DicomAttribute":
            self._start_value(local, parent[1], attrs)
        elif local == "BulkData" and parent[0] == "DicomAttribute":
            uri = attrs.get("uri") or attrs.get("uuid")
            if not uri:
                raise BadRequestError("BulkData needs a uri")
            parent[1]["BulkDataURI"] = uri
            self.stack.append((local, None))
        elif local == "InlineBinary" and parent[0] == "DicomAttribute":
            self.stack.append((local, parent[1]))
        elif local in _PN_GROUPS and parent[0] == "PersonName":
            self.stack.append((local, [""] * len(_PN_COMPONENTS)))
        elif local in _PN_COMPONENTS and parent[0] in _PN_GROUPS:
            self.stack.append((local, parent[1]))
        else:
            where = parent[0]
            raise BadRequestError(f"unexpected XML element {local} in {where} (PS3.19 A.1)")

    def _start_attribute(self, doc: JsonDict, attrs: dict[str, str]) -> None:
        """A DicomAttribute of the data set `doc` (the document's, or an item's)."""
        tag, vr = attrs.get("tag", ""), attrs.get("vr", "")
        if not _TAG.fullmatch(tag) or not _VR.fullmatch(vr):
            raise BadRequestError(
                f"DicomAttribute needs tag (8 hex digits) and vr: {tag!r}, {vr!r}"
            )
        entry: JsonDict = {"vr": vr}
        number, creator = int(tag, 16), attrs.get("privateCreator")
        if creator and (number >> 16) % 2:
            # a private data element (gggg00ee, or a full tag to be checked against its
            # creator; creator elements carry no privateCreator): placed when its data
            # set ends
            self.private.setdefault(id(doc), []).append((number, creator, entry))
        else:
            doc[tag.upper()] = entry
        self.stack.append(("DicomAttribute", entry))

    def _start_value(self, local: str, entry: JsonDict, attrs: dict[str, str]) -> None:
        """A Value, PersonName or Item of the DicomAttribute `entry`, numbered in turn."""
        allowed = {"SQ": "Item", "PN": "PersonName"}.get(entry["vr"], "Value")
        if local != allowed:  # PS3.19 Table A.1.5-2: Item only in SQ, PersonName in PN
            raise BadRequestError(
                f"{local} in a DicomAttribute of VR {entry['vr']}: expected {allowed}"
            )
        number = _number(attrs)
        values = entry.setdefault("Value", [])
        if number != len(values) + 1:  # "monotonically increasing starting from 1 by 1"
            raise BadRequestError(
                f"{local} number {number} after {len(values)}: numbers run 1, 2, 3, ..."
                " (PS3.19 A.1.5)"
            )
        values.append(None)
        if local == "Value":  # its text is converted when it ends
            self.stack.append((local, (entry, number)))
        else:  # an item's data set, or a name's groups
            values[number - 1] = {}
            self.stack.append((local, values[number - 1]))

    def end(self, name: str) -> None:
        local, built = self.stack.pop()
        text = "".join(self.text)
        self.text = []
        if local in ("NativeDicomModel", "Item"):
            _place_private(built, self.private.pop(id(built), []))
        elif local == "Value":
            entry, number = built
            entry["Value"][number - 1] = _json_value(entry["vr"], text)
        elif local == "InlineBinary":
            built["InlineBinary"] = "".join(text.split())
        elif local in _PN_COMPONENTS:
            built[_PN_COMPONENTS.index(local)] = text
        elif local in _PN_GROUPS:
            self.stack[-1][1][local] = "^".join(built).rstrip("^")
        elif local == "DicomAttribute" and "Value" in built and "BulkDataURI" in built:
            raise BadRequestError("a DicomAttribute has both values and BulkData")

    def chars(self, data: str) -> None:
        self.text.append(data)


def _place_private(doc: JsonDict, private: list[tuple[int, str, JsonDict]]) -> None:
    """Put private attributes under their creator's block (gggg,xxee): one written with its
    full tag stays there if (gggg,00xx) holds its privateCreator; otherwise, as for one
    written gggg00ee, the first block whose creator element holds that name and whose element
    ee is free, else the first free block, whose creator element is then added (PS3.5 7.8.1).
    A creator reserving several blocks (as real data sometimes has) keeps all its elements."""
    if not private:
        return
    creators: dict[int, dict[int, Any]] = {}  # group -> block -> creator, read once
    for key, entry in doc.items():
        group, element = int(key[:4], 16), int(key[4:], 16)
        if group % 2 and 0x10 <= element <= 0xFF:
            creators.setdefault(group, {})[element] = (entry.get("Value") or [None])[0]
    for number, creator, entry in private:
        group, low, hint = number >> 16, number & 0xFF, (number >> 8) & 0xFF
        blocks = creators.setdefault(group, {})
        block = next(
            (b for b, name in blocks.items() if name == creator and _free(doc, group, b, low)),
            None,
        )
        if hint and blocks.get(hint) == creator and _free(doc, group, hint, low):
            block = hint  # a full tag (gggg,xxee) in a block its creator does reserve
        if block is None:
            block = next((b for b in range(0x10, 0x100) if b not in blocks), None)
            if block is None:
                raise BadRequestError(f"no free private block in group {group:04X}")
            doc[f"{group:04X}{block:04X}"] = {"vr": "LO", "Value": [creator]}
            blocks[block] = creator
        doc[f"{group:04X}{block:02X}{low:02X}"] = entry


def _free(doc: JsonDict, group: int, block: int, low: int) -> bool:
    return f"{group:04X}{block:02X}{low:02X}" not in doc


_NUMBER = re.compile(r"[1-9][0-9]{0,4}")
_INTEGER_TEXT = re.compile(r"\s*[+-]?[0-9]{1,20}\s*")
_FLOAT_TEXT = re.compile(
    r"\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?|NaN|-?Infinity|inf|nan)\s*"
)


def _number(attrs: dict[str, str]) -> int:
    raw = attrs.get("number", "")
    if not _NUMBER.fullmatch(raw):
        raise BadRequestError(f"number must be a positive integer, not {raw[:20]!r} (PS3.19 A.1.5)")
    return int(raw)


def _json_value(vr: str, text: str) -> Any:
    """The DICOM JSON value of one Value element's text (None when empty): ASCII digits only
    for the binary number VRs (no `1_0`, no other scripts' digits)."""
    if text == "":
        return None
    if vr in _INTEGER_VRS:
        if not _INTEGER_TEXT.fullmatch(text):
            raise BadRequestError(f"{text[:40]!r} is not a value of VR {vr}")
        return int(text)
    if vr in _FLOAT_VRS:
        if not _FLOAT_TEXT.fullmatch(text):
            raise BadRequestError(f"{text[:40]!r} is not a value of VR {vr}")
        return float(text)
    return text


def dataset_from_xml(data: bytes) -> JsonDict:
    """The DICOM JSON of one NativeDicomModel document (400 when it is not one)."""
    reader = _Reader()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.chars

    def no_dtd(*_: Any) -> None:
        raise BadRequestError("XML metadata may not have a DOCTYPE")

    parser.StartDoctypeDeclHandler = no_dtd
    parser.EntityDeclHandler = no_dtd
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise BadRequestError(f"the XML metadata part is not well-formed XML: {exc}") from None
    except (LookupError, ValueError) as exc:  # an encoding expat cannot read (shift_jis)
        raise BadRequestError(f"the XML metadata part's encoding is not supported: {exc}") from None
    if reader.root is None:
        raise BadRequestError("the XML metadata part holds no NativeDicomModel")
    return reader.root
