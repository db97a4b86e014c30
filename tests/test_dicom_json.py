"""DICOM JSON: the walker's BulkDataURIs, URI absolutisation, the STOW response document."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb_server.dicom_json import BULK_DATA_THRESHOLD_BYTES, dataset_to_json
from dicomweb_server.errors import FailureReason
from dicomweb_server.response_json import InstanceOutcome, absolutize_bulk_uris, stow_response


def test_walker_matches_pydicom_and_names_nested_bulk_paths() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.add_new(0x00091010, "OB", b"\x01" * 2000)  # private, large: bulk data
    item = Dataset()
    item.add_new(0x54001010, "OW", b"\x00\x01" * 1000)
    item.add_new(0x003A0005, "US", 2)
    ds.WaveformSequence = Sequence([item])
    ds.add_new(0x00091011, "OB", b"\x02" * 10)  # small: inline
    doc = dataset_to_json(ds, lambda path: f"/bulk/{path}")
    assert doc["00091010"] == {"vr": "OB", "BulkDataURI": "/bulk/00091010"}
    assert doc["54000100"]["Value"][0]["54001010"] == {
        "vr": "OW",
        "BulkDataURI": "/bulk/54000100/0/54001010",
    }
    theirs = ds.to_json_dict(1024, lambda _e: "x")
    for key in ("00100010", "00091011"):
        assert doc[key] == theirs[key]


def test_absolutize_only_touches_bulk_data_uris() -> None:
    text = json.dumps(
        {
            "a": {"vr": "OB", "BulkDataURI": "/studies/1/bulk/x"},
            "b": {"Value": ['"BulkDataURI": "/']},
        }
    )
    out = json.loads(absolutize_bulk_uris(text, "http://h:1/dicom-web"))
    assert out["a"]["BulkDataURI"] == "http://h:1/dicom-web/studies/1/bulk/x"
    assert out["b"]["Value"] == ['"BulkDataURI": "/']


def test_stow_response_document() -> None:
    doc = stow_response(
        [
            InstanceOutcome("1.2", "1.2.3", retrieve_path="/studies/9/series/8/instances/1.2.3"),
            InstanceOutcome("1.2", "1.2.4", FailureReason.DUPLICATE_SOP_INSTANCE, reason="dup"),
            InstanceOutcome(None, None, FailureReason.CANNOT_UNDERSTAND, reason="garbage"),
        ],
        "http://h/dicom-web",
        "/studies/9",
    )
    assert doc["00081190"]["Value"] == ["http://h/dicom-web/studies/9"]
    (ok,) = doc["00081199"]["Value"]
    assert ok["00081190"]["Value"] == ["http://h/dicom-web/studies/9/series/8/instances/1.2.3"]
    failed = doc["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0x0111], [0xC000]]
    assert "00081155" not in failed[1]


def test_raw_fast_path_gives_pydicom_json_on_the_sample_corpus(samples: object) -> None:
    """`simple_json` renders common elements from raw bytes; on every file of the corpus
    (character sets, transfer syntaxes, big endian, sequences, odd values) the document must
    be exactly pydicom's."""
    from pathlib import Path

    import pydicom

    from dicomweb_server import dicom_json

    assert isinstance(samples, Path)
    hits = implicit_hits = 0
    real = dicom_json.simple_json

    def counting(raw: Any, little: bool) -> Any:
        nonlocal hits, implicit_hits
        out = real(raw, little)
        hits += out is not None
        implicit_hits += out is not None and raw.VR is None
        return out

    dicom_json.simple_json = counting
    try:
        files = sorted(samples.rglob("*.dcm"))
        assert len(files) > 100
        for path in files:
            docs = [
                dataset_to_json(
                    pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024, force=True),
                    lambda p: "/bulk/" + p,
                    fast=fast,
                )
                for fast in (True, False)
            ]
            assert json.dumps(docs[0], sort_keys=True) == json.dumps(docs[1], sort_keys=True), path
    finally:
        dicom_json.simple_json = real
    assert hits > 10_000, "the fast path was not exercised"
    # Elements of implicit VR files take the fast path too, their VR from the dictionary.
    assert implicit_hits > 1_000, implicit_hits


