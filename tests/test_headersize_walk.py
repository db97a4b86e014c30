"""The header walk (headersize.measure) read as pydicom reads the data set, found by review:
valid instances are not refused for a header they do not have, and a malformed one is refused
for what it is (0xC000), not as too large (0xA700)."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicomweb_server import dicomfile, headersize
from dicomweb_server.dicomfile import parse_file, sop_uids
from dicomweb_server.dimse.stores import command_mismatch
from dicomweb_server.errors import FailureReason
from dicomweb_server.wellformed import InvalidInstanceError
from tests.helpers import make_instance
from tests.test_deep_sequences import deep_part10
from tests.test_headersize import _element, _measured, _pydicom_elements, part10

_UNDEFINED = 0xFFFFFFFF


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _delimiter(element: int) -> bytes:
    return struct.pack("<HHI", 0xFFFE, element, 0)


def test_an_icon_images_pixel_data_in_an_implicit_vr_item_is_no_sequence(
    tmp_path: Path,
) -> None:
    """A private sequence sent as UN of undefined length (its items Implicit VR Little
    Endian, PS3.5 6.2.2) holding an icon image whose Pixel Data is encapsulated (PS3.5 A.4):
    pydicom reads that Pixel Data, a tag its dictionary knows as no sequence, as a value up to
    its Sequence Delimitation Item. The walk took it for a sequence because its first bytes
    are an item, and read the JPEG fragment's bytes (FF D8 FF E0 ...) as element headers of
    gigabytes: the instance, stored before, was refused with 0xA700."""
    jpeg_file = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert jpeg_file is not None
    source = pydicom.dcmread(jpeg_file)
    jpeg = next(generate_frames(source.PixelData, number_of_frames=1))
    assert jpeg[:4] == b"\xff\xd8\xff\xe0"  # a JFIF APP0: its length and "JF", read as 4
    pixels = struct.pack("<HHI", 0x7FE0, 0x0010, _UNDEFINED)
    pixels += struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # an empty Basic Offset Table
    pixels += struct.pack("<HHI", 0xFFFE, 0xE000, len(jpeg)) + jpeg + _delimiter(0xE0DD)
    icon = _implicit(0x00280002, struct.pack("<H", 3)) + _implicit(0x00280010, b"\x40\x00")
    item = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED) + icon + pixels + _delimiter(0xE00D)
    sequence = struct.pack("<HH2sHI", 0x0009, 0x1010, b"UN", 0, _UNDEFINED)
    sequence += item + _delimiter(0xE0DD)
    ds = make_instance(rows=256, cols=256)  # past _UNWALKED_MAX_BYTES: walked
    raw = part10(ds, {
        0x00090010: _element(0x00090010, b"LO", b"ACME", False),
        0x00091010: sequence,
    })  # fmt: skip
    size, at = _measured(raw)
    assert len(raw) - at > headersize._UNWALKED_MAX_BYTES
    # All of it but the top-level Pixel Data, as pydicom reads it (the icon's Pixel Data too).
    assert size.held_bytes == len(raw) - at - (12 + 256 * 256 * 2), size
    assert size.elements == _pydicom_elements(raw) + 1, size
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    parsed = parse_file(path)
    assert parsed.uids[1] == ds.SOPInstanceUID
    (icon_item,) = parsed.meta["00091010"]["Value"]
    assert "7FE00010" in icon_item


def _text_cut_short(ds: pydicom.Dataset) -> bytes:
    """`ds` and a private UT declared 100,000,000 bytes long, the file ending 70,000 into it."""
    head = struct.pack("<HH2sHI", 0x0029, 0x1010, b"UT", 0, 100_000_000)
    raw = part10(ds, {
        0x00290010: _element(0x00290010, b"LO", b"ACME", False),
        0x00291010: head + b"t" * 70_000,
    })  # fmt: skip
    return raw[: raw.index(head) + len(head) + 70_000]


def _value_past_its_sequence(ds: pydicom.Dataset) -> bytes:
    """`ds` and a sequence of defined length whose item holds a value declared 1,500,000
    bytes long, 8 of them in the sequence (the file goes on: the Pixel Data)."""
    leaf = _element(0x00081150, b"UI", b"1.2.3\0", False)
    cut = struct.pack("<HH2sHI", 0x0029, 0x1010, b"UT", 0, 1_500_000) + b"x" * 8
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(leaf + cut)) + leaf + cut
    return part10(ds, {0x00081140: _element(0x00081140, b"SQ", item, False)})


@pytest.mark.parametrize("shape", ["truncated file", "value past its sequence"])
def test_a_value_cut_short_is_refused_as_such_not_as_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """A value declared longer than the file, or than the sequence of defined length it is in:
    the walk counted its declared length as held and refused the instance with 0xA700 ("header
    of at least 100000196 bytes past MAX_HEADER_BYTES"), a limit of the archive the sender
    passed (a DIMSE sender may send it again later), where the parse refuses it as cut short
    (0xC000, as before the walk). The walk stops there and leaves it to the parse."""
    monkeypatch.setattr(headersize, "MAX_HEADER_BYTES", 1024 * 1024)
    ds = make_instance(rows=1024, cols=1024)
    raw = _text_cut_short(ds) if shape == "truncated file" else _value_past_its_sequence(ds)
    size, _ = _measured(raw)
    assert size.held_bytes < 64 * 1024, size
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    with pytest.raises(InvalidInstanceError) as caught:
        parse_file(path)
    assert caught.value.reason == FailureReason.CANNOT_UNDERSTAND, caught.value
    assert "truncated data set: value of (0029,1010)" in caught.value.message
    assert not caught.value.over_limit


def test_fragments_are_skipped_a_window_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encapsulated Pixel Data of 100,000 fragments (a whole-slide level of 100,000 tiles),
    elements after it: the fragments are skipped in a loop of their own, not one turn of the
    walk each (1.8 s a million: twice the parse's own walk of them, 15 minutes for 4 GB of
    empty fragments), and what follows them is counted as before, across window edges."""
    ds = make_instance(rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    del ds.PixelData
    fragments = b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, n % 31 * 2) + b"\xff" * (n % 31 * 2)
        for n in range(100_000)
    )
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, _UNDEFINED) + fragments
    pixels += _delimiter(0xE0DD)
    after = _element(0x7FE10010, b"LO", b"ACME", False)
    raw = part10(ds, {0x7FE00010: pixels, 0x7FE10010: after}, JPEGBaseline8Bit)
    turns = 0
    window_at = headersize._Walk._at

    def counted(walk: headersize._Walk, pos: int, n: int) -> int:
        nonlocal turns
        turns += 1
        return window_at(walk, pos, n)

    monkeypatch.setattr(headersize._Walk, "_at", counted)
    size, at = _measured(raw)
    assert turns < 1000, turns  # about one a window read (64 KiB), not 100,000
    assert size.held_bytes == len(raw) - at - len(pixels), size
    assert size.elements == len(ds) + 1, size  # (Pixel Data deleted from ds) the LO after it


