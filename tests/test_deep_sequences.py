"""Part-10 instances with sequences nested deep, written by hand (explicit and implicit VR,
items of defined and undefined length): refused past dicomfile.MAX_SEQUENCE_DEPTH with a
reason, in bounded memory and time, and served whole below it. pydicom reads and writes
sequences recursively, and its writer re-raises a failure in each enclosing sequence with the
message and traceback so far, doubling it per level (as for STOW-RS JSON metadata,
tests/test_stow_json_sequences.py)."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.events import Event
from starlette.applications import Starlette

from dicomweb_server import stow_json
from dicomweb_server.dicomfile import MAX_SEQUENCE_DEPTH, InvalidInstanceError, parse_file
from dicomweb_server.errors import FailureReason
from dicomweb_server.transcode.codecs import TranscodeError
from dicomweb_server.transcode.convert import converted_dataset, to_transfer_syntax
from dicomweb_server.transcode.writable import check_writable
from tests.dimse_support import (
    Archive,
    blobs,
    get_study,
    in_thread,
    received_data_set,
    store_one_file,
)
from tests.helpers import (
    CT_IMAGE_STORAGE,
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    stow_headers,
)

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
    ds: Dataset,
    levels: int,
    implicit: bool = False,
    undefined: bool = False,
    leaf: bytes = b"",
    *,
    deflated: bool = False,
) -> bytes:
    """`ds` as a Part-10 file with `levels` nested sequences at (0008,1140)."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = _data_set(ds, levels, implicit, undefined, leaf)
    if deflated:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = deflater.compress(body) + deflater.flush()
    return meta.getvalue() + body


def _data_set(ds: Dataset, levels: int, implicit: bool, undefined: bool, leaf: bytes) -> bytes:
    out = DicomBytesIO()
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
    return bytes(out.getvalue())


def test_json_metadata_takes_the_same_limit() -> None:
    assert stow_json.MAX_JSON_SEQUENCE_DEPTH == MAX_SEQUENCE_DEPTH == 64


@pytest.mark.parametrize(("implicit", "undefined"), ENCODINGS)
def test_max_sequence_depth_at_its_edge(tmp_path: Path, implicit: bool, undefined: bool) -> None:
    """MAX_SEQUENCE_DEPTH levels parse, the innermost value in the DICOM JSON; one more is
    refused (0xC000) with the limit as the reason. Without the limit, every encoding was
    stored up to 200 levels and more (deeper ones overflowed pydicom's reader)."""
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
    # The top-level sequence they are under, named (the reason said only the limit).
    assert f"deeper than {MAX_SEQUENCE_DEPTH} levels in {_NAMED}," in caught.value.message


_NAMED = "(0008,1140) ReferencedImageSequence"
_PRIVATE_SQ = 0x00711018  # (0071,xx18) of 'AGFA-AG_HPState': SQ in pydicom's private dictionary


def _read_as_sequence_part10(levels: int, private: bool) -> bytes:
    """`levels` nested sequences whose outermost a sequence only as pydicom reads it: an
    explicit VR UN of (0008,1140), whose value pydicom parses as an implicit VR sequence
    (config.replace_un_with_known_vr), or an implicit VR private element its private
    dictionary names SQ. The levels inside are implicit VR, of defined length."""
    leaf = element(0x00081150, b"UI", b"1.2.3\0", True)
    inner = nested(levels - 1, leaf, True, False)
    value = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    ds = make_instance()
    ds["PixelData"].VR = "OW"
    at = _PRIVATE_SQ if private else _SEQUENCE
    if private:
        ds.add_new(0x00710010, "LO", "AGFA-AG_HPState")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if private else ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    for part in (
        Dataset({t: e for t, e in ds.items() if t < at}),
        Dataset({t: e for t, e in ds.items() if t > at}),
    ):
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, private
        write_dataset(buf, part)
        out.write(buf.getvalue())
        if part.get(0x00080016) is not None:  # the first part: the sequence follows it
            out.write(element(at, b"SQ" if private else b"UN", value, private))
    return bytes(out.getvalue())


