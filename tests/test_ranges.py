"""HTTP Range on frame and bulk data URLs (field notes 6; RFC 9110 14): ranges of the response
body, which is byte-identical from request to request, so that pieces join (Cornerstone's
progressive HTJ2K loading appends the raw bodies of its range requests)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID
from starlette.applications import Starlette

from dicomweb_server.errors import RangeNotSatisfiableError
from dicomweb_server.media.headers import byte_range
from dicomweb_server.retrieve.frames import _item_map, slice_stream
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

AS_STORED = "multipart/related; type=application/octet-stream; transfer-syntax=*"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


@pytest.mark.parametrize(
    ("header", "length", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),  # a suffix longer than the value is all of it
        ("bytes=90-1000", 100, (90, 100)),  # the last byte is clipped to the end
        ("bytes=99-99", 100, (99, 100)),  # the last byte alone
        ("Bytes = 5-6 ", 100, (5, 7)),  # unit case-insensitive, whitespace tolerated
        ("bytes=0-", 1, (0, 1)),
        (None, 100, None),
        ("bytes=9-3", 100, None),  # backwards: invalid, so ignored
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole value
        ("items=0-1", 100, None),  # another unit
        ("bytes=abc", 100, None),
        ("bytes=", 100, None),
        ("bytes=1" + "0" * 20 + "-", 100, None),  # longer than any offset: malformed
    ],
)
def test_byte_range(header: str | None, length: int, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, length) == expected


@pytest.mark.parametrize(
    ("header", "length"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0)],
)
def test_unsatisfiable_range(header: str, length: int) -> None:
    with pytest.raises(RangeNotSatisfiableError) as caught:
        byte_range(header, length)
    assert caught.value.status == 416
    assert caught.value.headers == {"Content-Range": f"bytes */{length}"}


async def _store(client: httpx.AsyncClient, data: bytes) -> None:
    r = await client.post(f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers())
    assert r.status_code == 200, r.text


def _one_part(r: httpx.Response) -> tuple[dict[str, str], bytes]:
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    return headers, body


def _head(body: bytes) -> int:
    """Where the one part's value starts in a one-part multipart body."""
    return body.index(b"\r\n\r\n") + 4


