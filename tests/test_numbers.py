"""Numbers in DICOM JSON (field notes 12, PS3.18 F.2.3): DS and IS values are JSON Numbers when
valid and exact, strings otherwise; FL/FD NaN and infinities, and SV/UV beyond 2^53, are strings.
An instance carrying such values is stored, never refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomweb_server.dicom_json import (
    IS_MAX,
    IS_MIN,
    JSON_EXACT_INTEGER,
    number_string_json,
    simple_json,
)
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

WINDOW_CENTER, WINDOW_WIDTH, PIXEL_SPACING = 0x00281050, 0x00281051, 0x00280030
SLICE_THICKNESS, PATIENT_WEIGHT, SERIES_NUMBER = 0x00180050, 0x00101030, 0x00200011


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _set_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put bytes in a data set as they are: pydicom would refuse to convert invalid values."""
    value += b" " * (len(value) % 2)
    ds._dict[Tag(tag)] = _raw(tag, vr, value)


@pytest.mark.parametrize(
    ("vr", "raw", "expected"),
    [
        ("DS", b"1.5 ", [1.5]),
        ("DS", b" 40\\400", [40.0, 400.0]),
        ("DS", b"+.5\\-2E3\\5.", [0.5, -2000.0, 5.0]),
        ("DS", b"0.1", [0.1]),  # not exact in binary, but the same decimal both ways
        ("DS", b"1.50000000000000", [1.5]),  # trailing zeros: the same number
        ("DS", b"9007199254740993", ["9007199254740993"]),  # a double cannot hold it
        ("DS", b"123456789012345", [123456789012345.0]),  # 15 digits: exact
        ("DS", b"1e400", ["1e400"]),  # overflows a double
        ("DS", b"1e-400", ["1e-400"]),  # underflows to 0
        ("DS", b"NaN", ["NaN"]),
        ("DS", b"1,5", ["1,5"]),  # a decimal comma, as some modalities write
        ("DS", b"abc\\2", ["abc", 2.0]),
        ("DS", b"1\\\\2", [1.0, None, 2.0]),  # an empty value among several is null (F.2.5)
        ("DS", b"1.5\x00", [1.5]),  # NUL padding
        ("DS", b"", None),
        ("DS", b"  ", None),
        ("DS", b"1\xb52", ["1\ufffd2"]),  # a byte outside the default repertoire
        ("IS", b"12", [12]),
        ("IS", b"000000052637", [52637]),  # leading zeros are valid
        ("IS", b"-12 \\ +7", [-12, 7]),
        ("IS", str(IS_MAX).encode(), [IS_MAX]),
        ("IS", str(IS_MAX + 1).encode(), [str(IS_MAX + 1)]),  # out of range (PS3.5 6.2)
        ("IS", str(IS_MIN).encode(), [IS_MIN]),
        ("IS", str(IS_MIN - 1).encode(), [str(IS_MIN - 1)]),
        ("IS", b"12.0", ["12.0"]),  # not an integer string: kept as sent
        ("IS", b"x", ["x"]),
    ],
)
def test_number_strings(vr: str, raw: bytes, expected: list[Any] | None) -> None:
    got = number_string_json(vr, raw)
    assert got == ({"vr": vr} if expected is None else {"vr": vr, "Value": expected})
    # Every value as a JSON Number reads back as what the string says (no precision lost).
    texts = raw.decode("latin-1").split("\\") if "Value" in got else []
    for value, text in zip(got.get("Value", []), texts, strict=True):
        if isinstance(value, float):
            assert json.loads(json.dumps(value)) == float(text.strip(" \x00"))
    # The document is JSON PostgreSQL takes (no NaN or Infinity tokens).
    json.dumps(got, allow_nan=False)


