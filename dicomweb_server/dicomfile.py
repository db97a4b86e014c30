"""Reading stored Part-10 files: header, pixel data layout and bulk data ranges.

Never loads Pixel Data into memory: the header is parsed by pydicom up to Pixel Data, and the
Pixel Data element (native or encapsulated, PS3.5 A.4) is walked item by item with seeks, so
that frame byte ranges are known at ingest (STYLE.md rule 11).
"""

from __future__ import annotations

import itertools
import re
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import (
    _read_file_meta_info,
    data_element_generator,
    read_dataset,
    read_partial,
    read_preamble,
)
from pydicom.hooks import hooks as pydicom_hooks
from pydicom.multival import MultiValue

from dicomweb_server import headersize
from dicomweb_server.dicom_json import (
    BINARY_FORMATS,
    BULK_DATA_THRESHOLD_BYTES,
    BULK_VRS,
    JsonDict,
    dataset_to_json,
    lut_data_vr,
    raw_vr,
    simple_json,
)
from dicomweb_server.errors import FailureReason
from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    VIDEO_TRANSFER_SYNTAXES,
)
from dicomweb_server.media.part10 import LONG_LENGTH_VRS
from dicomweb_server.record import FrameLayout
from dicomweb_server.vr import frame_count
from dicomweb_server.wellformed import (
    DATASET_TRAILING_PADDING,
    MAX_SEQUENCE_DEPTH,
    InvalidInstanceError,
    check_depth,
    check_whole,
    cut_numbers,
    end_before_item_delimiter,
    merge_tail,
    padding_at,
    too_deep,
)

__all__ = [
    "MAX_INFLATED_BYTES",
    "MAX_SEQUENCE_DEPTH",
    "PIXEL_DATA_TAGS",
    "InvalidInstanceError",
    "ParsedFile",
    "bulk_prefix",
    "check_whole",
    "configure_pydicom",
    "parse_file",
    "sop_uids",
]

PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM = (0xFFFE, 0xE000)
_SEQ_DELIM = (0xFFFE, 0xE0DD)
# A Deflated Explicit VR Little Endian data set (PS3.5 A.5) cannot be range-read: pydicom
# inflates the whole of it in memory. Above this many bytes inflated it is refused (0xA700)
# before pydicom sees it, so that a small upload cannot inflate to gigabytes (a zip bomb), and
# one file is inflated at a time per process (_INFLATE_LOCK): at most this (and pydicom's
# copies of it, about three times as much) in memory for STOW.
MAX_INFLATED_BYTES = 64 * 1024 * 1024
_INFLATE_LOCK = threading.Lock()
_INFLATE_READ_BYTES = 64 * 1024
# An inflated data set is measured (headersize) from a scratch file, in memory up to this.
_INFLATED_IN_MEMORY_BYTES = 1024 * 1024
# What sop_uids inflates of a Deflated data set, at most: the elements before (0008,0018).
_SOP_UIDS_INFLATED_BYTES = 1024 * 1024
# Values of undefined length before (0008,0018) sop_uids walks past (headersize.element_end),
# at most: a Language Code Sequence (0008,0006), say. More: the UIDs are not known.
_SOP_UIDS_SKIPS = 8
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018


@dataclass(frozen=True)
class ParsedFile:
    uids: tuple[str, str, str, str]  # SOP Class, SOP Instance, Study, Series
    meta: JsonDict  # DICOM JSON, bulk data as root-relative BulkDataURIs
    transfer_syntax_uid: str
    number_of_frames: int
    frames: FrameLayout | None  # None: frames need a full decode (not range-readable)
    # tag path -> [offset, length, vr, encapsulated] for range reads of bulk data; offset
    # None: a Deflated file's Pixel Data, not read by range from the file, whose length is
    # known (a HEAD answered without inflating it: retrieve.pixeldata.stored_bulk_value)
    bulk_ranges: dict[str, list[Any]]
    data_set_at: int  # where the data set begins, after the File Meta Information
    # where its Data Set Trailing Padding (FFFC,FFFC) begins, when it ends the file
    data_set_end: int | None = None


