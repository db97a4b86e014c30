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

import functools
import json
import re
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element, write_dataset
from pydicom.uid import UID
from pydicom.valuerep import AMBIGUOUS_VR

from dicomweb_server.blobstore.files import BlobWriter, scratch_file
from dicomweb_server.dicom_json import (
    BULK_VRS,
    JsonDict,
    dataset_from_json,
    first_number,
    tag_name,
)
from dicomweb_server.dicom_xml import dataset_from_xml
from dicomweb_server.dicomfile import MAX_SEQUENCE_DEPTH, InvalidInstanceError
from dicomweb_server.errors import BadRequestError, FailureReason, PayloadTooLargeError
from dicomweb_server.ingest import Services, refusal, storage_failure, store_path
from dicomweb_server.media.mediatypes import (
    APPLICATION_DICOM_JSON,
    EXPLICIT_VR_LITTLE_ENDIAN,
    VIDEO_TRANSFER_SYNTAXES,
    parse_content_type,
)
from dicomweb_server.media.negotiate import frame_syntax, jpeg_process
from dicomweb_server.multipart import Event, PartBegin, PartData, PartEnd
from dicomweb_server.response_json import InstanceOutcome

__all__ = [
    "MAX_JSON_BULK_REUSE_BYTES",
    "MAX_JSON_BULK_VALUE_BYTES",
    "MAX_JSON_DATASETS",
    "MAX_JSON_METADATA_BYTES",
    "MAX_JSON_SEQUENCE_DEPTH",
    "store_json_parts",
]

# Largest metadata part: it is parsed whole, in memory. Above it: 413.
MAX_JSON_METADATA_BYTES = 16 * 1024 * 1024
# Bulk data of one data set other than Pixel Data (an encapsulated document, an overlay), all
# values together: it is put into the data set in memory. Above: that instance fails (0xA700).
MAX_JSON_BULK_VALUE_BYTES = 64 * 1024 * 1024
# Bulk data bytes the data sets of one request may copy beyond what the request sent: a part
# named by several data sets is copied into each, and without a bound one 4 MiB part named
# by 10,000 data sets wrote 40 GB. Above it: the data set that passes it fails (0xA700).
MAX_JSON_BULK_REUSE_BYTES = 64 * 1024 * 1024
# Longest value of an explicit-length element (PS3.5 7.1.1: 0xFFFFFFFF means undefined).
_MAX_LENGTH = 0xFFFFFFFE
# Data sets in one metadata part, at most (as multipart.MAX_PARTS for Part-10 parts). Above: 413.
MAX_JSON_DATASETS = 10_000
# Sequences nested in a data set, at most, JSON or XML (dicom_xml.MAX_XML_DEPTH lets 125 levels
# through): deeper, pydicom's recursive writer overflows. Above: that data set fails (0xC000).
# The same as for a Part-10 instance (dicomfile.MAX_SEQUENCE_DEPTH).
MAX_JSON_SEQUENCE_DEPTH = MAX_SEQUENCE_DEPTH
# Bytes per read when bulk data is copied into the assembled file.
_COPY_BYTES = 1024 * 1024
_PIXEL_DATA = "7FE00010"
# Encapsulated Uncompressed Explicit VR Little Endian (PS3.5 A.4.11): one native frame per part.
_ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


@dataclass(frozen=True)
class _Bulk:
    path: Path
    size: int
    content_type: str


class _Budget:
    """Bulk data bytes the data sets of one request may still copy into their instances:
    what the request sent, plus MAX_JSON_BULK_REUSE_BYTES."""

    def __init__(self, bulk: dict[str, list[_Bulk]]) -> None:
        self.left = sum(b.size for parts in bulk.values() for b in parts)
        self.left += MAX_JSON_BULK_REUSE_BYTES

    def take(self, n: int, ds: Dataset | None = None) -> None:
        self.left -= n
        if self.left < 0:
            raise _refused(
                FailureReason.OUT_OF_RESOURCES,
                "the data sets of this request name its bulk data more than once, over"
                f" {MAX_JSON_BULK_REUSE_BYTES} bytes more than it sent",
                ds,
                over_limit=True,
            )


# Base64 (RFC 4648 4), as InlineBinary holds it (PS3.18 F.2.7); white space is ignored, as
# XML's base64Binary allows.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def _check_inline_binary(node: JsonDict) -> None:
    """Every InlineBinary of a data set (nested ones too) is base64: pydicom decodes what it
    can of anything else and drops the rest, so `QUJD!!` was stored as `ABC`."""
    for tag, element in node.items():
        if not isinstance(element, dict):
            continue
        inline = element.get("InlineBinary")
        if inline is not None and not (
            isinstance(inline, str) and _BASE64.fullmatch("".join(inline.split()))
        ):
            raise _refused(
                FailureReason.CANNOT_UNDERSTAND,
                f"the InlineBinary of {tag} is not base64 (PS3.18 F.2.7)",
            )
        for item in element.get("Value") or []:
            if element.get("vr") == "SQ" and isinstance(item, dict):
                _check_inline_binary(item)


