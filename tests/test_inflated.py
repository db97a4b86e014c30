"""Frames of Deflated instances read from an inflated copy (transcode.inflated): each file
inflated once per request, whatever other requests read, and kept across requests within
INFLATED_KEEP_BYTES. Inflations are counted (deflate streams inflated to their end), not
timed."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian
from starlette.applications import Starlette

from dicomweb_server.render import render_animation
from dicomweb_server.rendered import RenderParams
from dicomweb_server.transcode import frames as transcode_frames
from dicomweb_server.transcode import inflated
from dicomweb_server.transcode.codecs import TranscodeError
from dicomweb_server.transcode.frames import decode_frames, frame_array
from tests.helpers import inst_url, make_instance, multipart_body, split_multipart, stow_headers

ROOT = "/dicom-web"
_FRAMES = 16
_OCTETS = 'multipart/related; type="application/octet-stream"'


class _Counted:
    """A zlib decompressor counted once when it reaches the end of its stream."""

    def __init__(self, real: Any, counter: list[int]) -> None:
        self._real, self._counter, self._ended = real, counter, False

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out: bytes = self._real.decompress(data, max_length)
        if self._real.eof and not self._ended:
            self._ended = True
            self._counter[0] += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def inflations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """[Deflated data sets inflated whole so far], whoever inflates: pydicom's dcmread with
    zlib.decompress, a copy with a decompressobj run to the end of the stream (a header read
    stops at the Pixel Data, short of it). Copies kept by other tests are forgotten first."""
    counter = [0]
    real_decompress, real_obj = zlib.decompress, zlib.decompressobj

    def decompress(data: bytes, wbits: int = zlib.MAX_WBITS, *args: Any) -> bytes:
        counter[0] += wbits < 0  # a raw deflate stream (PS3.5 A.5), not a module's zlib data
        return real_decompress(data, wbits, *args)

    monkeypatch.setattr(zlib, "decompress", decompress)
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: _Counted(real_obj(*a), counter))
    monkeypatch.setattr(inflated, "_copies", type(inflated._copies)())
    monkeypatch.setattr(transcode_frames, "_whole", type(transcode_frames._whole)())
    yield counter


def _deflated(frames: int = _FRAMES, seed: int = 0, **extra: Any) -> Dataset:
    ds = make_instance(frames=frames, rows=64, cols=64, **extra)
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (frames, 64, 64), dtype=np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def _saved(tmp_path: Path, ds: Dataset, name: str) -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_two_files_read_frame_by_frame_at_once_inflate_once_each(
    tmp_path: Path, inflations: list[int]
) -> None:
    """OHIF's way: each frame asked alone, two instances at once. One file decoded whole was
    kept per process, so each frame took the place of the other file's and every frame
    decoded its whole file again (2 instances x 120 frames, 6 requests at a time: 144 s)."""
    a, b = _deflated(seed=1), _deflated(seed=2)
    pa, pb = _saved(tmp_path, a, "a.dcm"), _saved(tmp_path, b, "b.dcm")
    scratch = tmp_path / "scratch"
    for n in range(1, _FRAMES + 1):
        assert decode_frames(pa, [n], scratch) == [a.pixel_array[n - 1].tobytes()]
        assert decode_frames(pb, [n], scratch) == [b.pixel_array[n - 1].tobytes()]
    assert inflations == [2]
    assert sorted(p.name for p in scratch.iterdir()) == sorted(
        c.path.name for c in inflated._copies.values()
    )


def test_a_file_decoding_past_the_memory_kept_is_inflated_once(
    tmp_path: Path, inflations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose pixels decode to more than WHOLE_FILE_KEEP_MAX_BYTES was not kept, and
    decoded whole again for each of its frames (a 1-bit Deflated SEG unpacks 8 times over):
    its frames are read from the inflated copy, which holds them packed, on disk."""
    ds = _deflated()
    path = _saved(tmp_path, ds, "big.dcm")
    monkeypatch.setattr(transcode_frames, "WHOLE_FILE_KEEP_MAX_BYTES", 0)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    inflations[0] = 0  # dcmread inflated it whole for that header
    for n in range(1, _FRAMES + 1):
        frame = frame_array(path, header, n, scratch=tmp_path)
        assert np.array_equal(frame, ds.pixel_array[n - 1])
    assert inflations == [1]


