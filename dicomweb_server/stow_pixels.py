"""The Pixel Data of a data set of a STOW-RS of metadata and bulk data (stow_json), from its
bulk data parts (PS3.18 10.5.1.4): which parts hold it (pixel_parts), the transfer syntax they
agree on (pixel_syntax: `application/octet-stream` native little endian, else one compressed
frame per part in the syntax of its media type, PS3.18 Table 8.7.3-2), then the element
written into the assembled Part-10 file, its header (pixel_header) and its value copied from
the spooled parts in chunks (write_pixel_values), never held in memory. Also what both
modules share: a spooled bulk data part (Bulk) and the failure of one data set (refused)."""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from dicomweb_server.dicom_json import first_number
from dicomweb_server.dicomfile import InvalidInstanceError
from dicomweb_server.errors import FailureReason
from dicomweb_server.media.mediatypes import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    VIDEO_TRANSFER_SYNTAXES,
    parse_content_type,
)
from dicomweb_server.media.negotiate import frame_syntax, jpeg_process

__all__ = [
    "Bulk",
    "pixel_header",
    "pixel_parts",
    "pixel_syntax",
    "refused",
    "write_pixel_values",
]

# Longest value of an explicit-length element (PS3.5 7.1.1: 0xFFFFFFFF means undefined).
_MAX_LENGTH = 0xFFFFFFFE
# Bytes per read when bulk data is copied into the assembled file.
_COPY_BYTES = 1024 * 1024
# Encapsulated Uncompressed Explicit VR Little Endian (PS3.5 A.4.11): one native frame per part.
_ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


@dataclass(frozen=True)
class Bulk:
    """A bulk data part spooled to disk: its file, its size, its Content-Type."""

    path: Path
    size: int
    content_type: str


def refused(
    reason: FailureReason, message: str, ds: Dataset | None = None, *, over_limit: bool = False
) -> InvalidInstanceError:
    """One data set that cannot become an instance: the STOW failure a Part-10 part that
    cannot be stored raises too, with the data set's UIDs when known; `over_limit` when it
    is a limit of the archive's that the request passed."""

    def uid(keyword: str) -> str | None:
        return str(ds.get(keyword, "")) or None if ds is not None else None

    return InvalidInstanceError(
        reason, message, sop_class=uid("SOPClassUID"), sop=uid("SOPInstanceUID"),
        over_limit=over_limit,
    )  # fmt: skip


def pixel_parts(pixel: Any, bulk: dict[str, list[Bulk]], ds: Dataset) -> list[Bulk]:
    """The bulk data parts of Pixel Data given by BulkDataURI; [] when it is inline or absent.
    Pixel Data has one value: a BulkDataURI or an InlineBinary, not both, not a "Value"."""
    if pixel is None:
        return []
    given = [
        k
        for k in ("BulkDataURI", "InlineBinary", "Value")
        if isinstance(pixel, dict) and k in pixel
    ]
    if not isinstance(pixel, dict) or len(given) > 1 or given == ["Value"]:
        raise refused(
            FailureReason.CANNOT_UNDERSTAND,
            "Pixel Data (7FE00010) must be a BulkDataURI or an InlineBinary (PS3.18 F.2.6, F.2.7)",
            ds,
        )
    if given != ["BulkDataURI"]:
        return []
    uri = pixel["BulkDataURI"]
    parts = bulk.get(uri) if isinstance(uri, str) else None
    if not parts:
        raise refused(FailureReason.CANNOT_UNDERSTAND, f"no bulk data part for {uri!r}", ds)
    return parts


def pixel_syntax(parts: list[Bulk], ds: Dataset) -> str:
    """The transfer syntax of the pixel data parts, which must agree."""
    syntaxes = {_part_syntax(p) for p in parts}
    if len(syntaxes) != 1 or None in syntaxes:
        raise refused(
            FailureReason.CANNOT_UNDERSTAND,
            "the Pixel Data parts must share one media type naming a transfer syntax "
            "(application/octet-stream is native little endian only): "
            + ", ".join(sorted({p.content_type for p in parts})),
            ds,
        )
    (ts,) = syntaxes
    assert ts is not None
    if ts == EXPLICIT_VR_LITTLE_ENDIAN:
        return ts
    if "Rows" not in ds:
        raise refused(
            FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "encapsulated Pixel Data needs the Image Pixel attributes (Rows, Columns, ...) in "
            "the metadata: this server does not read them from the frames",
            ds,
        )
    frames = _integer(ds, "NumberOfFrames") or 1
    if len(parts) != frames and ts not in VIDEO_TRANSFER_SYNTAXES:
        raise refused(  # found by review: it said "compressed" of uncompressed frames too
            FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"{len(parts)} frame parts for Number of Frames {frames}: one part per frame",
            ds,
        )
    if ts == _ENCAPSULATED_UNCOMPRESSED:
        _check_native_frames(parts, ds)
    return ts


