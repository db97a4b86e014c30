"""The sans-I/O multipart reader and the writer (RFC 2046 5.1, PS3.18 8.6.1.2)."""

from __future__ import annotations

import logging
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import pytest

from dicomweb_server.errors import BadRequestError, PayloadTooLargeError
from dicomweb_server.multipart import (
    MAX_BOUNDARY_CHARS,
    MAX_PART_HEADER_BYTES,
    MAX_PARTS,
    MAX_PREAMBLE_BYTES,
    Event,
    MultipartReader,
    PartBegin,
    PartData,
    PartEnd,
    encode_parts,
    encoded_length,
    iter_parts,
    new_boundary,
)

B = "a'()+_,-./:=?b"  # the special characters RFC 2046 5.1.1 allows in a boundary
DELIM = b"--" + B.encode()
BIG = 10 * 1024 * 1024
Parts = list[tuple[dict[str, str], bytes]]

PARTS: Parts = [
    (
        {"Content-Type": "application/dicom", "Content-Location": "Studies/1.2/Instances/3.4"},
        # boundary-like text that is not a delimiter: not at a line start, or not followed by
        # CRLF or "--" (python-multipart keeps both as data)
        b"first " + DELIM + b"\r\n" + DELIM + b"x\r\n" + DELIM + b"-y\r\n-\r\n--\r",
    ),
    ({}, b""),
    ({"content-type": "application/dicom"}, bytes(range(256)) * 3),
]


def body(
    parts: Parts,
    *,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    boundary: str = B,
    padding: bytes = b"",
) -> bytes:
    out = bytearray(preamble)
    for headers, data in parts:
        out += f"--{boundary}".encode() + padding + b"\r\n"
        out += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode() + epilogue
    return bytes(out)


def collect(events: Iterable[Event]) -> Parts:
    """(headers, data) per part; checks that the events come in a sane order."""
    parts: Parts = []
    data: bytearray | None = None
    headers: dict[str, str] = {}
    for e in events:
        if isinstance(e, PartBegin):
            assert data is None, "PartBegin inside a part"
            headers, data = e.headers, bytearray()
        elif isinstance(e, PartData):
            assert data is not None and e.data, "PartData outside a part, or empty"
            data += e.data
        else:
            assert isinstance(e, PartEnd) and data is not None, "PartEnd outside a part"
            parts.append((headers, bytes(data)))
            data = None
    assert data is None, "unterminated part"
    return parts


def expected(parts: Parts = PARTS) -> Parts:
    return [({k.lower(): v for k, v in h.items()}, d) for h, d in parts]


def feed_all(
    chunks: Iterable[bytes], *, boundary: str = B, max_part_bytes: int = BIG, max_parts: int = 50
) -> Parts:
    reader = MultipartReader(boundary, max_part_bytes=max_part_bytes, max_parts=max_parts)
    events: list[Event] = []
    for c in chunks:
        events += reader.feed(c)
    reader.close()
    assert reader.finished
    return collect(events)