def test_tag_hex_cache_is_bounded() -> None:
    """Files may carry any number of distinct private tags: the key cache stays bounded."""
    from dicomweb_server.attributes import TAG_HEX_CACHE_SIZE, tag_hex

    tag_hex.cache_clear()
    for t in range(0x00090010, 0x00090010 + TAG_HEX_CACHE_SIZE + 100):
        assert tag_hex(t) == f"{t:08X}"
    assert tag_hex.cache_info().currsize == TAG_HEX_CACHE_SIZE
    assert tag_hex(0x7FE00010) == "7FE00010"


def test_values_read_raw_at_ingest_are_pydicoms(samples: object) -> None:
    """The UIDs and pixel attributes the ingest reads from raw bytes (dicomfile._value) equal
    pydicom's values on every file of the corpus."""
    from pathlib import Path

    import pydicom

    from dicomweb_server.dicomfile import _value

    def norm(v: Any) -> Any:
        if isinstance(v, list | pydicom.multival.MultiValue):
            return [norm(x) for x in v]
        return "" if v is None else str(v)

    assert isinstance(samples, Path)
    tags = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00280002, 0x00280004,
            0x00280008, 0x00280010, 0x00280011, 0x00280100)  # fmt: skip
    compared = 0
    for path in sorted(samples.rglob("*.dcm")):
        ours = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024, force=True)
        ref = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024, force=True)
        for tag in tags:
            if tag in ref:
                assert norm(_value(ours, tag)) == norm(ref[tag].value), (path, hex(tag))
                compared += 1
            else:
                assert _value(ours, tag) is None
    assert compared > 1000


def test_implicit_vr_elements_take_their_vr_from_the_dictionary() -> None:
    """An implicit VR element is rendered raw only when the dictionary names one plain VR;
    private tags, group lengths, unknown tags and ambiguous VRs are left to pydicom."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from dicomweb_server.dicom_json import simple_json

    def raw(tag: int, value: bytes) -> RawDataElement:
        return RawDataElement(Tag(tag), None, len(value), value, 0, True, True)

    assert simple_json(raw(0x00100020, b"PID-1 "), True) == {"vr": "LO", "Value": ["PID-1"]}
    assert simple_json(raw(0x00280010, b"\x00\x02"), True) == {"vr": "US", "Value": [512]}
    assert simple_json(raw(0x00200013, b"12"), True) == {"vr": "IS", "Value": [12]}
    assert simple_json(raw(0x00100010, b"DOE^JOHN"), True) == {
        "vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]
    }  # fmt: skip
    for tag in (0x00090010, 0x00191001, 0x00080000, 0x00281101, 0x7FE00010, 0x00420099):
        # private creator, private, group length, "US or SS", "OB or OW", unknown
        assert simple_json(raw(tag, b"\x00\x01\x00\x02\x00\x03"), True) is None, hex(tag)


def test_implicit_vr_cache_is_bounded() -> None:
    """Files may carry any number of distinct (unknown) tags: the VR cache stays bounded."""
    from dicomweb_server.dicom_json import IMPLICIT_VR_CACHE_SIZE, _implicit_vr

    _implicit_vr.cache_clear()
    for t in range(0x00420100, 0x00420100 + IMPLICIT_VR_CACHE_SIZE + 100):
        assert _implicit_vr(t) is None
    assert _implicit_vr.cache_info().currsize == IMPLICIT_VR_CACHE_SIZE
    assert _implicit_vr(0x00100020) == "LO"


def _read_back(ds: Dataset, *, little_endian: bool = True) -> Dataset:
    """`ds` written as a Part 10 file (Explicit VR, of the byte order asked) and read again
    as the ingest reads it: elements stay raw until converted, so both paths can be taken."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID("2.25.1")
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, little_endian=little_endian, implicit_vr=False)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), defer_size=1024)