def test_binary_numbers_json_cannot_hold_are_strings() -> None:
    nan_inf = struct.pack("<4d", float("nan"), float("inf"), float("-inf"), 2.5)
    assert simple_json(_raw(0x00189087, "FD", nan_inf), True) == {
        "vr": "FD", "Value": ["NaN", "Infinity", "-Infinity", 2.5]
    }  # fmt: skip
    assert simple_json(_raw(0x00189087, "FL", struct.pack("<f", float("nan"))), True) == {
        "vr": "FL", "Value": ["NaN"]
    }  # fmt: skip
    edge = struct.pack(
        "<4q",
        JSON_EXACT_INTEGER,
        JSON_EXACT_INTEGER + 1,
        -JSON_EXACT_INTEGER,
        -JSON_EXACT_INTEGER - 1,
    )
    assert simple_json(_raw(0x00720082, "SV", edge), True) == {
        "vr": "SV",
        "Value": [JSON_EXACT_INTEGER, str(JSON_EXACT_INTEGER + 1), -JSON_EXACT_INTEGER,
                  str(-JSON_EXACT_INTEGER - 1)],
    }  # fmt: skip
    uv = struct.pack("<2Q", 7, 2**64 - 1)
    assert simple_json(_raw(0x00720083, "UV", uv), True) == {
        "vr": "UV",
        "Value": [7, str(2**64 - 1)],
    }


def test_deferred_binary_values_are_not_read_and_are_range_served(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large binary values before Pixel Data (an overlay, palettes) are described from their
    position, never read at ingest, and their byte ranges are kept for bulk data retrieval."""
    import pydicom.filereader

    from dicomweb_server import dicom_json, dicomfile

    path = next(samples.rglob("examples_overlay.dcm"))
    read: list[int] = []
    real = pydicom.filereader.read_deferred_data_element

    def spy(*args: Any) -> Any:
        read.append(int(args[-1].tag))
        return real(*args)

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", spy)
    monkeypatch.setattr(dicom_json, "read_deferred_data_element", spy)
    parsed = dicomfile.parse_file(path)
    assert 0x60003000 not in read
    offset, length, vr, encapsulated = parsed.bulk_ranges["60003000"]
    ds = pydicom.dcmread(path)
    assert (vr, encapsulated) == ("OW", False)
    assert path.read_bytes()[offset : offset + length] == ds[0x60003000].value
    assert "BulkDataURI" in parsed.meta["60003000"]


@pytest.mark.db
async def test_instance_with_odd_numbers_is_stored_and_shown_as_sent(
    app_client: httpx.AsyncClient,
) -> None:
    ds = make_instance(modality="CT")
    _set_raw(ds, WINDOW_CENTER, "DS", b"40,5")  # a decimal comma
    _set_raw(ds, WINDOW_WIDTH, "DS", b"NaN")
    _set_raw(ds, PIXEL_SPACING, "DS", b"0.5\\\\0.5")  # an empty value among two
    _set_raw(ds, SLICE_THICKNESS, "DS", b"9007199254740993")
    _set_raw(ds, PATIENT_WEIGHT, "DS", b"1e400")
    _set_raw(ds, SERIES_NUMBER, "IS", b"12.0")
    _set_raw(ds, 0x00281052, "DS", b"-1024")  # Rescale Intercept
    _set_raw(ds, 0x00281053, "DS", b"1,0")  # Rescale Slope, a decimal comma
    _set_raw(ds, 0x00189087, "FD", struct.pack("<d", float("nan")))  # Diffusion b-value
    resp = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert resp.status_code == 200, resp.text
    meta = (await app_client.get(f"{inst_url(ds)}/metadata")).json()[0]
    assert meta["00281050"]["Value"] == ["40,5"]
    assert meta["00281051"]["Value"] == ["NaN"]
    assert meta["00280030"]["Value"] == [0.5, None, 0.5]
    assert meta["00180050"]["Value"] == ["9007199254740993"]
    assert meta["00101030"]["Value"] == ["1e400"]
    assert meta["00200011"]["Value"] == ["12.0"]
    assert meta["00189087"]["Value"] == ["NaN"]
    # Found by QIDO, with the series number as sent; the archive copy is the bytes sent.
    r = await app_client.get(f"{ROOT}/series", params={"SeriesInstanceUID": ds.SeriesInstanceUID})
    (series,) = r.json()
    assert series["00200011"]["Value"] == ["12.0"]
    r = await app_client.get(
        inst_url(ds),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert r.status_code == 200
    assert to_bytes(ds) in r.content
    # Rendered with the invalid rescale and window ignored: a viewer still gets a picture.
    r = await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    r = await app_client.get(f"{inst_url(ds)}/thumbnail", headers={"Accept": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_dimse_find_response_sends_number_strings_as_text() -> None:
    """A C-FIND response carries a DS or IS kept as a string as its text (pydicom would
    refuse to convert it), and numbers as numbers."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomweb_server.attributes import Level
    from dicomweb_server.dimse.identifier import FindRequest, find_response
    from dicomweb_server.query import parse

    req = FindRequest(
        parse(Level.SERIES, [], {}),
        "SERIES",
        (
            (0x0020000E, "UI"),
            (SERIES_NUMBER, "IS"),
            (PATIENT_WEIGHT, "DS"),
            (SLICE_THICKNESS, "DS"),
        ),
    )
    result = {
        "0020000E": {"vr": "UI", "Value": ["1.2.3"]},
        "00200011": {"vr": "IS", "Value": ["12.0"]},
        "00101030": {"vr": "DS", "Value": ["1,5", None, 2.5]},
        "00180050": {"vr": "DS", "Value": [1.25]},
    }
    ds = find_response(req, result, "ARCHIVE")
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ds)  # encodes, as pynetdicom does for the response
    written = out.getvalue()
    assert b"\x04\x00\x00\x0012.0" in written and b"\x08\x00\x00\x001,5\\\\2.5" in written
    assert ds[SLICE_THICKNESS].value == 1.25
    assert ds.QueryRetrieveLevel == "SERIES"


