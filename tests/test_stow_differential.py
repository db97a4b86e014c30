"""Files found by STOW-RS differential testing against Orthanc (its DICOMweb plugin, dcmtk
underneath): ones we stored although their encoding contradicts itself, which dcmtk refuses
("premature end of stream") and which conformance/STATEMENT.md says we refuse."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import httpx
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from dicomweb_server.dicomfile import configure_pydicom, parse_file
from dicomweb_server.errors import FailureReason
from tests.helpers import (
    ROOT,
    element_bytes,
    inst_url,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
)
from tests.test_malformed import _refused, _write


@pytest.fixture(autouse=True)
def _pydicom_configured() -> None:
    """parse_file as the server runs it (app.open_services): without it, a test run alone
    (`-k rows`) read a value of a wrong length with pydicom's defaults and failed."""
    configure_pydicom()


def _item_value_cut(declared: int, present: int) -> bytes:
    """A data set ending in a sequence of defined length that holds all its bytes, whose one
    item's last value, Code Meaning, declares `declared` bytes and has `present`: the shape of
    pydicom's rtplan_truncated.dcm (Isocenter Position 50 bytes, 29 there)."""
    ds = make_instance()
    del ds.PixelData
    inner = element_bytes(0x00080100, b"SH", b"12345")
    inner += struct.pack("<HH2sH", 0x0008, 0x0104, b"LO", declared) + b"m" * present
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    return to_bytes(ds) + struct.pack("<HH2sHI", 0x0040, 0x0260, b"SQ", 0, len(item)) + item


@pytest.mark.parametrize("missing", [1, 2, 20])
def test_value_cut_inside_a_sequence_item_is_refused(tmp_path: Path, missing: int) -> None:
    """The top-level sequence is whole, so the check of the file's last value passed; pydicom
    read the item's value as the bytes its sequence had. Stored, its metadata showed the value
    cut short as if whole (Orthanc refuses the file: 400)."""
    exc = _refused(_write(tmp_path, _item_value_cut(20 + missing, 20)))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert "(0008,0104)" in exc.message and "(0040,0260)" in exc.message
    assert f"lacks {missing} bytes" in exc.message


def test_whole_item_values_still_parse(tmp_path: Path) -> None:
    """The edge: a value holding exactly the bytes it declares."""
    parsed = parse_file(_write(tmp_path, _item_value_cut(20, 20)))
    (item,) = parsed.meta["00400260"]["Value"]
    assert item["00080104"]["Value"] == ["m" * 20]


def test_the_pydicom_sample_is_refused(samples: Path) -> None:
    """The real file the difference was found with (the corpus copy, its SOP Instance UID
    rewritten): its Beam Sequence is whole, the Control Point Sequence in its item is not
    (dcmtk: Isocenter Position, 50 bytes, with 29 left)."""
    exc = _refused(samples / "real/pydicom/rtplan_truncated.dcm")
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert "(300A,0111)" in exc.message and "BeamSequence" in exc.message


@pytest.mark.parametrize("stray", [b"a", b"abc", b"\xe0\x7f\x10\x00OB\x00"])
async def test_partial_element_header_after_pixel_data_is_refused(
    app_client: httpx.AsyncClient, stray: bytes
) -> None:
    """1 to 7 bytes after Pixel Data: pydicom reads no element from them and said nothing, so
    the file was stored (200) with bytes that are no element; the same bytes after any other
    last element were already refused (test_malformed). Orthanc refuses both."""
    ds = make_instance()
    r = await app_client.post(
        f"{ROOT}/studies",
        content=multipart_body([to_bytes(ds) + stray]),
        headers=stow_headers(),
    )
    assert r.status_code == 409, r.text
    (failed,) = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [FailureReason.CANNOT_UNDERSTAND]
    assert f"{len(stray)} bytes after the Pixel Data" in r.headers["Warning"]
    assert (await app_client.get(f"{ROOT}/instances")).status_code == 204


# ---------------------------------------------------------------- binary values of a wrong length


def _with_cut_values(implicit: bool, **cut: tuple[int, str, bytes]) -> tuple[Dataset, bytes]:
    """make_instance() with values whose length is no multiple of their VR's size (PS3.5 6.2),
    written by hand: each `cut` value is first written whole (padded with 0xAA), then cut."""
    ds = make_instance()
    ds.add_new(0x00290010, "LO", "ACME")
    whole: list[tuple[int, str, bytes, bytes]] = []
    for tag, vr, value in cut.values():
        padded = value + b"\xaa" * (-len(value) % {"US": 2, "UL": 4, "FD": 8}[vr])
        ds[tag] = RawDataElement(Tag(tag), vr, len(padded), padded, 0, False, True)
        whole.append((tag, vr, padded, value))
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        for tag, _vr, padded, _ in whole:
            ds[tag] = RawDataElement(Tag(tag), None, len(padded), padded, 0, True, True)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=implicit, enforce_file_format=True)
    data = buf.getvalue()
    for tag, vr, padded, value in whole:
        g, e = tag >> 16, tag & 0xFFFF
        if implicit:
            old, new = (struct.pack("<HHI", g, e, len(v)) + v for v in (padded, value))
        else:
            old, new = (
                struct.pack("<HH2sH", g, e, vr.encode(), len(v)) + v for v in (padded, value)
            )
        assert data.count(old) == 1
        data = data.replace(old, new)
    return ds, data