def configure_pydicom() -> None:
    """Process-wide pydicom settings, set once at start (STYLE.md rule 15).

    An archive stores what it is sent: invalid element values are kept as they are, not refused
    and not "fixed", so reading validation is off.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    # A binary number value of the wrong length (PS3.5 6.2: a US of 3 bytes) is read as UN,
    # its bytes kept, not refused: a conversion writes it so, as the metadata shows it
    # (dicom_json._cut_numbers_json); group 0028 is refused at ingest
    # (wellformed._check_pixel_description).
    pydicom_config.convert_wrong_length_to_UN = True
    pydicom_hooks.register_callback("raw_element_vr", lut_data_vr)  # LUT Data with no descriptor


def parse_file(path: Path) -> ParsedFile:
    """Parse and validate a Part-10 file. Runs in a worker thread."""
    try:
        return _parse(path)
    except InvalidInstanceError:
        raise
    except InvalidDicomError as exc:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {exc}"
        ) from None
    except RecursionError:  # pydicom reads undefined-length sequences recursively
        raise too_deep() from None
    except Exception as exc:  # untrusted input: any parser failure is the client's data
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}"
        ) from None


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Attributes every stored instance needs (PS3.4 B.4.1 / PS3.18 10.5.3: 0xA900 otherwise).
_REQUIRED_UIDS = (
    (0x00080016, "SOPClassUID"),
    (0x00080018, "SOPInstanceUID"),
    (0x0020000D, "StudyInstanceUID"),
    (0x0020000E, "SeriesInstanceUID"),
)


def _uids(ds: Dataset) -> tuple[str, str, str, str]:
    """The four UIDs, validated: digits and dots, at most 64 characters (PS3.5 9.1).

    Leading zeros in a component are tolerated (real modalities emit them); anything else is
    refused, which also keeps every UID safe to place in a URL path.
    """
    out = []
    for tag, keyword in _REQUIRED_UIDS:
        got = _value(ds, tag)
        several = isinstance(got, list | MultiValue)
        value = ("\\".join(str(v or "") for v in got) if several else str(got or "")).strip("\x00 ")
        if not value:
            raise InvalidInstanceError(
                FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing"
            )
        if len(value) > 64 or not _UID.match(value):
            raise InvalidInstanceError(
                FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                f"{keyword} {value[:80]!r} is not a valid UID",
            )
        out.append(value)
    return out[0], out[1], out[2], out[3]


def bulk_prefix(study: str, series: str, sop: str) -> str:
    """Root-relative BulkDataURI prefix of an instance; the tag path follows."""
    return f"/studies/{study}/series/{series}/instances/{sop}/bulk/"


def _parse(path: Path) -> ParsedFile:
    """Measure the header (headersize: refused past its limits before pydicom reads it), then
    parse it while the memory it takes is held (headersize.parsing)."""
    with path.open("rb") as fp:
        syntax, data_set_at = _file_meta(fp)
        deflated = syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
        if deflated:
            with _INFLATE_LOCK:
                header = _inflated_header(fp, data_set_at)
        else:
            header = headersize.measured(fp, data_set_at, syntax)
    try:
        headersize.check(header)
    except InvalidInstanceError as exc:  # its UIDs for the response (FailedSOPSequence)
        exc.sop_class, exc.sop = _known_uids(path)
        raise
    with headersize.parsing(header):
        if deflated:
            with _INFLATE_LOCK:
                return _parse_whole(path, syntax, data_set_at)
        return _parse_by_range(path, data_set_at)


def _known_uids(path: Path) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) of a file refused unparsed, None when not read."""
    try:
        sop_class, sop = sop_uids(path)
    except Exception:  # untrusted input: the refusal stands without them
        return None, None
    return sop_class or None, sop or None


def _parse_by_range(path: Path, data_set_at: int) -> ParsedFile:
    size = path.stat().st_size
    with path.open("rb") as fp:
        ds, ts = _header(fp, size)
        uids = _uids(ds)
        prefix = bulk_prefix(uids[2], uids[3], uids[1])
        layout, pixel_entry, end = _pixel_data(fp, ds, ts, size)
        padding: object = ds.get_item(DATASET_TRAILING_PADDING, keep_deferred=True)
        if end is not None and end < size:
            padding = merge_tail(fp, ds, ts, end, size, pixel_entry[0] if pixel_entry else None)
        data_set_end = padding_at(padding, ts, size)
    bulk_ranges = _deferred_ranges(ds, size) if ts != EXPLICIT_VR_BIG_ENDIAN else {}
    check_depth(ds)
    meta = dataset_to_json(ds, lambda p: prefix + p)
    if pixel_entry is not None:
        pixel_tag, vr, entry = pixel_entry
        meta[f"{pixel_tag:08X}"] = {"vr": vr, "BulkDataURI": f"{prefix}{pixel_tag:08X}"}
        if entry is not None and ts != EXPLICIT_VR_BIG_ENDIAN:
            bulk_ranges[f"{pixel_tag:08X}"] = entry
    nframes = _number_of_frames(ds) if pixel_entry is not None else 0
    if ts == EXPLICIT_VR_BIG_ENDIAN:
        layout = None
    return ParsedFile(uids, meta, ts, nframes, layout, bulk_ranges, data_set_at, data_set_end)


