"""Files found by STOW-RS differential testing against Orthanc (its DICOMweb plugin, dcmtk
underneath): ones we stored although their encoding contradicts itself, which dcmtk refuses
("premature end of stream") and which conformance/STATEMENT.md says we refuse."""

from __future__ import annotations

import struct
from pathlib import Path

import httpx
import pytest

from dicomweb_server.dicomfile import InvalidInstanceError, parse_file
from dicomweb_server.errors import FailureReason
from tests.helpers import (
    ROOT,
    element_bytes,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    return path


def _refused(path: Path) -> InvalidInstanceError:
    with pytest.raises(InvalidInstanceError) as info:
        parse_file(path)
    return info.value


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
