"""Bulk data values read from a stored Part-10 file by full parse, by a tag path as the
BulkDataURIs of dicom_json name them (nested values, big endian or Deflated files; top-level
ones before Pixel Data are served by byte range, dicomfile.ParsedFile.bulk_ranges)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from dicomweb_server.dicom_json import BULK_DATA_THRESHOLD_BYTES, BULK_VRS, raw_vr
from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)
from dicomweb_server.vr import WORD_WIDTHS, swapped_words

__all__ = [
    "bulk_element",
    "element_range",
    "element_value",
    "placed_element",
    "read_bulk_value",
]


def read_bulk_value(path: Path, tag_path: str) -> tuple[bytes, str] | None:
    """A bulk data value by full parse (nested, big endian or deflated files). Runs in a thread.

    `tag_path` is a tag, then `/item/tag` for each sequence entered (items from 0, as in the
    BulkDataURIs of dicom_json). None unless it names a binary value: a malformed path, a step
    into an element that is not a sequence or an item it does not have, a missing element, a
    sequence or a value that is not bytes. Values come back little endian, as PS3.18 8.7.3.4
    (application/octet-stream) expects.
    """
    found = bulk_element(path, tag_path)
    return None if found is None else element_value(found[0], found[1][found[2]])


def bulk_element(path: Path, tag_path: str) -> tuple[Dataset, Dataset, int] | None:
    """(the file's data set, the data set holding the element, its tag) of a tag path as
    read_bulk_value takes it; None when the path is malformed or leads nowhere."""
    found = placed_element(path, tag_path)
    return None if found is None else found[:3]


def placed_element(path: Path, tag_path: str) -> tuple[Dataset, Dataset, int, int] | None:
    """bulk_element, and where in the file the element's value_tell counts from (its
    base, for element_range): 0 at the top level. pydicom reads a sequence of defined
    length from the bytes of its value, and counts the places of the elements of its items
    from the start of those; one of undefined length it reads where it is, counting as the
    data set holding it does."""
    parts = tag_path.split("/")
    patterns = itertools.cycle((r"[0-9A-Fa-f]{8}", r"\d{1,9}"))
    if len(parts) % 2 == 0 or not all(map(re.fullmatch, patterns, parts)):
        return None
    # Values above the threshold stay unread until the one asked for is reached: a nested
    # value of a large multi-frame file reads that value, not the file's Pixel Data too.
    ds = pydicom.dcmread(path, defer_size=BULK_DATA_THRESHOLD_BYTES)
    node: Dataset = ds
    base = 0
    for tag, item in zip(parts[:-1:2], parts[1::2], strict=True):
        raw = node.get_item(int(tag, 16), keep_deferred=True)
        element = node.get(int(tag, 16))
        if element is None or element.VR != "SQ" or int(item) >= len(element.value):
            return None
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value_tell:
            base += raw.value_tell  # its items read from its value's bytes
        node = element.value[int(item)]
    last = int(parts[-1], 16)
    return (ds, node, last, base) if last in node else None


def element_value(ds: Dataset, element: DataElement) -> tuple[bytes, str] | None:
    """An element's binary value, little endian (a big endian file's swapped, vr.swapped_words),
    and its VR; None when the value is not bytes. An empty binary value, which pydicom reads
    as None, is b"": the metadata gives empty Pixel Data a BulkDataURI too, and that of a big
    endian or Deflated file (read by parsing) was a 404, or a bulk data response cut off."""
    value = element.value
    if value is None and str(element.VR) in BULK_VRS:
        value = b""
    if not isinstance(value, bytes | bytearray):
        return None
    data, vr = bytes(value), str(element.VR)
    return (data if ds.is_little_endian else swapped_words(data, vr)), vr


def element_range(
    ds: Dataset, node: Dataset, tag: int, size: int, base: int | None = None
) -> tuple[int, int, str | None] | None:
    """(offset, length, the VR whose words are to be swapped, None for none) of an element's
    value in the file `ds` was read from, when pydicom left it unread there (bulk_element
    defers values over the bulk data threshold) and it can be read by byte range: not of a
    Deflated file (its offsets are into the inflated stream), not of undefined length,
    inside the file (`size` bytes). None otherwise: the value is then read by element_value.
    A big endian value's words are swapped as it is sent, a chunk at a time, rather than the
    value read whole, copied and swapped in memory: the Pixel Data of a 500 MB big endian
    instance took 1.7 GB of memory to send.

    `base` (placed_element): a value pydicom has read (one in a sequence: pydicom defers
    top-level values only) is located too, at `base` + its value_tell, while it is still
    the RawDataElement the file gave; for a file whose values are read again by range (the
    inflated copy of a Deflated file). Its place is to be checked against the value read."""
    raw = node.get_item(tag, keep_deferred=True)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if (
        not isinstance(raw, RawDataElement)
        or (raw.value is not None and base is None)
        or not raw.value_tell
        or raw.length in (0, 0xFFFFFFFF)
        or (base or 0) + raw.value_tell + raw.length > size
        or ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    ):
        return None
    vr = raw_vr(tag, raw)
    if vr not in BULK_VRS:
        return None
    swap = vr if ts == EXPLICIT_VR_BIG_ENDIAN and vr in WORD_WIDTHS else None
    return (base or 0) + raw.value_tell, raw.length, swap