def _refused(
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


async def store_json_parts(
    events: AsyncIterator[Event],
    ctx: Services,
    expected_study: str | None,
    metadata_type: str = APPLICATION_DICOM_JSON,
    known: list[InstanceOutcome] | None = None,
) -> list[InstanceOutcome]:
    """Store the data sets of a metadata-and-bulk-data STOW body, outcomes in the order of
    the metadata: one `application/dicom+json` part holding an array of data sets, or
    (`metadata_type` APPLICATION_DICOM_XML) one `application/dicom+xml` part per data set,
    each a NativeDicomModel (PS3.18 10.5.1.4, PS3.19 A.1). MAX_JSON_METADATA_BYTES bounds
    the metadata parts together. Each outcome is also appended to `known` as it is known
    (as ingest.store_parts does: what a request that then fails stored)."""
    known = [] if known is None else known
    metadata: list[bytearray] = []
    bulk: dict[str, list[_Bulk]] = {}
    writers: list[BlobWriter] = []
    try:
        await _receive(events, ctx, metadata_type, metadata, bulk, writers)
        if not metadata:
            raise BadRequestError(f"no {metadata_type} part: no metadata to store")
        if metadata_type == APPLICATION_DICOM_JSON:
            docs = _documents(bytes(metadata[0]))
        else:
            docs = await anyio.to_thread.run_sync(_xml_documents, metadata, limiter=ctx.limiter)
        budget = _Budget(bulk)
        outcomes: list[InstanceOutcome] = []
        for doc in docs:
            outcomes.append(await _store_one(doc, bulk, budget, ctx, expected_study))
            known.append(outcomes[-1])
        return outcomes
    finally:
        with anyio.CancelScope(shield=True):
            for writer in writers:
                await ctx.blobs.discard(writer)


async def _receive(
    events: AsyncIterator[Event],
    ctx: Services,
    metadata_type: str,
    metadata: list[bytearray],
    bulk: dict[str, list[_Bulk]],
    writers: list[BlobWriter],
) -> None:
    """Read the body: each metadata part into `metadata`, each bulk data part spooled into
    a blob writer (added to `writers` as it opens: the caller discards them all) and listed
    in `bulk` under its Content-Location."""
    size = 0
    current: tuple[str, str] | None = None  # the bulk data part being spooled
    async for event in events:
        if isinstance(event, PartBegin):
            current = _part_kind(event.headers, metadata_type)
            if current is None:
                if metadata and metadata_type == APPLICATION_DICOM_JSON:
                    raise BadRequestError("more than one application/dicom+json part")
                metadata.append(bytearray())
            else:
                writers.append(await ctx.blobs.open_writer(hashed=False))
        elif isinstance(event, PartData):
            if current is not None:
                await writers[-1].write(event.data)
            elif metadata:
                metadata[-1] += event.data
                size += len(event.data)
                if size > MAX_JSON_METADATA_BYTES:
                    what = "part is" if len(metadata) == 1 else "parts are"
                    raise PayloadTooLargeError(
                        f"the metadata {what} over {MAX_JSON_METADATA_BYTES} bytes"
                    )
        elif isinstance(event, PartEnd) and current is not None:
            writer = writers[-1]
            await writer.close()
            location, ctype = current
            bulk.setdefault(location, []).append(_Bulk(writer.path, writer.size, ctype))


def _xml_documents(parts: list[bytearray]) -> list[JsonDict]:
    """The data sets of the XML metadata parts, all read before any is stored (400 when one
    is not a NativeDicomModel)."""
    if len(parts) > MAX_JSON_DATASETS:
        raise PayloadTooLargeError(
            f"{len(parts)} data sets in one request; at most {MAX_JSON_DATASETS}"
        )
    return [dataset_from_xml(bytes(part)) for part in parts]


def _part_kind(headers: dict[str, str], metadata_type: str) -> tuple[str, str] | None:
    """None for a metadata part; (Content-Location, Content-Type) for a bulk data part."""
    ctype = headers.get("content-type", "")
    if ctype and parse_content_type(ctype).essence == metadata_type:
        return None
    location = headers.get("content-location")
    if not location:
        raise BadRequestError(
            "a bulk data part has no Content-Location: it must name the BulkDataURI whose "
            "value it is (PS3.18 10.5.1.4)"
        )
    return location, ctype or "application/octet-stream"


def _documents(metadata: bytes) -> list[JsonDict]:
    """The data sets of the metadata part, checked before any is stored: a JSON array of at
    most MAX_JSON_DATASETS objects (400 / 413)."""
    try:
        docs = json.loads(metadata)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequestError(f"the metadata part is not JSON: {_first_line(exc)}") from None
    if not isinstance(docs, list) or not docs:
        raise BadRequestError("the metadata part must be a JSON array of DICOM JSON data sets")
    if len(docs) > MAX_JSON_DATASETS:
        raise PayloadTooLargeError(
            f"{len(docs)} data sets in one request; at most {MAX_JSON_DATASETS}"
        )
    if not all(isinstance(doc, dict) for doc in docs):
        raise BadRequestError("every element of the metadata array must be a JSON object")
    return docs


def _first_line(exc: BaseException) -> str:
    """An exception's message as a failure reason: its first line, not a traceback."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


async def _store_one(
    doc: JsonDict,
    bulk: dict[str, list[_Bulk]],
    budget: _Budget,
    ctx: Services,
    expected_study: str | None,
) -> InstanceOutcome:
    out: Path | None = None
    try:
        out = scratch_file(ctx.scratch_dir, ".dcm")
        await anyio.to_thread.run_sync(_assemble, doc, bulk, budget, out, limiter=ctx.limiter)
        return await store_path(ctx, out, expected_study)
    except InvalidInstanceError as exc:
        return refusal(exc)
    except OSError as exc:  # the same rule as for a Part-10 part's bytes
        return storage_failure(exc, "could not assemble a STOW-RS instance from its metadata")
    finally:
        if out is not None:
            with anyio.CancelScope(shield=True):  # also when the client went away meanwhile
                await anyio.to_thread.run_sync(functools.partial(out.unlink, missing_ok=True))


def _assemble(doc: JsonDict, bulk: dict[str, list[_Bulk]], budget: _Budget, out: Path) -> None:
    """Write the Part-10 file of one data set (a worker thread): everything but a bulk data
    Pixel Data encoded by pydicom (in memory: the metadata and the non-pixel bulk values,
    both bounded), then the Pixel Data element copied from its parts, then anything after it.
    What the client sent wrong is an InvalidInstanceError; OSError is the disk's."""
    pixel = doc.get(_PIXEL_DATA)
    ds: Dataset | None = None
    try:
        _check_inline_binary(doc)
        ds = dataset_from_json(
            {k: v for k, v in doc.items() if k != _PIXEL_DATA}, _bulk_reader(bulk, budget)
        )
        parts = _pixel_parts(pixel, bulk, ds)
        budget.take(sum(p.size for p in parts), ds)
        if pixel is not None and not parts:  # inline, or no value: pydicom encodes it
            ds[0x7FE00010] = dataset_from_json({_PIXEL_DATA: pixel})[0x7FE00010]
        _check_encodable(ds)
        ts = _syntax_of(parts, ds) if parts else EXPLICIT_VR_LITTLE_ENDIAN
        head = Dataset({t: e for t, e in ds.items() if not parts or t < 0x7FE00010})
        tail = Dataset({t: e for t, e in ds.items() if parts and t > 0x7FE00010})
        head.file_meta = _file_meta(ts, ds)
        encoded = DicomBytesIO()
        pydicom.dcmwrite(encoded, head, enforce_file_format=True)
        pixel_header = _pixel_header(parts, ts, ds) if parts else b""
        after = DicomBytesIO()
        after.is_little_endian, after.is_implicit_VR = True, False
        write_dataset(after, tail)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # untrusted input: any failure to encode is the client's data
        raise _refused(
            FailureReason.CANNOT_UNDERSTAND, f"cannot encode the data set: {_first_line(exc)}", ds
        ) from None
    with out.open("wb") as fh:
        fh.write(encoded.getvalue())
        if parts:
            fh.write(pixel_header)
            _write_pixel_values(fh, parts, ts)
        fh.write(after.getvalue())


def _check_encodable(ds: Dataset) -> None:
    """Encode every element on its own, items' elements too (a loop, not recursion), before
    the data set is written whole. pydicom's writer re-raises a failure in each enclosing
    sequence with the message and traceback so far, so the message doubles with each level:
    a US value of 70000 twelve items deep took 4 GB and eight seconds, thirteen killed the
    server, and so did its RecursionError under 250 levels of valid items (found by
    fuzzing). Here the failure is one element's, named by its tag, and sequences nest at
    most MAX_JSON_SEQUENCE_DEPTH levels. An ambiguous VR (`US or SS`) is resolved first, as
    dcmwrite would, so that its value is checked too: skipped, one the writer then could
    not resolve or encode deep in sequences took the doubling path."""
    # (item, its Specific Character Set or its parent's, depth, the item and its ancestors)
    stack: list[tuple[Dataset, Any, int, list[Dataset]]] = [(ds, None, 0, [ds])]
    while stack:
        item, encodings, depth, ancestors = stack.pop()
        encodings = item.get("SpecificCharacterSet", encodings)
        for tag in item.keys():
            if tag.element == 0 and tag.group > 6:
                continue  # a retired Group Length: dcmwrite leaves it out (PS3.5 7.2)
            elem = item.get_item(tag)  # as it is: a kept DS or IS text stays raw
            if elem.VR == "SQ" and depth == MAX_JSON_SEQUENCE_DEPTH:
                raise _refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    f"sequences nested deeper than {MAX_JSON_SEQUENCE_DEPTH} levels"
                    f" in {tag_name(_top_sequence(ds, ancestors[-2]))}",
                    ds,
                )
            if elem.VR == "SQ":
                stack.extend((c, encodings, depth + 1, [c, *ancestors]) for c in elem.value)
                continue
            if elem.VR in AMBIGUOUS_VR:
                _resolve_vr(elem, ancestors, ds)
            if not (elem.VR in BULK_VRS and isinstance(elem.value, bytes)):
                _encode_alone(elem, encodings, ds)  # bytes are written as they are