def byte_by_byte(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


# --- chunking ---------------------------------------------------------------------------------


def test_every_split_offset_including_inside_the_boundary() -> None:
    raw = body(PARTS, preamble=b"preamble\r\nbare LF line\n--not-it\r\n", epilogue=b"epi\r\n")
    for i in range(len(raw) + 1):
        assert feed_all([raw[:i], raw[i:]]) == expected(), f"split at {i}"


def test_byte_by_byte() -> None:
    raw = body(PARTS, preamble=b"preamble\n", epilogue=b"epilogue")
    assert feed_all(byte_by_byte(raw)) == expected()


def test_large_part_is_streamed_in_bounded_pieces() -> None:
    payload = bytes(range(256)) * (BIG // 256)
    raw = body([({}, payload)])
    reader = MultipartReader(B, max_part_bytes=BIG)
    sizes: list[int] = []
    tracemalloc.start()
    try:
        for i in range(0, len(raw), 65536):
            for e in reader.feed(raw[i : i + 65536]):
                if isinstance(e, PartData):
                    assert payload[sum(sizes) : sum(sizes) + len(e.data)] == e.data
                    sizes.append(len(e.data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    reader.close()
    assert sum(sizes) == BIG and len(sizes) >= BIG // 65536 and max(sizes) <= 65536
    assert peak < 1024 * 1024, f"peak {peak} bytes: the part was buffered"


# --- limits, each at its edge -----------------------------------------------------------------


def test_part_size_limit_at_the_edge() -> None:
    assert feed_all([body([({}, b"x" * 100)])], max_part_bytes=100) == [({}, b"x" * 100)]
    with pytest.raises(PayloadTooLargeError, match="limit of 100 bytes"):
        feed_all([body([({}, b"x" * 101)])], max_part_bytes=100)


def test_part_size_limit_while_streaming() -> None:
    raw = body([({}, b"x" * 101)])
    with pytest.raises(PayloadTooLargeError, match="limit of 100 bytes"):
        feed_all(byte_by_byte(raw), max_part_bytes=100)


def test_part_count_limit_at_the_edge() -> None:
    assert len(feed_all([body([({}, b"x")] * 3)], max_parts=3)) == 3
    with pytest.raises(PayloadTooLargeError, match="limit of 3 parts"):
        feed_all([body([({}, b"x")] * 4)], max_parts=3)


def test_default_part_count_limit_at_the_edge() -> None:
    reader = MultipartReader(B, max_part_bytes=10)
    assert len(collect(reader.feed(body([({}, b"")] * MAX_PARTS)))) == MAX_PARTS
    reader.close()
    # One too many: the parts before it are given, then the error (at the next feed or close).
    reader = MultipartReader(B, max_part_bytes=10)
    events = reader.feed(body([({}, b"")] * (MAX_PARTS + 1)))
    assert sum(isinstance(e, PartEnd) for e in events) == MAX_PARTS
    with pytest.raises(PayloadTooLargeError, match=f"limit of {MAX_PARTS} parts"):
        reader.close()
    with pytest.raises(PayloadTooLargeError, match=f"limit of {MAX_PARTS} parts"):
        reader.feed(b"more")


@pytest.mark.parametrize("lines", [1, 7])
def test_header_block_limit_at_the_edge(lines: int) -> None:
    """Names and values count; ':', the space after it and the line ends do not."""
    names = [f"X-{i}" for i in range(lines)]
    value_bytes = MAX_PART_HEADER_BYTES - sum(len(n) for n in names)
    values = [value_bytes // lines] * lines
    values[-1] += value_bytes % lines
    ok = {n: "v" * v for n, v in zip(names, values, strict=True)}
    assert feed_all([body([(ok, b"d")])]) == expected([(ok, b"d")])
    over = {**ok, names[-1]: ok[names[-1]] + "v"}
    with pytest.raises(BadRequestError, match=f"limit of {MAX_PART_HEADER_BYTES} bytes"):
        feed_all([body([(over, b"d")])])
    with pytest.raises(BadRequestError, match=f"limit of {MAX_PART_HEADER_BYTES} bytes"):
        feed_all(byte_by_byte(body([(over, b"d")])))


def test_many_headers_are_fine() -> None:
    """python-multipart's default of 8 headers per part (meant for forms) is lifted."""
    headers = {f"X-Header-{i}": str(i) for i in range(100)}
    assert feed_all([body([(headers, b"d")])]) == expected([(headers, b"d")])


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_preamble_limit_at_the_edge(eol: bytes) -> None:
    just = b"p" * (MAX_PREAMBLE_BYTES - len(eol)) + eol
    raw = body(PARTS, preamble=just)
    assert feed_all([raw]) == expected()
    assert feed_all([raw[i : i + 7] for i in range(0, len(raw), 7)]) == expected()
    raw = body(PARTS, preamble=b"p" + just)
    with pytest.raises(BadRequestError, match=f"first {MAX_PREAMBLE_BYTES} bytes"):
        feed_all([raw])
    with pytest.raises(BadRequestError, match=f"first {MAX_PREAMBLE_BYTES} bytes"):
        feed_all([raw[i : i + 7] for i in range(0, len(raw), 7)])


def test_padding_of_the_first_delimiter_counts_as_preamble() -> None:
    reader = MultipartReader(B, max_part_bytes=10)
    assert reader.feed(DELIM + b" " * MAX_PREAMBLE_BYTES) == []  # still waiting for the CRLF
    with pytest.raises(BadRequestError, match=f"first {MAX_PREAMBLE_BYTES} bytes"):
        reader.feed(b" ")
    raw = body([({}, b"d")], padding=b" " * MAX_PREAMBLE_BYTES)
    assert feed_all([raw]) == [({}, b"d")]
    with pytest.raises(BadRequestError, match=f"first {MAX_PREAMBLE_BYTES} bytes"):
        feed_all([b"p\n" + raw])


def test_garbage_without_boundary_stops_at_the_preamble_limit() -> None:
    reader = MultipartReader(B, max_part_bytes=10)
    with pytest.raises(BadRequestError, match="no multipart boundary delimiter"):
        for _ in range(MAX_PREAMBLE_BYTES):
            reader.feed(b"garbage ")


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _events(raw: bytes, *, size: int = 7, max_request_bytes: int = BIG) -> list[Event]:
    stream = iter_parts(
        _chunks(raw, size), B, max_part_bytes=BIG, max_request_bytes=max_request_bytes
    )
    return [e async for e in stream]


async def test_iter_parts_request_limit_at_the_edge() -> None:
    raw = body(PARTS)
    assert collect(await _events(raw, max_request_bytes=len(raw))) == expected()
    with pytest.raises(PayloadTooLargeError, match=f"limit of {len(raw) - 1} bytes"):
        await _events(raw, max_request_bytes=len(raw) - 1)


async def test_iter_parts_streams_events_before_the_end() -> None:
    stream = iter_parts(
        _chunks(body([({}, b"x" * 1000)]), 100), B, max_part_bytes=BIG, max_request_bytes=BIG
    )
    first = [await anext(stream), await anext(stream)]  # from the first 100-byte chunk
    assert first[0] == PartBegin({})
    assert isinstance(first[1], PartData) and 0 < len(first[1].data) < 100
    assert collect([*first, *[e async for e in stream]]) == [({}, b"x" * 1000)]


async def test_iter_parts_closes_the_reader() -> None:
    raw = body(PARTS)
    with pytest.raises(BadRequestError, match="truncated"):
        await _events(raw[: len(raw) // 2])
    with pytest.raises(BadRequestError, match="no boundary delimiter"):
        await _events(b"")


# --- malformed bodies -------------------------------------------------------------------------

MALFORMED = {
    "empty": b"",
    "no boundary at all": b"garbage with no boundary at all\r\n",
    "wrong boundary": body(PARTS, boundary="other"),
    "truncated in data": DELIM + b"\r\nContent-Type: a\r\n\r\ntruncated",
    "truncated in headers": DELIM + b"\r\nContent-Type: a",
    "no closing delimiter": DELIM + b"\r\n\r\ndata\r\n" + DELIM,
    "header without colon": DELIM + b"\r\nnocolon\r\n\r\ndata\r\n" + DELIM + b"--",
    "header with space, no colon": DELIM + b"\r\nno colon here\r\n\r\nd\r\n" + DELIM + b"--",
    "empty header name": DELIM + b"\r\n: value\r\n\r\nd\r\n" + DELIM + b"--",
    "folded header": DELIM + b"\r\nA: b\r\n c\r\n\r\nd\r\n" + DELIM + b"--",
    "bare LF in header": DELIM + b"\r\nA: b\nEvil: c\r\n\r\nd\r\n" + DELIM + b"--",
    "CR without LF in header": DELIM + b"\r\nA: b\rc\r\n\r\nd\r\n" + DELIM + b"--",
    "delimiter then junk": DELIM + b"X\r\n\r\ndata\r\n" + DELIM + b"--",
    "delimiter then bare LF": DELIM + b"\n\r\ndata\r\n" + DELIM + b"--",
    "delimiter then one hyphen": DELIM + b"-x\r\n",
    "padding then junk": DELIM + b"  x\r\n\r\nd\r\n" + DELIM + b"--",
    "later delimiter padding then junk": body([({}, b"a")] * 2).replace(
        b"\r\n" + DELIM + b"\r\n", b"\r\n" + DELIM + b" x\r\n"
    ),
    "closing delimiter only": DELIM + b"--\r\n",
    "preamble then closing delimiter only": b"pre\r\n" + DELIM + b"--",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies(raw: bytes) -> None:
    with pytest.raises(BadRequestError):
        feed_all([raw])
    with pytest.raises(BadRequestError):
        feed_all(byte_by_byte(raw))


def test_truncated_anywhere() -> None:
    raw = body(PARTS, preamble=b"pre\r\n").removesuffix(b"\r\n")  # ends with "--boundary--"
    for i in range(len(raw)):
        with pytest.raises(BadRequestError):
            feed_all([raw[:i]])
    assert feed_all([raw]) == expected()


def test_python_multipart_does_not_log_the_clients_mistakes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BadRequestError, match="malformed multipart body"):
        feed_all([MALFORMED["delimiter then junk"]])
    assert caplog.records == []


def test_a_failed_reader_stays_failed() -> None:
    reader = MultipartReader(B, max_part_bytes=10)
    with pytest.raises(BadRequestError) as first:
        reader.feed(DELIM + b"X\r\n")
    with pytest.raises(BadRequestError) as again:
        reader.feed(b"\r\n" + DELIM + b"--\r\n")
    assert again.value is first.value
    with pytest.raises(BadRequestError):
        reader.close()


def _outcome(chunks: list[bytes]) -> tuple[str, Parts]:
    try:
        return "parsed", feed_all(chunks, max_part_bytes=1000, max_parts=3)
    except (BadRequestError, PayloadTooLargeError) as exc:
        return type(exc).__name__, []


def test_random_bytes_never_raise_anything_else_and_chunking_never_matters() -> None:
    rng = random.Random(20240611)
    valid = body(PARTS, preamble=b"pre\r\n")
    seen: dict[str, int] = {}
    for _ in range(200):
        if rng.random() < 0.3:
            raw = rng.randbytes(rng.randrange(300))
        else:  # a valid body with a few bytes changed, removed or repeated
            mutable = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(len(mutable))
                choice = rng.randrange(3)
                if choice == 0:
                    mutable[at] = rng.choice(b"\r\n-: \t" + bytes([rng.randrange(256)]))
                elif choice == 1:
                    del mutable[at : at + rng.randrange(1, 8)]
                else:
                    mutable[at:at] = mutable[at : at + rng.randrange(1, 8)]
            raw = bytes(mutable)
        cuts = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randrange(1, 5)))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        whole = _outcome([raw])
        assert _outcome(chunks) == whole, (raw, cuts)
        seen[whole[0]] = seen.get(whole[0], 0) + 1
    assert seen.get("parsed", 0) > 10 and seen.get("BadRequestError", 0) > 10, seen


# --- tolerated variations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "preamble",
    [b"", b"\r\n", b"\n", b"\r\n\r\n", b"This is a preamble.\r\n", b"bare LF preamble\n"],
)
def test_preamble_is_ignored(preamble: bytes) -> None:
    assert feed_all([body(PARTS, preamble=preamble)]) == expected()


@pytest.mark.parametrize(
    "epilogue", [b"", b"epilogue", b"\r\n--" + B.encode() + b"\r\nX: y\r\n\r\nnot a part\r\n"]
)
def test_epilogue_is_ignored(epilogue: bytes) -> None:
    reader = MultipartReader(B, max_part_bytes=BIG)
    events = reader.feed(body(PARTS))
    assert reader.finished
    events += reader.feed(epilogue)
    reader.close()
    assert collect(events) == expected()


def test_finished_only_after_the_closing_delimiter() -> None:
    raw = body(PARTS)
    reader = MultipartReader(B, max_part_bytes=BIG)
    reader.feed(raw[:-3])
    assert not reader.finished
    reader.feed(raw[-3:])
    assert reader.finished


def test_transport_padding_after_every_delimiter() -> None:
    """RFC 2046 5.1.1 transport padding (python-multipart alone refuses it on the first one)."""
    raw = body(PARTS, padding=b" \t ", preamble=b"pre\r\n")
    for i in range(len(raw) + 1):
        assert feed_all([raw[:i], raw[i:]]) == expected(), f"split at {i}"
    assert feed_all(byte_by_byte(raw)) == expected()


def test_headers_names_lowercased_values_stripped_and_kept_in_case() -> None:
    raw = (
        DELIM + b"\r\n"
        b"Content-Type:application/DICOM; Transfer-Syntax=1.2.840.10008.1.2.1 \r\n"
        b"CONTENT-LOCATION: \t /Studies/ABC\t\r\n"
        b"X-Dup: first\r\nx-dup: last\r\n"
        b"X-Empty:\r\n"
        b"\r\npayload\r\n" + DELIM + b"--"
    )
    assert feed_all([raw]) == [
        (
            {
                "content-type": "application/DICOM; Transfer-Syntax=1.2.840.10008.1.2.1",
                "content-location": "/Studies/ABC",
                "x-dup": "last",
                "x-empty": "",
            },
            b"payload",
        )
    ]


def test_parts_without_headers() -> None:
    assert feed_all([body([({}, b"one"), ({}, b"")])]) == [({}, b"one"), ({}, b"")]


def test_body_with_crlf_and_hyphens_at_the_edges() -> None:
    tricky: Parts = [({}, b"\r\n"), ({}, b"--"), ({}, b"\r\n--\r\n"), ({}, b"-")]
    raw = body(tricky)
    for i in range(len(raw) + 1):
        assert feed_all([raw[:i], raw[i:]]) == tricky, f"split at {i}"


def test_orthanc_stow_client_body() -> None:
    """Orthanc's DICOMweb plugin: a 73-character boundary, no CRLF after the closing delimiter."""
    uuid = "fd095149-8a9b-441d-a1b4-adc664789ba3"
    boundary = f"{uuid}-{uuid}"
    raw = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: 3\r\n\r\n"
        f"abc\r\n--{boundary}--"
    ).encode()
    headers = {"content-type": "application/dicom", "content-length": "3"}
    assert feed_all(byte_by_byte(raw), boundary=boundary) == [(headers, b"abc")]


# --- boundaries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "boundary",
    [
        "x",
        B,
        "with space inside",
        "=_Part_0_1234567.1700000000000",
        "b" * 70,
        "c" * MAX_BOUNDARY_CHARS,
        new_boundary(),
    ],
)
def test_good_boundaries(boundary: str) -> None:
    raw = body(PARTS, boundary=boundary, preamble=b"p\r\n")
    assert feed_all([raw], boundary=boundary) == expected()


@pytest.mark.parametrize(
    "boundary", ["", "x" * (MAX_BOUNDARY_CHARS + 1), "naïve", "line\r\nbreak", "tab\there"]
)
def test_bad_boundaries(boundary: str) -> None:
    with pytest.raises(BadRequestError, match="boundary"):
        MultipartReader(boundary, max_part_bytes=10)


# --- the writer -------------------------------------------------------------------------------


async def _body(*chunks: bytes) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


async def _parts(
    parts: list[tuple[dict[str, str], tuple[bytes, ...]]],
) -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes]]]:
    for headers, chunks in parts:
        yield headers, _body(*chunks)


