"""The header of a Part-10 instance (its data set but Pixel Data and top-level bulk data, which
ingest never reads) measured before pydicom parses it (headersize): refused past
MAX_HEADER_BYTES or MAX_HEADER_MEMORY_BYTES with 0xA700 and nothing stored (STOW-RS, DIMSE
C-STORE, `load`), parses of large ones taking turns (HEADER_PARSES_MEMORY_BYTES). A header of
small sequence items took about a kilobyte per item to parse, within MAX_PART_BYTES: 30 MB of
them 880 MB, 300 MB some 9 GB."""

from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from starlette.applications import Starlette

from dicomweb_server import dicomfile, headersize
from dicomweb_server.commands import run_load
from dicomweb_server.config import Settings
from dicomweb_server.dicomfile import PIXEL_DATA_TAGS, InvalidInstanceError, parse_file, sop_uids
from dicomweb_server.errors import FailureReason
from dicomweb_server.headersize import HeaderSize, measure
from dicomweb_server.reservations import Reservations
from tests.dimse_support import Archive, blobs, store_one_file
from tests.helpers import (
    CT_IMAGE_STORAGE,
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    pending_reservations,
    stow_headers,
    to_bytes,
)
from tests.liveserver import running
from tests.test_deep_sequences import _read_as_sequence_part10, deep_part10
from tests.test_live import chunked_body

_SEQUENCE = 0x00081140  # Referenced Image Sequence
_UNDEFINED = 0xFFFFFFFF


def _element(tag: int, vr: bytes, value: bytes, implicit: bool, big: bool = False) -> bytes:
    """One data element written by hand (a length of _UNDEFINED when `value` is a sequence's
    items of undefined length is the caller's)."""
    o = ">" if big else "<"
    head = struct.pack(f"{o}HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(f"{o}I", len(value)) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + vr + b"\0\0" + struct.pack(f"{o}I", len(value)) + value
    return head + vr + struct.pack(f"{o}H", len(value)) + value


def small_items(n: int, implicit: bool = False, undefined: bool = False) -> bytes:
    """(0008,1140) of `n` items holding one IS each: 18 bytes an item, the shape that costs most
    memory per byte parsed."""
    leaf = _element(0x00081160, b"IS", b"7 ", implicit)
    if undefined:
        item = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED) + leaf
        item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        body = item * n + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        head = struct.pack("<HH", 0x0008, 0x1140)
        return head + (b"" if implicit else b"SQ\0\0") + struct.pack("<I", _UNDEFINED) + body
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(leaf)) + leaf
    return _element(_SEQUENCE, b"SQ", item * n, implicit)


def part10(ds: Dataset, extra: dict[int, bytes], syntax: str = ExplicitVRLittleEndian) -> bytes:
    """`ds` as a Part-10 file in `syntax`, with elements written by hand (`extra`, by tag) in
    their places, in tag order."""
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian = syntax != ExplicitVRBigEndian
    body.is_implicit_VR = syntax == ImplicitVRLittleEndian
    for tag in sorted({*ds.keys(), *extra}):
        if tag in extra:
            body.write(extra[tag])
            continue
        elem = ds[tag]
        if " or " in elem.VR:  # no context to resolve it from, written alone
            elem.VR = "OW"
        write_dataset(body, Dataset({elem.tag: elem}))
    data = body.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return bytes(out.getvalue()) + data


def _measured(raw: bytes) -> tuple[HeaderSize, int]:
    """The header of a Part-10 file's bytes, and where its data set begins."""
    fp = io.BytesIO(raw)
    syntax, at = dicomfile._file_meta(fp)
    return measure(fp, at, syntax), at


