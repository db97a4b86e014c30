"""Whether a Part-10 data set pydicom read is whole and well formed, checked at ingest before
it is indexed (STOW-RS, DIMSE C-STORE, reindex; dicomfile reads the file): every element
whole (PS3.5 7.1), values within their items and items within their sequences (7.5),
sequences no deeper than the archive takes, binary numbers of the pixel description in whole
values (6.2), what follows the Pixel Data (a Digital Signatures Sequence, Data Set Trailing
Padding, PS3.10 7.2), nothing after an Item Delimitation Item that ends the data set. A data
set that is not is refused with InvalidInstanceError (0xC000) and the reason."""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_deferred_data_element
from pydicom.hooks import hooks as pydicom_hooks

from dicomweb_server.dicom_json import (
    BINARY_FORMATS,
    BULK_DATA_THRESHOLD_BYTES,
    raw_vr,
    tag_name,
)
from dicomweb_server.errors import FailureReason
from dicomweb_server.media.mediatypes import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

__all__ = [
    "DATASET_TRAILING_PADDING",
    "MAX_SEQUENCE_DEPTH",
    "InvalidInstanceError",
    "check_depth",
    "check_whole",
    "cut_numbers",
    "end_before_item_delimiter",
    "merge_tail",
    "padding_at",
    "too_deep",
]

DATASET_TRAILING_PADDING = 0xFFFCFFFC
# Sequences nested in a data set, at most (STOW-RS Part-10, DIMSE C-STORE, reindex; STOW-RS
# JSON metadata takes the same, stow_json.MAX_JSON_SEQUENCE_DEPTH). pydicom reads and writes
# sequences recursively: instances nested 200 levels and more (items of undefined length)
# overflowed its reader at ingest, shallower ones were stored, each a few hundred levels
# from its writer's limit too (found by fuzzing deep items). Deeper: that instance fails
# (0xC000), the reason naming the limit.
MAX_SEQUENCE_DEPTH = 64
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Group 0028: the pixel description (Image Pixel module, LUTs), read to decode and render.
_PIXEL_DESCRIPTION_GROUP = 0x0028


