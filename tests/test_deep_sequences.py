"""Part-10 instances with sequences nested deep, written by hand (explicit and implicit VR,
items of defined and undefined length): refused past dicomfile.MAX_SEQUENCE_DEPTH with a
reason, in bounded memory and time, and served whole below it. pydicom reads and writes
sequences recursively, and its writer re-raises a failure in each enclosing sequence with the
message and traceback so far, doubling it per level (as for STOW-RS JSON metadata,
tests/test_stow_json.py)."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomweb_server import stow_json
from dicomweb_server.dicomfile import MAX_SEQUENCE_DEPTH, InvalidInstanceError, parse_file
from dicomweb_server.errors import FailureReason
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers

_SEQUENCE = 0x00081140  # Referenced Image Sequence, nested in its own items
_LONG_LENGTH = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF
ENCODINGS = [(False, False), (False, True), (True, False), (True, True)]  # implicit, undefined


def element(tag: int, vr: bytes, value: bytes, implicit: bool, length: int | None = None) -> bytes:
    """One little endian data element, explicit or implicit VR, written by hand."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", n) + value
    if vr in _LONG_LENGTH:
        return head + vr + b"\0\0" + struct.pack("<I", n) + value
    return head + vr + struct.pack("<H", n) + value


def nested(levels: int, leaf: bytes, implicit: bool, undefined: bool) -> bytes:
    """`levels` sequences, each with one item holding the next; `leaf` in the innermost."""
    body = leaf
    for _ in range(levels):
        if undefined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED) + body
            item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            value = item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            body = element(_SEQUENCE, b"SQ", value, implicit, _UNDEFINED)
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
            body = element(_SEQUENCE, b"SQ", item, implicit)
    return body


def deep_part10(
    ds: Dataset, levels: int, implicit: bool = False, undefined: bool = False, leaf: bytes = b""
) -> bytes:
    """`ds` as a Part-10 file with `levels` nested sequences at (0008,1140)."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    for part in (
        Dataset({t: e for t, e in ds.items() if t < _SEQUENCE}),
        nested(
            levels, leaf or element(0x00081150, b"UI", b"1.2.3\0", implicit), implicit, undefined
        ),
        Dataset({t: e for t, e in ds.items() if t > _SEQUENCE}),
    ):
        if isinstance(part, bytes):
            out.write(part)
            continue
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, implicit
        write_dataset(buf, part)
        out.write(buf.getvalue())
    return out.getvalue()


def test_json_metadata_takes_the_same_limit() -> None:
    assert stow_json.MAX_JSON_SEQUENCE_DEPTH == MAX_SEQUENCE_DEPTH == 64


@pytest.mark.parametrize(("implicit", "undefined"), ENCODINGS)
def test_max_sequence_depth_at_its_edge(tmp_path: Path, implicit: bool, undefined: bool) -> None:
    """MAX_SEQUENCE_DEPTH levels parse, the innermost value in the DICOM JSON; one more is
    refused (0xC000) with the limit as the reason. Without the limit, every encoding was
    stored up to about 200 levels (deeper ones overflowed pydicom's reader)."""
    path = tmp_path / "x.dcm"
    path.write_bytes(deep_part10(make_instance(), MAX_SEQUENCE_DEPTH, implicit, undefined))
    node: Any = parse_file(path).meta
    for _ in range(MAX_SEQUENCE_DEPTH):
        (node,) = node["00081140"]["Value"]
    assert node["00081150"]["Value"] == ["1.2.3"]
    path.write_bytes(deep_part10(make_instance(), MAX_SEQUENCE_DEPTH + 1, implicit, undefined))
    with pytest.raises(InvalidInstanceError) as caught:
        parse_file(path)
    assert caught.value.reason == FailureReason.CANNOT_UNDERSTAND
    assert f"deeper than {MAX_SEQUENCE_DEPTH} levels" in caught.value.message


@pytest.mark.parametrize("levels", [300, 3000])
@pytest.mark.parametrize(("implicit", "undefined"), ENCODINGS)
def test_far_deeper_is_refused_in_bounded_memory_and_time(
    tmp_path: Path, levels: int, implicit: bool, undefined: bool
) -> None:
    """300 and 3000 levels: the same reason as one level too many (pydicom's reader
    overflowing on items of undefined length included), in a few MB and well under a second."""
    path = tmp_path / "x.dcm"
    path.write_bytes(deep_part10(make_instance(), levels, implicit, undefined))
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidInstanceError) as caught:
            parse_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5
    assert peak < 40 * 1024 * 1024, peak
    assert f"deeper than {MAX_SEQUENCE_DEPTH} levels" in caught.value.message


@pytest.mark.db
async def test_stow_stores_the_deepest_and_refuses_deeper(app_client: httpx.AsyncClient) -> None:
    """STOW-RS Part-10: MAX_SEQUENCE_DEPTH levels stored and served (metadata as JSON and
    XML); one more, 300 and 3000 levels fail that instance (0xC000) and leave nothing."""
    instances = [make_instance() for _ in range(4)]
    levels = [MAX_SEQUENCE_DEPTH, MAX_SEQUENCE_DEPTH + 1, 300, 3000]
    parts = [
        deep_part10(ds, n, implicit=i % 2 == 1, undefined=i > 1)
        for i, (ds, n) in enumerate(zip(instances, levels, strict=True))
    ]
    r = await app_client.post(f"{ROOT}/studies", content=multipart_body(parts),
                              headers=stow_headers())  # fmt: skip
    assert r.status_code == 202, r.text
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xC000]] * 3
    assert f"deeper than {MAX_SEQUENCE_DEPTH} levels" in r.headers.get("Warning", "")
    for ds in instances[1:]:
        assert (await app_client.get(inst_url(ds) + "/metadata")).status_code == 404
    url = inst_url(instances[0])
    (meta,) = (await app_client.get(f"{url}/metadata")).json()
    for _ in range(MAX_SEQUENCE_DEPTH):
        (meta,) = meta["00081140"]["Value"]
    assert meta["00081150"]["Value"] == ["1.2.3"]
    xml = await app_client.get(f"{url}/metadata", headers={"Accept": "multipart/related; "
                               'type="application/dicom+xml"'})  # fmt: skip
    assert xml.status_code == 200 and xml.content.count(b'tag="00081140"') == MAX_SEQUENCE_DEPTH