def _pydicom_elements(raw: bytes) -> int:
    """Elements and items of the data set but Pixel Data, as pydicom reads it whole."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    count = 0
    for elem in ds.iterall():
        if elem.tag not in PIXEL_DATA_TAGS:
            count += 1 + (len(elem.value) if elem.VR == "SQ" else 0)
    return count


def _refused(path: Path) -> InvalidInstanceError:
    with pytest.raises(InvalidInstanceError) as caught:
        parse_file(path)
    return caught.value


def _peak_of(call: Callable[[], Any]) -> tuple[Any, int]:
    """(what `call()` returned or raised, the peak of memory traced meanwhile)."""
    tracemalloc.start()
    try:
        try:
            out: Any = call()
        except Exception as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


@pytest.mark.parametrize("syntax", _SYNTAXES)
@pytest.mark.parametrize("undefined", [False, True])
def test_the_walk_counts_what_pydicom_reads(syntax: str, undefined: bool) -> None:
    """Elements and items as pydicom reads the data set, whatever its encoding (nested
    sequences of defined and undefined length); bytes all but Pixel Data and the top-level
    binary values past the bulk data threshold, which stay on disk (a private OB, an
    Encapsulated Document), those under it counted."""
    implicit, big = syntax == ImplicitVRLittleEndian, syntax == ExplicitVRBigEndian
    ds = make_instance(rows=8, cols=8)
    ds.ReferencedImageSequence = [Dataset() for _ in range(3)]
    for n, item in enumerate(ds.ReferencedImageSequence):
        item.ReferencedSOPInstanceUID = f"1.2.3.{n}"
        item.ReferencedFrameNumber = [1, 2, 3]
        item.ReferencedSegmentNumber = [1, 2]
    ds.ReferencedImageSequence.is_undefined_length = undefined
    bulk = 4096
    raw = part10(ds, {
        0x00290010: _element(0x00290010, b"LO", b"ACME", implicit, big),
        0x00291010: _element(0x00291010, b"OB", b"\x01" * bulk, implicit, big),
        0x00291011: _element(0x00291011, b"OB", b"\x02" * 1000, implicit, big),
        0x00420011: _element(0x00420011, b"OB", b"%PDF" * 1024, implicit, big),
    }, syntax)  # fmt: skip
    size, at = _measured(raw)
    pixels = 8 * 8 * 2 + (8 if implicit else 12)
    assert size.held_bytes == len(raw) - at - pixels - bulk - 4096
    assert size.elements == _pydicom_elements(raw)
    # A value each of numbers and strings, Referenced Frame Number (IS) and Referenced
    # Segment Number (US) of the items 3 and 2; private ones of implicit VR are UN (bytes).
    one_each = sum(
        1
        for e in pydicom.dcmread(io.BytesIO(raw)).iterall()
        if e.VR not in ("OB", "OW", "SQ") and not e.tag.is_private
    )
    assert size.values == one_each + 3 * (2 + 1) + (0 if implicit else 1)


@pytest.mark.parametrize(("implicit", "undefined"), [(False, False), (True, True)])
def test_deep_sequences_are_counted(implicit: bool, undefined: bool) -> None:
    raw = deep_part10(make_instance(), 20, implicit, undefined)
    size, at = _measured(raw)
    assert size.elements == _pydicom_elements(raw)
    assert size.held_bytes == len(raw) - at - (4 * 4 * 2 + (8 if implicit else 12))


@pytest.mark.parametrize("private", [False, True])
def test_sequences_only_pydicom_calls_so_are_counted(private: bool) -> None:
    """An explicit UN of a sequence's tag (its items implicit VR), an implicit VR private
    element that begins with an item: pydicom parses both as sequences."""
    raw = _read_as_sequence_part10(5, private)
    size, _ = _measured(raw)
    assert size.elements == _pydicom_elements(raw)


def test_a_value_of_undefined_length_is_held_to_its_delimiter() -> None:
    """An OB of undefined length outside Pixel Data (items, then the Sequence Delimitation
    Item): pydicom reads it whole, in an item as at the top level."""
    items = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, 4000) + bytes(4000) for _ in range(3))
    value = items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    undefined = struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, _UNDEFINED) + value
    ds = make_instance()
    raw = part10(ds, {0x00290010: _element(0x00290010, b"LO", b"ACME", False),
                      0x00291010: undefined})  # fmt: skip
    size, at = _measured(raw)
    assert size.held_bytes == len(raw) - at - (4 * 4 * 2 + 12)
    assert size.elements == len(ds) - 1 + 2


def test_a_small_data_set_is_taken_at_its_worst_unwalked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set of at most _UNWALKED_MAX_BYTES is not walked (a walk costs a tenth of a
    usual header's parse): an element every 8 bytes, a value every 2, held whole."""
    raw = part10(make_instance(), {_SEQUENCE: small_items(100)})
    walked, at = _measured(raw)
    size = len(raw) - at
    monkeypatch.setattr(headersize, "_UNWALKED_MAX_BYTES", size)
    fp = io.BytesIO(raw)
    assert headersize.measured(fp, at, ExplicitVRLittleEndian) == HeaderSize(
        size, size // 8, size // 2
    )
    monkeypatch.setattr(headersize, "_UNWALKED_MAX_BYTES", size - 1)
    assert headersize.measured(fp, at, ExplicitVRLittleEndian) == walked


