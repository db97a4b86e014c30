"""STOW-RS of metadata and bulk data (PS3.18 10.5.1.4): `multipart/related;
type="application/dicom+json"`, one part holding a JSON array of DICOM JSON data sets, the
other parts the values their BulkDataURIs name (each part's Content-Location is the URI).

Each data set becomes a Part-10 file, which is then stored exactly as a STOW part is
(ingest.store_path): the same checks, the same duplicates rule, the same failure reasons.
Pixel Data comes from its bulk data part(s): `application/octet-stream` is native little
endian pixel data; an image or video media type is one compressed frame per part (all parts
under the same Content-Location, in frame order), in the transfer syntax of the part's
`transfer-syntax` parameter or the media type's default (PS3.18 Table 8.7.3-2). Bulk data is
spooled to disk as it arrives and copied into the file in chunks: memory holds the metadata
part (at most MAX_JSON_METADATA_BYTES) and non-pixel bulk values (at most
MAX_JSON_BULK_VALUE_BYTES each), never the pixel data.
"""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from dicomweb_server.blobstore import BlobWriter
from dicomweb_server.dicom_json import InstanceOutcome, JsonDict, dataset_from_json
from dicomweb_server.errors import BadRequestError, FailureReason, PayloadTooLargeError
from dicomweb_server.ingest import Services, store_path
from dicomweb_server.media import (
    APPLICATION_DICOM_JSON,
    EXPLICIT_VR_LITTLE_ENDIAN,
    frame_syntax,
    parse_content_type,
)
from dicomweb_server.multipart import Event, PartBegin, PartData, PartEnd

__all__ = ["MAX_JSON_BULK_VALUE_BYTES", "MAX_JSON_METADATA_BYTES", "store_json_parts"]

# Largest metadata part: it is parsed whole, in memory. Above it: 413.
MAX_JSON_METADATA_BYTES = 16 * 1024 * 1024
# Largest bulk data value other than Pixel Data (an encapsulated document, an overlay): it is
# put into the data set in memory. Above it: that instance fails (0xA700, out of resources).
MAX_JSON_BULK_VALUE_BYTES = 64 * 1024 * 1024
# Bytes per read when bulk data is copied into the assembled file.
_COPY_BYTES = 1024 * 1024
_PIXEL_DATA = "7FE00010"
_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


@dataclass(frozen=True)
class _Bulk:
    path: Path
    size: int
    content_type: str


class _Refused(Exception):
    """One data set that cannot become an instance: its STOW failure."""

    def __init__(self, reason: FailureReason, message: str, ds: Dataset | None = None) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message
        self.uids = (
            (str(ds.get("SOPClassUID", "")) or None, str(ds.get("SOPInstanceUID", "")) or None)
            if ds is not None
            else (None, None)
        )


async def store_json_parts(
    events: AsyncIterator[Event], ctx: Services, expected_study: str | None
) -> list[InstanceOutcome]:
    """Store the data sets of a metadata-and-bulk-data STOW body, outcomes in array order."""
    metadata: bytearray | None = None
    bulk: dict[str, list[_Bulk]] = {}
    writers: list[BlobWriter] = []
    current: tuple[str, str] | None = None  # the bulk data part being spooled
    try:
        async for event in events:
            if isinstance(event, PartBegin):
                current = _part_kind(event.headers)
                if current is None:
                    if metadata is not None:
                        raise BadRequestError("more than one application/dicom+json part")
                    metadata = bytearray()
                else:
                    writers.append(await ctx.blobs.open_writer())
            elif isinstance(event, PartData):
                if current is not None:
                    await writers[-1].write(event.data)
                elif metadata is not None:
                    metadata += event.data
                    if len(metadata) > MAX_JSON_METADATA_BYTES:
                        raise PayloadTooLargeError(
                            f"the metadata part is over {MAX_JSON_METADATA_BYTES} bytes"
                        )
            elif isinstance(event, PartEnd) and current is not None:
                writer = writers[-1]
                await writer.close()
                location, ctype = current
                bulk.setdefault(location, []).append(_Bulk(writer.path, writer.size, ctype))
        if metadata is None:
            raise BadRequestError("no application/dicom+json part: no metadata to store")
        docs = _documents(bytes(metadata))
        return [await _store_one(doc, bulk, ctx, expected_study) for doc in docs]
    finally:
        with anyio.CancelScope(shield=True):
            for writer in writers:
                await ctx.blobs.discard(writer)


def _part_kind(headers: dict[str, str]) -> tuple[str, str] | None:
    """None for the metadata part; (Content-Location, Content-Type) for a bulk data part."""
    ctype = headers.get("content-type", "")
    if ctype and parse_content_type(ctype).essence == APPLICATION_DICOM_JSON:
        return None
    location = headers.get("content-location")
    if not location:
        raise BadRequestError(
            "a bulk data part has no Content-Location: it must name the BulkDataURI whose "
            "value it is (PS3.18 10.5.1.4)"
        )
    return location, ctype or "application/octet-stream"


def _documents(metadata: bytes) -> list[JsonDict]:
    try:
        docs = json.loads(metadata)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the metadata part is not JSON: {exc}") from None
    if not isinstance(docs, list) or not docs:
        raise BadRequestError("the metadata part must be a JSON array of DICOM JSON data sets")
    return docs


async def _store_one(
    doc: Any, bulk: dict[str, list[_Bulk]], ctx: Services, expected_study: str | None
) -> InstanceOutcome:
    out = ctx.scratch_dir / f"stow-json-{uuid.uuid4().hex}.dcm"
    try:
        await anyio.to_thread.run_sync(_assemble, doc, bulk, out, limiter=ctx.limiter)
        return await store_path(ctx, out, expected_study)
    except _Refused as exc:
        return InstanceOutcome(*exc.uids, exc.reason, reason=exc.message)
    except OSError as exc:
        reason = FailureReason.OUT_OF_RESOURCES
        return InstanceOutcome(None, None, reason, reason=f"storage: {exc.strerror}")
    finally:
        await anyio.to_thread.run_sync(lambda: out.unlink(missing_ok=True))