def _header(fp: BinaryIO, size: int) -> tuple[Dataset, str]:
    """The data set up to Pixel Data as pydicom reads it (values over the bulk data threshold
    left unread), and the Transfer Syntax UID of its File Meta Information; refused (0xC000)
    when the data set is cut short or no transfer syntax is given."""
    fp.seek(0)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=BULK_DATA_THRESHOLD_BYTES)
    stop = fp.tell()
    file_meta = getattr(ds, "file_meta", None)
    meta_ts = file_meta.get("TransferSyntaxUID") if file_meta else None
    if meta_ts:  # a data set with no Pixel Data may end in an Item Delimitation Item too
        stop = end_before_item_delimiter(fp, ds, 0, stop, size, str(meta_ts))
    check_whole(ds, stop, size)
    if not meta_ts:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            "no File Meta Information with a Transfer Syntax UID (PS3.10 7.1)",
        )
    return ds, str(meta_ts)


def _deferred_ranges(ds: Dataset, size: int) -> dict[str, list[Any]]:
    """tag -> [offset, length, vr, False] of the binary values pydicom left unread."""
    bulk_ranges: dict[str, list[Any]] = {}
    for tag in ds.keys():
        # Deferred values stay unread (get_item would read them): large binary values
        # before Pixel Data (overlays, palettes, private blobs) are served by range.
        item = ds.get_item(tag, keep_deferred=True)
        if (
            isinstance(item, RawDataElement)
            and item.value is None
            and item.value_tell
            and (vr := raw_vr(tag, item)) in BULK_VRS
        ):
            if item.value_tell + item.length > size:  # pydicom seeks past a deferred value
                raise InvalidInstanceError(
                    FailureReason.CANNOT_UNDERSTAND,
                    f"the value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end"
                    " of the file: it is truncated",
                )
            bulk_ranges[f"{tag:08X}"] = [item.value_tell, item.length, vr, False]
    return bulk_ranges


def _file_meta(fp: BinaryIO) -> tuple[str, int]:
    """The Transfer Syntax UID of the File Meta Information and where the data set begins,
    as pydicom reads them (it inflates nothing here): a Deflated data set is measured from
    there before pydicom reads it, and the STOW hash (blobstore.hashing.DataSetHash) must have
    found the data set at the same place. No preamble: InvalidDicomError, as from dcmread."""
    fp.seek(0)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)  # pydicom's own, which dcmread calls
    ts = str(meta.get("TransferSyntaxUID", "")).rstrip("\0 ")
    return ts, fp.tell()


