"""Items where PS3.5 7.5 does not put them, read leniently by pydicom: an item that declares
more bytes than its sequence of defined length has left (refused)."""

from __future__ import annotations

import struct
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from dicomweb_server.dicomfile import configure_pydicom, parse_file
from dicomweb_server.errors import FailureReason
from tests.helpers import (
    ROOT,
    element_bytes,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
)
from tests.test_malformed import _refused, _write

_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # PS3.5 7.5.2, little endian
# (0040,0280) Comments on the Performed Procedure Step, empty: 8 bytes in explicit VR LE.
_AFTER = element_bytes(0x00400280, b"ST", b"")
_SOP = "1.2.826.0.1.3680043.8.498.7501"
_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(autouse=True)
def _pydicom_configured() -> None:
    configure_pydicom()


def _header(tag: int, vr: bytes, length: int, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)


def _element(tag: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    return element_bytes(tag, vr, value)


def _item(inner: bytes, extra: int = 0) -> bytes:
    """An item of defined length holding `inner`, declaring `extra` bytes more."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(inner) + extra) + inner


def _code(implicit: bool, meaning: bytes = b"meaning ") -> bytes:
    return _element(0x00080100, b"SH", b"12345 ", implicit) + _element(
        0x00080104, b"LO", meaning, implicit
    )


def _instance(items: list[bytes], after: bytes = b"", implicit: bool = False) -> bytes:
    """make_instance() without Pixel Data, then Performed Protocol Code Sequence (0040,0260)
    of defined length holding `items`, then `after`."""
    ds = make_instance(sop=_SOP)
    del ds.PixelData
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    value = b"".join(items)
    return to_bytes(ds) + _header(0x00400260, b"SQ", len(value), implicit) + value + after


async def test_item_overrunning_its_sequence_is_refused_at_stow(
    app_client: httpx.AsyncClient,
) -> None:
    """The item declares 8 bytes more than its sequence holds, and its elements end where the
    sequence does. pydicom ended the item with the sequence and read (0040,0280) after it at
    the top level; dcmtk reads the item on and takes (0040,0280) into it. Stored (200), the
    metadata served said what only pydicom reads."""
    data = _instance([_item(_code(False), extra=8)], after=_AFTER)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 409, r.text
    (failed,) = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [FailureReason.CANNOT_UNDERSTAND]
    assert (
        "item 1 of (0040,0260) PerformedProtocolCodeSequence declares 38 bytes, its sequence"
        " of defined length has 30 left (PS3.5 7.5)"
    ) in r.headers["Warning"]
    assert (await app_client.get(f"{ROOT}/instances")).status_code == 204


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("extra", [1, 2, 100, 0xFFFFFFFE - 30])
def test_item_overrunning_its_sequence_is_refused(
    tmp_path: Path, implicit: bool, extra: int
) -> None:
    """At the end of the file too (nothing after the sequence), in either VR encoding."""
    exc = _refused(_write(tmp_path, _instance([_item(_code(implicit), extra)], implicit=implicit)))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert exc.message.startswith("item 1 of (0040,0260) PerformedProtocolCodeSequence")
    assert exc.message.endswith(
        f"declares {30 + extra} bytes, its sequence of defined length has 30 left (PS3.5 7.5)"
    )


@pytest.mark.parametrize("implicit", [False, True])
def test_item_filling_its_sequence_exactly_is_stored(tmp_path: Path, implicit: bool) -> None:
    """The edge: items that end where their sequence ends, the last one empty."""
    data = _instance([_item(_code(implicit)), _item(b"")], after=b"", implicit=implicit)
    parsed = parse_file(_write(tmp_path, data))
    first, second = parsed.meta["00400260"]["Value"]
    assert first["00080104"]["Value"] == ["meaning"] and second == {}


def test_second_item_overrunning_is_named(tmp_path: Path) -> None:
    data = _instance([_item(_code(False)), _item(_code(False), extra=2)], after=_AFTER)
    exc = _refused(_write(tmp_path, data))
    assert exc.message.startswith("item 2 of (0040,0260) PerformedProtocolCodeSequence")


def test_item_overrunning_a_nested_sequence_is_refused(tmp_path: Path) -> None:
    """A sequence of defined length inside an item: its item runs past it into the outer
    item's next element, the outer sequence whole."""
    inner_item = _item(_code(False), extra=8)
    nested = _header(0x00400008, b"SQ", len(inner_item), False) + inner_item
    outer = _item(nested + element_bytes(0x00400009, b"SH", b"STEP-1"))
    exc = _refused(_write(tmp_path, _instance([outer], after=_AFTER)))
    assert exc.message == (
        "item 1 of (0040,0008) ScheduledProtocolCodeSequence in (0040,0260)"
        " PerformedProtocolCodeSequence declares 38 bytes, its sequence of defined length has"
        " 30 left (PS3.5 7.5)"
    )


def test_item_overrunning_a_deferred_sequence_is_refused(tmp_path: Path) -> None:
    """A sequence over the bulk data threshold (1024 bytes) is left unread by pydicom until
    it is walked: checked all the same."""
    long = _item(_code(False, meaning=b"m" * 2000), extra=4)
    exc = _refused(_write(tmp_path, _instance([long], after=_AFTER)))
    assert exc.message.endswith(
        "declares 2026 bytes, its sequence of defined length has 2022 left (PS3.5 7.5)"
    )
    whole = parse_file(_write(tmp_path, _instance([_item(_code(False, b"m" * 2000))])))
    (item,) = whole.meta["00400260"]["Value"]
    assert item["00080104"]["Value"] == ["m" * 2000]