def test_far_deeper_than_the_limit_stops_the_walk(tmp_path: Path) -> None:
    """Past the depth the parse refuses, the walk stops and refuses it (an open container a
    level would take 100 MB for 8 MB of nested items): as too deep (0xC000), as before, not
    as too large."""
    raw = deep_part10(make_instance(), 3000, True, True)
    with pytest.raises(InvalidInstanceError, match="deeper than"):
        _measured(raw)
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    exc = _refused(path)
    assert exc.reason == FailureReason.CANNOT_UNDERSTAND and "deeper than" in exc.message


def test_elements_after_pixel_data_leave_bulk_values_on_disk(tmp_path: Path) -> None:
    """Encapsulated Pixel Data, then a private OB and Data Set Trailing Padding of 2 MiB each:
    neither counted nor read (both were read into memory), the OB served by range."""
    ds = make_instance(rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    del ds.PixelData
    fragments = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, n) + b"\xff" * n for n in (0, 64))
    value = b"\x5a" * (2 * 1024 * 1024)
    raw = part10(ds, {
        0x7FE00010: struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, _UNDEFINED) + fragments
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
        0x7FE10010: _element(0x7FE10010, b"LO", b"ACME", False),
        0x7FE11010: _element(0x7FE11010, b"OB", value, False),
        0xFFFCFFFC: _element(0xFFFCFFFC, b"OB", bytes(len(value)), False),
    }, JPEGBaseline8Bit)  # fmt: skip
    size, _ = _measured(raw)
    assert size.held_bytes < 1024
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    parsed, peak = _peak_of(lambda: parse_file(path))
    assert peak < len(value) // 4, peak
    offset, length, vr, _ = parsed.bulk_ranges["7FE11010"]
    assert (raw[offset : offset + length], vr) == (value, "OB")
    assert parsed.meta["7FE11010"]["BulkDataURI"].endswith("/bulk/7FE11010")
    assert parsed.data_set_end == len(raw) - len(value) - 12


def test_header_of_small_items_is_refused_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50,000 small items, the memory limit lowered to 16 MiB: refused (0xA700, the sender's
    limit) before pydicom reads them, in well under a MiB. Parsed, they took 100 MB."""
    monkeypatch.setattr(headersize, "MAX_HEADER_MEMORY_BYTES", 16 * 1024 * 1024)
    path = tmp_path / "x.dcm"
    path.write_bytes(part10(make_instance(), {_SEQUENCE: small_items(50_000)}))
    exc, peak = _peak_of(lambda: parse_file(path))
    assert isinstance(exc, InvalidInstanceError), exc
    assert exc.reason == FailureReason.OUT_OF_RESOURCES and exc.over_limit
    # The walk stopped there: the counts so far.
    assert exc.message.startswith("header of at least ")
    assert "elements and items" in exc.message and "past MAX_HEADER_MEMORY_BYTES" in exc.message
    assert peak < 1024 * 1024, peak


def test_the_walk_stops_past_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its counts pass a limit the walk stops, its counts so far (whole False): a part of
    4 GB of small items would have been walked for a quarter of an hour to refuse it."""
    raw = part10(make_instance(), {_SEQUENCE: small_items(50_000)})
    whole, _ = _measured(raw)
    assert whole.whole and whole.elements == 100_000 + 21
    monkeypatch.setattr(headersize, "MAX_HEADER_MEMORY_BYTES", 1024 * 1024)
    cut, _ = _measured(raw)
    assert not cut.whole and cut.estimate > 1024 * 1024
    assert cut.elements < 1024
    monkeypatch.setattr(headersize, "MAX_HEADER_BYTES", 10_000)
    monkeypatch.setattr(headersize, "MAX_HEADER_MEMORY_BYTES", 1024**3)
    cut, _ = _measured(raw)
    assert not cut.whole and 10_000 < cut.held_bytes < 10_100


