"""How much memory the ingest parse of a Part-10 data set takes, measured before pydicom reads
it, and the admission of large ones (dicomfile.parse_file: STOW-RS, DIMSE C-STORE, `load`,
`reindex`).

Pixel Data is never read at ingest, and a top-level binary value longer than the bulk data
threshold is left on disk (read by range: an Encapsulated Document, a private OB). The rest,
the "header", pydicom reads and converts and its DICOM JSON is built: sequences whole with
every value of their items, text of any length. That costs far more than its bytes: about a
kilobyte per element or item (pydicom's objects, then the JSON), tens of bytes per value of a
multi-valued element. 30 MB of small sequence items took 880 MB and 19 s to parse; 300 MB would
have taken some 9 GB, within MAX_PART_BYTES. So the header is walked first from its element
headers, values skipped by seeking, nothing kept (measure), and refused past MAX_HEADER_BYTES
or an estimated MAX_HEADER_MEMORY_BYTES (check); the parses under way in a process then hold
at most HEADER_PARSES_MEMORY_BYTES between them, estimated alike, those of usual headers
(HEADER_PARSE_UNCOUNTED_BYTES) left out (parsing).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.datadict import dictionary_VR

from dicomweb_server.dicom_json import BULK_DATA_THRESHOLD_BYTES, BULK_VRS
from dicomweb_server.errors import FailureReason
from dicomweb_server.media.mediatypes import EXPLICIT_VR_BIG_ENDIAN
from dicomweb_server.media.part10 import LONG_LENGTH_VRS
from dicomweb_server.reservations import Reservations
from dicomweb_server.wellformed import MAX_SEQUENCE_DEPTH, InvalidInstanceError, too_deep

__all__ = [
    "HEADER_PARSES_MEMORY_BYTES",
    "HEADER_PARSE_UNCOUNTED_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_MEMORY_BYTES",
    "HeaderSize",
    "check",
    "element_end",
    "measure",
    "measured",
    "parsing",
]

# Bytes of a data set an ingest parse holds, at most: all but Pixel Data and the top-level
# binary values past BULK_DATA_THRESHOLD_BYTES (left on disk). Real headers reach tens of MB:
# RT Structure Sets of fine contours, the Per-frame Functional Groups of large multi-frame and
# whole-slide images, long SRs. The size of MAX_INFLATED_BYTES (a Deflated data set, parsed
# whole) and of MAX_JSON_BULK_VALUE_BYTES. More: that instance fails with 0xA700, nothing
# stored: PS3.4 Table B.2-1 "Refused: Out of Resources", to which PS3.18 10.5.3 refers. The
# data set is understood; the archive will not spend the memory it takes (0xC000, "cannot
# understand", would tell the sender it is malformed).
MAX_HEADER_BYTES = 64 * 1024 * 1024
# The memory one parse is estimated to take (HeaderSize.estimate), at most: a header of small
# elements passes it long before MAX_HEADER_BYTES (64 MiB of them would take some 8 GB). About
# a million elements and items: a whole-slide level of 50,000 tiles with Per-frame Functional
# Groups (TILED_SPARSE) has some 750,000, an enhanced CT of 5,000 frames some 200,000; an RT
# Structure Set of 50 MB of Contour Data (DS), some 7 million values, is estimated at 650 MB.
# More: 0xA700.
MAX_HEADER_MEMORY_BYTES = 1024 * 1024 * 1024
# The memory the ingest parses under way in a process may take between them, estimated: a
# parse waits, first come first served, until its estimate fits; one estimated larger runs
# alone. Usual headers (kilobytes to a few MB) never wait for each other; large ones take
# turns, so that STOW requests and C-STOREs of them at once cannot sum to gigabytes.
HEADER_PARSES_MEMORY_BYTES = 256 * 1024 * 1024
# A parse estimated at most this neither waits nor counts against HEADER_PARSES_MEMORY_BYTES:
# usual headers, and every data set too small to be walked (_UNWALKED_MAX_BYTES: 11 MB at its
# worst). They waited behind a large parse under way (one estimated larger than the budget runs
# alone), each in the worker thread it parses in (Services.limiter: a CPU's worth of them,
# shared with transcodes and renders): a 512 x 512 CT took 2.2 s, not 0.02, and a render
# waited as long for a thread. At most one a worker thread: the ingest parses within that
# limiter, so these add that many times this at most.
HEADER_PARSE_UNCOUNTED_BYTES = 16 * 1024 * 1024
# The estimate, from measurements of parse_file's peak (tracemalloc) on headers of one shape
# each; it errs high. Bytes held per element or item (pydicom's Dataset, RawDataElement and
# converted element, then the JSON object: 800 to 900 measured) ...
_ELEMENT_COST = 1024
# ... per value of a number or multi-valued string element (pydicom's and the JSON's list
# entries, a float each: about 60) ...
_VALUE_COST = 64
# ... and per byte held (the bytes as read, converted, in the JSON: 2 to 4).
_BYTE_COST = 4

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Bytes per value of the VRs whose values are binary numbers (converted to a list of them).
_NUMBER_SIZES = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
# VRs whose values are separated by backslashes (PS3.5 6.4; LT, ST, UT and UR have one).
_MULTI_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"]
)
# Containers open at once, at most: a sequence and its item per level. Deeper, the parse
# refuses the data set anyway (wellformed.check_depth, or pydicom's recursion), and so does
# the walk (0xC000), before pydicom holds what is nested there. It counted the rest of the
# file as held, as small elements, Pixel Data included: 0xA700 (a limit passed) for 32 MB
# of it, not too deep.
_MAX_OPEN = 2 * (MAX_SEQUENCE_DEPTH + 8)
_SMALLEST_ELEMENT_BYTES = 8
_UNWALKED_MAX_BYTES = 64 * 1024
_WINDOW_BYTES = 64 * 1024


@dataclass(frozen=True)
class HeaderSize:
    """What an ingest parse of a data set holds: bytes, elements (items included), values."""

    held_bytes: int
    elements: int
    values: int = 0
    # False: the walk stopped once past a limit (measure), these are its counts so far: a
    # 4 GB part of small items would have been walked for a quarter of an hour.
    whole: bool = True

    @property
    def estimate(self) -> int:
        """Memory the parse is expected to hold at its peak, bytes."""
        return (
            _BYTE_COST * self.held_bytes + _ELEMENT_COST * self.elements + _VALUE_COST * self.values
        )


def check(size: HeaderSize) -> None:
    """Refuse (0xA700, a limit the sender passed) a header past MAX_HEADER_BYTES or
    MAX_HEADER_MEMORY_BYTES, before it is parsed. The reason begins with what a DIMSE Error
    Comment keeps (64 characters)."""
    least = "" if size.whole else "at least "
    if size.held_bytes > MAX_HEADER_BYTES:
        message = (
            f"header of {least}{size.held_bytes} bytes past MAX_HEADER_BYTES"
            f" ({MAX_HEADER_BYTES}): the data set but Pixel Data and bulk data, more than this"
            " archive parses"
        )
    elif size.estimate > MAX_HEADER_MEMORY_BYTES:
        message = (
            f"header of {least}{size.elements} elements and items, {size.values} values past"
            f" MAX_HEADER_MEMORY_BYTES ({MAX_HEADER_MEMORY_BYTES}): parsed, they would take"
            f" about {size.estimate} bytes of memory, more than this archive spends on one"
        )
    else:
        return
    raise InvalidInstanceError(FailureReason.OUT_OF_RESOURCES, message, over_limit=True)


# Held only while a parse runs (in its worker thread), never across an await: a STOW part
# waits for the earlier parts' parses before it commits (commit_order.CommitOrder), so a part
# holding it there could wait on one waiting for it.
_BUDGET = Reservations(HEADER_PARSES_MEMORY_BYTES)


@contextmanager
def parsing(size: HeaderSize) -> Iterator[None]:
    """Hold the memory a parse of a header of `size` is estimated to take while it parses,
    waiting for it in the calling (worker) thread; nothing for a usual one."""
    if size.estimate <= HEADER_PARSE_UNCOUNTED_BYTES:
        yield
        return
    with _BUDGET.reserve(min(size.estimate, _BUDGET.limit)):
        yield


def measured(fp: BinaryIO, start: int, transfer_syntax_uid: str) -> HeaderSize:
    """measure, but for a data set of at most _UNWALKED_MAX_BYTES: taken at its worst (an
    element every 8 bytes, a value every 2: some 10 MB to parse), not walked. Most instances
    are larger (their Pixel Data), but a walk costs a tenth of a usual header's parse."""
    size = fp.seek(0, 2) - start
    if size <= _UNWALKED_MAX_BYTES:
        return HeaderSize(size, size // _SMALLEST_ELEMENT_BYTES, size // 2)
    return measure(fp, start, transfer_syntax_uid)


def measure(fp: BinaryIO, start: int, transfer_syntax_uid: str) -> HeaderSize:
    """The header of the data set at `start` of `fp` (a Part-10 file, or an inflated data set):
    its elements walked as pydicom reads them (explicit or implicit VR, a sequence's items in
    implicit VR within an explicit one, an UN of a sequence, items and sequences of defined
    or undefined length, elements after Pixel Data), values skipped by seeking but those of
    multi-valued strings (their backslashes counted). The walk stops as soon as its counts
    pass a limit (check refuses them then); sequences nested deeper than the parse takes are
    refused here (0xC000, wellformed.too_deep)."""
    return _Walk(fp, transfer_syntax_uid).run(start)


def element_end(fp: BinaryIO, pos: int, transfer_syntax_uid: str, implicit: bool) -> int | None:
    """Where the top-level element at `pos` of `fp` ends (`implicit`: its VR encoding, as
    pydicom found the data set's), walked as measure walks, nothing kept: a sequence of
    undefined length without parsing its items (pydicom does, even to skip it). None when the
    data set ends first or the walk passes a limit of measure's."""
    return _Walk(fp, transfer_syntax_uid).end_of(pos, implicit)


@dataclass
class _Open:
    """A container being walked: a sequence's items, an item's elements, or the fragments
    of encapsulated Pixel Data (skipped, not held)."""

    kind: str  # "items", "elements" or "fragments"
    end: int | None  # None: undefined length, ended by a delimiter
    implicit: bool  # implicit VR: of the elements (an item), of the items (a sequence)
    # Where its values must end: the end of the file, or of the innermost sequence of defined
    # length it is in (pydicom reads such a sequence from its value's bytes).
    bound: int


class _Walk:
    """One walk: counts, the containers open, and a window of the file read ahead."""

    def __init__(self, fp: BinaryIO, ts: str) -> None:
        order = ">" if ts == EXPLICIT_VR_BIG_ENDIAN else "<"
        self.fp = fp
        self._head = struct.Struct(f"{order}HHI").unpack_from
        self._u16 = struct.Struct(f"{order}H").unpack_from
        self._u32 = struct.Struct(f"{order}I").unpack_from
        self._item = struct.pack(f"{order}HH", *_ITEM)
        self._delimiter = struct.pack(f"{order}HH", *_SEQUENCE_END)
        self.held = self.elements = self.values = 0
        self.open: list[_Open] = []
        self._start, self.window = 0, b""
        self._top_tag: int | None = None  # the top-level element being walked
        self.too_deep = False  # past _MAX_OPEN: the walk ended there
        self.size = fp.seek(0, 2)

    def _at(self, pos: int, n: int) -> int:
        """Where the `n` bytes at `pos` are in `window` (read a window at a time), or -1 when
        the file ends before them."""
        at = pos - self._start
        if at < 0 or at + n > len(self.window):
            self.fp.seek(pos)
            self._start, self.window, at = pos, self.fp.read(max(n, _WINDOW_BYTES)), 0
            if len(self.window) < n:
                return -1
        return at

    def _looks_implicit(self, pos: int) -> bool:
        """pydicom's test of a data set's first element (filereader._is_implicit_vr): no two
        capital letters where an explicit VR would be."""
        if (at := self._at(pos + 4, 2)) < 0:
            return False
        return not (0x40 < self.window[at] < 0x5B and 0x40 < self.window[at + 1] < 0x5B)

    def run(self, pos: int) -> HeaderSize:
        top = self._looks_implicit(pos)  # pydicom trusts the data set over its meta
        while pos >= 0:
            pos = self._step(self._close(pos), top)
            if self._past_limit():
                return HeaderSize(self.held, self.elements, self.values, whole=False)
        if self.too_deep:
            raise too_deep(self._top_tag)
        return HeaderSize(self.held, self.elements, self.values)

    def end_of(self, pos: int, implicit: bool) -> int | None:
        """Where the top-level element at `pos` ends; None when the walk ends first."""
        pos = self._step(pos, implicit)
        while pos >= 0 and not self._past_limit():
            pos = self._close(pos)
            if not self.open:
                return pos
            pos = self._step(pos, implicit)
        return None

    def _past_limit(self) -> bool:
        return self.held > MAX_HEADER_BYTES or (
            _BYTE_COST * self.held + _ELEMENT_COST * self.elements + _VALUE_COST * self.values
            > MAX_HEADER_MEMORY_BYTES
        )

    def _step(self, pos: int, top: bool) -> int:
        """Walk the element header or item at `pos` (containers ended there left): where the
        walk goes on, -1 where it ends (the data set's end, or a stop)."""
        if (at := self._at(pos, 8)) < 0:
            return -1
        if len(self.open) > _MAX_OPEN:
            self.too_deep = True
            return -1
        group, elem, length = self._head(self.window, at)
        inner = self.open[-1] if self.open else None
        if inner is not None and inner.kind != "elements":
            return self._in_sequence(inner, (group, elem), length, pos)
        if (group, elem) == _ITEM_END:  # ends an item; at the top level, the data set
            if inner is None:
                return -1
            self.open.pop()
            self.held += 8
            return pos + 8
        return self._element(pos, at, group << 16 | elem, length, inner or top)

    def _push(self, kind: str, end: int | None, implicit: bool) -> None:
        bound = self.open[-1].bound if self.open else self.size
        if kind == "items" and end is not None:
            bound = min(bound, end)
        self.open.append(_Open(kind, end, implicit, bound))

    def _close(self, pos: int) -> int:
        """Leave the containers of defined length `pos` has reached. pydicom reads a sequence
        of defined length from its value's bytes and goes on after them; an item's elements
        until one ends at or past its end."""
        while self.open and (end := self.open[-1].end) is not None and pos >= end:
            if self.open.pop().kind == "items":
                pos = max(pos, end)
        return pos

    def _in_sequence(self, seq: _Open, tag: tuple[int, int], length: int, pos: int) -> int:
        """An item (or the end) of a sequence or of encapsulated Pixel Data; -1 to stop. pydicom
        reads any tag but the Sequence Delimitation Item as an item there; a fragment that is
        no item of defined length ends the walk (dicomfile refuses the file)."""
        if tag == _SEQUENCE_END:
            self.open.pop()
            self.held += 8 if seq.kind == "items" else 0
            return pos + 8
        if seq.kind == "fragments":
            return -1 if tag != _ITEM or length == _UNDEFINED else self._past_fragments(pos)
        self.elements += 1
        self.held += 8
        end = None if length == _UNDEFINED else pos + 8 + length
        implicit = seq.implicit or self._looks_implicit(pos + 8)
        self._push("elements", end, implicit)
        return pos + 8

    def _past_fragments(self, pos: int) -> int:
        """Where the fragments from `pos` (an item of defined length) end: at the first bytes
        that are no such item (the Sequence Delimitation Item, else the walk ends there), -1
        at the end of the file. Skipped in a loop of their own, nothing counted: one turn of
        the walk each took 1.8 s for a million fragments, twice the parse's own walk of them
        (dicomfile._pixel_data), and 4 GB of empty fragments some 15 minutes."""
        item, u32 = self._item, self._u32
        while (at := self._at(pos, 8)) >= 0:
            window, last = self.window, len(self.window) - 8
            while at <= last:  # the items in the window read
                if window[at : at + 4] != item:
                    return self._start + at
                (length,) = u32(window, at + 4)
                if length == _UNDEFINED:
                    return -1
                at += 8 + length
            pos = self._start + at
        return -1

    def _element(self, pos: int, at: int, tag: int, length: int, where: bool | _Open) -> int:
        """Walk the element at `pos` (its header at `at` in the window, its length read as
        implicit VR), in an item (`where`) or at the top level (`where`: its VR encoding): a
        sequence is opened, any other value skipped, held unless it is Pixel Data or top-level
        bulk data; -1 to stop. Its VR and length as pydicom's data_element_generator reads
        them: an explicit VR that is no two capital letters is read as implicit
        (config.assume_implicit_vr_switch), other letters have a 2-byte length."""
        top = isinstance(where, bool)
        implicit = where if isinstance(where, bool) else where.implicit
        if top:
            self._top_tag = tag
        vr = None if implicit else self.window[at + 4 : at + 6]
        header = 8
        if vr in LONG_LENGTH_VRS:
            if (at := self._at(pos, 12)) < 0:
                return -1
            (length,), header = self._u32(self.window, at + 8), 12
        elif vr is not None and b"AA" <= vr <= b"ZZ":
            (length,) = self._u16(self.window, at + 6)
        else:
            vr = None
        value_at = pos + header
        if length != _UNDEFINED and value_at + length > (
            self.open[-1].bound if self.open else self.size
        ):
            # Cut short: a value past the end of the file, or of the sequence of defined
            # length it is in. No header that large: the parse refuses it as it reads it
            # (0xC000, wellformed: truncated, or a value past its item's sequence, PS3.5 7.5),
            # which 0xA700 (a limit passed; a DIMSE sender may send it again later) hid.
            return -1
        if top and tag in _PIXEL_DATA_TAGS:
            if length != _UNDEFINED:
                return value_at + length
            self._push("fragments", None, implicit)
            return value_at
        self.elements += 1
        self.held += header
        if (vr is None or vr in (b"SQ", b"UN") or length == _UNDEFINED) and (
            end := self._sequence_or_value(tag, vr, value_at, length, where)
        ) is not None:
            return end
        name = _vr_of(tag, vr)
        if not (top and length > BULK_DATA_THRESHOLD_BYTES and name in BULK_VRS):
            self.held += length
            self.values += self._count_values(name, value_at, length)
        return value_at + length

    def _sequence_or_value(
        self, tag: int, vr: bytes | None, value_at: int, length: int, where: bool | _Open
    ) -> int | None:
        """Where to go on from an element that may hold a sequence, now open (its value), or
        from a value of undefined length that is none (its end, held); None for a value of
        defined length that is none."""
        if self._is_sequence(tag, vr, value_at, length):
            end = None if length == _UNDEFINED else value_at + length
            implicit = where if isinstance(where, bool) else where.implicit
            self._push("items", end, implicit)
            return value_at
        if length != _UNDEFINED:
            return None
        end = self._undefined_value_end(value_at)
        self.held += end - value_at
        return end

    def _is_sequence(self, tag: int, vr: bytes | None, value_at: int, length: int) -> bool:
        """Whether pydicom reads the value as a sequence, now or when it is converted: an
        explicit SQ, an UN of undefined length (config.infer_sq_for_un_vr), an UN or implicit
        VR value of a sequence's tag (config.replace_un_with_known_vr), or one that begins
        with an item (a private sequence, named by a private dictionary or not)."""
        if vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED):
            return True
        if vr is not None and vr != b"UN":
            return False
        if (known := _dictionary_vr(tag)) is not None:
            # The dictionary decides for a tag it knows, as pydicom's does (data_element_
            # generator, the raw_element_vr hook): an implicit VR Pixel Data of undefined
            # length in an icon image's item is a value whose fragments are items, no
            # sequence (walked as one, a JPEG fragment's bytes were read as element headers
            # of gigabytes: 0xA700 for an instance pydicom reads).
            return known == "SQ"
        if length != _UNDEFINED and length < 8:
            return False
        at = self._at(value_at, 4)
        return at >= 0 and self.window[at : at + 4] == self._item

    def _count_values(self, vr: str, pos: int, length: int) -> int:
        """Values of a number or multi-valued string element (each a list entry once
        converted); 0 for any other (its bytes are what it holds)."""
        if size := _NUMBER_SIZES.get(vr):
            return length // size
        if vr not in _MULTI_TEXT_VRS:
            return 0
        count, end = 1, pos + length
        while pos < end and (at := self._at(pos, n := min(end - pos, _WINDOW_BYTES))) >= 0:
            count += self.window.count(b"\\", at, at + n)
            pos += n
        return count

    def _undefined_value_end(self, value_at: int) -> int:
        """Where a value of undefined length that is no sequence ends, as pydicom finds it
        (fileutil.read_undefined_length_value): after its items' Sequence Delimitation Item,
        else after the first delimiter's bytes, else at the end of the file."""
        pos = value_at
        while (at := self._at(pos, 8)) >= 0:
            group, elem, length = self._head(self.window, at)
            if (group, elem) == _SEQUENCE_END:
                return pos + 8
            if (group, elem) != _ITEM or length == _UNDEFINED:
                break
            pos += 8 + length
        pos = value_at
        while (at := self._at(pos, 4)) >= 0:
            if (found := self.window.find(self._delimiter, at)) >= 0:
                return self._start + found + 8
            pos = self._start + len(self.window) - 3
        return self.fp.seek(0, 2)


def _dictionary_vr(tag: int) -> str | None:
    """The VR pydicom's data dictionary gives a tag, None when it has none (a private tag)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _vr_of(tag: int, vr: bytes | None) -> str:
    """An element's VR: explicit, else its dictionary's as dicom_json.raw_vr reads it (an
    "OB or OW" is OW), UN when the tag is unknown (a private one)."""
    if vr is not None:
        return vr.decode("ascii", "replace")
    if (found := _dictionary_vr(tag)) is None:
        return "UN"
    if " or " in found:
        return "OW" if "OW" in found else found.split(" or ")[0]
    return found