@pytest.mark.parametrize("private", [False, True])
def test_sequences_pydicom_reads_from_other_vrs_take_the_limit(
    tmp_path: Path, private: bool
) -> None:
    """The depth is counted as pydicom reads the data set later, for every conversion: an
    explicit UN of a sequence's tag and an implicit VR private sequence are sequences there.
    They were left unread (not SQ by the data dictionary alone) and any depth was stored; 300
    levels then took 55 s and 3.7 GB of memory in a conversion to Explicit VR Little Endian
    (pydicom's writer re-raising its RecursionError in each enclosing sequence)."""
    path = tmp_path / "x.dcm"
    path.write_bytes(_read_as_sequence_part10(MAX_SEQUENCE_DEPTH, private))
    parse_file(path)
    to_transfer_syntax(path, tmp_path / "y.dcm", ExplicitVRLittleEndian)
    for levels in (MAX_SEQUENCE_DEPTH + 1, 300):
        path.write_bytes(_read_as_sequence_part10(levels, private))
        with pytest.raises(InvalidInstanceError) as caught:
            parse_file(path)
        assert f"deeper than {MAX_SEQUENCE_DEPTH} levels" in caught.value.message


@pytest.mark.parametrize(("levels", "stored"), [(MAX_SEQUENCE_DEPTH, True), (300, False)])
def test_deflated_data_sets_take_the_limit_too(tmp_path: Path, levels: int, stored: bool) -> None:
    """A Deflated data set is parsed whole, not by range (dicomfile._parse_whole)."""
    path = tmp_path / "x.dcm"
    path.write_bytes(deep_part10(make_instance(), levels, undefined=True, deflated=True))
    if stored:
        assert parse_file(path).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
        return
    with pytest.raises(InvalidInstanceError) as caught:
        parse_file(path)
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


@pytest.mark.db
async def test_c_store_takes_the_limit_too(archive: Archive, tmp_path: Path) -> None:
    """DIMSE C-STORE is the STOW ingest: one level too many is refused with 0xC000 and the
    limit as its Error Comment, nothing stored."""
    path = tmp_path / "deep.dcm"
    for levels, answer in [(MAX_SEQUENCE_DEPTH, 0x0000), (MAX_SEQUENCE_DEPTH + 1, 0xC000)]:
        path.write_bytes(deep_part10(make_instance(), levels, True, True))
        rsp = await store_one_file(archive, path, CT_IMAGE_STORAGE, ImplicitVRLittleEndian)
        assert rsp.Status == answer, rsp
    assert f"deeper than {MAX_SEQUENCE_DEPTH} levels" in rsp.ErrorComment
    assert len(blobs(archive)) == 1


# A value pydicom cannot convert (a Source Image Sequence of 4 bytes that are no item) in the
# place of a UI of the same length. STOW refuses such an instance (its DICOM JSON converts
# every value); the tests below put it into a stored file, as one stored before would be.
# (4 bytes of an FD were the example until such a value came to be read, and written, as UN.)
_GOOD_LEAF = element(0x00081150, b"UI", b"1.2\0", True)
_BAD_LEAF = element(0x00082112, b"SQ", b"1.2\0", True)
# Levels of the spoiled value: without check_writable, pydicom's writer took 525 MB here
# (doubling per level: 2 GB at 12, more than the machine at 13).
_SPOILED_LEVELS = 10


def _spoil(path: Path) -> None:
    data = path.read_bytes()
    assert data.count(_GOOD_LEAF) == 1
    path.write_bytes(data.replace(_GOOD_LEAF, _BAD_LEAF))


def _peak_of(call: Any) -> tuple[Any, int]:
    """(what `call()` returned or raised, the peak of memory traced meanwhile)."""
    tracemalloc.start()
    try:
        try:
            out = call()
        except Exception as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"])