async def test_encode_parts_exact_bytes() -> None:
    parts = [({"Content-Type": "application/dicom"}, (b"ab", b"", b"c")), ({}, ())]
    out = [c async for c in encode_parts(_parts(parts), "BND")]
    assert out == [  # small pieces joined: one message per part, then the closing delimiter
        b"--BND\r\nContent-Type: application/dicom\r\n\r\nabc\r\n",
        b"--BND\r\n\r\n\r\n",
        b"--BND--\r\n",
    ]


async def test_encode_parts_joins_small_pieces_up_to_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small chunks are joined until COALESCE_BYTES, then sent: memory stays bounded; a chunk
    of at least that size goes as it is, after what was pending."""
    from dicomweb_server import multipart

    monkeypatch.setattr(multipart, "COALESCE_BYTES", 4000)
    small = [bytes([i]) * 1000 for i in range(10)]
    big = b"B" * 4000
    parts: list[tuple[dict[str, str], tuple[bytes, ...]]] = [({}, (*small, big, b"tail"))]
    out = [c async for c in encode_parts(_parts(parts), "BND")]
    assert b"".join(out) == b"--BND\r\n\r\n" + b"".join(small) + big + b"tail\r\n--BND--\r\n"
    assert [len(c) for c in out] == [4009, 4000, 2000, 4000, 6, 9]
    assert any(c is big for c in out)


@pytest.mark.parametrize("boundary", ["BND", "x" * 70])
async def test_encoded_length_is_what_encode_parts_sends(boundary: str) -> None:
    parts = [
        ({"Content-Type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}, (b"ab", b"c")),
        ({}, ()),
        ({"Content-Type": "a/b", "Content-Range": "bytes 0-9/10"}, (b"0123456789",)),
    ]
    sent = b"".join([c async for c in encode_parts(_parts(parts), boundary)])
    lengths = [(h, sum(len(c) for c in chunks)) for h, chunks in parts]
    assert encoded_length(lengths, boundary) == len(sent)
    assert encoded_length([], boundary) == len(f"--{boundary}--\r\n")


async def test_encode_parts_passes_chunks_through_without_joining() -> None:
    big = [bytes([i]) * 65536 for i in range(8)]
    out = [c async for c in encode_parts(_parts([({}, tuple(big))]), "BND")]
    assert all(any(o is c for o in out) for c in big)


async def test_encode_parts_round_trip() -> None:
    boundary = new_boundary()
    assert boundary != new_boundary() and len(boundary) == 32
    tricky = b"one --" + boundary.encode() + b"-- not at line start\r\n-" + boundary.encode()
    parts = [
        (
            {"Content-Type": "application/dicom", "Content-Location": "/a/B"},
            (tricky[:5], tricky[5:]),
        ),
        ({}, ()),
        ({"Content-Type": "application/octet-stream"}, (bytes(range(256)),)),
    ]
    raw = b"".join([c async for c in encode_parts(_parts(parts), boundary)])
    assert feed_all([raw], boundary=boundary) == [
        ({"content-type": "application/dicom", "content-location": "/a/B"}, tricky),
        ({}, b""),
        ({"content-type": "application/octet-stream"}, bytes(range(256))),
    ]


@pytest.mark.parametrize(
    "headers", [{"X": "a\r\nEvil: b"}, {"X\n": "a"}, {"": "a"}, {"X:Y": "a"}, {"X": "a\rb"}]
)
async def test_encode_parts_refuses_header_injection(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="invalid part header"):
        async for _ in encode_parts(_parts([(headers, (b"x",))]), "BND"):
            pass


async def test_an_error_found_in_a_chunk_is_raised_before_the_next_is_read() -> None:
    """The events before an error come first, then the error itself, not a later one (a
    413 for the request's size used to replace the 400 of a malformed header)."""
    first = b"--B\r\nContent-Type: a/b\r\n\r\nxx\r\n--B\r\nBadHeader\n\r\n"
    read: list[int] = []

    async def stream() -> AsyncIterator[bytes]:
        for chunk in (first, b"y" * 1000):
            read.append(len(chunk))
            yield chunk

    events = []
    with pytest.raises(BadRequestError, match="malformed"):
        async for event in iter_parts(stream(), "B", max_part_bytes=100, max_request_bytes=200):
            events.append(event)
    assert [type(e) for e in events] == [PartBegin, PartData, PartEnd]
    assert read == [len(first)]  # the next chunk was not read