class InvalidInstanceError(Exception):
    """The part is not a DICOM instance we can store; carries the STOW failure reason."""

    def __init__(
        self,
        reason: FailureReason,
        message: str,
        *,
        sop_class: str | None = None,
        sop: str | None = None,
        over_limit: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.sop_class, self.sop = sop_class, sop  # when known, for the FailedSOPSequence
        # Refused (0xA700) for a limit of the archive the sender passed: the sender's doing,
        # not the archive out of resources (InstanceOutcome.over_limit).
        self.over_limit = over_limit


def check_whole(data: Dataset, pos: int, size: int) -> None:
    """Refuse (0xC000) a data set that ends inside an element (PS3.5 7.1: a data set is a
    sequence of whole data elements). pydicom reads a value the file ends inside of as the
    bytes there are, and stops silently at an element header cut short; `pos` is where it
    stopped reading, `data` what it read (the last element read is the last inserted). A last
    element of undefined length is a sequence whose delimiter pydicom found, or it raised."""
    tags = list(data.keys())
    if not tags:
        return
    last = data.get_item(tags[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return
    name = f"({tags[-1] >> 16:04X},{tags[-1] & 0xFFFF:04X})"
    end = last.value_tell + last.length
    if end > size:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            f"truncated data set: value of {name} lacks {end - size} bytes",
        )
    if pos > end:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            f"truncated data set: {pos - end} bytes after {name}, no whole element",
        )


def too_deep(top: int | None = None) -> InvalidInstanceError:
    """The refusal, naming the top-level sequence the levels are under when it is known (not
    when pydicom's recursive reader gave out first)."""
    under = f" in {tag_name(top)}" if top is not None else ""
    return InvalidInstanceError(
        FailureReason.CANNOT_UNDERSTAND,
        f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels{under},"
        " the most this archive takes",
    )


def check_depth(ds: Dataset) -> None:
    """Refuse (0xC000) a data set whose sequences nest deeper than MAX_SEQUENCE_DEPTH: walked
    with a stack, not recursion, before the (recursive) DICOM JSON walk. A sequence of defined
    length is still raw here (or deferred, past the bulk data threshold); converting it, as
    the JSON walk would, parses its items. Other elements are left raw and unread. Whether a
    raw element is a sequence is asked of pydicom's own VR hook, as every later reader (a
    conversion) resolves it: an explicit UN of a sequence's tag, or an implicit VR private
    element of a private dictionary sequence, is parsed as a sequence there."""
    stack: list[tuple[Dataset, int, int | None]] = [(ds, 0, None)]  # item, depth, top level
    # An item overrunning its sequence is refused after the walk: a value cut inside an item
    # is named first (its sequence's item then overruns it too: pydicom's
    # rtplan_truncated.dcm).
    overrun: InvalidInstanceError | None = None
    while stack:
        item, depth, top = stack.pop()
        for tag in item.keys():
            raw = item.get_item(tag, keep_deferred=True)
            value: bytes | None = None  # a sequence of defined length, as it was read
            if isinstance(raw, RawDataElement):
                if top is not None:
                    _check_item_value(raw, top)
                if tag >> 16 == _PIXEL_DESCRIPTION_GROUP:
                    _check_pixel_description(tag, raw)
                if _read_vr(item, raw) != "SQ":
                    continue  # left as it is: no sequence, deferred or not
                if raw.length != _UNDEFINED_LENGTH:
                    value = _sequence_value(item, raw)
            elem = item[tag]  # a deferred sequence is read, as the JSON walk reads it
            if elem.VR != "SQ":
                continue
            if value is not None and overrun is None and isinstance(raw, RawDataElement):
                overrun = _item_overrun(raw, value, elem.value, top)
            if depth == MAX_SEQUENCE_DEPTH:
                raise too_deep(top)
            stack.extend((child, depth + 1, tag if top is None else top) for child in elem.value)
    if overrun is not None:
        raise overrun


def _sequence_value(item: Dataset, raw: RawDataElement) -> bytes:
    """The bytes of a sequence of defined length. One past the bulk data threshold (at the
    top level only: items are read from their sequence's bytes) is read here as
    Dataset.__getitem__ reads it, and kept raw in `item` for the conversion that follows.
    An empty one whose VR the file does not give (implicit VR, an explicit UN) pydicom reads
    as None, as a value left unread: nothing to read (an item is no file to read it from)."""
    if raw.length == 0:
        return b""
    if raw.value is not None:
        return bytes(raw.value)
    src = item.filename or item.buffer
    if item.filename and item.buffer and not getattr(item.buffer, "closed", False):
        src = item.buffer
    loaded = read_deferred_data_element(item.fileobj_type, src, item.timestamp, raw)
    item[raw.tag] = loaded
    return bytes(loaded.value or b"")


def _item_overrun(
    raw: RawDataElement, value: bytes, items: list[Dataset], top: int | None
) -> InvalidInstanceError | None:
    """The refusal (0xC000) of an item of a sequence of defined length that declares more
    bytes than its sequence has left after the item's header (PS3.5 7.5: a sequence of
    defined length holds its items whole). pydicom reads the items from the sequence's bytes
    and ends such an item where they end, silently (an item whose elements end there was
    stored); dcmtk reads the item on, past its sequence, taking the elements that follow
    into it: the metadata served disagreed with the file as other readers read it. An item
    of undefined length ends at its delimiter, read by pydicom."""
    order = "<" if raw.is_little_endian else ">"
    tag = int(raw.tag)
    where = f" in {tag_name(top)}" if top is not None else ""
    for number, child in enumerate(items, 1):
        at = child.seq_item_tell - raw.value_tell  # from the start of the sequence's value
        (length,) = struct.unpack_from(f"{order}I", value, at + 4)
        left = len(value) - at - 8
        if length != _UNDEFINED_LENGTH and length > left:
            return InvalidInstanceError(
                FailureReason.CANNOT_UNDERSTAND,
                f"item {number} of {tag_name(tag)}{where} declares {length} bytes, its"
                f" sequence of defined length has {left} left (PS3.5 7.5)",
            )
    return None


def _check_item_value(raw: RawDataElement, top: int) -> None:
    """Refuse (0xC000) a value inside a sequence item that declares more bytes than its
    sequence holds (PS3.5 7.5: an item's elements lie within it). pydicom reads a sequence of
    defined length from its value's bytes and gives such a value as the bytes there are, so
    it was stored and shown cut short (pydicom's rtplan_truncated.dcm; dcmtk refuses it:
    "premature end of stream"). The top level is checked against the file (check_whole)."""
    if raw.length == 0xFFFFFFFF or raw.value is None or len(raw.value) >= raw.length:
        return
    tag = int(raw.tag)
    raise InvalidInstanceError(
        FailureReason.CANNOT_UNDERSTAND,
        f"truncated data set: value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) in"
        f" {tag_name(top)} lacks {raw.length - len(raw.value)} bytes",
    )


def _check_pixel_description(tag: int, raw: RawDataElement) -> None:
    """Refuse (0xC000) a binary number value of group 0028 (Image Pixel, LUTs, pixel padding:
    what decoding and rendering read, PS3.3 C.7.6.3) whose length is no multiple of its VR's
    size (PS3.5 6.2: a Bits Stored of 3 bytes). Elsewhere such a value is stored as sent and
    shown as UN (dicom_json._cut_numbers_json); these were stored too, then every rendering
    and conversion of the instance failed with a 500 (pydicom's BytesLengthException)."""
    vr = raw_vr(tag, raw)
    fmt = BINARY_FORMATS.get(vr)
    if fmt is not None and raw.value is not None and len(raw.value) % struct.calcsize(fmt):
        raise cut_numbers(tag, vr, len(raw.value))


def cut_numbers(tag: int, vr: str, length: int) -> InvalidInstanceError:
    return InvalidInstanceError(
        FailureReason.CANNOT_UNDERSTAND,
        f"{tag_name(tag)} has {length} bytes, no whole {vr} values (PS3.5 6.2)",
    )


def _read_vr(item: Dataset, raw: RawDataElement) -> str:
    """The VR pydicom gives `raw` when it is read (its value left unread): an UN replaced
    with the VR of a known tag, a private VR looked up by its Private Creator (PS3.5 6.2.2).
    An explicit VR other than UN is kept as it is, without asking (most elements: the hook
    took a twentieth of a small instance's parse)."""
    if raw.VR is not None and raw.VR != "UN":
        return str(raw.VR)
    data: dict[str, Any] = {}
    pydicom_hooks.raw_element_vr(raw, data, encoding=None, ds=item)
    return str(data["VR"])


def padding_at(element: object, ts: str, size: int) -> int | None:
    """Where a Data Set Trailing Padding element read raw begins, when it ends the file."""
    if not isinstance(element, RawDataElement) or not element.value_tell:
        return None
    if element.value_tell + element.length != size:
        return None
    return element.value_tell - (8 if ts == IMPLICIT_VR_LITTLE_ENDIAN else 12)


def _after_item_delimiter(fp: BinaryIO, stop: int, end: int, ts: str) -> bool:
    """Whether the 8 bytes before `stop` (where read_dataset stopped, past `end`) are an Item
    Delimitation Item, (FFFE,E00D) of length 0, at which pydicom ends a data set silently."""
    if stop - end < 8:
        return False
    fp.seek(stop - 8)
    order = ">" if ts == EXPLICIT_VR_BIG_ENDIAN else "<"
    found = fp.read(8) == struct.pack(f"{order}HHI", 0xFFFE, 0xE00D, 0)
    fp.seek(stop)
    return found


def end_before_item_delimiter(
    fp: BinaryIO, data: Dataset, start: int, stop: int, size: int, ts: str, where: str = ""
) -> int:
    """Where the data set pydicom read up to `stop` ends: before an Item Delimitation Item
    (PS3.5 7.5.2) that ends the file after its last element, at which pydicom and dcmtk both
    end a data set silently (dcmdump lists the elements before it and no error). It belongs
    in no item there, yet it is read alike: stored, after Pixel Data or any last element.
    Bytes after it are refused: pydicom never read them. `where` names the last element's
    place in the reason; `start` is where pydicom began reading."""
    end = max(start, stop - 8)  # a last element of undefined length ends in its delimiter
    last = data.get_item(list(data.keys())[-1], keep_deferred=True) if data else None
    if isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH:
        end = last.value_tell + last.length
    if not _after_item_delimiter(fp, stop, end, ts):
        return stop
    if stop < size:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            f"truncated data set: {size - stop} bytes after the Item Delimitation Item"
            f" (FFFE,E00D) that ends the data set{where}",
        )
    return stop - 8