def sop_uids(path: Path) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) of a Part-10 file ("" when absent), read from the start
    of its data set and no further than (0008,0018). A Deflated data set is inflated at most
    _SOP_UIDS_INFLATED_BYTES (UIDs beyond: absent, or the read fails): dcmread inflates all
    of it in memory: a C-STORE data set of 400 KB took 800 MB before the ingest (parse_file) could
    refuse it as over MAX_INFLATED_BYTES (found by review). Malformed: InvalidDicomError, or
    what pydicom raises."""
    with path.open("rb") as fp:
        syntax, at = _file_meta(fp)
        if syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return _sop_uids_in_place(fp, syntax)
        fp.seek(at)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = inflater.decompress(fp.read(_SOP_UIDS_INFLATED_BYTES), _SOP_UIDS_INFLATED_BYTES)
        ds = read_dataset(
            cast(BinaryIO, DicomBytesIO(head)),
            False,
            True,
            stop_when=lambda tag, *_: tag > _SOP_INSTANCE,
        )
    return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))


def _sop_uids_in_place(fp: BinaryIO, syntax: str) -> tuple[str, str]:
    """sop_uids of a data set not inflated: read no further than (0008,0018), nor into a
    value of undefined length before it: pydicom parses a sequence of undefined length whole
    even to skip it (specific_tags), which was the whole data set up to the Pixel Data before
    the ingest (headersize) could refuse a header of gigabytes of small items. Such a value
    is walked past (headersize.element_end), as many as _SOP_UIDS_SKIPS: the C-STORE check of
    the Affected SOP UIDs (dimse.stores.command_mismatch) was skipped for a data set with one
    (a Language Code Sequence) and one naming another SOP Instance than its request stored."""
    tags, undefined = [_SOP_CLASS, _SOP_INSTANCE], [False]

    def stop(tag: int, _vr: str | None, length: int) -> bool:
        undefined[0] = tag <= _SOP_INSTANCE and length == 0xFFFFFFFF
        return tag > _SOP_INSTANCE or undefined[0]

    fp.seek(0)
    ds = read_partial(fp, stop_when=stop, specific_tags=cast(Any, tags))
    found = {tag: str(ds[tag].value) for tag in tags if tag in ds}
    implicit, little = (bool(flag) for flag in ds.original_encoding)
    for _ in range(_SOP_UIDS_SKIPS):
        if (
            not undefined[0]
            or (end := headersize.element_end(fp, fp.tell(), syntax, implicit)) is None
        ):
            break
        fp.seek(end)
        undefined[0] = False
        for raw in data_element_generator(
            fp, implicit, little, stop, specific_tags=cast(Any, tags)
        ):
            if raw.tag in tags and isinstance(raw.value, bytes):
                found[raw.tag] = raw.value.decode("ascii", "replace").rstrip("\0 ")
    return found.get(_SOP_CLASS, ""), found.get(_SOP_INSTANCE, "")


def _inflated_header(fp: BinaryIO, at: int) -> headersize.HeaderSize:
    """Inflate the data set from `at` into a scratch file, not memory: refused (0xA700) once it
    passes MAX_INFLATED_BYTES, or (0xC000) when it is not a deflate stream; else its header
    measured there. pydicom holds all of it, Pixel Data included: its bytes are held."""
    fp.seek(at)
    with tempfile.SpooledTemporaryFile(_INFLATED_IN_MEMORY_BYTES) as inflated:
        _inflate_into(fp, zlib.decompressobj(-zlib.MAX_WBITS), inflated)
        total = inflated.tell()
        header = headersize.measured(cast(BinaryIO, inflated), 0, EXPLICIT_VR_LITTLE_ENDIAN)
    return replace(header, held_bytes=total)


def _inflate_into(fp: BinaryIO, inflater: Any, out: Any) -> None:
    total = 0
    try:
        # Bytes after the end of the stream (padding) may stay in unconsumed_tail: stop at eof.
        while not inflater.eof and (chunk := fp.read(_INFLATE_READ_BYTES)):
            while chunk and not inflater.eof:
                piece = inflater.decompress(chunk, _INFLATE_READ_BYTES)
                total += len(piece)
                out.write(piece)
                chunk = inflater.unconsumed_tail
                if total > MAX_INFLATED_BYTES:
                    raise InvalidInstanceError(
                        FailureReason.OUT_OF_RESOURCES,
                        f"the Deflated data set inflates to more than {MAX_INFLATED_BYTES}"
                        " bytes, the most this archive inflates",
                        over_limit=True,
                    )
    except zlib.error as exc:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND, f"the Deflated data set does not inflate: {exc}"
        ) from None


def _parse_whole(path: Path, ts: str, data_set_at: int) -> ParsedFile:
    """Deflated files cannot be range-read: parse in memory, frames decoded on demand."""
    ds = pydicom.dcmread(path)
    # pydicom read the data set from its inflated bytes, kept in `buffer` where it stopped,
    # as silently as from a file (at an Item Delimitation Item, inside a value or a header
    # cut short): checked as a file's data set is (_header). It was stored unchecked.
    inflated = cast(BinaryIO, ds.buffer)
    stop = inflated.tell()
    size = inflated.seek(0, 2)
    stop = end_before_item_delimiter(inflated, ds, 0, stop, size, ts)
    check_whole(ds, stop, size)
    uids = _uids(ds)
    prefix = bulk_prefix(uids[2], uids[3], uids[1])
    pixel = [t for t in PIXEL_DATA_TAGS if t in ds]
    entries = {t: ds[t].VR for t in pixel}
    # The length of each (native) Pixel Data value, known here only: a HEAD of it then
    # inflates nothing (the value is read from an inflated copy, by the place found there).
    lengths: dict[str, list[Any]] = {
        f"{t:08X}": [None, len(ds[t].value), ds[t].VR, False]
        for t in pixel
        if not ds[t].is_undefined_length and isinstance(ds[t].value, bytes)
    }
    for t in pixel:
        del ds[t]
    check_depth(ds)
    meta = dataset_to_json(ds, lambda p: prefix + p)
    for t, vr in entries.items():
        meta[f"{t:08X}"] = {"vr": vr, "BulkDataURI": f"{prefix}{t:08X}"}
    nframes = _number_of_frames(ds) if pixel else 0
    return ParsedFile(uids, meta, ts, nframes, None, lengths, data_set_at)


def _value(ds: Dataset, tag: int) -> Any:
    """An element's value as pydicom gives it (a list for several values), None when absent;
    read from its raw bytes when `simple_json` can, as the DICOM JSON walk does. Converting
    an element through pydicom costs tens of microseconds, and a converted element then takes
    the walk's slow path: the UIDs and pixel attributes read here were a fifth of a parse."""
    item = ds.get_item(tag)
    if item is None:
        return None
    if isinstance(item, RawDataElement) and item.value is not None:
        simple = simple_json(item, ds.original_encoding[1] is True)
        if simple is not None:
            values = simple.get("Value") or [""]
            return values[0] if len(values) == 1 else values
    elem = ds[tag]
    if elem.VR in BINARY_FORMATS and isinstance(elem.value, bytes):  # see configure_pydicom
        vr = raw_vr(tag, item) if isinstance(item, RawDataElement) else str(elem.VR)
        raise cut_numbers(tag, vr, len(elem.value))
    return elem.value