def _both_walks(ds: Dataset) -> dict[str, Any]:
    """The JSON of a data set read back, the raw path's and pydicom's, which must agree."""
    fast, slow = (dataset_to_json(ds, lambda p: "/bulk/" + p, fast=f) for f in (True, False))
    assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)
    return fast


def _keys(doc: Any) -> list[str]:
    """Every attribute key of a DICOM JSON document, at any depth."""
    if isinstance(doc, list):
        return [k for item in doc for k in _keys(item)]
    if not isinstance(doc, dict):
        return []
    found = [k for k in doc if len(k) == 8]
    return found + [
        k for v in doc.values() for k in _keys(v.get("Value") if isinstance(v, dict) else None)
    ]


def test_binary_values_up_to_the_threshold_are_inline() -> None:
    """BULK_DATA_THRESHOLD_BYTES: a binary value of at most that many bytes is InlineBinary
    and a longer one a BulkDataURI (PS3.18 F.2.6, F.2.7), whichever path renders it, at any
    depth and in either byte order. Values over the threshold are deferred; the others went
    through pydicom's to_json_dict, whose threshold counts the base64 text, so values of
    769 to 1024 bytes became bulk data."""
    import base64

    def blobs(ds: Dataset) -> Dataset:
        ds.add_new(0x00090010, "LO", "SIZES")
        ds.add_new(0x00091011, "OB", bytes(range(256)) * 3 + b"\x01\x02")  # 770 bytes
        ds.add_new(0x00091012, "OB", bytes(range(256)) * 4)  # 1024 bytes
        ds.add_new(0x00091013, "OB", bytes(BULK_DATA_THRESHOLD_BYTES + 2))
        return ds

    for little_endian in (True, False):
        made = blobs(Dataset())
        made.add_new(0x00081140, "SQ", Sequence([blobs(Dataset())]))
        made.add_new(0x60003000, "OW", b"\x07" * BULK_DATA_THRESHOLD_BYTES)  # words read alike
        doc = _both_walks(_read_back(made, little_endian=little_endian))
        for prefix, data in (("", doc), ("00081140/0/", doc["00081140"]["Value"][0])):
            assert base64.b64decode(data["00091011"]["InlineBinary"]) == made[0x00091011].value
            assert base64.b64decode(data["00091012"]["InlineBinary"]) == made[0x00091012].value
            assert data["00091013"] == {"vr": "OB", "BulkDataURI": f"/bulk/{prefix}00091013"}
        assert base64.b64decode(doc["60003000"]["InlineBinary"]) == b"\x07" * 1024


def test_group_lengths_are_left_out(samples: object) -> None:
    """PS3.18 F.2.2: "Group Length (gggg,0000) attributes shall not be included in a DICOM
    JSON Model object": public, private, and in sequence items."""
    from pathlib import Path

    import pydicom

    assert isinstance(samples, Path)
    path = samples / "real" / "pydicom-data" / "693_J2KR.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024)
    assert 0x00080000 in ds and 0x00280000 in ds  # the file carries them
    for fast in (True, False):
        doc = dataset_to_json(ds, lambda p: p, fast=fast)
        assert not [k for k in doc if k.endswith("0000")]
        assert "00080016" in doc and "00280010" in doc
    made = Dataset()
    made.add_new(0x00080000, "UL", 8)
    made.add_new(0x00090000, "UL", 12)  # private group
    made.add_new(0x00090010, "LO", "CREATOR")
    item = Dataset()
    item.add_new(0x00080000, "UL", 8)
    item.add_new(0x00081150, "UI", "1.2.3")
    made.add_new(0x00081140, "SQ", Sequence([item]))
    doc = _both_walks(_read_back(made))
    assert not [k for k in _keys(doc) if k.endswith("0000")]
    assert doc["00081140"]["Value"] == [{"00081150": {"vr": "UI", "Value": ["1.2.3"]}}]


