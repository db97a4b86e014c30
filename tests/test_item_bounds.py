"""Items and delimiters where PS3.5 7.5 does not put them, read leniently by pydicom: an item
that declares more bytes than its sequence of defined length has left (refused), and an Item
Delimitation Item ending a data set with no Pixel Data (read as the end of the data set, as
after Pixel Data: test_stow_differential)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

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


@pytest.mark.parametrize(("implicit", "vr"), [(True, b"SQ"), (False, b"UN")])
async def test_empty_sequence_in_an_item_is_stored(
    app_client: httpx.AsyncClient, implicit: bool, vr: bytes
) -> None:
    """An empty sequence of defined length (0) in an item, in implicit VR (the VR looked up)
    or as an explicit UN: pydicom reads its value as None, not b"", as for a value left
    unread past the bulk data threshold. It was read again from the file as such a value,
    which an item cannot be (the item is no file data set), and refused: "cannot parse the
    data set: 'Dataset' object has no attribute 'filename'"."""
    empty = _header(0x00400008, vr, 0, implicit)
    data = _instance([_item(empty + _code(implicit))], implicit=implicit)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200, r.headers.get("Warning")
    got = await app_client.get(
        f"{ROOT}/instances", params={"SOPInstanceUID": _SOP, "includefield": "00400260"}
    )
    assert got.status_code == 200


# ------------------------------------------------ an Item Delimitation Item ending the data set


def _no_pixels(implicit: bool = False, ds: Dataset | None = None) -> bytes:
    ds = ds or make_instance(sop=_SOP)
    del ds.PixelData
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return to_bytes(ds)


async def test_item_delimiter_ending_a_data_set_without_pixel_data_is_stored(
    app_client: httpx.AsyncClient,
) -> None:
    """PS3.5 7.5.2 puts an Item Delimitation Item only at the end of an item of undefined
    length; at the end of the file pydicom and dcmtk (dcmdump: no error) both end the data set
    there, as after Pixel Data, where it was stored. Here it was refused as "truncated data
    set: 8 bytes after (0028,0103), no whole element", naming no delimiter."""
    ds = make_instance()
    data = _no_pixels(ds=ds) + _ITEM_DELIMITER
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200, r.headers.get("Warning")
    got = await app_client.get(
        f"{inst_url(ds)}/metadata", headers={"Accept": "application/dicom+json"}
    )
    assert got.status_code == 200
    (meta,) = got.json()
    assert "FFFEE00D" not in meta and meta["00280103"]["Value"] == [0]
    served = await app_client.get(inst_url(ds), headers={"Accept": _AS_STORED})
    assert served.status_code == 200 and data in served.content  # the delimiter with it


def _ending_in_a_sequence() -> bytes:
    return _instance([_item(_code(False))])


def _ending_in_an_undefined_sequence() -> bytes:
    """The last element a sequence of undefined length, its one item of undefined length."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + _code(False) + _ITEM_DELIMITER
    end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return _no_pixels() + _header(0x00400260, b"SQ", 0xFFFFFFFF, False) + item + end


def _implicit() -> bytes:
    return _no_pixels(implicit=True)


@pytest.mark.parametrize(
    "ending", [_ending_in_a_sequence, _ending_in_an_undefined_sequence, _implicit]
)
def test_item_delimiter_after_any_last_element_is_stored(
    tmp_path: Path, ending: Callable[[], bytes]
) -> None:
    parsed = parse_file(_write(tmp_path, ending() + _ITEM_DELIMITER))
    assert "FFFEE00D" not in parsed.meta
    assert parsed.uids[1] == _SOP
    if ending is not _implicit:
        (item,) = parsed.meta["00400260"]["Value"]
        assert item["00080104"]["Value"] == ["meaning"]


@pytest.mark.parametrize("junk", [b"ab", b"junk", _ITEM_DELIMITER, _AFTER])
@pytest.mark.parametrize("ending", [_no_pixels, _ending_in_an_undefined_sequence])
def test_bytes_after_an_item_delimiter_ending_the_data_set_are_refused(
    tmp_path: Path, junk: bytes, ending: Callable[[], bytes]
) -> None:
    """pydicom stops at the delimiter and never reads what follows (after a sequence of
    undefined length, stored before: the check of the last element stopped at it)."""
    exc = _refused(_write(tmp_path, ending() + _ITEM_DELIMITER + junk))
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND
    assert exc.message == (
        f"truncated data set: {len(junk)} bytes after the Item Delimitation Item (FFFE,E00D)"
        " that ends the data set"
    )


def _deflated(tail: bytes) -> bytes:
    """_no_pixels() in Deflated Explicit VR Little Endian, `tail` inflated after its last
    element."""
    ds = make_instance(sop=_SOP)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(ds)
    # The File Meta Information: 128-byte preamble, DICM, its group length element, the group
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    body = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS) + tail
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return data[:meta_end] + packer.compress(body) + packer.flush()


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (_ITEM_DELIMITER + _AFTER, "8 bytes after the Item Delimitation Item (FFFE,E00D)"),
        (element_bytes(0x00400280, b"ST", b"comments")[:-3], "value of (0040,0280) lacks 3"),
        (b"\x40\x00", "2 bytes after (0028,0103), no whole element"),
    ],
)
async def test_deflated_data_set_is_whole_as_any(
    app_client: httpx.AsyncClient, tail: bytes, reason: str
) -> None:
    """A Deflated data set is read from its inflated bytes, where pydicom stops as silently
    as in a file: at an Item Delimitation Item (what follows never read), inside a value cut
    short (the bytes there are), at an element header cut short. The same data set not
    Deflated was refused; Deflated, it was stored, and its metadata said what only pydicom
    reads."""
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([_deflated(tail)]), headers=stow_headers()
    )
    assert r.status_code == 409, r.text
    assert reason in r.headers["Warning"]
    assert (await app_client.get(f"{ROOT}/instances")).status_code == 204


async def test_deflated_data_set_ending_in_an_item_delimiter_is_stored(
    app_client: httpx.AsyncClient,
) -> None:
    r = await app_client.post(
        f"{ROOT}/studies",
        content=multipart_body([_deflated(_ITEM_DELIMITER)]),
        headers=stow_headers(),
    )
    assert r.status_code == 200, r.headers.get("Warning")