def _check_native_frames(parts: list[Bulk], ds: Dataset) -> None:
    """Refuse (0xC000) a frame part of Encapsulated Uncompressed Explicit VR Little Endian
    that is not one frame's native bytes: PS3.5 A.4.11, one fragment per frame holding the
    frame as Explicit VR Little Endian would (Rows x Columns x Samples per Pixel x Bits
    Allocated / 8 bytes, a byte more when that is odd: the fragment's padding; YBR_FULL_422
    has 2 samples a pixel). Found by review: a part of any size was stored, and its frames
    could not be decoded."""
    keys = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")
    dims = [_integer(ds, k) or 0 for k in keys]
    if min(dims) <= 0:
        raise refused(FailureReason.CANNOT_UNDERSTAND, f"{', '.join(keys)} are required", ds)
    rows, columns, samples, bits = dims
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # Y Y CB CR for each pair of pixels (PS3.3 C.7.6.3.1.2), as pydicom reads it
    size = (rows * columns * samples * bits + 7) // 8
    for number, part in enumerate(parts, 1):
        if part.size not in (size, size + size % 2):
            raise refused(
                FailureReason.CANNOT_UNDERSTAND,
                f"frame {number} is {part.size} bytes, not the {size} of one uncompressed"
                " frame (Rows x Columns x SamplesPerPixel x BitsAllocated / 8, PS3.5 A.4.11)",
                ds,
            )


def _part_syntax(part: Bulk) -> str | None:
    """The transfer syntax of a pixel data part: named by its media type; for `image/jpeg`
    without a `transfer-syntax`, read from the codestream's frame header, since clients
    send camera JPEG (Baseline) as often as the RESTful default (Lossless SV1, PS3.18 Table
    8.7.3-5)."""
    rng = parse_content_type(part.content_type)
    if rng.essence != "image/jpeg" or "transfer-syntax" in rng.params:
        return frame_syntax(part.content_type)
    with part.path.open("rb") as fh:
        return jpeg_process(fh)


def _integer(ds: Dataset, keyword: str) -> int | None:
    """The first value of an integer attribute, None when absent or not a whole number."""
    n = first_number(ds, keyword)
    return int(n) if n is not None and n == int(n) else None


def pixel_header(parts: list[Bulk], ts: str, ds: Dataset) -> bytes:
    """The Pixel Data (7FE0,0010) element header, explicit VR little endian: native with its
    length, else encapsulated (undefined length) with an empty Basic Offset Table (PS3.5 A.4).
    A value too long for a 32-bit length is refused."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    if ts != EXPLICIT_VR_LITTLE_ENDIAN:
        if any(p.size + p.size % 2 > _MAX_LENGTH for p in parts):
            raise refused(FailureReason.CANNOT_UNDERSTAND, "a frame is 4 GiB or more", ds)
        return tag + b"OB\x00\x00" + b"\xff\xff\xff\xff" + _ITEM + b"\x00\x00\x00\x00"
    size = sum(p.size for p in parts)
    if size + size % 2 > _MAX_LENGTH:
        raise refused(FailureReason.CANNOT_UNDERSTAND, "native Pixel Data of 4 GiB or more", ds)
    vr = b"OW" if (_integer(ds, "BitsAllocated") or 16) > 8 else b"OB"
    return tag + vr + b"\x00\x00" + struct.pack("<I", size + size % 2)


def write_pixel_values(fh: BinaryIO, parts: list[Bulk], ts: str) -> None:
    """The value after pixel_header: the native bytes (padded to even length), or one
    fragment per part and the sequence delimiter."""
    if ts == EXPLICIT_VR_LITTLE_ENDIAN:
        for p in parts:
            _copy(p.path, fh)
        fh.write(b"\x00" * (sum(p.size for p in parts) % 2))
        return
    for p in parts:
        fh.write(_ITEM + struct.pack("<I", p.size + p.size % 2))
        _copy(p.path, fh)
        fh.write(b"\x00" * (p.size % 2))
    fh.write(_SEQUENCE_END + b"\x00\x00\x00\x00")


def _copy(src: Path, fh: BinaryIO) -> None:
    with src.open("rb") as data:
        shutil.copyfileobj(data, fh, _COPY_BYTES)
