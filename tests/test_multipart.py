"""The sans-I/O multipart reader and the writer (RFC 2046 5.1, PS3.18 8.6.1.2)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from dicomweb_server.errors import BadRequestError, PayloadTooLargeError
from dicomweb_server.multipart import (
    MAX_BOUNDARY_CHARS,
    MAX_PART_HEADER_BYTES,
    MAX_PREAMBLE_BYTES,
    Event,
    MultipartReader,
    PartBegin,
    PartData,
    PartEnd,
    encode_parts,
    iter_parts,
    new_boundary,
)

B = "a'()+_,-./:=?b"  # every special character RFC 2046 allows in a boundary
BIG = 10 * 1024 * 1024


def body(
    parts: list[tuple[dict[str, str], bytes]], *, preamble: bytes = b"", epilogue: bytes = b""
) -> bytes:
    out = bytearray(preamble)
    for headers, data in parts:
        out += f"--{B}\r\n".encode()
        out += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{B}--\r\n".encode() + epilogue
    return bytes(out)


PARTS = [
    (
        {"Content-Type": "application/dicom", "Content-Location": "x/1"},
        b"first\r\n--not-a-boundary",
    ),
    ({}, b""),
    ({"content-type": "application/dicom"}, bytes(range(256)) * 3),
]


def collect(events: list[Event]) -> list[tuple[dict[str, str], bytes]]:
    parts: list[tuple[dict[str, str], bytes]] = []
    data = bytearray()
    headers: dict[str, str] = {}
    for e in events:
        if isinstance(e, PartBegin):
            headers, data = e.headers, bytearray()
        elif isinstance(e, PartData):
            data += e.data
        elif isinstance(e, PartEnd):
            parts.append((headers, bytes(data)))
    return parts


def expected() -> list[tuple[dict[str, str], bytes]]:
    return [({k.lower(): v for k, v in h.items()}, d) for h, d in PARTS]


def feed_all(chunks: list[bytes], max_part_bytes: int = BIG) -> list[tuple[dict[str, str], bytes]]:
    reader = MultipartReader(B, max_part_bytes=max_part_bytes)
    events: list[Event] = []
    for c in chunks:
        events += reader.feed(c)
    reader.close()
    assert reader.finished
    return collect(events)


def test_every_split_offset_including_inside_the_boundary() -> None:
    raw = body(PARTS, preamble=b"preamble text\r\nmore\n", epilogue=b"epilogue")
    for i in range(len(raw) + 1):
        assert feed_all([raw[:i], raw[i:]]) == expected(), f"split at {i}"


def test_byte_by_byte() -> None:
    raw = body(PARTS, preamble=b"\r\n")
    assert feed_all([raw[i : i + 1] for i in range(len(raw))]) == expected()


def test_large_part_is_streamed_in_pieces() -> None:
    payload = bytes(range(256)) * (BIG // 256)
    raw = body([({}, payload)])
    reader = MultipartReader(B, max_part_bytes=BIG)
    sizes = []
    for i in range(0, len(raw), 65536):
        sizes += [len(e.data) for e in reader.feed(raw[i : i + 65536]) if isinstance(e, PartData)]
    reader.close()
    assert sum(sizes) == BIG and len(sizes) > 100 and max(sizes) <= 65536


def test_part_size_limit_at_the_edge() -> None:
    assert feed_all([body([({}, b"x" * 100)])], max_part_bytes=100)[0][1] == b"x" * 100
    with pytest.raises(PayloadTooLargeError, match=r"101|100"):
        feed_all([body([({}, b"x" * 101)])], max_part_bytes=100)


def test_part_count_limit_at_the_edge() -> None:
    raw = body([({}, b"x")] * 3)
    r = MultipartReader(B, max_part_bytes=10, max_parts=3)
    r.feed(raw)
    r.close()
    with pytest.raises(PayloadTooLargeError):
        MultipartReader(B, max_part_bytes=10, max_parts=2).feed(raw)


def test_header_block_limit_at_the_edge() -> None:
    name = "X-H: "
    ok = {"X-H": "v" * (MAX_PART_HEADER_BYTES - len(name) - 2)}
    assert feed_all([body([(ok, b"d")])])[0][1] == b"d"
    too_long = {"X-H": "v" * (MAX_PART_HEADER_BYTES + 1)}
    with pytest.raises(BadRequestError):
        feed_all([body([(too_long, b"d")])])


def test_preamble_limit_at_the_edge() -> None:
    just = b"p" * (MAX_PREAMBLE_BYTES - 2) + b"\r\n"
    assert feed_all([body(PARTS, preamble=just)]) == expected()
    with pytest.raises(BadRequestError, match="no multipart boundary"):
        feed_all([b"p" * (MAX_PREAMBLE_BYTES + 1)])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage with no boundary at all",
        f"--{B}\r\nContent-Type: a\r\n\r\ntruncated".encode(),
        f"--{B}\r\nno colon here\r\n\r\ndata\r\n--{B}--".encode(),
        f"--{B}X\r\n\r\ndata\r\n--{B}--".encode(),
        f"--{B}\r\n\r\ndata\r\n--{B}".encode(),
    ],
)
def test_malformed_bodies(raw: bytes) -> None:
    with pytest.raises(BadRequestError):
        feed_all([raw])


@pytest.mark.parametrize("boundary", ["", "x" * (MAX_BOUNDARY_CHARS + 1), "naïve"])
def test_bad_boundaries(boundary: str) -> None:
    with pytest.raises(BadRequestError):
        MultipartReader(boundary, max_part_bytes=10)


def test_orthanc_73_character_boundary() -> None:
    """Orthanc 1.10 sends two UUIDs joined by '-' (73 characters, over RFC 2046's 70)."""
    boundary = "fd095149-8a9b-441d-a1b4-adc664789ba3-fd095149-8a9b-441d-a1b4-adc664789ba3"
    raw = f"--{boundary}\r\nContent-Length: 3\r\n\r\nabc\r\n--{boundary}--\r\n".encode()
    reader = MultipartReader(boundary, max_part_bytes=10)
    events = reader.feed(raw)
    reader.close()
    assert collect(events) == [({"content-length": "3"}, b"abc")]


def test_random_bytes_never_raise_anything_else() -> None:
    rng = random.Random(1234)
    valid = body(PARTS)
    for _ in range(300):
        if rng.random() < 0.5:
            mutable = bytearray(rng.randrange(256) for _ in range(rng.randrange(200)))
        else:  # a valid body with a few bytes flipped
            mutable = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        raw = bytes(mutable)
        cut = rng.randrange(len(raw) + 1)
        with contextlib.suppress(BadRequestError, PayloadTooLargeError):
            feed_all([raw[:cut], raw[cut:]], max_part_bytes=1000)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_iter_parts_request_limit_at_the_edge() -> None:
    raw = body(PARTS)
    events = [
        e
        async for e in iter_parts(
            _chunks(raw, 7), B, max_part_bytes=BIG, max_request_bytes=len(raw)
        )
    ]
    assert collect(events) == expected()
    with pytest.raises(PayloadTooLargeError):
        async for _ in iter_parts(
            _chunks(raw, 7), B, max_part_bytes=BIG, max_request_bytes=len(raw) - 1
        ):
            pass


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data[:3]
    yield data[3:]


async def _parts() -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes]]]:
    yield (
        {"Content-Type": "application/dicom"},
        _body(b"one\r\n--" + B.encode() + b" not at line start"),
    )
    yield {}, _body(b"")


async def test_encode_parts_round_trip() -> None:
    boundary = new_boundary()
    assert boundary != new_boundary()
    raw = b"".join([c async for c in encode_parts(_parts(), boundary)])
    reader = MultipartReader(boundary, max_part_bytes=BIG)
    events = reader.feed(raw)
    reader.close()
    assert collect(events) == [
        ({"content-type": "application/dicom"}, b"one\r\n--" + B.encode() + b" not at line start"),
        ({}, b""),
    ]