def _top_sequence(ds: Dataset, item: Dataset) -> int:
    """The tag of the top-level sequence of `ds` holding `item` (an item of the first level)."""
    return next(
        elem.tag for elem in ds if elem.VR == "SQ" and any(child is item for child in elem.value)
    )


def _resolve_vr(elem: Any, ancestors: list[Dataset], ds: Dataset) -> None:
    """Resolve an ambiguous VR in place as dcmwrite does (from Pixel Representation, LUT
    Descriptor... of the item or its ancestors, PS3.5 Annex A): dcmwrite then leaves it."""
    try:
        correct_ambiguous_vr_element(elem, ancestors[0], True, ancestors)
    except Exception as exc:  # the client's data set: one failure, with its tag
        raise _refused(
            FailureReason.CANNOT_UNDERSTAND,
            f"cannot resolve the VR {_vr_text(elem)} of {elem.tag}: {_first_line(exc)}",
            ds,
        ) from None


def _encode_alone(elem: Any, encodings: Any, ds: Dataset) -> None:
    scratch = DicomBytesIO()
    scratch.is_little_endian, scratch.is_implicit_VR = True, False
    try:
        write_data_element(scratch, elem, encodings)
    except Exception as exc:  # the client's value: one failure, with its tag
        raise _refused(
            FailureReason.CANNOT_UNDERSTAND,
            f"cannot encode {elem.tag} (VR {_vr_text(elem)}): {_first_line(exc)}",
            ds,
        ) from None


