"""Sans-I/O multipart/related reader and an async writer (RFC 2046 5.1, PS3.18 8.6.1.2).

`MultipartReader.feed()` is synchronous and does no I/O: it drives python-multipart's streaming
`MultipartParser` (STYLE.md rule 6) and turns its callbacks into events; chunks may split anything.
Only the preamble and the first delimiter line are read here (python-multipart wants the body to
begin with the delimiter); the rest, epilogue included, is python-multipart's job.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser

from dicomweb_server.errors import BadRequestError, DicomWebError, PayloadTooLargeError

_T = TypeVar("_T")

__all__ = [
    "COALESCE_BYTES",
    "MAX_BOUNDARY_CHARS",
    "MAX_PARTS",
    "MAX_PART_HEADER_BYTES",
    "MAX_PREAMBLE_BYTES",
    "Event",
    "MultipartReader",
    "PartBegin",
    "PartData",
    "PartEnd",
    "Prefixed",
    "close_all",
    "close_delimiter",
    "encode_body",
    "encode_parts",
    "encode_run",
    "encoded_length",
    "iter_parts",
    "new_boundary",
    "one_part_frame",
    "stable_boundary",
]

# Bytes of the header names and values of one part (the ':', the spaces after it and the line
# ends are not counted; python-multipart bounds those per line).
MAX_PART_HEADER_BYTES = 16 * 1024
# Parts in one request.
MAX_PARTS = 10_000
# Bytes before the first delimiter, plus any transport padding after it (RFC 2046 5.1.1).
MAX_PREAMBLE_BYTES = 64 * 1024
# RFC 2046 5.1.1 caps a boundary at 70 characters, but the Orthanc DICOMweb plugin's STOW-RS
# client sends 73 (a UUID, '-', the same UUID): accept up to python-multipart's own cap.
MAX_BOUNDARY_CHARS = 256
# Response pieces shorter than this are joined into one message (see encode_parts).
COALESCE_BYTES = 64 * 1024

# python-multipart logs a warning for each malformed body before it raises; the client gets the
# reason in a 400 instead, so each parser gets a logger that drops them (no global logging setup).
_QUIET = logging.Logger("dicomweb_server.multipart.engine", logging.CRITICAL + 1)


@dataclass(frozen=True)
class PartBegin:
    headers: dict[str, str]  # names lower-cased, values stripped; a repeated name: last wins


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartBegin | PartData | PartEnd


def _check_boundary(boundary: str) -> bytes:
    if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
        raise BadRequestError(
            f"multipart boundary must be 1 to {MAX_BOUNDARY_CHARS} characters: {boundary[:80]!r}"
        )
    if not (boundary.isascii() and boundary.isprintable()):
        raise BadRequestError(f"multipart boundary must be printable ASCII: {boundary[:80]!r}")
    return boundary.encode("ascii")


class MultipartReader:
    """Feed bytes, get events, `close()` at the end; after an error every call raises it again."""

    def __init__(self, boundary: str, *, max_part_bytes: int, max_parts: int = MAX_PARTS) -> None:
        raw = _check_boundary(boundary)
        self._delimiter = b"--" + raw
        self._max_part_bytes = max_part_bytes
        self._max_parts = max_parts
        self._head = b""  # undecided bytes before the first delimiter line is complete
        self._skipped = 0  # preamble bytes already dropped
        self._started = self._finished = False
        self._error: DicomWebError | None = None
        self._events: list[Event] = []
        self._parts = self._part_bytes = self._header_bytes = 0
        self._field = self._value = b""
        self._headers: dict[str, str] = {}
        self._parser = MultipartParser(
            raw,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            # python-multipart's per-part defaults (8 headers, 4 KiB a line) are for HTML forms;
            # set them so that our block limit is the one that binds (each line costs >= 1 byte).
            max_header_count=MAX_PART_HEADER_BYTES,
            max_header_size=2 * MAX_PART_HEADER_BYTES,
        )
        self._parser.logger = _QUIET

    @property
    def finished(self) -> bool:
        """True once the closing delimiter `--boundary--` has been read."""
        return self._finished

    def feed(self, data: bytes) -> list[Event]:
        if self._error is not None:
            raise self._error
        if self._finished or not data:
            return []  # RFC 2046 5.1.1: the epilogue is ignored
        try:
            if not self._started:
                data = self._skip_preamble(data)
            if data:
                self._parser.write(data)
        except FormParserError as exc:
            self._error = BadRequestError(f"malformed multipart body: {exc}")
            self._error.__cause__ = exc
        except DicomWebError as exc:  # raised by our callbacks, through python-multipart
            self._error = exc
        # The events before an error are given first (a part that ended before the one too
        # large is stored, and reported); the error comes with the next feed or close.
        events, self._events = self._events, []
        if self._error is not None and not events:
            raise self._error
        return events

    def check(self) -> None:
        """Raise the error the input fed so far holds, if any (feed gives the events before
        it first)."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """End of input: the closing delimiter must have been seen, after at least one part."""
        if self._error is not None:
            raise self._error
        if not self._started:
            raise BadRequestError(
                "multipart body has no boundary delimiter (empty or wrong boundary?)"
            )
        if not self._finished:
            raise BadRequestError("multipart body is truncated: the closing delimiter is missing")
        if self._parts == 0:
            raise BadRequestError("multipart body has no parts")

    def _skip_preamble(self, data: bytes) -> bytes:
        """Bytes for python-multipart, from the first delimiter on, or b"" while undecided.

        RFC 2046 5.1.1: a preamble may come first, and the first delimiter then starts a line
        (after CRLF, or a bare LF); the body may also begin with it. Only the tail that could
        still begin "\\n--boundary" is kept, so a preamble fed byte by byte costs O(n).
        """
        buf = self._head + data
        at = self._find_delimiter(buf)
        if at < 0:
            cut = max(0, len(buf) - len(self._delimiter))
            return self._hold(buf[cut:], self._skipped + cut, used=self._skipped + cut)
        rest = buf[at + len(self._delimiter) :]
        padding = len(rest) - len(rest.lstrip(b" \t"))
        if rest[padding:] in (b"", b"\r"):  # cannot tell yet: the line end is still to come
            keep = max(at - 1, 0)  # keep the LF before the delimiter, to find it again
            used = self._skipped + at + padding
            return self._hold(buf[keep:], self._skipped + keep, used=used)
        self._hold(b"", 0, used=self._skipped + at + padding)
        self._started = True
        # RFC 2046 5.1.1 allows transport padding after any delimiter; python-multipart allows
        # it after later delimiters only, so the first delimiter line is rewritten without it.
        if padding and rest[padding : padding + 2] == b"\r\n":
            return self._delimiter + rest[padding:]
        return buf[at:]  # python-multipart rejects anything but CRLF or "--" here

    def _find_delimiter(self, buf: bytes) -> int:
        if self._skipped == 0 and buf.startswith(self._delimiter):
            return 0
        at = buf.find(b"\n" + self._delimiter)
        return at + 1 if at >= 0 else -1

    def _hold(self, keep: bytes, skipped: int, *, used: int) -> bytes:
        """Keep `keep` for the next feed; `used` bytes of preamble and padding are known so far."""
        if used > MAX_PREAMBLE_BYTES:
            raise BadRequestError(
                f"no multipart boundary delimiter in the first {MAX_PREAMBLE_BYTES} bytes"
                " (wrong boundary?)"
            )
        self._head, self._skipped = keep, skipped
        return b""

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise PayloadTooLargeError(f"more than the limit of {self._max_parts} parts")
        self._part_bytes = self._header_bytes = 0
        self._headers = {}

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequestError(
                f"part headers are larger than the limit of {MAX_PART_HEADER_BYTES} bytes"
            )

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        # python-multipart ends a value at CR only; a bare LF would smuggle in another header.
        if b"\n" in self._value:
            raise BadRequestError("a part header line ends with a bare LF, not CRLF")
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _on_headers_finished(self) -> None:
        self._events.append(PartBegin(self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        if self._part_bytes > self._max_part_bytes:
            raise PayloadTooLargeError(
                f"a part is larger than the limit of {self._max_part_bytes} bytes"
            )
        self._events.append(PartData(data[start:end]))  # python-multipart skips empty spans

    def _on_part_end(self) -> None:
        self._events.append(PartEnd())

    def _on_end(self) -> None:
        self._finished = True


async def iter_parts(
    stream: AsyncIterator[bytes],
    boundary: str,
    *,
    max_part_bytes: int,
    max_request_bytes: int,
    max_parts: int = MAX_PARTS,
) -> AsyncIterator[Event]:
    """Events of a multipart body read from `stream`; its only awaits are on `stream`."""
    reader = MultipartReader(boundary, max_part_bytes=max_part_bytes, max_parts=max_parts)
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > max_request_bytes:
            raise PayloadTooLargeError(
                f"request body is larger than the limit of {max_request_bytes} bytes"
            )
        for event in reader.feed(chunk):
            yield event
        reader.check()  # an error found in this chunk, before reading the next
    reader.close()


def new_boundary() -> str:
    """A fresh random boundary for each response: 32 hex digits, a valid RFC 2046 token."""
    return secrets.token_hex(16)


async def encode_parts(
    parts: AsyncIterable[tuple[dict[str, str], AsyncIterable[bytes]]], boundary: str
) -> AsyncIterator[bytes]:
    """A multipart/related body (RFC 2046 5.1.1, PS3.18 8.6.1.2), streamed chunk by chunk.

    Each part: `--boundary` CRLF, its header lines, CRLF, the body, CRLF; then `--boundary--`
    CRLF. Pieces under COALESCE_BYTES (delimiters, header blocks, small bodies) are joined
    into one message, sent at the latest when the part ends: each message costs a pass
    through the ASGI stack and a socket write, four for a small instance before. Larger
    chunks are passed through as they come, never copied.
    """
    delimiter = f"--{boundary}\r\n".encode("ascii")
    pending: list[bytes] = []
    size = 0
    body: AsyncIterable[bytes] | None = None
    try:
        async for headers, body in parts:
            pending.append(delimiter + _header_block(headers))
            async for chunk in body:
                if len(chunk) >= COALESCE_BYTES:
                    if pending:
                        yield b"".join(pending)
                        pending, size = [], 0
                    yield chunk
                    del chunk  # sent: not held while the next one is read
                elif chunk:
                    pending.append(chunk)
                    size += len(chunk)
                    if size >= COALESCE_BYTES:
                        yield b"".join(pending)
                        pending, size = [], 0
            pending.append(b"\r\n")
            yield b"".join(pending)  # this part's bytes go now: the next may take a while
            pending, size = [], 0
        yield f"--{boundary}--\r\n".encode("ascii")
    finally:
        # Closed early (a client gone, a HEAD): what is open (a blob read, a scratch file)
        # closes now, not when the garbage collector finds it.
        await close_all(body, parts)


class Prefixed(Generic[_T]):
    """`rest` with `made` (items already taken from it) before it; closing this closes
    `rest`. A response's first piece is made before the response starts, so that its
    failure is an error status; the rest follows as it comes.
    `owned`: what `rest` reads from, closed with it: an async generator closed before it
    starts runs none of its code, its `finally` neither, and so closes nothing it was given
    (a HEAD closes its body unread: routes.responses.StreamedResponse)."""

    def __init__(self, made: list[_T], rest: AsyncIterator[_T], *owned: object) -> None:
        self._made, self._rest, self._owned = made, rest, owned

    def __aiter__(self) -> Prefixed[_T]:
        return self

    async def __anext__(self) -> _T:
        if self._made:
            return self._made.pop(0)
        return await anext(self._rest)

    async def aclose(self) -> None:
        await close_all(self._rest, *self._owned)


async def close_all(*sources: object) -> None:
    """Close each async iterator given (those that have aclose), every one even when one
    fails; the first failure is raised after."""
    failure: BaseException | None = None
    for source in sources:
        close = getattr(source, "aclose", None)
        if close is None:
            continue
        try:
            await close()
        except BaseException as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def encode_body(parts: Iterable[tuple[dict[str, str], bytes]], boundary: str) -> bytes:
    """What `encode_parts` sends for parts already in memory, as one body."""
    return encode_run(parts, boundary) + close_delimiter(boundary)


def encode_run(parts: Iterable[tuple[dict[str, str], bytes]], boundary: str) -> bytes:
    """Parts in memory as `encode_parts` sends them, without the close delimiter: a body
    sent a run of parts at a time, then close_delimiter."""
    delimiter = f"--{boundary}\r\n".encode("ascii")
    return b"".join(delimiter + _header_block(h) + body + b"\r\n" for h, body in parts)


def close_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def stable_boundary(*keys: str) -> str:
    """A boundary that is the same for the same keys (32 hex digits of their SHA-256): a body
    that must be byte-identical from one request to the next, so that byte ranges of it taken
    in several requests join up (RFC 9110 14)."""
    digest = hashlib.sha256("\x00".join(keys).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def one_part_frame(headers: dict[str, str], boundary: str) -> tuple[bytes, bytes]:
    """(what comes before, what comes after) the body of a one-part multipart/related body, as
    `encode_parts` writes it."""
    return f"--{boundary}\r\n".encode("ascii") + _header_block(headers), (
        f"\r\n--{boundary}--\r\n".encode("ascii")
    )


def encoded_length(parts: Iterable[tuple[dict[str, str], int]], boundary: str) -> int:
    """Length of what `encode_parts` sends for parts of these headers and body lengths: the
    Content-Length of a response whose bodies are known before it starts."""
    delimiter = len(f"--{boundary}\r\n")
    body = sum(delimiter + len(_header_block(headers)) + n + 2 for headers, n in parts)
    return body + len(f"--{boundary}--\r\n")


def _header_block(headers: dict[str, str]) -> bytes:
    """Header lines and the blank line after them; a line break in a header is our own bug."""
    lines = []
    for name, value in headers.items():
        if not name or any(c in name + value for c in "\r\n") or ":" in name:
            raise ValueError(f"invalid part header {name!r}: {value!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1") + b"\r\n"
