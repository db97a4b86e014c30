"""Sans-I/O multipart/related reader and an async writer (RFC 2046 5.1, PS3.18 8.6.1.2).

`MultipartReader.feed()` is synchronous and does no I/O; it drives python-multipart's streaming
`MultipartParser` (STYLE.md rule 6) and turns its callbacks into events. Chunk boundaries may fall
anywhere. A preamble before the first delimiter is skipped here, because python-multipart expects
the body to start with it (RFC 2046 5.1.1 allows a preamble); the epilogue is ignored by
python-multipart itself.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser

from dicomweb_server.errors import BadRequestError, PayloadTooLargeError

__all__ = [
    "MAX_BOUNDARY_CHARS",
    "MAX_PARTS",
    "MAX_PART_HEADER_BYTES",
    "MAX_PREAMBLE_BYTES",
    "Event",
    "MultipartReader",
    "PartBegin",
    "PartData",
    "PartEnd",
    "encode_parts",
    "iter_parts",
    "new_boundary",
]

# Total bytes of one part's header block.
MAX_PART_HEADER_BYTES = 16 * 1024
# Parts in one request.
MAX_PARTS = 10_000
# Bytes tolerated before the first delimiter.
MAX_PREAMBLE_BYTES = 64 * 1024
# RFC 2046 5.1.1 says a boundary is 1 to 70 characters, but Orthanc 1.10's STOW-RS client
# sends 73 (two UUIDs joined by '-'): accept up to python-multipart's own limit.
MAX_BOUNDARY_CHARS = 256

# python-multipart logs every parse error as a warning; we report them to the client instead.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


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


class MultipartReader:
    """Feed bytes, get events; `close()` at the end of input checks the body was complete."""

    def __init__(self, boundary: str, *, max_part_bytes: int, max_parts: int = MAX_PARTS) -> None:
        if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
            raise BadRequestError(
                f"multipart boundary must be 1 to {MAX_BOUNDARY_CHARS} characters:"
                f" {boundary[:80]!r}"
            )
        try:
            self._boundary = boundary.encode("ascii")
        except UnicodeEncodeError:
            raise BadRequestError(f"multipart boundary is not ASCII: {boundary!r}") from None
        self._delimiter = b"--" + self._boundary
        self._max_part_bytes = max_part_bytes
        self._max_parts = max_parts
        self._preamble = b""
        self._started = False
        self._finished = False
        self._events: list[Event] = []
        self._parts = 0
        self._part_bytes = 0
        self._header_bytes = 0
        self._field = b""
        self._value = b""
        self._headers: dict[str, str] = {}
        self._parser = MultipartParser(
            self._boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_end": self._on_end,
            },
            max_header_size=MAX_PART_HEADER_BYTES,
        )

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, data: bytes) -> list[Event]:
        if self._finished or not data:
            return []
        if not self._started:
            data = self._skip_preamble(data)
            if not data:
                return []
        try:
            self._parser.write(data)
        except (BadRequestError, PayloadTooLargeError):
            raise
        except Exception as exc:  # python-multipart's errors are the client's malformed body
            raise BadRequestError(f"malformed multipart body: {exc}") from None
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        if not self._finished:
            if not self._started:
                raise BadRequestError("multipart body has no boundary delimiter (empty body?)")
            raise BadRequestError("multipart body is truncated: the closing delimiter is missing")

    def _skip_preamble(self, data: bytes) -> bytes:
        """Drop bytes before the first delimiter (at the start of the body or of a line)."""
        buf = self._preamble + data
        at = 0 if buf.startswith(self._delimiter) else -1
        if at < 0:
            found = buf.find(b"\n" + self._delimiter)
            at = found + 1 if found >= 0 else -1
        if at < 0:
            if len(buf) > MAX_PREAMBLE_BYTES:
                raise BadRequestError(
                    f"no multipart boundary delimiter in the first {MAX_PREAMBLE_BYTES} bytes"
                )
            self._preamble = buf
            return b""
        self._started = True
        self._preamble = b""
        return buf[at:]

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise PayloadTooLargeError(f"more than {self._max_parts} parts in one request")
        self._part_bytes = 0
        self._header_bytes = 0
        self._headers = {}

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequestError(f"part headers longer than {MAX_PART_HEADER_BYTES} bytes")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        if not name:
            raise BadRequestError("a part header line has no name")
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
        if end > start:
            self._events.append(PartData(data[start:end]))

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
    reader.close()


def new_boundary() -> str:
    """A fresh random boundary for each response (field notes 4)."""
    return secrets.token_hex(16)


async def encode_parts(
    parts: AsyncIterable[tuple[dict[str, str], AsyncIterable[bytes]]], boundary: str
) -> AsyncIterator[bytes]:
    """A multipart/related body, streamed part by part (RFC 2046 5.1.1)."""
    delimiter = f"--{boundary}\r\n".encode("ascii")
    async for headers, body in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        yield delimiter + head.encode("latin-1") + b"\r\n"
        async for chunk in body:
            if chunk:
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")