@pytest.mark.db
async def test_values_pydicom_renders_and_counts_written_oddly(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by review: a Number of Frames written `3.0` still counts 3 frames; FL/FD NaN in
    an element pydicom renders (a value longer than the bulk data threshold) is a string, not
    a JSON token PostgreSQL refuses; an animated GIF of an instance whose Frame Time is `33,3`
    is made at the default pace, not a 500."""
    ds = make_instance(frames=3, rows=4, cols=4)
    _set_raw(ds, 0x00280008, "IS", b"3.0")
    _set_raw(ds, 0x00181063, "DS", b"33,3")  # Frame Time
    doubles = [float("nan"), float("inf"), *range(198)]
    _set_raw(ds, 0x00189089, "FD", struct.pack(f"<{len(doubles)}d", *doubles))  # 1,600 bytes
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    meta = (await app_client.get(f"{inst_url(ds)}/metadata")).json()[0]
    assert meta["00280008"]["Value"] == ["3.0"]
    assert "BulkDataURI" in meta["00189089"] or meta["00189089"]["Value"][:2] == [
        "NaN", "Infinity"
    ]  # fmt: skip
    stored = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    for n in (1, 2, 3):
        r = await app_client.get(f"{inst_url(ds)}/frames/{n}", headers={"Accept": stored})
        assert r.status_code == 200, (n, r.text)
    r = await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "image/gif"})
    assert r.status_code == 200, r.text


def test_float_values_pydicom_renders_are_json_strings() -> None:
    """The slow path (pydicom's rendering: big endian here) writes FL/FD NaN and infinities
    and SV beyond 2^53 as strings too."""
    from dicomweb_server.dicom_json import dataset_to_json

    ds = Dataset()
    ds.set_original_encoding(False, False)  # explicit VR big endian
    ds._dict[Tag(0x00189087)] = RawDataElement(
        Tag(0x00189087), "FD", 16, struct.pack(">2d", float("nan"), 1.5), 0, False, False
    )
    ds._dict[Tag(0x00720082)] = RawDataElement(
        Tag(0x00720082), "SV", 8, struct.pack(">q", 2**60), 0, False, False
    )
    doc = dataset_to_json(ds, lambda p: p)
    assert doc["00189087"]["Value"] == ["NaN", 1.5]
    assert doc["00720082"]["Value"] == [str(2**60)]
    json.dumps(doc, allow_nan=False)


def test_dimse_find_response_number_strings_inside_a_sequence() -> None:
    from dicomweb_server.attributes import Level
    from dicomweb_server.dimse.identifier import FindRequest, find_response
    from dicomweb_server.query import parse

    req = FindRequest(parse(Level.INSTANCE, [], {}), "IMAGE", ((0x52009229, "SQ"),))
    item = {"00180050": {"vr": "DS", "Value": ["1,5"]}, "00200013": {"vr": "IS", "Value": [4]}}
    ds = find_response(req, {"52009229": {"vr": "SQ", "Value": [item]}}, "ARCHIVE")
    (got,) = ds[0x52009229].value
    raw = got.get_item(0x00180050)
    assert raw is not None and raw.value == b"1,5 " and got.InstanceNumber == 4