def _number_of_frames(ds: Dataset) -> int:
    """Number of Frames read raw (vr.frame_count)."""
    return frame_count(_value(ds, 0x00280008))


def _pixel_data(
    fp: BinaryIO, ds: Dataset, ts: str, size: int
) -> tuple[FrameLayout | None, tuple[int, str, list[Any] | None] | None, int | None]:
    """Frame layout, (tag, vr, bulk range) of the pixel data element, and where it ends."""
    start = fp.tell()
    little = ts != EXPLICIT_VR_BIG_ENDIAN
    header = fp.read(8)
    if len(header) < 8:
        return None, None, None
    group, elem = struct.unpack("<HH" if little else ">HH", header[:4])
    tag = (group << 16) | elem
    if tag not in PIXEL_DATA_TAGS:
        return None, None, start
    # An explicit VR file whose Pixel Data was written implicitly (pydicom's test file
    # SC_rgb_jpeg.dcm does this; pydicom reads it with a warning): no VR letters at byte 4.
    implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN or not header[4:6].isalpha()
    if implicit:
        (length,) = struct.unpack("<I" if little else ">I", header[4:8])
        vr = "OB" if int(_value(ds, 0x00280100) or 16) <= 8 else "OW"
        value_at = start + 8
    else:
        vr = header[4:6].decode("ascii", "replace")
        if header[4:6] in LONG_LENGTH_VRS:
            (length,) = struct.unpack("<I" if little else ">I", fp.read(4))
            value_at = start + 12
        else:
            (length,) = struct.unpack("<H" if little else ">H", header[6:8])
            value_at = start + 8
    if length == 0xFFFFFFFF:
        items, end = _items(fp, value_at, size)
        layout = _encapsulated_layout(fp, ds, items, ts)
        first = items[1][0] if len(items) > 1 else end
        return layout, (tag, "OB", [first, max(0, end - 8 - first), "OB", True]), end
    if value_at + length > size:
        raise InvalidInstanceError(FailureReason.CANNOT_UNDERSTAND, "Pixel Data is truncated")
    layout = _native_layout(ds, value_at, length) if little else None
    return layout, (tag, vr, [value_at, length, vr, False]), value_at + length