def test_an_empty_value_among_several_is_null(samples: object) -> None:
    """PS3.18 F.2.5: "If a multi-valued attribute has one or more empty values these are
    represented as 'null' array elements", for every string VR, on the raw path and
    pydicom's; an attribute whose one value is empty has no "Value"."""
    from pathlib import Path

    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from dicomweb_server.dicom_json import simple_json

    def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
        return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)

    assert simple_json(raw(0x00080008, "CS", b"A\\\\B "), True) == {
        "vr": "CS", "Value": ["A", None, "B"]
    }  # fmt: skip
    assert simple_json(raw(0x00080005, "CS", b"\\ISO 2022 IR 87"), True) == {
        "vr": "CS", "Value": [None, "ISO 2022 IR 87"]
    }  # fmt: skip
    assert simple_json(raw(0x00101001, "PN", b"A^B\\\\C"), True) == {
        "vr": "PN", "Value": [{"Alphabetic": "A^B"}, None, {"Alphabetic": "C"}]
    }  # fmt: skip
    assert simple_json(raw(0x00080008, "CS", b"  "), True) == {"vr": "CS"}

    made = Dataset()
    made.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    made.add_new(0x00080008, "CS", ["DERIVED", "", "MPR"])
    made.add_new(0x00081030, "LO", ["", ""])
    made.add_new(0x00090010, "LO", "CREATOR")
    made.add_new(0x00091011, "UC", ["a", "", "b"])
    made.add_new(0x00101001, "PN", "A^B\\\\=C")  # pydicom's own JSON fails on this one
    made.add_new(0x00200020, "CS", "")
    doc = _both_walks(_read_back(made))
    assert doc["00080005"]["Value"] == [None, "ISO 2022 IR 87"]
    assert doc["00080008"]["Value"] == ["DERIVED", None, "MPR"]
    assert doc["00081030"]["Value"] == [None, None]
    assert doc["00091011"] == {"vr": "UC", "Value": ["a", None, "b"]}
    assert doc["00101001"]["Value"] == [{"Alphabetic": "A^B"}, None, {"Ideographic": "C"}]
    assert doc["00200020"] == {"vr": "CS"}

    assert isinstance(samples, Path)
    ds = pydicom.dcmread(samples / "real" / "pydicom" / "examples_overlay.dcm", defer_size=1024)
    image_type = dataset_to_json(ds, lambda p: p)["00080008"]["Value"]
    assert image_type[3:5] == ["CSA MPR", None], image_type


def test_person_names_carry_their_non_empty_groups_only(samples: object) -> None:
    """PS3.18 F.2.2: a name's "Alphabetic", "Ideographic" and "Phonetic" properties are there
    for its non-empty component groups only: `=山田^太郎` has no "Alphabetic"."""
    from pathlib import Path

    import pydicom

    made = Dataset()
    made.SpecificCharacterSet = "ISO_IR 192"
    made.PatientName = "=山田^太郎"
    made.add_new(0x00081060, "PN", ["Yamada^Tarou==やまだ^たろう", "Doe^J=", "=="])
    doc = _both_walks(_read_back(made))
    assert doc["00100010"] == {"vr": "PN", "Value": [{"Ideographic": "山田^太郎"}]}
    assert doc["00081060"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Phonetic": "やまだ^たろう"},
        {"Alphabetic": "Doe^J"},
        None,  # delimiters only: no name
    ]
    assert isinstance(samples, Path)
    path = samples / "real" / "pydicom" / "charset_files" / "chrH31.dcm"
    name = dataset_to_json(pydicom.dcmread(path), lambda p: p)["00100010"]["Value"][0]
    assert name == {
        "Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"
    }  # fmt: skip


