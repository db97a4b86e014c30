"""DICOM XML, the Native DICOM Model of PS3.19 A.1: the writer checked against dcmtk's
`dcm2xml --native-format` (an independent implementation) over the sample corpus, the
reader by round trips and by what it must refuse."""

from __future__ import annotations

import math
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomweb_server.dicom_json import dataset_to_json
from dicomweb_server.dicom_xml import (
    MAX_XML_DEPTH,
    NATIVE_DICOM_NS,
    dataset_from_xml,
    dataset_xml,
)
from dicomweb_server.errors import BadRequestError

NS = f"{{{NATIVE_DICOM_NS}}}"


def _json_of(path: Path) -> dict[str, Any]:
    return dataset_to_json(pydicom.dcmread(path), lambda p: "/bulk/" + p)


# -- the writer, against dcmtk -----------------------------------------------------------


def _canonical(elem: ET.Element) -> dict[str, Any]:
    """tag -> (vr, keyword, privateCreator, values) of a NativeDicomModel or Item; numbers
    as floats (DS "1.50" is our 1.5), names as their non-empty components."""
    out: dict[str, Any] = {}
    for a in elem.findall(NS + "DicomAttribute"):
        tag, vr = a.get("tag", "").upper(), a.get("vr")
        # dcmtk writes the file meta group and its own character set (+U8)
        if tag.startswith("0002") or tag == "00080005":
            continue
        values: list[Any] = []
        if a.find(NS + "BulkData") is not None or a.find(NS + "InlineBinary") is not None:
            values = ["binary"]
        for v in a.findall(NS + "Value"):
            text: Any = (v.text or "").strip()
            if vr in ("DS", "IS", "FL", "FD") and text:
                text = float(text)
            values.append((v.get("number"), text))
        names = []
        for p in a.findall(NS + "PersonName"):
            groups = tuple(
                (g.tag[len(NS) :], tuple((c.tag[len(NS) :], (c.text or "").strip()) for c in g))
                for g in p
                if len(g)
            )
            names.append((p.get("number"), groups))
        if any(groups for _, groups in names):
            values += names
        for item in a.findall(NS + "Item"):
            values.append((item.get("number"), _canonical(item)))
        out[tag] = (vr, a.get("keyword"), a.get("privateCreator"), values)
    return out


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) and isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=1e-6) or (math.isnan(ours) and math.isnan(theirs))
    if isinstance(ours, tuple | list) and isinstance(theirs, tuple | list):
        return len(ours) == len(theirs) and all(map(_same, ours, theirs))
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same(ours[k], theirs[k]) for k in ours)
    return bool(ours == theirs)


def _differences(ours: dict[str, Any], theirs: dict[str, Any], path: str = "") -> list[str]:
    found = []
    for tag in sorted(ours.keys() | theirs.keys()):
        if tag not in ours or tag not in theirs:
            found.append(f"{path}{tag} only in {'dcmtk' if tag in theirs else 'ours'}")
            continue
        (vr, kw, creator, a), (vr2, kw2, creator2, b) = ours[tag], theirs[tag]
        # dcmtk's dictionary lacks some retired keywords (StudyComments): compare its own
        if (vr, creator) != (vr2, creator2) or (kw2 and kw != kw2):
            found.append(f"{path}{tag}: {ours[tag][:3]} vs dcmtk {theirs[tag][:3]}")
        elif vr == "SQ" and "binary" not in a + b:
            if len(a) != len(b):
                found.append(f"{path}{tag}: {len(a)} items vs dcmtk {len(b)}")
            for (n, item), (_, item2) in zip(a, b, strict=False):
                found += _differences(item, item2, f"{path}{tag}/{n}/")
        elif "binary" not in a + b and not _same(a, b):
            found.append(f"{path}{tag} {vr}: {a[:3]} vs dcmtk {b[:3]}")
    return found


def test_metadata_xml_matches_dcmtk_native_format(samples: Path) -> None:
    if shutil.which("dcm2xml") is None:
        pytest.fail("dcm2xml not found: `make test` installs Debian's dcmtk")
    compared = 0
    for path in sorted((samples / "generated" / "coverage").glob("*.dcm")):
        done = subprocess.run(
            ["dcm2xml", "-q", "-nat", "+Xn", "+U8", str(path)], capture_output=True, check=False
        )
        if done.returncode:  # ISO 2022 IR 87: glibc's iconv cannot convert it for dcmtk
            assert b"character" in done.stderr or b"encoding" in done.stderr, done.stderr
            continue
        ours = _canonical(ET.fromstring(dataset_xml(_json_of(path))))
        theirs = _canonical(ET.fromstring(done.stdout))
        assert _differences(ours, theirs) == [], path.name
        compared += 1
    assert compared >= 15