@pytest.mark.db
async def test_range_of_a_native_frame(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(frames=3, rows=4, cols=4)  # 32 bytes per frame
    await _store(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/frames/2"
    frame = bytes(ds.PixelData)[32:64]
    whole = await app_client.get(url)
    assert whole.status_code == 200 and _one_part(whole)[1] == frame
    body, head = whole.content, _head(whole.content)
    assert (await app_client.get(url)).content == body  # the same bytes every time

    r = await app_client.get(url, headers={"Range": "bytes=2-9"})
    assert r.status_code == 206, r.text
    assert r.content == body[2:10] and r.headers["content-length"] == "8"
    assert r.headers["content-range"] == f"bytes 2-9/{len(body)}"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == whole.headers["content-type"]
    r = await app_client.get(url, headers={"Range": f"bytes={head + 2}-{head + 9}"})
    assert r.status_code == 206 and r.content == frame[2:10]  # value bytes, by their offset

    # Pieces join into the body: the first 50 bytes, then the rest (Cornerstone's way).
    first = await app_client.get(url, headers={"Range": "bytes=0-49"})
    rest = await app_client.get(url, headers={"Range": "bytes=50-"})
    assert first.content + rest.content == body
    assert rest.headers["content-range"] == f"bytes 50-{len(body) - 1}/{len(body)}"

    r = await app_client.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == body[-5:]
    # The last byte is the edge of what can be asked; one past it is a 416.
    r = await app_client.get(url, headers={"Range": f"bytes={len(body) - 1}-"})
    assert r.status_code == 206 and r.content == body[-1:]
    r = await app_client.get(url, headers={"Range": f"bytes={len(body)}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(body)}"
    assert f"{len(body)}-byte body" in r.json()["message"]
    # A HEAD gives the headers of the same request with GET, nothing read.
    r = await app_client.head(url, headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 0-9/{len(body)}"
    assert (await app_client.head(url)).headers["content-length"] == str(len(body))

    # Ignored: a malformed range, If-Range (no validator to match), several frames.
    for extra in ({"Range": "bytes=9-2"}, {"Range": "bytes=0-3", "If-Range": '"x"'}):
        r = await app_client.get(url, headers=extra)
        assert r.status_code == 200 and r.content == body, extra
    r = await app_client.get(f"{inst_url(ds)}/frames/1,2", headers={"Range": "bytes=0-3"})
    assert r.status_code == 200
    assert "accept-ranges" not in r.headers  # several frames: no one value to cut
    assert [b for _, b in split_multipart(r.content, r.headers["content-type"])] == [
        bytes(ds.PixelData)[:32],
        frame,
    ]
    # Advertised on a one-frame URL without a Range too, so a client knows it may ask.
    r = await app_client.get(url)
    assert r.status_code == 200 and r.headers["accept-ranges"] == "bytes"


@pytest.mark.db
async def test_range_of_an_encapsulated_frame_of_several_fragments(
    app_client: httpx.AsyncClient,
) -> None:
    """The range counts bytes of the frame's codestream (its fragments' values joined), not
    of the stored items."""
    ds = make_instance(frames=2, rows=4, cols=4)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS_LOSSLESS)
    streams = [bytes(range(i, i + 61)) + b"\xff\xd9" for i in (0, 100)]  # 63 bytes each
    ds.PixelData = encapsulate(streams, fragments_per_frame=3, has_bot=True)
    ds["PixelData"].VR = "OB"
    await _store(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/frames/2"

    whole = await app_client.get(url, headers={"Accept": AS_STORED})
    assert whole.status_code == 200
    headers, stored = _one_part(whole)
    assert headers["content-type"] == f"image/jls; transfer-syntax={JPEG_LS_LOSSLESS}"
    assert stored.startswith(streams[1][:20])  # fragments joined, item headers removed
    head, end = _head(whole.content), _head(whole.content) + len(stored)
    for header, expected in (
        (f"bytes={head + 5}-{head + 30}", stored[5:31]),
        (f"bytes={end - 7}-{end - 1}", stored[-7:]),
    ):
        r = await app_client.get(url, headers={"Accept": AS_STORED, "Range": header})
        assert r.status_code == 206, r.text
        assert r.content == expected
        assert r.headers["content-range"].endswith(f"/{len(whole.content)}")
    r = await app_client.get(
        url, headers={"Accept": AS_STORED, "Range": f"bytes={len(whole.content)}-"}
    )
    assert r.status_code == 416


@pytest.mark.db
async def test_one_encapsulated_frame_whole_in_one_read(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stored encapsulated frame asked for without a Range: its fragments' values
    joined, as in a request for several frames, with a Content-Length, read in one
    worker-thread call (no item map first)."""
    import anyio.to_thread

    ds = make_instance(frames=2, rows=4, cols=4)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS_LOSSLESS)
    streams = [bytes(range(i, i + 61)) + b"\xff\xd9" for i in (0, 100)]
    ds.PixelData = encapsulate(streams, fragments_per_frame=3, has_bot=True)
    ds["PixelData"].VR = "OB"
    await _store(app_client, to_bytes(ds))
    both = await app_client.get(f"{inst_url(ds)}/frames/1,2", headers={"Accept": AS_STORED})
    expected = [body for _, body in split_multipart(both.content, both.headers["content-type"])]
    calls = []
    original = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(func.__name__)
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    for n in (1, 2):
        calls.clear()
        r = await app_client.get(f"{inst_url(ds)}/frames/{n}", headers={"Accept": AS_STORED})
        assert r.status_code == 200 and r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-length"] == str(len(r.content))
        assert _one_part(r)[1] == expected[n - 1]
        assert expected[n - 1].startswith(streams[n - 1])  # its fragments joined (even-padded)
        assert calls == ["_open_and_read"]


@pytest.mark.db
async def test_a_range_of_an_encapsulated_frame_in_two_reads(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Range of one stored encapsulated frame (Cornerstone's progressive loading asks
    `bytes=0-65535` of each frame): its items mapped, the file's size checked in the same
    worker-thread call (a file missing or cut short is a 500 that says so, test_lost_blob),
    then read: two calls. Found by review: the size check was a worker-thread call of its
    own, one more per request (about 50 us of CPU, 4% of such a request here)."""
    import anyio.to_thread

    ds = make_instance(frames=2, rows=4, cols=4)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS_LOSSLESS)
    streams = [bytes(range(i, i + 61)) + b"\xff\xd9" for i in (0, 100)]
    ds.PixelData = encapsulate(streams, fragments_per_frame=3, has_bot=True)
    ds["PixelData"].VR = "OB"
    await _store(app_client, to_bytes(ds))
    whole = await app_client.get(f"{inst_url(ds)}/frames/2", headers={"Accept": AS_STORED})
    calls = []
    original = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(func.__name__)
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    headers = {"Accept": AS_STORED, "Range": "bytes=0-65535"}
    r = await app_client.get(f"{inst_url(ds)}/frames/2", headers=headers)
    assert r.status_code == 206 and r.content == whole.content
    assert calls == ["_checked_item_map", "_open_and_read"]


@pytest.mark.db
async def test_range_of_a_transcoded_frame(app_client: httpx.AsyncClient, samples: Path) -> None:
    path = samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    await _store(app_client, path.read_bytes())
    url = f"{inst_url(ds)}/frames/3"  # default: uncompressed, decoded on the server

    whole = await app_client.get(url)
    assert whole.status_code == 200
    _, decoded = _one_part(whole)
    assert len(decoded) == ds.Rows * ds.Columns * ds.BitsAllocated // 8
    head = _head(whole.content)
    r = await app_client.get(url, headers={"Range": f"bytes={head + 100}-{head + 1123}"})
    assert r.status_code == 206
    assert r.content == decoded[100:1124]
    total = len(whole.content)
    assert r.headers["content-range"] == f"bytes {head + 100}-{head + 1123}/{total}"


@pytest.mark.db
async def test_range_of_bulk_data(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(frames=1, rows=64, cols=64)  # 8 KiB of pixel data: sent as bulk data
    await _store(app_client, to_bytes(ds))
    r = await app_client.get(f"{inst_url(ds)}/metadata")
    uri = r.json()[0]["7FE00010"]["BulkDataURI"]
    pixels = bytes(ds.PixelData)

    whole = await app_client.get(uri)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert _one_part(whole)[1] == pixels
    body, head = whole.content, _head(whole.content)
    r = await app_client.get(uri, headers={"Range": f"bytes={head + 4096}-"})
    assert r.status_code == 206
    assert r.content == body[head + 4096 :] and r.content.startswith(pixels[4096:])
    assert r.headers["content-range"] == f"bytes {head + 4096}-{len(body) - 1}/{len(body)}"
    # A browser viewer reads Content-Range across origins, on the 416 too (field notes 2).
    origin = {"Origin": "http://viewer.example"}
    r = await app_client.get(uri, headers={"Range": f"bytes={len(body)}-", **origin})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(body)}"
    assert "Content-Range" in r.headers["access-control-expose-headers"]


async def _chunks(parts: list[bytes], closed: list[bool]) -> AsyncIterator[bytes]:
    try:
        for p in parts:
            yield p
    finally:
        closed.append(True)


@pytest.mark.parametrize(("start", "stop"), [(0, 9), (2, 5), (3, 7), (8, 9), (0, 1), (4, 4 + 3)])
async def test_slice_stream(start: int, stop: int) -> None:
    parts = [b"abc", b"defg", b"hi"]
    closed: list[bool] = []
    got = b"".join([c async for c in slice_stream(_chunks(parts, closed), start, stop)])
    assert got == b"abcdefghi"[start:stop]
    assert closed == [True]  # the source is closed when the slice ends, even early


def test_item_map(tmp_path: Path) -> None:
    """Encapsulated items (FFFE,E000): each one's header position and value length; an item
    that runs past the recorded range counts only up to it, as strip_items yields."""
    items = b"".join(
        b"\xfe\xff\x00\xe0" + struct.pack("<I", len(v)) + v for v in (b"1234", b"abcdef")
    )
    path = tmp_path / "items"
    path.write_bytes(b"PREFIX" + items)
    assert _item_map(path, 6, len(items)) == [(6, 4), (18, 6)]
    assert _item_map(path, 6, 12) == [(6, 4)]  # the first item only
    assert _item_map(path, 6, 12 + 8 + 2) == [(6, 4), (18, 2)]  # two bytes into the 2nd value
    assert _item_map(path, 6, 12 + 5) == [(6, 4), (18, 0)]  # a partial second header: nothing


@pytest.mark.db
async def test_suffix_range_of_many_fragments_reads_from_the_last(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range of an encapsulated value starts reading at the item holding its first byte:
    the end of a value of many fragments is not read from the value's start."""
    ds = make_instance(frames=1, rows=4, cols=4)
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS_LOSSLESS)
    stream = bytes(range(200)) + b"\xff\xd9"  # 202 bytes, in 10 fragments
    ds.PixelData = encapsulate([stream], fragments_per_frame=10, has_bot=True)
    ds["PixelData"].VR = "OB"
    await _store(app_client, to_bytes(ds))
    blobs = app.state.services.blobs
    opened: list[tuple[int, int | None]] = []
    open_range = blobs.open_range

    def recording(blob: Any, offset: int = 0, length: int | None = None) -> Any:
        opened.append((offset, length))
        return open_range(blob, offset, length)

    monkeypatch.setattr(blobs, "open_range", recording)
    url = f"{inst_url(ds)}/frames/1"
    whole = await app_client.get(url, headers={"Accept": AS_STORED})
    assert _one_part(whole)[1] == stream
    end = _head(whole.content) + len(stream)
    r = await app_client.get(
        url, headers={"Accept": AS_STORED, "Range": f"bytes={end - 3}-{end - 1}"}
    )
    assert r.status_code == 206 and r.content == stream[-3:]
    (whole_start, whole_len), (tail_start, tail_len) = opened
    assert tail_start > whole_start and tail_len is not None and whole_len is not None
    assert tail_len < whole_len / 5  # the last fragment or so, not all ten


@pytest.mark.db
async def test_pieces_of_a_large_frame_join_into_its_body(app_client: httpx.AsyncClient) -> None:
    """Cornerstone's way with a frame larger than INLINE_RESPONSE_BYTES (streamed): the first
    64 KiB, then the rest, appended raw, make the body a plain GET gets, and it parses."""
    from dicomweb_server.routes.responses import INLINE_RESPONSE_BYTES

    ds = make_instance(frames=1, rows=1024, cols=1024)  # 2 MiB
    await _store(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/frames/1"
    accept = {"Accept": AS_STORED}
    whole = await app_client.get(url, headers=accept)
    assert len(whole.content) > INLINE_RESPONSE_BYTES
    first = await app_client.get(url, headers={**accept, "Range": "bytes=0-65535"})
    rest = await app_client.get(url, headers={**accept, "Range": "bytes=65536-"})
    assert first.status_code == rest.status_code == 206
    assert rest.headers["content-length"] == str(len(whole.content) - 65536)
    joined = first.content + rest.content
    assert joined == whole.content
    ((_, frame),) = split_multipart(joined, first.headers["content-type"])
    assert frame == bytes(ds.PixelData)


@pytest.mark.db
async def test_the_boundary_cannot_be_worked_out_by_the_uploader(
    app_client: httpx.AsyncClient,
) -> None:
    """The stable boundary is drawn from the blob's key too (random, the server's): from the
    URL, the part headers and the length alone, which an uploader knows before uploading, a
    value could be made to hold its own boundary and forge parts."""
    from dicomweb_server.multipart import stable_boundary

    ds = make_instance(frames=1, rows=4, cols=4)
    await _store(app_client, to_bytes(ds))
    url = f"{inst_url(ds)}/frames/1"
    r = await app_client.get(url)
    served = r.headers["content-type"].split("boundary=")[1]
    ctype = "Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert served != stable_boundary(url, "", ctype, "32")
    assert (await app_client.get(url)).headers["content-type"].endswith(served)  # still stable