@pytest.mark.parametrize("whole", [False, True])
def test_a_value_that_cannot_be_written_deep_fails_conversion_in_bounded_memory(
    tmp_path: Path, target: str, whole: bool
) -> None:
    """to_transfer_syntax (WADO-RS, streamed) and converted_dataset (DIMSE, Deflated and
    1-bit data): a TranscodeError naming the element, in a few MB."""
    src = tmp_path / "x.dcm"
    src.write_bytes(deep_part10(make_instance(), _SPOILED_LEVELS, True, True, _GOOD_LEAF))
    _spoil(src)
    if whole:
        caught, peak = _peak_of(lambda: converted_dataset(src, target))
    else:
        caught, peak = _peak_of(lambda: to_transfer_syntax(src, tmp_path / "out.dcm", target))
    assert peak < 20 * 1024 * 1024, peak
    assert isinstance(caught, TranscodeError), caught
    assert "(0008,2112) cannot be written" in str(caught) and len(str(caught)) < 600


@pytest.mark.db
async def test_wado_conversion_of_a_stored_unwritable_value_is_a_406(
    app_client: httpx.AsyncClient, app: Starlette
) -> None:
    """An implicit VR instance is sent as Explicit VR Little Endian by default (PS3.18
    8.7.3.5.2): its conversion failing is a 406 with the reason, in bounded memory, where it
    was a 500 after 525 MB. Its metadata, frames and rendering need no writing."""
    ds = make_instance()
    data = deep_part10(ds, _SPOILED_LEVELS, True, True, _GOOD_LEAF)
    r = await app_client.post(f"{ROOT}/studies", content=multipart_body([data]),
                              headers=stow_headers())  # fmt: skip
    assert r.status_code == 200, r.text
    (inst,) = await app.state.services.index.locate(str(ds.StudyInstanceUID), None, None)
    _spoil(app.state.services.blobs.local_path(inst.blob_key))
    tracemalloc.start()
    try:
        answer = await app_client.get(
            inst_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'}
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak
    assert answer.status_code == 406 and "(0008,2112) cannot be written" in answer.text
    for resource in ("/metadata", "/frames/1", "/rendered"):
        assert (await app_client.get(inst_url(ds) + resource)).status_code == 200, resource


@pytest.mark.db
async def test_c_get_of_a_stored_unwritable_value_fails_the_sub_operation_in_bounded_memory(
    archive: Archive,
) -> None:
    """A requestor taking Explicit VR Little Endian only, the instance stored implicit VR:
    pynetdicom re-encodes it, and pydicom's writer failed in 525 MB (pynetdicom logs the
    failure and fails the sub-operation). Now the element is found first: the sub-operation
    fails (0xA702, PS3.4 C.4.3.1.3.2) in a few MB."""
    ds = make_instance()
    data = deep_part10(ds, _SPOILED_LEVELS, True, True, _GOOD_LEAF)
    r = await archive.http.post(f"{ROOT}/studies", content=multipart_body([data]),
                                headers=stow_headers())  # fmt: skip
    assert r.status_code == 200, r.text
    (path,) = blobs(archive)
    _spoil(path)
    received: list[bytes] = []

    def on_store(event: Event) -> int:
        received.append(received_data_set(event))
        return 0x0000

    tracemalloc.start()
    try:
        statuses = await in_thread(
            get_study, archive, ds.StudyInstanceUID, ds.SOPClassUID, on_store
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, peak
    assert statuses[-1].Status == 0xA702 and not received


def test_check_writable_resolves_ambiguous_vrs_from_the_nearest_data_set() -> None:
    """An element whose VR is still ambiguous (one made, not read) is resolved as pydicom's
    writer resolves it, its own data set first (PS3.5 Annex A): at the top level it was
    refused (IndexError, no ancestors), in an item it took the parent's Pixel Representation."""
    top = Dataset()
    top.PixelRepresentation = 1
    top.add_new(0x00280106, "US or SS", b"\xfb\xff")
    check_writable(top)
    assert top[0x00280106].VR == "SS"
    item = Dataset()
    item.PixelRepresentation = 1
    item.add_new(0x00280106, "US or SS", b"\xfb\xff")
    root = Dataset()
    root.PixelRepresentation = 0
    root.ReferencedImageSequence = [item]
    check_writable(root)
    assert item[0x00280106].VR == "SS"


def test_a_retired_group_length_the_writer_leaves_out_is_not_checked(tmp_path: Path) -> None:
    """pydicom's writer leaves out retired Group Lengths (PS3.5 7.2), whatever their value: an
    implicit VR instance with a (0008,0000) of 2 bytes (stored: ingest leaves it raw) converts
    to Explicit VR Little Endian, the default of WADO-RS. check_writable refused it (a 406)."""
    ds = make_instance()
    ds["PixelData"].VR = "OW"
    path = tmp_path / "x.dcm"
    path.write_bytes(deep_part10(ds, 1, True, leaf=element(0x00081150, b"UI", b"1.2\0", True)))
    data = bytearray(path.read_bytes())
    first = min(t for t in ds.keys() if t.group == 0x0008)
    at = data.index(struct.pack("<HH", 0x0008, first.element), 132)  # after the preamble
    data[at:at] = element(0x00080000, b"UL", b"\1\0", True)
    path.write_bytes(bytes(data))
    parse_file(path)
    to_transfer_syntax(path, tmp_path / "y.dcm", ExplicitVRLittleEndian)
    assert 0x00080000 not in pydicom.dcmread(tmp_path / "y.dcm")


def test_check_writable_copies_no_binary_value() -> None:
    """A binary value (the Pixel Data of an in-memory conversion, up to 128 MiB decoded for
    a DIMSE peer) is written as it is: encoding it alone to check it took twice its size more
    (converted_dataset of 32 MiB of native Pixel Data peaked at 96 MiB, 32 before)."""
    ds = Dataset()
    ds.BitsAllocated = 16
    ds.add_new(0x7FE00010, "OB or OW", bytes(16 * 1024 * 1024))
    tracemalloc.start()
    try:
        check_writable(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ds["PixelData"].VR == "OW"
    assert peak < 1024 * 1024
    ds["PixelData"].is_undefined_length = True  # not encapsulated: the writer refuses it
    with pytest.raises(ValueError, match=r"\(7FE0,0010\) cannot be written"):
        check_writable(ds)


@pytest.mark.parametrize("implicit", [True, False])
def test_check_writable_leaves_a_deferred_value_unread(tmp_path: Path, implicit: bool) -> None:
    """A C-GET to a peer taking the other little endian syntax reads the stored file with a
    defer size of 1 KiB (dimse.conversion.as_stored_for_peer): check_writable reads a deferred
    sequence to walk it, but no other deferred value. Merging the branch that walks deferred
    sequences with the one that converts elements read without a VR converted every element
    of an implicit VR file, its deferred Pixel Data too (16 MiB read here, once more than
    pynetdicom's own encoding). The elements read without a VR are converted all the same."""
    ds = make_instance(rows=1024, cols=1024, frames=8)
    ds.NumberOfFrames, ds.BitsAllocated = 8, 16
    ds.PixelData = bytes(1024 * 1024 * 2 * 8)
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "121322", "m" * 2000  # a sequence left deferred
    ds.DerivationCodeSequence = [item]
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = pydicom.dcmread(path, defer_size=1024)
    deferred = read.get_item(0x00089215, keep_deferred=True)
    assert deferred.value is None  # read as the C-GET reads it: the sequence is deferred
    tracemalloc.start()
    try:
        check_writable(read, implicit_vr=not implicit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    assert read.get_item(0x7FE00010, keep_deferred=True).value is None  # still unread
    assert read.DerivationCodeSequence[0].CodeMeaning == item.CodeMeaning
    assert read.get_item(0x00100010, keep_deferred=True).VR == "PN"  # converted