def _language_codes(count: int, implicit: bool) -> bytes:
    """`count` Language Code Sequences (0008,0006) of undefined length, an item of undefined
    length each (as dcmtk writes sequences), holding a Code Value."""
    code = _element(0x00080100, b"SH", b"eng ", implicit)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED) + code + _delimiter(0xE00D)
    head = struct.pack("<HH", 0x0008, 0x0006) + (b"" if implicit else b"SQ\0\0")
    return (head + struct.pack("<I", _UNDEFINED) + item + _delimiter(0xE0DD)) * count


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_c_store_naming_another_instance_is_refused_after_a_sequence(
    tmp_path: Path, syntax: str
) -> None:
    """A data set with a sequence of undefined length before (0008,0018) (a Language Code
    Sequence): sop_uids stopped there, its UIDs unknown, and the C-STORE check that the data
    set is the request's instance (PS3.7 9.1.1.1) was skipped: one naming another SOP
    Instance was stored under a File Meta Information built from the request. The sequence
    is walked past now, not parsed."""
    ds = make_instance()
    path = tmp_path / "x.dcm"
    path.write_bytes(
        part10(ds, {0x00080006: _language_codes(1, syntax != ExplicitVRLittleEndian)}, syntax)
    )
    assert pydicom.dcmread(path).LanguageCodeSequence[0].CodeValue == "eng"
    assert sop_uids(path) == (ds.SOPClassUID, ds.SOPInstanceUID)
    same = SimpleNamespace(
        AffectedSOPClassUID=ds.SOPClassUID, AffectedSOPInstanceUID=ds.SOPInstanceUID
    )
    other = SimpleNamespace(AffectedSOPClassUID=ds.SOPClassUID, AffectedSOPInstanceUID="1.2.3")
    assert command_mismatch(path, cast(Any, same)) is None
    assert f"SOPInstanceUID {ds.SOPInstanceUID} is not the Affected" in str(
        command_mismatch(path, cast(Any, other))
    )


@pytest.mark.parametrize("over", [0, 1])
def test_values_of_undefined_length_walked_past_at_most(tmp_path: Path, over: int) -> None:
    """As many as _SOP_UIDS_SKIPS before (0008,0018) are walked past; one more, the UIDs are
    not known (the C-STORE check is left to the ingest's parse, as for an unreadable one)."""
    ds = make_instance()
    count = dicomfile._SOP_UIDS_SKIPS + over
    path = tmp_path / "x.dcm"
    path.write_bytes(part10(ds, {0x00080006: _language_codes(count, False)}))
    assert sop_uids(path) == (("", "") if over else (ds.SOPClassUID, ds.SOPInstanceUID))


def test_too_deep_is_refused_as_such_whatever_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences nested 100 levels, then 2 MB of Pixel Data: the walk, past the depth the
    parse refuses, counted the rest of the file as held, as small elements, the Pixel Data
    too, and refused the instance with 0xA700 as too large (`header of 4194747 elements and
    items` for 32 MB of it) where the parse refuses it as too deep (0xC000, as before the
    walk). The walk refuses it so now, before pydicom holds what is nested there."""
    monkeypatch.setattr(headersize, "MAX_HEADER_BYTES", 1024 * 1024)
    raw = deep_part10(make_instance(rows=1024, cols=1024), 100, True, True)
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    with pytest.raises(InvalidInstanceError) as caught:
        parse_file(path)
    assert caught.value.reason == FailureReason.CANNOT_UNDERSTAND, caught.value
    assert caught.value.message == (
        "sequences nested deeper than 64 levels in (0008,1140) ReferencedImageSequence,"
        " the most this archive takes"
    )