def _vr_text(elem: Any) -> str:
    """An element's VR for a failure reason: as the client sent it, which may be any string
    (a 100 KB one made a 100 KB reason), cut to the longest VR pydicom knows."""
    vr = str(elem.VR)
    return vr if len(vr) <= len("US or SS or OW") else f"{vr[: len('US or SS or OW')]}..."


def _file_meta(ts: str, ds: Dataset) -> FileMetaDataset:
    """The File Meta Information _assemble writes: the transfer syntax, and the SOP Class and
    Instance UIDs of the data set (empty when it has none)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(ts)
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    return meta


def _bulk_reader(bulk: dict[str, list[_Bulk]], budget: _Budget) -> Any:
    """BulkDataURI -> value, for pydicom's from_json: what one data set reads in all is at
    most MAX_JSON_BULK_VALUE_BYTES (a URI named many times counts each time), and what the
    request's data sets read comes out of its budget."""
    read_so_far = 0

    def read(_tag: str, _vr: str, uri: str) -> bytes:
        nonlocal read_so_far
        found = bulk.get(uri)
        if not found:
            raise _refused(FailureReason.CANNOT_UNDERSTAND, f"no bulk data part for {uri!r}")
        budget.take(sum(b.size for b in found))
        read_so_far += sum(b.size for b in found)
        if read_so_far > MAX_JSON_BULK_VALUE_BYTES:
            raise _refused(
                FailureReason.OUT_OF_RESOURCES,
                f"the bulk data of one data set is over {MAX_JSON_BULK_VALUE_BYTES} bytes "
                "(Pixel Data aside)",
                over_limit=True,
            )
        return b"".join(b.path.read_bytes() for b in found)

    return read


