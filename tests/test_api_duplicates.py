"""STOW-RS of an instance the archive holds already, in-process against a real PostgreSQL: the
same data set again (the same bytes, other File Meta Information, PS3.10 7.1, or Data Set
Trailing Padding, PS3.10 7.2) is one instance and one copy, another data set under the same
SOP Instance UID is 0x0111; within one request the first part wins. The data set hash that
tells them apart (blobstore.hashing)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import asyncpg
import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server import ingest
from dicomweb_server.config import Settings
from dicomweb_server.dicomfile import ParsedFile, parse_file
from tests.api_support import _blob_contents, stow
from tests.helpers import element_bytes, make_instance, pending_reservations, to_bytes, values

pytestmark = pytest.mark.db


async def test_stow_same_bytes_twice_and_conflicting_copy(
    app: Starlette, app_client: httpx.AsyncClient, settings: Settings, pg_dsn: str
) -> None:
    ds = make_instance()
    raw = to_bytes(ds)
    assert (await stow(app_client, raw)).status_code == 200
    assert (await stow(app_client, raw)).status_code == 200
    ds.PatientName = "Changed^Name"
    r = await stow(app_client, to_bytes(ds))
    assert r.status_code == 409
    (f,) = values(r.json(), "00081198")
    assert isinstance(f, dict) and values(f, "00081197") == [0x0111]
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM instance") == 1
        assert await pending_reservations(conn, app.state.services.index) == 0
        key = await conn.fetchval("SELECT blob_key FROM instance")
    finally:
        await conn.close()
    root = settings.blob_dir
    blobs = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]
    assert [p.name for p in blobs] == [key]
    assert blobs[0].read_bytes() == raw


async def test_same_data_set_under_other_file_meta_is_the_same_instance(
    app_client: httpx.AsyncClient, settings: Settings, pg_dsn: str
) -> None:
    """The File Meta Information describes the file, not the instance (PS3.10 7.1): the same
    data set again under other meta information (as DIMSE, whose pynetdicom writes its own,
    and another tool send it) is a success with one copy, not 0x0111; a different data set
    is still 0x0111. An instance stored before the hash left the meta information out (its
    row holds the whole file's hash) is compared by its file."""
    import hashlib

    ds = make_instance()
    raw = to_bytes(ds)
    assert (await stow(app_client, raw)).status_code == 200
    ds.file_meta.ImplementationClassUID = pydicom.uid.UID("1.2.826.0.1.3680043.9.3811.2.1.0")
    ds.file_meta.ImplementationVersionName = "PYNETDICOM_210"
    other_meta = to_bytes(ds)
    assert other_meta != raw
    r = await stow(app_client, other_meta)
    assert r.status_code == 200, r.text
    assert _blob_contents(settings) == [raw]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE instance SET sha256 = $1", hashlib.sha256(raw).digest())
    finally:
        await conn.close()
    assert (await stow(app_client, other_meta)).status_code == 200
    ds.PatientName = "Changed^Name"
    r = await stow(app_client, to_bytes(ds))
    assert r.status_code == 409
    (f,) = values(r.json(), "00081198")
    assert isinstance(f, dict) and values(f, "00081197") == [0x0111]


@pytest.mark.parametrize("piece", [1, 7, 131, 133, 4096])
def test_data_set_hash_leaves_the_file_meta_out_however_the_file_comes(piece: int) -> None:
    from dicomweb_server.blobstore.hashing import DataSetHash

    ds = make_instance()
    raw = to_bytes(ds)
    ds.file_meta.ImplementationVersionName = "OTHER_TOOL"
    other = to_bytes(ds)

    def digest(data: bytes) -> bytes:
        h = DataSetHash()
        for i in range(0, len(data), piece):
            h.update(data[i : i + piece])
        return h.digest()

    assert digest(raw) == digest(other)
    import hashlib

    from dicomweb_server.blobstore.hashing import WHOLE_FILE_HASH_VERSION as W

    body_at = len(raw) - len(ds.PixelData) - 200
    assert digest(raw) != digest(raw[:body_at] + b"x" + raw[body_at + 1 :])
    assert digest(b"not DICOM" * 100) == W + hashlib.sha256(b"not DICOM" * 100).digest()
    assert digest(raw[:140]) == W + hashlib.sha256(raw[:140]).digest()  # ends in the meta
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    relabelled = bytearray(other)  # the same bytes after the meta, another syntax named
    at = relabelled.index(b"1.2.840.10008.1.2.1\0")
    relabelled[at : at + 20] = b"1.2.840.10008.1.2\0\0\0"
    assert digest(bytes(relabelled)) != digest(raw)


def test_a_file_hashed_whole_never_passes_for_a_data_set() -> None:
    """Found by review: file A, whose meta information is too long to walk, is hashed whole;
    file B's data set is A's bytes after the 20 that a data set hash starts with (B's syntax
    and a NUL), so both came to the same SHA-256, and B was dropped as A's duplicate. The
    two kinds of hash now differ in their first byte."""
    from dicomweb_server.blobstore.hashing import DataSetHash

    def digest(data: bytes) -> bytes:
        h = DataSetHash()
        h.update(data)
        return h.digest()

    syntax = b"1.2.840.10008.1.2.1"
    ds = make_instance()
    raw = to_bytes(ds)
    data_set = raw[raw.index(b"\x08\x00") :]
    elements = [
        element_bytes(0x00020001, b"OB", b"\0\1"),
        element_bytes(0x00020010, b"UI", syntax + b"\0"),
        element_bytes(0x00020102, b"OB", b"p" * 70_000),
    ]
    rest = b"".join(elements)
    a_meta = element_bytes(0x00020000, b"UL", struct.pack("<I", len(rest))) + rest
    head = syntax + b"\0"
    header = struct.pack("<HH2sHI", 8, 1, b"UN", 0, 128 - len(head) - 12 + 4 + len(a_meta))
    a = head + header + b"\0" * (128 - len(head) - len(header)) + b"DICM" + a_meta + data_set
    b_rest = element_bytes(0x00020010, b"UI", syntax + b"\0")
    b_meta = element_bytes(0x00020000, b"UL", struct.pack("<I", len(b_rest))) + b_rest
    b = b"\0" * 128 + b"DICM" + b_meta + a[len(head) :]
    assert digest(a)[1:] == digest(b)[1:]  # the same SHA-256 ...
    assert digest(a) != digest(b)  # ... of two kinds


def test_data_set_hash_reads_the_meta_as_pydicom_does(tmp_path: Path) -> None:
    """Found by review: the walk of the File Meta Information took a UV element (4-byte
    length after 2 reserved bytes, PS3.5 7.1.2) for a 2-byte length, so it skipped part of
    the data set that pydicom then read: two instances differing only there hashed alike,
    and the second was dropped as a duplicate."""
    from dicomweb_server.blobstore.hashing import data_set_sha256

    def part10(name: str) -> bytes:
        ds = make_instance(sop="1.2.3.4.5.6.7", patient_name=name)
        body = to_bytes(ds)
        body = body[body.index(b"\x08\x00") :]  # the data set (its first group is 0008)
        rest = b"".join(
            [
                element_bytes(0x00020001, b"OB", b"\0\1"),
                element_bytes(0x00020002, b"UI", str(ds.SOPClassUID).encode() + b"\0"),
                element_bytes(0x00020003, b"UI", b"1.2.3.4.5.6.7\0"),
                element_bytes(0x00020010, b"UI", b"1.2.840.10008.1.2.1\0"),
                element_bytes(0x00020012, b"UI", b"1.2.3.4\0"),
                element_bytes(0x00020100, b"UV", b"", reserved=200),
            ]
        )
        meta = element_bytes(0x00020000, b"UL", struct.pack("<I", len(rest))) + rest
        return b"\0" * 128 + b"DICM" + meta + body

    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.write_bytes(part10("Alice^A"))
    b.write_bytes(part10("Mallory^M"))
    assert parse_file(a).data_set_at == parse_file(b).data_set_at
    assert data_set_sha256(a) != data_set_sha256(b)


def test_data_set_hash_in_small_pieces_is_linear() -> None:
    """Found by review: until the meta's end was known, every piece walked the whole head
    again; 64 KiB of meta elements in 16-byte pieces took 8 s of the event loop."""
    from dicomweb_server.blobstore.hashing import DataSetHash

    head = b"\0" * 128 + b"DICM"
    head += b"".join(
        element_bytes(0x00020000 | (0x100 + i % 0xFF00), b"UI", b"") for i in range(8200)
    )
    h = DataSetHash()
    started = time.perf_counter()
    for i in range(0, len(head), 16):
        h.update(head[i : i + 16])
    h.digest()
    assert time.perf_counter() - started < 2  # 0.03 s here; 8 s before the fix


@pytest.mark.parametrize("garbage_first", [False, True])
async def test_stow_same_sop_twice_in_one_request_first_part_wins(
    app_client: httpx.AsyncClient,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    garbage_first: bool,
) -> None:
    """Two parts of one request with the same SOP Instance UID and different bytes: the first
    in request order is stored, the later one fails with 0x0111, even when the first is parsed
    last (parts are stored concurrently). A part that fails before its UID is known (not
    DICOM) holds nothing up."""
    ds = make_instance(rows=32, cols=32)
    first = to_bytes(ds)
    ds.PatientName = "Other^Copy"
    second = to_bytes(ds)
    real_parse = parse_file

    def first_parsed_last(path: Path) -> ParsedFile:
        parsed = real_parse(path)
        if path.read_bytes() == first:
            time.sleep(0.3)  # in a worker thread: the second part's parse finishes meanwhile
        return parsed

    monkeypatch.setattr(ingest, "parse_file", first_parsed_last)
    parts = [b"not dicom"] * garbage_first + [first, second]
    r = await stow(app_client, *parts)
    assert r.status_code == 202, r.text
    (stored,) = values(r.json(), "00081199")
    assert isinstance(stored, dict) and values(stored, "00081155") == [ds.SOPInstanceUID]
    failures = values(r.json(), "00081198")
    codes = [values(f, "00081197")[0] for f in failures if isinstance(f, dict)]
    assert codes == [0xC000] * garbage_first + [0x0111]
    assert _blob_contents(settings) == [first]


async def test_stow_same_bytes_twice_in_one_request(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    raw = to_bytes(make_instance())
    r = await stow(app_client, raw, raw)
    assert r.status_code == 200, r.text
    assert len(values(r.json(), "00081199")) == 2
    assert _blob_contents(settings) == [raw]


def _padded(raw: bytes, value_bytes: int) -> bytes:
    """A Part-10 file with Data Set Trailing Padding (FFFC,FFFC) of `value_bytes` at its end."""
    return raw + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, value_bytes) + b"\0" * value_bytes


@pytest.mark.parametrize("padded_first", [True, False])
async def test_trailing_padding_is_not_part_of_the_instance(
    app_client: httpx.AsyncClient, settings: Settings, padded_first: bool
) -> None:
    """Found by review: dcmtk's storescu sends a file without its Data Set Trailing Padding,
    which has no meaning (PS3.10 7.2), so STOW-RS then storescu of the same file was 0x0111.
    With the padding or without, it is one instance; the first copy is kept."""
    ds = make_instance()
    raw = to_bytes(ds)
    first, second = (_padded(raw, 100), raw) if padded_first else (raw, _padded(raw, 100))
    assert (await stow(app_client, first)).status_code == 200
    r = await stow(app_client, second)
    assert r.status_code == 200, r.text
    assert _blob_contents(settings) == [first]
    ds.PatientName = "Changed^Name"
    r = await stow(app_client, _padded(to_bytes(ds), 100))
    assert r.status_code == 409


def test_padding_hash_window_at_its_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    """PADDING_HASH_WINDOW_BYTES: padding (its 12-byte header and value) that fits in the
    window is left out of the hash; a longer one is hashed."""
    from dicomweb_server.blobstore import hashing

    monkeypatch.setattr(hashing, "PADDING_HASH_WINDOW_BYTES", 64)
    raw = to_bytes(make_instance(rows=16, cols=16))

    def digest(data: bytes) -> bytes:
        h = hashing.DataSetHash()
        h.update(data)
        return h.digest(len(raw) if len(data) > len(raw) else None)

    assert digest(_padded(raw, 64 - 12)) == digest(raw)
    assert digest(_padded(raw, 64 - 10)) != digest(raw)