def merge_tail(
    fp: BinaryIO, ds: Dataset, ts: str, end: int, size: int, pixel_tag: int | None
) -> RawDataElement | None:
    """Elements after Pixel Data (rare: a Digital Signatures Sequence) join the header, Data
    Set Trailing Padding excepted (returned, read raw). Their tags must follow the Pixel
    Data's (PS3.5 7.1: data elements in increasing tag order, each once): one that does not
    would replace a value already checked (a UID, the number of frames) and is refused."""
    fp.seek(end)
    if fp.read(8) == bytes(8):  # read as (0000,0000), "out of tag order": say what it is
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            f"{size - end} bytes after the Pixel Data begin with zeros, no element"
            " (Data Set Trailing Padding is (FFFC,FFFC), PS3.10 7.2)",
        )
    fp.seek(end)
    # Values past the bulk data threshold left unread, as before Pixel Data (dicomfile._header):
    # a large private value or padding after it was read into memory (headersize).
    tail = read_dataset(
        fp,
        ts == IMPLICIT_VR_LITTLE_ENDIAN,
        ts != EXPLICIT_VR_BIG_ENDIAN,
        defer_size=BULK_DATA_THRESHOLD_BYTES,
    )
    stop = end_before_item_delimiter(fp, tail, end, fp.tell(), size, ts, " after the Pixel Data")
    if not tail and stop > end:  # 1 to 7 bytes: pydicom stops there silently
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            f"truncated data set: {stop - end} bytes after the Pixel Data, no whole element",
        )
    check_whole(tail, stop, size)
    after = pixel_tag if pixel_tag is not None else max(ds.keys(), default=0)
    for tag in tail.keys():
        if tag <= after or tag in ds:
            raise InvalidInstanceError(
                FailureReason.CANNOT_UNDERSTAND,
                f"({tag >> 16:04X},{tag & 0xFFFF:04X}) after the Pixel Data is out of tag order"
                " or repeated (PS3.5 7.1)",
            )
        if tag != DATASET_TRAILING_PADDING:
            # Raw, as dcmread leaves the elements before Pixel Data: Dataset.__setitem__
            # converts a private element, and a value left unread would become None.
            ds._dict[tag] = tail.get_item(tag, keep_deferred=True)
    padding = tail.get_item(DATASET_TRAILING_PADDING, keep_deferred=True)
    return padding if isinstance(padding, RawDataElement) else None