def _pixel_parts(pixel: Any, bulk: dict[str, list[_Bulk]], ds: Dataset) -> list[_Bulk]:
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
        raise _refused(
            FailureReason.CANNOT_UNDERSTAND,
            "Pixel Data (7FE00010) must be a BulkDataURI or an InlineBinary (PS3.18 F.2.6, F.2.7)",
            ds,
        )
    if given != ["BulkDataURI"]:
        return []
    uri = pixel["BulkDataURI"]
    parts = bulk.get(uri) if isinstance(uri, str) else None
    if not parts:
        raise _refused(FailureReason.CANNOT_UNDERSTAND, f"no bulk data part for {uri!r}", ds)
    return parts


def _syntax_of(parts: list[_Bulk], ds: Dataset) -> str:
    """The transfer syntax of the pixel data parts, which must agree."""
    syntaxes = {_part_syntax(p) for p in parts}
    if len(syntaxes) != 1 or None in syntaxes:
        raise _refused(
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
        raise _refused(
            FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "encapsulated Pixel Data needs the Image Pixel attributes (Rows, Columns, ...) in "
            "the metadata: this server does not read them from the frames",
            ds,
        )
    frames = _integer(ds, "NumberOfFrames") or 1
    if len(parts) != frames and ts not in VIDEO_TRANSFER_SYNTAXES:
        raise _refused(  # found by review: it said "compressed" of uncompressed frames too
            FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"{len(parts)} frame parts for Number of Frames {frames}: one part per frame",
            ds,
        )
    if ts == _ENCAPSULATED_UNCOMPRESSED:
        _check_native_frames(parts, ds)
    return ts


def _check_native_frames(parts: list[_Bulk], ds: Dataset) -> None:
    """Refuse (0xC000) a frame part of Encapsulated Uncompressed Explicit VR Little Endian
    that is not one frame's native bytes: PS3.5 A.4.11, one fragment per frame holding the
    frame as Explicit VR Little Endian would (Rows x Columns x Samples per Pixel x Bits
    Allocated / 8 bytes, a byte more when that is odd: the fragment's padding; YBR_FULL_422
    has 2 samples a pixel). Found by review: a part of any size was stored, and its frames
    could not be decoded."""
    keys = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")
    dims = [_integer(ds, k) or 0 for k in keys]
    if min(dims) <= 0:
        raise _refused(FailureReason.CANNOT_UNDERSTAND, f"{', '.join(keys)} are required", ds)
    rows, columns, samples, bits = dims
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # Y Y CB CR for each pair of pixels (PS3.3 C.7.6.3.1.2), as pydicom reads it
    size = (rows * columns * samples * bits + 7) // 8
    for number, part in enumerate(parts, 1):
        if part.size not in (size, size + size % 2):
            raise _refused(
                FailureReason.CANNOT_UNDERSTAND,
                f"frame {number} is {part.size} bytes, not the {size} of one uncompressed"
                " frame (Rows x Columns x SamplesPerPixel x BitsAllocated / 8, PS3.5 A.4.11)",
                ds,
            )


def _part_syntax(part: _Bulk) -> str | None:
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


def _pixel_header(parts: list[_Bulk], ts: str, ds: Dataset) -> bytes:
    """The Pixel Data (7FE0,0010) element header, explicit VR little endian: native with its
    length, else encapsulated (undefined length) with an empty Basic Offset Table (PS3.5 A.4).
    A value too long for a 32-bit length is refused."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    if ts != EXPLICIT_VR_LITTLE_ENDIAN:
        if any(p.size + p.size % 2 > _MAX_LENGTH for p in parts):
            raise _refused(FailureReason.CANNOT_UNDERSTAND, "a frame is 4 GiB or more", ds)
        return tag + b"OB\x00\x00" + b"\xff\xff\xff\xff" + _ITEM + b"\x00\x00\x00\x00"
    size = sum(p.size for p in parts)
    if size + size % 2 > _MAX_LENGTH:
        raise _refused(FailureReason.CANNOT_UNDERSTAND, "native Pixel Data of 4 GiB or more", ds)
    vr = b"OW" if (_integer(ds, "BitsAllocated") or 16) > 8 else b"OB"
    return tag + vr + b"\x00\x00" + struct.pack("<I", size + size % 2)


def _write_pixel_values(fh: BinaryIO, parts: list[_Bulk], ts: str) -> None:
    """The value after _pixel_header: the native bytes (padded to even length), or one
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