def test_inline_binary_of_a_big_endian_data_set_is_little_endian(samples: object) -> None:
    """DICOM JSON carries binary values as Explicit VR Little Endian does (PS3.18 F.2.7,
    PS3.5 7.3): the words of OW, OF, OL, OD and OV values of a big endian data set are
    swapped; OB and UN are bytes, kept as they are. The little and big endian copies of one
    sample give the same document."""
    import base64
    import struct
    from pathlib import Path

    import pydicom

    made = Dataset()
    made.add_new(0x00281201, "OW", struct.pack(">3H", 1, 2, 0xABCD))
    made.add_new(0x00420011, "OB", b"\x01\x02\x03\x04")
    made.add_new(0x00660016, "OF", struct.pack(">2f", 1.5, -2.0))
    made.add_new(0x00660040, "OL", struct.pack(">I", 7))
    made.add_new(0x00720075, "OV", struct.pack(">Q", 9))
    made.add_new(0x7FE00009, "OD", struct.pack(">d", 0.25))
    item = Dataset()
    item.add_new(0x00281201, "OW", struct.pack(">H", 0x0102))
    made.add_new(0x00081140, "SQ", Sequence([item]))
    doc = _both_walks(_read_back(made, little_endian=False))

    def inline(entry: dict[str, Any]) -> bytes:
        return base64.b64decode(entry["InlineBinary"])

    assert inline(doc["00281201"]) == struct.pack("<3H", 1, 2, 0xABCD)
    assert inline(doc["00420011"]) == b"\x01\x02\x03\x04"
    assert inline(doc["00660016"]) == struct.pack("<2f", 1.5, -2.0)
    assert inline(doc["00660040"]) == struct.pack("<I", 7)
    assert inline(doc["00720075"]) == struct.pack("<Q", 9)
    assert inline(doc["7FE00009"]) == struct.pack("<d", 0.25)
    assert inline(doc["00081140"]["Value"][0]["00281201"]) == b"\x02\x01"

    assert isinstance(samples, Path)
    docs = [
        dataset_to_json(
            pydicom.dcmread(samples / "real" / "pydicom-data" / name, defer_size=1024),
            lambda p: p,
        )
        for name in ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm")
    ]
    inlines = [{k: v for k, v in d.items() if "InlineBinary" in v} for d in docs]
    assert "00281201" in inlines[0]  # the palette's Red LUT Data, OW
    assert inlines[0] == inlines[1]


def _jsonb_text(doc: dict[str, Any]) -> str:
    """Text as PostgreSQL's jsonb output gives it: keys of an object shortest first, then in
    byte order, `", "` and `": "` between (so the attribute keys are in tag order)."""

    def ordered(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ordered(v[k]) for k in sorted(v, key=lambda k: (len(k), k))}
        if isinstance(v, list):
            return [ordered(x) for x in v]
        return v

    return json.dumps(ordered(doc), ensure_ascii=False)