def _assemble(doc: Any, bulk: dict[str, list[_Bulk]], out: Path) -> None:
    """Write the Part-10 file of one data set (a worker thread): the data set but its Pixel
    Data through pydicom, then the Pixel Data element copied from its bulk data parts."""
    if not isinstance(doc, dict):
        raise _Refused(FailureReason.CANNOT_UNDERSTAND, "a data set must be a JSON object")
    pixel = doc.get(_PIXEL_DATA)
    rest = {k: v for k, v in doc.items() if k != _PIXEL_DATA}
    try:
        ds = dataset_from_json(rest, _bulk_reader(bulk))
    except _Refused:
        raise
    except Exception as exc:  # untrusted input: any conversion failure is the client's data
        raise _Refused(FailureReason.CANNOT_UNDERSTAND, f"not DICOM JSON: {exc}") from None
    parts = _pixel_parts(pixel, bulk, ds)
    ts = _syntax_of(parts, ds) if parts else EXPLICIT_VR_LITTLE_ENDIAN
    inline = pixel.get("InlineBinary") if isinstance(pixel, dict) else None
    if inline is not None:
        ds.PixelData = dataset_from_json({_PIXEL_DATA: pixel}).PixelData
    head = Dataset({t: e for t, e in ds.items() if t < 0x7FE00010 or inline is not None})
    tail = Dataset({t: e for t, e in ds.items() if t > 0x7FE00010 and inline is None})
    head.file_meta = FileMetaDataset()
    head.file_meta.TransferSyntaxUID = UID(ts)
    head.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    head.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    with out.open("wb") as fh:
        try:
            pydicom.dcmwrite(fh, head, enforce_file_format=True)
        except Exception as exc:
            raise _Refused(FailureReason.CANNOT_UNDERSTAND, f"cannot encode: {exc}", ds) from None
        if parts:
            _write_pixel_data(fh, parts, ts, ds)
        if len(tail):
            buf = DicomBytesIO()
            buf.is_little_endian, buf.is_implicit_VR = True, False
            write_dataset(buf, tail)
            fh.write(buf.getvalue())


def _bulk_reader(bulk: dict[str, list[_Bulk]]) -> Any:
    def read(_tag: str, _vr: str, uri: str) -> bytes:
        found = bulk.get(uri)
        if not found:
            raise _Refused(FailureReason.CANNOT_UNDERSTAND, f"no bulk data part for {uri!r}")
        if sum(b.size for b in found) > MAX_JSON_BULK_VALUE_BYTES:
            raise _Refused(
                FailureReason.OUT_OF_RESOURCES,
                f"bulk data {uri!r} is over {MAX_JSON_BULK_VALUE_BYTES} bytes",
            )
        return b"".join(b.path.read_bytes() for b in found)

    return read


def _pixel_parts(pixel: Any, bulk: dict[str, list[_Bulk]], ds: Dataset) -> list[_Bulk]:
    if not isinstance(pixel, dict) or "BulkDataURI" not in pixel:
        return []
    uri = pixel["BulkDataURI"]
    parts = bulk.get(uri) if isinstance(uri, str) else None
    if not parts:
        raise _Refused(FailureReason.CANNOT_UNDERSTAND, f"no bulk data part for {uri!r}", ds)
    return parts


def _syntax_of(parts: list[_Bulk], ds: Dataset) -> str:
    """The transfer syntax of the pixel data parts, which must agree."""
    syntaxes = {frame_syntax(p.content_type) for p in parts}
    if len(syntaxes) != 1 or None in syntaxes:
        raise _Refused(
            FailureReason.CANNOT_UNDERSTAND,
            "the Pixel Data parts must share one media type naming a transfer syntax: "
            + ", ".join(sorted({p.content_type for p in parts})),
            ds,
        )
    (ts,) = syntaxes
    assert ts is not None
    if ts != EXPLICIT_VR_LITTLE_ENDIAN and "Rows" not in ds:
        raise _Refused(
            FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "compressed Pixel Data needs the Image Pixel attributes (Rows, Columns, ...) in the "
            "metadata: this server does not read them from the codestream",
            ds,
        )
    return ts


def _write_pixel_data(fh: BinaryIO, parts: list[_Bulk], ts: str, ds: Dataset) -> None:
    """Pixel Data (7FE0,0010), explicit VR little endian: native from one octet-stream part,
    else encapsulated, one fragment per part after an empty Basic Offset Table (PS3.5 A.4)."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    if ts == EXPLICIT_VR_LITTLE_ENDIAN:
        size = sum(p.size for p in parts)
        vr = b"OW" if int(ds.get("BitsAllocated") or 16) > 8 else b"OB"
        fh.write(tag + vr + b"\x00\x00" + struct.pack("<I", size + size % 2))
        for p in parts:
            _copy(p.path, fh)
        fh.write(b"\x00" * (size % 2))
        return
    fh.write(tag + b"OB\x00\x00" + b"\xff\xff\xff\xff" + _ITEM + b"\x00\x00\x00\x00")
    for p in parts:
        fh.write(_ITEM + struct.pack("<I", p.size + p.size % 2))
        _copy(p.path, fh)
        fh.write(b"\x00" * (p.size % 2))
    fh.write(_SEQUENCE_END + b"\x00\x00\x00\x00")


def _copy(src: Path, fh: BinaryIO) -> None:
    with src.open("rb") as data:
        shutil.copyfileobj(data, fh, _COPY_BYTES)