# -- round trips -------------------------------------------------------------------------


def _normal(doc: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON with the differences XML cannot keep evened out: DS/IS numbers as text
    (XML has only text), "" and null (both an empty value), trailing `^` of names, group
    lengths (not in XML: PS3.19 A.1.1)."""
    out = {}
    for tag, entry in doc.items():
        if tag.endswith("0000"):
            continue
        entry = dict(entry)
        vals = entry.get("Value")
        if vals is not None and entry["vr"] == "SQ":
            entry["Value"] = [_normal(item) for item in vals]
        elif vals is not None:
            if entry["vr"] in ("DS", "IS"):
                vals = [_number(v) for v in vals]
            if entry["vr"] == "PN":
                vals = [
                    {g: t.rstrip("^") for g, t in (v or {}).items() if t.strip("^")} for v in vals
                ]
            vals = [None if v in ("", {}) else v for v in vals]
            entry["Value"] = vals
            if all(v is None for v in vals):
                del entry["Value"]
        out[tag] = entry
    return out


def _number(v: Any) -> Any:
    try:
        return float(v) if v is not None and v != "" else None
    except ValueError:
        return v


def test_round_trip_keeps_every_corpus_data_set(samples: Path) -> None:
    paths = sorted((samples / "generated" / "coverage").glob("*.dcm"))
    paths += sorted((samples / "real" / "pydicom").glob("*.dcm"))[:60]
    assert len(paths) > 50
    for path in paths:
        doc = _json_of(path)
        assert _normal(dataset_from_xml(dataset_xml(doc))) == _normal(doc), path.name


# -- the writer's rules ------------------------------------------------------------------


def _attrs(xml: bytes) -> list[ET.Element]:
    root = ET.fromstring(xml)
    assert root.tag == NS + "NativeDicomModel"
    return root.findall(NS + "DicomAttribute")


def test_values_names_items_and_binary() -> None:
    doc = {
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
        "00100010": {
            "vr": "PN",
            "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}, None],
        },
        "00081140": {
            "vr": "SQ",
            "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.3"]}}, {}],
        },
        "00209165": {"vr": "AT", "Value": ["00100020"]},
        "00281050": {"vr": "DS", "Value": [40, "1,5"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://h/bulk/7FE00010"},
        "00660023": {"vr": "OF", "InlineBinary": "AACAPw=="},
        "00100020": {"vr": "LO"},
        "00280000": {"vr": "UL", "Value": [120]},
    }
    attrs = {a.get("tag"): a for a in _attrs(dataset_xml(doc))}
    assert list(attrs) == sorted(doc.keys() - {"00280000"})  # tag order; no group length
    image_type = attrs["00080008"]
    assert image_type.get("keyword") == "ImageType"
    assert [(v.get("number"), v.text) for v in image_type] == [
        ("1", "ORIGINAL"),
        ("2", None),
        ("3", "AXIAL"),
    ]
    name = attrs["00100010"].findall(NS + "PersonName")
    assert [g.tag[len(NS) :] for g in name[0]] == ["Alphabetic", "Ideographic"]
    ideographic = name[0].find(NS + "Ideographic")
    assert ideographic is not None
    assert [(c.tag[len(NS) :], c.text) for c in ideographic] == [
        ("FamilyName", "山田"),
        ("GivenName", "太郎"),
    ]
    assert name[1].get("number") == "2" and len(name[1]) == 0
    items = attrs["00081140"].findall(NS + "Item")
    assert [i.get("number") for i in items] == ["1", "2"] and len(items[1]) == 0
    assert [v.text for v in attrs["00209165"]] == ["00100020"]
    assert [v.text for v in attrs["00281050"]] == ["40", "1,5"]
    bulk = attrs["7FE00010"].find(NS + "BulkData")
    assert bulk is not None and bulk.get("uri") == "http://h/bulk/7FE00010"
    inline = attrs["00660023"].find(NS + "InlineBinary")
    assert inline is not None and inline.text == "AACAPw=="
    assert len(attrs["00100020"]) == 0


def test_names_and_empty_values_of_a_data_set_as_the_json_has_them() -> None:
    """The XML of a data set follows its DICOM JSON: a name without an alphabetic group has
    no Alphabetic element (PS3.19 A.1.5: the groups present; the JSON has no empty ones), an
    empty value among several is an empty Value, a group length is not written."""
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "=山田^太郎"
    ds.add_new(0x00080008, "CS", ["DERIVED", "", "MPR"])
    ds.add_new(0x00100000, "UL", 8)
    attrs = {a.get("tag"): a for a in _attrs(dataset_xml(dataset_to_json(ds, lambda p: p)))}
    assert "00100000" not in attrs
    (name,) = attrs["00100010"].findall(NS + "PersonName")
    assert [g.tag[len(NS) :] for g in name] == ["Ideographic"]
    assert [(v.get("number"), v.text) for v in attrs["00080008"]] == [
        ("1", "DERIVED"),
        ("2", None),
        ("3", "MPR"),
    ]


def test_text_is_escaped_and_what_xml_cannot_carry_is_replaced() -> None:
    doc = {"00081030": {"vr": "LO", "Value": ['A&B <C> "d" \r\n\x01\x1b end']}}
    xml = dataset_xml(doc)
    assert b"\x01" not in xml and b"\x1b" not in xml
    (attr,) = _attrs(xml)
    assert attr[0].text == 'A&B <C> "d" \r\n\ufffd\ufffd end'
    back = dataset_from_xml(xml)
    assert back["00081030"]["Value"] == ['A&B <C> "d" \r\n\ufffd\ufffd end']


def test_private_attributes_carry_their_creator() -> None:
    """PS3.19 A.1: a private attribute's tag is written gggg00ee with privateCreator naming
    its block; (gggg,xx10) must not be taken for the creator element (gggg,0010)."""
    doc = {
        "00090010": {"vr": "LO", "Value": ["ACME 1.0"]},
        "00091010": {"vr": "LO", "Value": ["in block 10"]},
        "00090011": {"vr": "LO", "Value": ["OTHER"]},
        "00091101": {"vr": "US", "Value": [7]},
        "00191001": {"vr": "LO", "Value": ["no creator"]},
    }
    written = [
        (a.get("tag"), a.get("privateCreator"), a.get("keyword")) for a in _attrs(dataset_xml(doc))
    ]
    assert written == [
        ("00090010", None, None),
        ("00090011", None, None),
        ("00090010", "ACME 1.0", None),
        ("00090001", "OTHER", None),
        ("00191001", None, None),
    ]
    assert dataset_from_xml(dataset_xml(doc)) == doc


def test_reader_places_private_attributes_in_their_block_or_a_new_one() -> None:
    value = '<Value number="1">{}</Value></DicomAttribute>'
    xml = f"""<NativeDicomModel xmlns="{NATIVE_DICOM_NS}">
      <DicomAttribute tag="00290020" vr="LO" privateCreator="B">{value.format("b")}
      <DicomAttribute tag="00290010" vr="LO">{value.format("A")}
      <DicomAttribute tag="00290020" vr="LO" privateCreator="A">{value.format("a")}
    </NativeDicomModel>""".encode()
    doc = dataset_from_xml(xml)
    assert doc["00291020"]["Value"] == ["a"]
    assert doc["00290011"]["Value"] == ["B"] and doc["00291120"]["Value"] == ["b"]


def test_private_blocks_of_one_creator_and_full_tags() -> None:
    """A creator reserving two blocks keeps both blocks' elements; a full private tag stays in
    its block when that block's creator is its privateCreator, and moves otherwise."""
    two_blocks = {
        "00090010": {"vr": "LO", "Value": ["A"]},
        "00090011": {"vr": "LO", "Value": ["A"]},
        "00091001": {"vr": "LO", "Value": ["x"]},
        "00091101": {"vr": "LO", "Value": ["y"]},
    }
    assert dataset_from_xml(dataset_xml(two_blocks)) == two_blocks
    creator_a = (
        "<DicomAttribute tag='00090010' vr='LO'><Value number='1'>A</Value></DicomAttribute>"
    )
    for creator, where in (("A", "00091001"), ("B", "00091101")):
        xml = (
            f"<NativeDicomModel>{creator_a}<DicomAttribute tag='00091001' vr='LO' "
            f"privateCreator='{creator}'><Value number='1'>v</Value></DicomAttribute>"
            "</NativeDicomModel>"
        ).encode()
        doc = dataset_from_xml(xml)
        assert doc[where]["Value"] == ["v"], creator
        assert doc[f"0009{where[4:6]}"[:4] + "00" + where[4:6]]["Value"] == [creator]


def test_long_ds_values_are_written_in_16_characters() -> None:
    """A DS value is at most 16 characters (PS3.5 6.2); Python's shortest float text is not."""
    values = [123456789012345.0, 1.23456789012e-05, 0.1, 40]
    (attr,) = _attrs(dataset_xml({"00281050": {"vr": "DS", "Value": values}}))
    texts = [v.text or "" for v in attr]
    assert all(len(t) <= 16 for t in texts), texts
    assert [float(t) for t in texts] == pytest.approx(values, rel=1e-9)
    assert texts[2:] == ["0.1", "40"]


# -- what the reader refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    "xml",
    [
        b"<NativeDicomModel><DicomAttribute tag='00100010' vr='PN'>",  # not well-formed
        b"<Other/>",
        b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><NativeDicomModel/>',
        b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><NativeDicomModel/>',
        b"<NativeDicomModel><DicomAttribute tag='0010' vr='PN'/></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00100010' vr='pn'/></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00280010' vr='US'>"
        b"<Value number='0'>1</Value></DicomAttribute></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00280010' vr='US'>"
        b"<Value number='1'>x</Value></DicomAttribute></NativeDicomModel>",
        b"<NativeDicomModel><Value number='1'>x</Value></NativeDicomModel>",
        b"",
        # numbers run 1, 2, 3 (one `number="65536"` would otherwise allocate 65536 values)
        b"<NativeDicomModel><DicomAttribute tag='00080008' vr='CS'>"
        b"<Value number='65536'>x</Value></DicomAttribute></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00080008' vr='CS'><Value number='1'>a</Value>"
        b"<Value number='1'>b</Value></DicomAttribute></NativeDicomModel>",
        "<NativeDicomModel><DicomAttribute tag='00080008' vr='CS'>"
        "<Value number='\u00b2'>x</Value></DicomAttribute></NativeDicomModel>".encode(),
        b"<NativeDicomModel><DicomAttribute tag='00080008' vr='CS'>"
        b"<Value number='" + b"1" * 4400 + b"'>x</Value></DicomAttribute></NativeDicomModel>",
        b"<?xml version='1.0' encoding='shift_jis'?><NativeDicomModel/>",
        b"<?xml version='1.0' encoding='x-no-such'?><NativeDicomModel/>",
        # the content each VR allows (PS3.19 Table A.1.5-2)
        b"<NativeDicomModel><DicomAttribute tag='00080060' vr='CS'><Item number='1'/>"
        b"</DicomAttribute></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00081140' vr='SQ'><Value number='1'>x</Value>"
        b"</DicomAttribute></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00100020' vr='LO'><PersonName number='1'/>"
        b"</DicomAttribute></NativeDicomModel>",
        b"<NativeDicomModel><DicomAttribute tag='00100010' vr='PN'><Value number='1'>x</Value>"
        b"</DicomAttribute></NativeDicomModel>",
        # binary number VRs: ASCII digits only
        b"<NativeDicomModel><DicomAttribute tag='00280010' vr='US'>"
        b"<Value number='1'>1_0</Value></DicomAttribute></NativeDicomModel>",
        "<NativeDicomModel><DicomAttribute tag='00280010' vr='US'>"
        "<Value number='1'>\u0661</Value></DicomAttribute></NativeDicomModel>".encode(),
        b"<NativeDicomModel><DicomAttribute tag='00181063' vr='FD'>"
        b"<Value number='1'>1_0.5</Value></DicomAttribute></NativeDicomModel>",
    ],
)
def test_reader_refuses_what_is_not_a_native_dicom_model(xml: bytes) -> None:
    with pytest.raises(BadRequestError):
        dataset_from_xml(xml)


def _nested(depth: int) -> bytes:
    """A NativeDicomModel whose elements nest `depth` deep (sequences in sequences)."""
    levels = (depth - 1) // 2
    head = "<DicomAttribute tag='00081140' vr='SQ'><Item number='1'>" * levels
    tail = "</Item></DicomAttribute>" * levels
    leaf = "<DicomAttribute tag='00100020' vr='LO'/>" if (depth - 1) % 2 else ""
    return f"<NativeDicomModel>{head}{leaf}{tail}</NativeDicomModel>".encode()


def test_depth_limit_is_at_max_xml_depth() -> None:
    assert MAX_XML_DEPTH % 2 == 0
    dataset_from_xml(_nested(MAX_XML_DEPTH))
    with pytest.raises(BadRequestError, match="deeper"):
        dataset_from_xml(_nested(MAX_XML_DEPTH + 1))