def test_available_transfer_syntax_uid_is_placed_in_tag_order(samples: object) -> None:
    """PS3.18 F.2.2: attributes "shall be ordered by their property name in ascending
    lexicographic (alphabetic) order": Available Transfer Syntax UID (0008,3002), added to the
    stored text of each instance's metadata, goes in its place, not last; higher tags nested in
    an earlier sequence, or text in values that looks like a key, do not mislead it."""
    from pathlib import Path

    import pydicom

    from dicomweb_server.metadata import _add_available_ts

    evrle = "1.2.840.10008.1.2.1"

    def added(doc: dict[str, Any]) -> None:
        text = _add_available_ts(_jsonb_text(doc), evrle, None)
        out = json.loads(text)
        assert list(out) == sorted(out), list(out)
        assert out.pop("00083002") == {"vr": "UI", "Value": [evrle]}
        assert out == doc

    cs = {"vr": "CS", "Value": ["X"]}
    code = {"vr": "SQ", "Value": [{"00080100": cs}]}
    added({"00080005": cs, "00100010": cs})
    added({"00080005": cs})  # last
    added({"00100010": cs})  # first
    added({"7FE00010": {"vr": "OW", "BulkDataURI": "/x"}})
    added({"00083001": {"vr": "SQ", "Value": [{"00083010": cs, "0040A170": {"vr": "SQ"}}]}})
    added({
        "00080005": cs,
        "00081140": {"vr": "SQ", "Value": [{}, {"00100010": cs, "00200013": {"vr": "IS"}}]},
        "00082112": {"vr": "SQ", "Value": [{"0040A170": code}]},
        "00100020": {"vr": "LO", "Value": ['a"}, "00100010": {"vr": "PN"}, {"00200010": {']},
        "30060039": {"vr": "SQ", "Value": [{"30060084": {"vr": "IS", "Value": [1]}}]},
    })  # fmt: skip
    added({
        "00081140": {"vr": "SQ", "Value": [{"30060084": cs}]},
        "30060039": {"vr": "SQ", "Value": [{"00100010": cs}]},
    })  # fmt: skip
    # A value the instance came with is the archive's to replace.
    text = _add_available_ts(
        _jsonb_text({"00080005": cs, "00083002": {"vr": "UI", "Value": ["1.2"]}, "00100010": cs}),
        evrle,
        None,
    )
    assert json.loads(text)["00083002"] == {"vr": "UI", "Value": [evrle]}
    assert text.count("00083002") == 1
    assert _add_available_ts("{}", evrle, None) == "{}"

    assert isinstance(samples, Path)
    for path in sorted(samples.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024, force=True)
        doc = dataset_to_json(ds, lambda p: "/bulk/" + p)
        doc.pop("00083002", None)
        added(json.loads(json.dumps(doc)))


@pytest.mark.db
async def test_served_metadata_follows_annex_f(app_client: Any, samples: object) -> None:
    """Through the archive and PostgreSQL's jsonb: instance, series and study metadata list
    their attributes in tag order, Available Transfer Syntax UID among them (PS3.18 F.2.2),
    with no group lengths (also in QIDO's includefield=all), empty values among several as
    null (F.2.5), names by their non-empty groups, and a big endian instance's inline binary
    values little endian (F.2.7)."""
    import base64
    import io
    from pathlib import Path

    import pydicom

    from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

    assert isinstance(samples, Path)
    ds = make_instance(patient_name="=山田^太郎")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "", "MPR"]
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "2.25.7"
    item.add_new(0x00200013, "IS", 3)  # a key above (0008,3002), nested before it
    ds.ReferencedImageSequence = Sequence([item])
    files = [
        to_bytes(ds),
        (samples / "real" / "pydicom-data" / "693_J2KR.dcm").read_bytes(),
        (samples / "real" / "pydicom-data" / "OBXXXX1A_expb.dcm").read_bytes(),
    ]
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    stored = [pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True) for f in files]
    for original in stored:
        url = inst_url(original)
        for resource in (url, url.rsplit("/instances/", 1)[0], url.rsplit("/series/", 1)[0]):
            for doc in (await app_client.get(f"{resource}/metadata")).json():
                keys = list(doc)  # as sent
                assert keys == sorted(keys), resource
                assert "00083002" in doc
                assert not [k for k in keys if k.endswith("0000")], resource
    r = await app_client.get(f"{ROOT}/instances", params={"includefield": "all"})
    assert r.status_code == 200
    assert len(r.json()) == 3
    for doc in r.json():
        assert not [k for k in doc if k.endswith("0000")]
    meta = (await app_client.get(f"{inst_url(ds)}/metadata")).json()[0]
    assert meta["00080008"]["Value"] == ["DERIVED", None, "MPR"]
    assert meta["00100010"]["Value"] == [{"Ideographic": "山田^太郎"}]
    assert meta["00081140"]["Value"][0]["00200013"] == {"vr": "IS", "Value": [3]}
    # The Red Palette Color Lookup Table Data (OW) of the big endian sample is that of its
    # little endian copy.
    big = (await app_client.get(f"{inst_url(stored[2])}/metadata")).json()[0]
    little = pydicom.dcmread(samples / "real" / "pydicom-data" / "OBXXXX1A.dcm")
    assert base64.b64decode(big["00281201"]["InlineBinary"]) == little[0x00281201].value