def test_copies_kept_up_to_inflated_keep_bytes(
    tmp_path: Path, inflations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFLATED_KEEP_BYTES at its edge: two copies that take exactly it are both kept; a
    byte less and the least recently used goes (removed from disk), so frames of the two
    read in turn inflate their file each time; a file held (a request over its frames)
    keeps its copy through it all."""
    a, b = _deflated(seed=1), _deflated(seed=2)
    pa, pb = _saved(tmp_path, a, "a.dcm"), _saved(tmp_path, b, "b.dcm")
    scratch = tmp_path / "scratch"
    decode_frames(pa, [1], scratch)
    decode_frames(pb, [1], scratch)
    both = sum(c.size for c in inflated._copies.values())
    assert both == sum(p.stat().st_size for p in scratch.iterdir())
    # A byte less: a's first frame finds its copy, and b's is dropped then (least recently
    # used); from there on each frame inflates its file.
    for keep, count in ((both, 0), (both - 1, 2 * _FRAMES - 1)):
        monkeypatch.setattr(inflated, "INFLATED_KEEP_BYTES", keep)
        inflations[0] = 0
        for n in range(1, _FRAMES + 1):
            decode_frames(pa, [n], scratch)
            decode_frames(pb, [n], scratch)
        assert inflations == [count], keep
        assert sum(p.stat().st_size for p in scratch.iterdir()) <= keep
    inflations[0] = 0
    with inflated.hold(pa):
        for n in range(1, _FRAMES + 1):
            assert decode_frames(pa, [n], scratch) == [a.pixel_array[n - 1].tobytes()]
            decode_frames(pb, [n], scratch)
    # a once (the loop before left b's copy kept, not a's); b each frame.
    assert inflations == [1 + _FRAMES]
    assert len(inflated._copies) == 1  # a released, then removed: over the budget


def test_a_copy_removed_from_disk_is_made_again(tmp_path: Path, inflations: list[int]) -> None:
    """The scratch directory is cleared when a process is taken for dead (app.recover): a
    kept copy gone from disk is inflated again, not a 500."""
    ds = _deflated()
    path = _saved(tmp_path, ds, "a.dcm")
    assert decode_frames(path, [2], tmp_path / "s") == [ds.pixel_array[1].tobytes()]
    for copy in (tmp_path / "s").iterdir():
        copy.unlink()
    assert decode_frames(path, [3], tmp_path / "s") == [ds.pixel_array[2].tobytes()]
    assert len(list((tmp_path / "s").iterdir())) == 1


def test_an_animation_inflates_once_whatever_is_kept(
    tmp_path: Path, inflations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GIF of every frame holds the copy over its frames: nothing kept between requests
    (INFLATED_KEEP_BYTES 0), it is still inflated once, and removed after."""
    monkeypatch.setattr(inflated, "INFLATED_KEEP_BYTES", 0)
    ds = _deflated()
    path = _saved(tmp_path, ds, "a.dcm")
    gif = render_animation(path, RenderParams(), tmp_path / "s")
    assert gif.startswith(b"GIF")
    assert inflations == [1]
    assert not inflated._copies and not list((tmp_path / "s").iterdir())


def test_a_damaged_deflate_stream_is_a_406(tmp_path: Path, inflations: list[int]) -> None:
    """Bytes that do not inflate, or a stream cut short: the frame is refused with the
    reason, and no copy is left."""
    ds = _deflated()
    path = _saved(tmp_path, ds, "a.dcm")
    data = path.read_bytes()
    meta = _meta_bytes(path)
    raw = zlib.decompress(data[meta:], -zlib.MAX_WBITS)
    # Half the data set, then a block of the reserved type 11 (PS3.5 A.5 is RFC 1951).
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    half = deflater.compress(raw[: len(raw) // 2]) + deflater.flush(zlib.Z_FULL_FLUSH)
    for damaged, reason in (
        (data[: meta + (len(data) - meta) // 2], "cut short"),
        (data[:meta] + half + b"\x06" + bytes(64), "not a deflate stream: .*invalid block type"),
    ):
        path.write_bytes(damaged)
        with pytest.raises(TranscodeError, match=reason):
            decode_frames(path, [1], tmp_path / "s")
        assert not list((tmp_path / "s").iterdir()) and not inflated._copies


def test_inflated_max_bytes_edge(
    tmp_path: Path, inflations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFLATED_MAX_BYTES at its edge: a data set inflating to exactly it is read, a byte
    more is refused with the reason."""
    ds = _deflated(frames=2)
    path = _saved(tmp_path, ds, "a.dcm")
    decode_frames(path, [1], tmp_path / "s")
    (copy,) = inflated._copies.values()
    data_set = copy.size - _meta_bytes(copy.path)
    for limit, ok in ((data_set, True), (data_set - 1, False)):
        monkeypatch.setattr(inflated, "_copies", type(inflated._copies)())
        monkeypatch.setattr(inflated, "INFLATED_MAX_BYTES", limit)
        if ok:
            assert decode_frames(path, [2], tmp_path / "s") == [ds.pixel_array[1].tobytes()]
        else:
            with pytest.raises(TranscodeError, match=f"more than {limit} bytes"):
                decode_frames(path, [2], tmp_path / "s")


def _meta_bytes(path: Path) -> int:
    """Bytes of the preamble and File Meta Information of a Part 10 file."""
    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.tell()


async def _stored(client: httpx.AsyncClient, ds: Dataset) -> str:
    r = await client.post(
        f"{ROOT}/studies", content=multipart_body([_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 200 and "00081198" not in r.json(), r.text
    return inst_url(ds)


def _bytes(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def test_frame_requests_of_two_deflated_instances_inflate_each_once(
    app_client: httpx.AsyncClient, inflations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the server: a frame a request, two instances in turn (OHIF), each file
    inflated once; a frame list held over its request inflates once with nothing kept
    between requests (INFLATED_KEEP_BYTES 0) and leaves no copy behind."""
    a, b = _deflated(seed=1), _deflated(seed=2)
    ua, ub = await _stored(app_client, a), await _stored(app_client, b)
    inflations[0] = 0
    for n in range(1, _FRAMES + 1):
        for url, ds in ((ua, a), (ub, b)):
            r = await app_client.get(f"{url}/frames/{n}", headers={"Accept": _OCTETS})
            assert r.status_code == 200, r.text
            (part,) = split_multipart(r.content, r.headers["content-type"])
            assert part[1] == ds.pixel_array[n - 1].tobytes()
    assert inflations == [2]
    monkeypatch.setattr(inflated, "INFLATED_KEEP_BYTES", 0)
    c = _deflated(seed=3)  # frames not in the server's frame cache
    uc = await _stored(app_client, c)
    inflations[0] = 0
    every = ",".join(str(n) for n in range(1, _FRAMES + 1))
    r = await app_client.get(f"{uc}/frames/{every}", headers={"Accept": _OCTETS})
    assert r.status_code == 200, r.text
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [body for _, body in parts] == [f.tobytes() for f in c.pixel_array]
    assert inflations == [1]
    assert not inflated._copies and not inflated._pins


# Bulk data of Deflated instances (retrieve.pixeldata._inflated_bulk_value): read by byte
# range from the inflated copy, not from the file parsed whole for every request.

_ICON = "00880200/0/7FE00010"  # Icon Image Sequence, item 0, its (native) Pixel Data
_DOCUMENT = "00420011"  # Encapsulated Document, OB
_DEEP = "0040A730/0/0040A730/1/00420011"  # one in Content Sequence in Content Sequence


def _with_bulk_values(ds: Dataset, seed: int = 0) -> Dataset:
    """`ds` with a large value nested in a sequence (an icon's Pixel Data) and another at
    the top level beside its Pixel Data, both over the bulk data threshold."""
    rng = np.random.default_rng(seed)
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel = 64, 64, 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = rng.integers(0, 256, 64 * 64, dtype=np.uint8).tobytes()
    ds.IconImageSequence = [icon]
    ds.EncapsulatedDocument = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    inner = Dataset()  # two sequences down, each item of its own (undefined) length
    inner.EncapsulatedDocument = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    outer = Dataset()
    outer.ContentSequence = [Dataset(), inner]
    ds.ContentSequence = [outer]
    ds["ContentSequence"].is_undefined_length = True
    return ds


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """[files parsed for a bulk data value so far] (bulkvalue.bulk_element or
    placed_element, as pixeldata calls them); places of values in inflated copies found
    before are forgotten."""
    from dicomweb_server.retrieve import pixeldata

    counter = [0]

    def counted(real: Any) -> Any:
        def parse(path: Path, tag_path: str) -> Any:
            counter[0] += 1
            return real(path, tag_path)

        return parse

    for name in ("bulk_element", "placed_element"):
        if hasattr(pixeldata, name):
            monkeypatch.setattr(pixeldata, name, counted(getattr(pixeldata, name)))
    if hasattr(pixeldata, "_places"):
        monkeypatch.setattr(pixeldata, "_places", type(pixeldata._places)())
    yield counter


async def _bulk(
    client: httpx.AsyncClient, url: str, path: str, span: tuple[int, int] | None = None
) -> bytes:
    headers = {"Accept": "application/octet-stream"}
    if span is not None:
        headers["Range"] = f"bytes={span[0]}-{span[1] - 1}"
    r = await client.get(f"{url}/bulk/{path}", headers=headers)
    assert r.status_code == (200 if span is None else 206), r.text
    return r.content


async def test_bulk_values_of_a_deflated_instance_are_read_from_its_inflated_copy(
    app_client: httpx.AsyncClient, inflations: list[int], parses: list[int]
) -> None:
    """The Pixel Data of a multi-frame Deflated instance, a value nested in a sequence and
    one beside it, whole and by Range, asked again and again (OHIF): each byte as pydicom
    reads it, the file inflated once and each value's place found once. Each request parsed
    the file, inflating it whole in memory: 16 requests, 16 inflations (and 16 parses)."""
    ds = _with_bulk_values(_deflated())
    url = await _stored(app_client, ds)
    values = {
        "7FE00010": ds.PixelData,
        _ICON: ds.IconImageSequence[0].PixelData,
        _DOCUMENT: ds.EncapsulatedDocument,
        _DEEP: ds.ContentSequence[0].ContentSequence[1].EncapsulatedDocument,
    }
    inflations[0] = 0
    for path, value in values.items():
        assert await _bulk(app_client, url, path) == value
        for span in ((0, 1), (100, 1001), (len(value) - 7, len(value))):
            assert await _bulk(app_client, url, path, span) == value[span[0] : span[1]]
    assert inflations == [1]
    assert parses == [len(values)]
    assert not inflated._pins  # every request let its hold go
    # The Pixel Data resource (multipart, the same value) parses nothing more.
    r = await app_client.get(f"{url}/pixeldata", headers={"Accept": _OCTETS})
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == ds.PixelData
    assert inflations == [1] and parses == [len(values)] and not inflated._pins


async def test_bulk_data_of_deflated_samples_is_pydicoms_value(
    app_client: httpx.AsyncClient, samples: Path, inflations: list[int]
) -> None:
    """The Deflated samples of the corpus (MANIFEST.tsv): their Pixel Data by its
    BulkDataURI, whole and a range of it, byte for byte as pydicom reads it."""
    rows = (line.split("\t") for line in (samples / "MANIFEST.tsv").read_text().splitlines())
    paths = [r[0] for r in rows if len(r) > 6 and r[6] == DeflatedExplicitVRLittleEndian]
    assert paths
    for name in paths:
        ds = pydicom.dcmread(samples / name)
        url = await _stored(app_client, ds)
        value = ds.PixelData
        assert await _bulk(app_client, url, "7FE00010") == value
        span = (len(value) // 3, len(value) // 2)
        assert await _bulk(app_client, url, "7FE00010", span) == value[span[0] : span[1]]
    assert not inflated._pins


async def test_a_deflated_bulk_value_lets_its_hold_go_on_every_path(
    app: Starlette, app_client: httpx.AsyncClient, inflations: list[int], parses: list[int]
) -> None:
    """A HEAD (the value never read), a path naming no value, a value read whole and a
    damaged deflate stream (a 406 with the reason, as its frames are): the copy is held by
    none of them after, so INFLATED_KEEP_BYTES can remove it. (Asked as a single part, the
    reason leads the multipart answer's 406, tried next: routes.wado.retrieve_bulkdata.)"""
    ds = _with_bulk_values(_deflated(frames=2))
    url = await _stored(app_client, ds)
    inflations[0] = 0
    r = await app_client.head(
        f"{url}/bulk/7FE00010", headers={"Accept": "application/octet-stream"}
    )
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(ds.PixelData)
    assert not inflated._pins
    r = await app_client.get(f"{url}/bulk/00100010", headers={"Accept": "application/octet-stream"})
    assert r.status_code == 404, r.text
    assert not inflated._pins
    assert await _bulk(app_client, url, _ICON) == ds.IconImageSequence[0].PixelData
    assert not inflated._pins
    assert inflations == [1]
    (copy,) = inflated._copies.values()
    copy.path.unlink()  # the scratch directory cleared (app.recover): made again
    assert await _bulk(app_client, url, _ICON) == ds.IconImageSequence[0].PixelData
    assert inflations == [2] and parses == [2] and not inflated._pins  # 404, icon
    (inst,) = await app.state.services.index.locate(ds.StudyInstanceUID)
    blob = app.state.services.blobs.local_path(inst.blob_key)
    data = blob.read_bytes()
    # Half the data set, then a block of the reserved type 11, in a file of the size the
    # index recorded (a file cut short is lost, a 500: test_lost_blob.py).
    meta = _meta_bytes(blob)
    raw = zlib.decompress(data[meta:], -zlib.MAX_WBITS)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    damaged = data[:meta] + deflater.compress(raw[: len(raw) // 2])
    damaged += deflater.flush(zlib.Z_FULL_FLUSH) + b"\x06"
    assert len(damaged) <= len(data)
    blob.write_bytes(damaged + bytes(len(data) - len(damaged)))
    r = await app_client.get(f"{url}/bulk/7FE00010", headers={"Accept": _OCTETS})
    assert r.status_code == 406 and "not a deflate stream" in r.text, r.text
    assert not inflated._pins
    single = {"Accept": "application/octet-stream"}
    r = await app_client.get(f"{url}/bulk/7FE00010", headers=single)
    assert r.status_code == 406 and "not a deflate stream" in r.text, r.text
    assert not inflated._pins


async def test_inflated_places_kept_edge(
    app_client: httpx.AsyncClient,
    inflations: list[int],
    parses: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """INFLATED_PLACES_KEPT at its edge: two values asked in turn, each place found once
    when two are kept; with one kept, each request finds its value again (the file is
    still inflated once: the copy is kept)."""
    from dicomweb_server.retrieve import pixeldata

    ds = _with_bulk_values(_deflated(frames=2))
    url = await _stored(app_client, ds)
    inflations[0] = 0
    for kept, count in ((2, 2), (1, 6)):
        monkeypatch.setattr(pixeldata, "INFLATED_PLACES_KEPT", kept)
        monkeypatch.setattr(pixeldata, "_places", type(pixeldata._places)())
        parses[0] = 0
        for _ in range(3):
            assert await _bulk(app_client, url, "7FE00010") == ds.PixelData
            assert await _bulk(app_client, url, _DOCUMENT) == ds.EncapsulatedDocument
        assert parses == [count], kept
        assert len(pixeldata._places) == kept
    assert inflations == [1]


async def test_a_head_of_deflated_pixel_data_inflates_nothing(
    app: Starlette, app_client: httpx.AsyncClient, samples: Path, inflations: list[int]
) -> None:
    """A HEAD of the Pixel Data of a Deflated instance by its BulkDataURI, as one part or
    as multipart, whole or a range of it, gets the GET's Content-Length from the length
    recorded at ingest: no inflated copy is made to answer it. The value made for a HEAD,
    were it read, is the value."""
    from dicomweb_server.retrieve import pixeldata

    ds = pydicom.dcmread(samples / "generated" / "coverage" / "dx_deflated.dcm")
    url = await _stored(app_client, ds)
    inflations[0] = 0
    uri = f"{url}/bulk/7FE00010"
    for accept in ("application/octet-stream", _OCTETS):
        for span in (None, "bytes=10-99"):
            headers = {"Accept": accept} | ({"Range": span} if span else {})
            head = await app_client.head(uri, headers=headers)
            assert head.status_code == (206 if span else 200), head.text
            assert inflations == [0] and not inflated._copies, (accept, span)
            get = await app_client.get(uri, headers=headers)
            assert get.status_code == head.status_code
            assert int(head.headers["content-length"]) == len(get.content)
            assert head.headers.get("content-range") == get.headers.get("content-range")
            if span is None and accept != _OCTETS:
                assert get.content == ds.PixelData
            assert inflations == [1]
            for name in list(inflated._copies):  # the next HEAD finds no copy kept
                inflated._drop(name)
            inflations[0] = 0
    svc = app.state.services
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    (inst,) = await svc.index.locate(*uids)
    entry = await svc.index.bulk_range(*uids, "7FE00010")
    assert entry == [None, len(ds.PixelData), "OW", False]
    value = await pixeldata.stored_bulk_value(svc, inst, "7FE00010", entry, head=True)
    assert inflations == [0]
    assert b"".join([c async for c in value.read(0, value.length)]) == ds.PixelData
    assert inflations == [1] and not inflated._pins