def test_deflated_header_is_measured_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Deflated data set is inflated into a scratch file and walked there: refused before
    pydicom inflates and parses it whole (which took 100 MB for these 50,000 items)."""
    monkeypatch.setattr(headersize, "MAX_HEADER_MEMORY_BYTES", 16 * 1024 * 1024)
    path = tmp_path / "x.dcm"
    raw = part10(make_instance(), {_SEQUENCE: small_items(50_000)}, DeflatedExplicitVRLittleEndian)
    path.write_bytes(raw)
    exc, peak = _peak_of(lambda: parse_file(path))
    assert isinstance(exc, InvalidInstanceError), exc
    assert exc.reason == FailureReason.OUT_OF_RESOURCES
    assert peak < 4 * 1024 * 1024, peak
    monkeypatch.setattr(headersize, "MAX_HEADER_MEMORY_BYTES", 1024**3)
    assert len(parse_file(path).meta["00081140"]["Value"]) == 50_000


def test_sop_uids_reads_no_further_than_the_sop_instance_uid(tmp_path: Path) -> None:
    """The C-STORE check of the Affected SOP UIDs (dimse.handlers._command_mismatch) read the
    data set up to its Pixel Data, parsing a sequence of undefined length whole (pydicom does
    even to skip it), before the ingest could refuse it: 100 MB for 50,000 small items."""
    ds = make_instance()
    path = tmp_path / "x.dcm"
    path.write_bytes(part10(ds, {_SEQUENCE: small_items(50_000, undefined=True)}))
    uids, peak = _peak_of(lambda: sop_uids(path))
    assert uids == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert peak < 1024 * 1024, peak
    # One before (0008,0018) is walked past, not parsed (headersize.element_end).
    before = small_items(50_000, undefined=True).replace(
        b"\x08\x00\x40\x11", b"\x08\x00\x06\x00", 1
    )
    path.write_bytes(part10(ds, {0x00080006: before}))
    uids, peak = _peak_of(lambda: sop_uids(path))
    assert uids == (ds.SOPClassUID, ds.SOPInstanceUID) and peak < 1024 * 1024, peak


def _with_text(ds: Dataset, chars: int) -> bytes:
    """`ds` with a private UT of `chars` characters: held (text is never bulk data)."""
    return part10(ds, {
        0x00290010: _element(0x00290010, b"LO", b"ACME", False),
        0x00291010: _element(0x00291010, b"UT", b"t" * chars, False),
    })  # fmt: skip


def _blobs(settings: Settings) -> list[Path]:
    """Placed blobs (spool files left out)."""
    root = settings.blob_dir
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]


@pytest.mark.db
@pytest.mark.parametrize("limit", ["MAX_HEADER_BYTES", "MAX_HEADER_MEMORY_BYTES"])
async def test_limits_at_their_edge(
    app: Starlette,
    app_client: httpx.AsyncClient,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
) -> None:
    """A header at the limit is stored; the limit one byte lower refuses it (0xA700 with the
    reason, nothing of it stored) while the other parts of the request are stored."""
    first, big, last = make_instance(), make_instance(), make_instance()
    raw = _with_text(big, 200_000)
    size, _ = _measured(raw)
    at_limit = size.held_bytes if limit == "MAX_HEADER_BYTES" else size.estimate
    monkeypatch.setattr(headersize, limit, at_limit - 1)
    parts = [to_bytes(first), raw, to_bytes(last)]
    r = await app_client.post(f"{ROOT}/studies", content=multipart_body(parts),
                              headers=stow_headers())  # fmt: skip
    assert r.status_code == 202, r.text
    (failed,) = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    assert failed["00081155"]["Value"] == [big.SOPInstanceUID]
    assert f"past {limit} ({at_limit - 1})" in r.headers["Warning"]
    assert len(r.json()["00081199"]["Value"]) == 2
    for ds, status in [(first, 200), (big, 404), (last, 200)]:
        assert (await app_client.get(inst_url(ds) + "/metadata")).status_code == status
    assert len(_blobs(settings)) == 2
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await pending_reservations(conn, app.state.services.index) == 0
    finally:
        await conn.close()
    monkeypatch.setattr(headersize, limit, at_limit)
    r = await app_client.post(f"{ROOT}/studies", content=multipart_body([raw]),
                              headers=stow_headers())  # fmt: skip
    assert r.status_code == 200, r.text
    (meta,) = (await app_client.get(inst_url(big) + "/metadata")).json()
    assert meta["00291010"]["Value"] == ["t" * 200_000]


@pytest.mark.db
async def test_c_store_takes_the_limit_too(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DIMSE C-STORE is the STOW ingest: refused with 0xA700 and the reason as its Error
    Comment, nothing stored."""
    path = tmp_path / "big.dcm"
    path.write_bytes(_with_text(make_instance(), 200_000))
    monkeypatch.setattr(headersize, "MAX_HEADER_BYTES", 100_000)
    held = _measured(path.read_bytes())[0].held_bytes  # as far as the walk went (UIDs vary)
    rsp = await store_one_file(archive, path, CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assert rsp.Status == 0xA700, rsp
    reason = f"header of at least {held} bytes past MAX_HEADER_BYTES (100000): the data set"
    assert rsp.ErrorComment == reason[:64].rstrip()  # LO: 64 characters
    assert blobs(archive) == []


@pytest.mark.db
async def test_load_takes_the_limit_too(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.dcm").write_bytes(_with_text(make_instance(), 200_000))
    (src / "small.dcm").write_bytes(_with_text(make_instance(), 1000))
    monkeypatch.setattr(headersize, "MAX_HEADER_BYTES", 100_000)
    held = _measured((src / "big.dcm").read_bytes())[0].held_bytes
    assert await run_load(settings, [str(src)]) == 0
    out = capsys.readouterr().out
    assert "stored 1, already present 0, failed 1" in out
    assert f"{held} bytes past MAX_HEADER_BYTES (100000)" in out and "(0xA700)" in out


def test_parses_past_the_budget_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parses estimated at more than HEADER_PARSES_MEMORY_BYTES between them run one after
    the other; two that fit run at once. Each parse waits for the other to be under way too
    (briefly when they are to take turns, else until it is)."""
    path = tmp_path / "x.dcm"
    path.write_bytes(_with_text(make_instance(), 100_000))
    estimate = _measured(path.read_bytes())[0].estimate
    real = dicomfile._parse_by_range
    running, most, wait = [0], [0], [0.0]
    lock, both = threading.Lock(), threading.Event()

    def parse(*args: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] == 2:
                both.set()
        both.wait(wait[0])
        with lock:
            running[0] -= 1
        return real(*args)

    monkeypatch.setattr(dicomfile, "_parse_by_range", parse)
    monkeypatch.setattr(headersize, "HEADER_PARSE_UNCOUNTED_BYTES", 0)  # counted, as large ones
    for budget, together, patience in [(estimate * 2 - 1, 1, 0.5), (estimate * 2, 2, 30.0)]:
        monkeypatch.setattr(headersize, "_BUDGET", Reservations(budget))
        most[0], wait[0] = 0, patience
        both.clear()
        threads = [threading.Thread(target=parse_file, args=(path,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert most[0] == together, budget
        assert headersize._BUDGET.held == 0


def test_one_past_the_whole_budget_runs_alone() -> None:
    budget = Reservations(100)
    order: list[str] = []
    with budget.reserve(10):
        started = threading.Event()

        def big() -> None:
            started.set()
            with budget.reserve(100):
                order.append("big")

        t = threading.Thread(target=big)
        t.start()
        started.wait()
        time.sleep(0.1)
        order.append("small done")
    t.join()
    assert order == ["small done", "big"] and budget.held == 0


# Small items past the real MAX_HEADER_MEMORY_BYTES: about 2.2 KB each estimated, 1.3 GB.
_LIVE_ITEMS = 600_000
# Growth of the server's peak memory allowed for the request (its baseline is read first).
# Parsed, these items took the server 1.2 GB; walked, a few MB.
_LIVE_GROWTH_KIB = 150 * 1024


@pytest.mark.db
def test_a_real_server_refuses_a_huge_header_in_bounded_memory(
    tmp_path: Path, clean_db: str
) -> None:
    """The real limits, a real server: 11 MB of small items between two instances of one
    STOW request, sent in chunks. The two are stored; the one between fails (0xA700) without
    being parsed, and the server's peak memory (VmHWM) hardly moves."""
    first, big, last = make_instance(), make_instance(), make_instance()
    raw = part10(big, {_SEQUENCE: small_items(_LIVE_ITEMS)})
    assert _measured(raw)[0].estimate > headersize.MAX_HEADER_MEMORY_BYTES
    parts = [to_bytes(first), raw, to_bytes(last)]
    with running(tmp_path / "data", clean_db) as server, httpx.Client(timeout=300) as client:
        baseline = server.peak_rss_kib()
        r = client.post(f"{server.url}/studies", content=chunked_body(parts),
                        headers=stow_headers())  # fmt: skip
        growth = server.peak_rss_kib() - baseline
    assert growth < _LIVE_GROWTH_KIB, f"the server grew {growth} KiB"
    assert r.status_code == 202, r.text
    (failed,) = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    assert failed["00081155"]["Value"] == [big.SOPInstanceUID]
    assert len(r.json()["00081199"]["Value"]) == 2