def _items(fp: BinaryIO, pos: int, size: int) -> tuple[list[tuple[int, int]], int]:
    """(offset, length) of each item of encapsulated pixel data, and the end of the element."""
    items: list[tuple[int, int]] = []
    while True:
        fp.seek(pos)
        header = fp.read(8)
        if len(header) < 8:
            raise InvalidInstanceError(
                FailureReason.CANNOT_UNDERSTAND, "encapsulated Pixel Data is truncated"
            )
        group, elem, length = struct.unpack("<HHI", header)
        if (group, elem) == _SEQ_DELIM:
            return items, pos + 8
        if (group, elem) != _ITEM or length == 0xFFFFFFFF or pos + 8 + length > size:
            raise InvalidInstanceError(
                FailureReason.CANNOT_UNDERSTAND,
                f"malformed item in encapsulated Pixel Data at byte {pos} (PS3.5 A.4)",
            )
        items.append((pos, length))
        pos += 8 + length


def _encapsulated_layout(
    fp: BinaryIO, ds: Dataset, items: list[tuple[int, int]], ts: str
) -> FrameLayout | None:
    if not items:
        raise InvalidInstanceError(FailureReason.CANNOT_UNDERSTAND, "no Basic Offset Table item")
    bot_pos, bot_len = items[0]
    frags = items[1:]
    nframes = _number_of_frames(ds)
    if not frags:
        return None
    if nframes > len(frags) and ts not in VIDEO_TRANSFER_SYNTAXES:
        # PS3.5 A.4: a frame is one fragment or more, a fragment holds at most one frame
        # (a video stream, PS3.5 8.2.5-8.2.8, is the whole stream in any number of fragments).
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            f"Number of Frames is {nframes} but the encapsulated Pixel Data has {len(frags)}"
            " fragments (PS3.5 A.4: each frame is in one fragment or more)",
        )
    if nframes == 1:
        starts = [0]
    elif len(frags) == nframes:
        starts = list(range(nframes))
    else:
        offsets = _offset_table(fp, ds, bot_pos, bot_len)
        if offsets is None or len(offsets) != nframes:
            return None  # fragment-to-frame mapping unknown: decode path finds frames
        base = frags[0][0]
        by_pos = {p - base: i for i, (p, _) in enumerate(frags)}
        if any(o not in by_pos for o in offsets):
            return None
        starts = [by_pos[o] for o in offsets]
        if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
            return None  # unsorted or duplicate offsets: let the decoder find the frames
    bounds = [*starts, len(frags)]
    offs, lens = [], []
    for a, b in itertools.pairwise(bounds):
        first, last = frags[a], frags[b - 1]
        offs.append(first[0])
        lens.append(last[0] + 8 + last[1] - first[0])
    return FrameLayout(offs, lens, True)


def _offset_table(fp: BinaryIO, ds: Dataset, bot_pos: int, bot_len: int) -> list[int] | None:
    """Frame offsets from the Basic Offset Table or the Extended Offset Table (PS3.5 A.4)."""
    if bot_len:
        fp.seek(bot_pos + 8)
        raw = fp.read(bot_len)
        return list(struct.unpack(f"<{bot_len // 4}I", raw[: bot_len // 4 * 4]))
    eot = ds.get("ExtendedOffsetTable")
    if eot is not None and eot.value:
        raw = bytes(eot.value)
        return list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))
    return None


def _native_layout(ds: Dataset, value_at: int, length: int) -> FrameLayout | None:
    try:
        rows, cols = int(_value(ds, 0x00280010)), int(_value(ds, 0x00280011))
        spp = int(_value(ds, 0x00280002) or 1)
        bits = int(_value(ds, 0x00280100))
    except (AttributeError, TypeError, ValueError):
        return None
    nframes = _number_of_frames(ds)
    frame_bits = rows * cols * spp * bits
    if str(_value(ds, 0x00280004) or "") == "YBR_FULL_422":
        frame_bits = (
            rows * cols * 2 * bits
        )  # two luminance samples share Cb and Cr (PS3.3 C.7.6.3.1.2)
    if frame_bits % 8 or frame_bits == 0:
        return None  # bit-packed frames not on byte boundaries (e.g. 1-bit SEG)
    frame_len = frame_bits // 8
    if frame_len * nframes > length:
        return None
    offsets = [value_at + i * frame_len for i in range(nframes)]
    return FrameLayout(offsets, [frame_len] * nframes, False)
