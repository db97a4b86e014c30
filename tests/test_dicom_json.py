"""DICOM JSON: the walker's BulkDataURIs, URI absolutisation, the STOW response document."""

from __future__ import annotations

import json
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb_server.dicom_json import (
    InstanceOutcome,
    absolutize_bulk_uris,
    dataset_to_json,
    stow_response,
)
from dicomweb_server.errors import FailureReason


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
