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
MAX_JSON_BULK_VALUE_BYTES each), never the pixel data. The Pixel Data parts, their transfer
syntax and the element written from them are stow_pixels'.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
    tag_name,
)
from dicomweb_server.dicom_xml import dataset_from_xml
from dicomweb_server.dicomfile import MAX_SEQUENCE_DEPTH, InvalidInstanceError
from dicomweb_server.errors import BadRequestError, FailureReason, PayloadTooLargeError
from dicomweb_server.ingest import Services, refusal, storage_failure, store_path
from dicomweb_server.media.mediatypes import (
    APPLICATION_DICOM_JSON,
    EXPLICIT_VR_LITTLE_ENDIAN,
    parse_content_type,
)
from dicomweb_server.multipart import Event, PartBegin, PartData, PartEnd
from dicomweb_server.response_json import InstanceOutcome
from dicomweb_server.stow_pixels import (
    Bulk,
    pixel_header,
    pixel_parts,
    pixel_syntax,
    refused,
    write_pixel_values,
)

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
# Data sets in one metadata part, at most (as multipart.MAX_PARTS for Part-10 parts). Above: 413.
MAX_JSON_DATASETS = 10_000
# Sequences nested in a data set, at most, JSON or XML (dicom_xml.MAX_XML_DEPTH lets 125 levels
# through): deeper, pydicom's recursive writer overflows. Above: that data set fails (0xC000).
# The same as for a Part-10 instance (dicomfile.MAX_SEQUENCE_DEPTH).
MAX_JSON_SEQUENCE_DEPTH = MAX_SEQUENCE_DEPTH
_PIXEL_DATA = "7FE00010"


class _Budget:
    """Bulk data bytes the data sets of one request may still copy into their instances:
    what the request sent, plus MAX_JSON_BULK_REUSE_BYTES."""

    def __init__(self, bulk: dict[str, list[Bulk]]) -> None:
        self.left = sum(b.size for parts in bulk.values() for b in parts)
        self.left += MAX_JSON_BULK_REUSE_BYTES

    def take(self, n: int, ds: Dataset | None = None) -> None:
        self.left -= n
        if self.left < 0:
            raise refused(
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
            raise refused(
                FailureReason.CANNOT_UNDERSTAND,
                f"the InlineBinary of {tag} is not base64 (PS3.18 F.2.7)",
            )
        for item in element.get("Value") or []:
            if element.get("vr") == "SQ" and isinstance(item, dict):
                _check_inline_binary(item)


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
    bulk: dict[str, list[Bulk]] = {}
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
    bulk: dict[str, list[Bulk]],
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
            bulk.setdefault(location, []).append(Bulk(writer.path, writer.size, ctype))


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
    bulk: dict[str, list[Bulk]],
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


def _assemble(doc: JsonDict, bulk: dict[str, list[Bulk]], budget: _Budget, out: Path) -> None:
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
        parts = pixel_parts(pixel, bulk, ds)
        budget.take(sum(p.size for p in parts), ds)
        if pixel is not None and not parts:  # inline, or no value: pydicom encodes it
            ds[0x7FE00010] = dataset_from_json({_PIXEL_DATA: pixel})[0x7FE00010]
        _check_encodable(ds)
        ts = pixel_syntax(parts, ds) if parts else EXPLICIT_VR_LITTLE_ENDIAN
        head = Dataset({t: e for t, e in ds.items() if not parts or t < 0x7FE00010})
        tail = Dataset({t: e for t, e in ds.items() if parts and t > 0x7FE00010})
        head.file_meta = _file_meta(ts, ds)
        encoded = DicomBytesIO()
        pydicom.dcmwrite(encoded, head, enforce_file_format=True)
        pixel_head = pixel_header(parts, ts, ds) if parts else b""
        after = DicomBytesIO()
        after.is_little_endian, after.is_implicit_VR = True, False
        write_dataset(after, tail)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # untrusted input: any failure to encode is the client's data
        raise refused(
            FailureReason.CANNOT_UNDERSTAND, f"cannot encode the data set: {_first_line(exc)}", ds
        ) from None
    with out.open("wb") as fh:
        fh.write(encoded.getvalue())
        if parts:
            fh.write(pixel_head)
            write_pixel_values(fh, parts, ts)
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
                raise refused(
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
        raise refused(
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
        raise refused(
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


def _bulk_reader(bulk: dict[str, list[Bulk]], budget: _Budget) -> Any:
    """BulkDataURI -> value, for pydicom's from_json: what one data set reads in all is at
    most MAX_JSON_BULK_VALUE_BYTES (a URI named many times counts each time), and what the
    request's data sets read comes out of its budget."""
    read_so_far = 0

    def read(_tag: str, _vr: str, uri: str) -> bytes:
        nonlocal read_so_far
        found = bulk.get(uri)
        if not found:
            raise refused(FailureReason.CANNOT_UNDERSTAND, f"no bulk data part for {uri!r}")
        budget.take(sum(b.size for b in found))
        read_so_far += sum(b.size for b in found)
        if read_so_far > MAX_JSON_BULK_VALUE_BYTES:
            raise refused(
                FailureReason.OUT_OF_RESOURCES,
                f"the bulk data of one data set is over {MAX_JSON_BULK_VALUE_BYTES} bytes "
                "(Pixel Data aside)",
                over_limit=True,
            )
        return b"".join(b.path.read_bytes() for b in found)

    return read