@pytest.mark.parametrize("implicit", [False, True])
async def test_binary_values_of_a_wrong_length_are_stored_as_sent(
    app_client: httpx.AsyncClient, implicit: bool
) -> None:
    """Acquisition Matrix (US) of 5 bytes, a private UL of 2, a Diffusion b-value (FD) of 4:
    pydicom refuses to convert them, and the instance was refused ("cannot parse the data
    set: Expected total bytes to be an even multiple of bytes per value"); dcmtk reads them
    and Orthanc stores the file. Invalid values are stored as sent: the metadata gives their
    bytes as UN, and a conversion (implicit VR to explicit) writes them so, bytes kept."""
    ds, data = _with_cut_values(
        implicit,
        matrix=(0x00181310, "US", b"\x01\x00\x02\x00\x03"),
        private=(0x00291001, "UL", b"\x01\x00"),
        b_value=(0x00189087, "FD", b"\0\0\0\0"),
    )
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200, r.headers.get("Warning")
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    assert meta["00181310"] == {"vr": "UN", "InlineBinary": "AQACAAM="}
    assert meta["00291001"] == {"vr": "UN", "InlineBinary": "AQA="}
    assert meta["00189087"] == {"vr": "UN", "InlineBinary": "AAAAAA=="}
    got = await app_client.get(inst_url(ds), headers={"Accept": "application/dicom"})
    assert got.status_code == 200, got.text
    if implicit:  # sent converted (PS3.18 8.7.3), the values written as UN, bytes kept
        un = struct.pack("<HH2sHI", 0x0018, 0x1310, b"UN", 0, 5) + b"\x01\x00\x02\x00\x03"
        assert un in got.content
    else:
        assert got.content == data
    assert (await app_client.get(f"{ROOT}/instances")).json()


@pytest.mark.parametrize(
    ("tag", "vr", "value", "reason"),
    [
        (0x00280101, "US", b"\x0c\x00\x00", "(0028,0101) BitsStored has 3 bytes, no whole US"),
        (0x00280106, "US", b"\x01", "(0028,0106) SmallestImagePixelValue has 1 bytes"),
    ],
)
@pytest.mark.parametrize("implicit", [False, True])
async def test_pixel_description_of_a_wrong_length_is_refused(
    app_client: httpx.AsyncClient, implicit: bool, tag: int, vr: str, value: bytes, reason: str
) -> None:
    """Group 0028 is what decoding and rendering read: a Bits Stored of 3 bytes, stored as the
    rest, made every rendering (and every conversion of an implicit VR one) a 500."""
    _, data = _with_cut_values(implicit, bad=(tag, vr, value))
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 409, r.text
    (failed,) = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [FailureReason.CANNOT_UNDERSTAND]
    assert reason in r.headers["Warning"] and "PS3.5 6.2" in r.headers["Warning"]


def test_rows_of_a_wrong_length_gives_its_reason(tmp_path: Path) -> None:
    """Rows read to lay the frames out: the reason was pydicom's "invalid literal for int()"."""
    data = to_bytes(make_instance())
    rows = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2) + struct.pack("<H", 4)
    assert data.count(rows) == 1
    data = data.replace(rows, struct.pack("<HH2sH", 0x0028, 0x0010, b"UL", 2) + b"\x04\x00")
    exc = _refused(_write(tmp_path, data))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert exc.message == "(0028,0010) Rows has 2 bytes, no whole UL values (PS3.5 6.2)"


def test_zeros_after_pixel_data_are_refused_for_what_they_are(tmp_path: Path) -> None:
    """Zero bytes after Pixel Data (a tail padded with NULs: Orthanc stores such a file) stay
    refused, as PS3.10 7.2 pads with (FFFC,FFFC); the reason said "(0000,0000) after the Pixel
    Data is out of tag order or repeated"."""
    exc = _refused(_write(tmp_path, to_bytes(make_instance()) + bytes(64)))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert exc.message.startswith("64 bytes after the Pixel Data begin with zeros")


_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # PS3.5 7.5.2, explicit VR LE


@pytest.mark.parametrize(
    "tail", [_ITEM_DELIMITER, element_bytes(0xFFFCFFFC, b"OB", bytes(4)) + _ITEM_DELIMITER]
)
def test_item_delimiter_ending_the_file_after_pixel_data_is_accepted(
    tmp_path: Path, tail: bytes
) -> None:
    """An Item Delimitation Item ending the file after Pixel Data: dcmtk (dcmdump, so
    Orthanc) and pydicom end the data set there, and it was stored; the check of 1 to 7 stray
    bytes refused it, "8 bytes after the Pixel Data, no whole element" (found by review)."""
    ds = make_instance()
    parsed = parse_file(_write(tmp_path, to_bytes(ds) + tail))
    assert parsed.uids[1] == ds.SOPInstanceUID
    assert "FFFEE00D" not in parsed.meta


def test_bytes_after_an_item_delimiter_after_pixel_data_are_refused(tmp_path: Path) -> None:
    """pydicom stops at the delimiter and ignored what followed it (stored before)."""
    exc = _refused(_write(tmp_path, to_bytes(make_instance()) + _ITEM_DELIMITER + b"junk"))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert exc.message == (
        "truncated data set: 4 bytes after the Item Delimitation Item (FFFE,E00D) that ends"
        " the data set after the Pixel Data"
    )
