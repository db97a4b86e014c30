"""Whether pydicom can write a data set in Explicit (or Implicit) VR Little Endian, checked
before it is written (check_writable): a converted instance (convert.py) and a data set sent
to a DIMSE peer (dimse.conversion) are refused with the first element that cannot be, in
bounded memory, before pydicom's writer fails on it."""

from __future__ import annotations

from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.hooks import hooks as pydicom_hooks

from dicomweb_server.dicom_json import BINARY_FORMATS, BULK_VRS
from dicomweb_server.transcode.frames import MAX_CONVERTED_SEQUENCE_DEPTH, too_deep

__all__ = ["check_writable"]


def check_writable(ds: Dataset, implicit_vr: bool = False) -> None:
    """ValueError naming the first element of `ds`, at any depth in its sequences, that
    pydicom cannot write in Explicit (or Implicit) VR Little Endian, found before pydicom
    writes the data set (or pynetdicom encodes it for a peer). pydicom's writer re-raises a
    failure in each enclosing sequence with the message and traceback so far, so that they
    double per level: a 4-byte FD ten items deep took 525 MB and answered a 500, twelve 2 GB,
    thirteen more than the machine had (found by deep-item fuzzing; STOW refuses such an
    instance, but one stored before is converted here). Walked with a stack, each element
    encoded on its own, as the writer would: a raw element of a data set read in the target
    encoding is copied as it is (not checked), and a value left deferred (top level only) is
    read from the file outside any item. Sequences nested deeper than
    MAX_CONVERTED_SEQUENCE_DEPTH are refused before any is written: pydicom's writer recurses
    (see that limit)."""
    stack: list[tuple[Dataset, list[Dataset], Any]] = [(ds, [], None)]
    while stack:
        item, ancestors, encodings = stack.pop()
        encodings = item.get("SpecificCharacterSet", encodings)
        copied = item.original_encoding == (implicit_vr, True)
        for tag in item.keys():
            if tag.element == 0 and tag.group > 6:
                continue  # a retired Group Length: the writer leaves it out (PS3.5 7.2)
            if _left_as_is(item, item.get_item(tag, keep_deferred=True), copied):
                continue
            try:
                elem = _encoded_alone(item, tag, ancestors, encodings, implicit_vr)
            except RecursionError:  # a sequence read only now, of items of undefined length
                raise ValueError(too_deep()) from None
            except Exception as exc:  # the stored value: one failure, with its tag
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
                raise ValueError(
                    f"{name} cannot be written: {type(exc).__name__} {first}"
                ) from None
            if elem.VR == "SQ":
                if len(ancestors) == MAX_CONVERTED_SEQUENCE_DEPTH:  # a sequence one level more
                    raise ValueError(too_deep())
                stack.extend((child, [item, *ancestors], encodings) for child in elem.value)


def _left_as_is(item: Dataset, raw: Any, copied: bool) -> bool:
    """Whether check_writable leaves a raw element to the writer: one of a data set read in
    the target encoding (`copied`), which the writer copies as it is, or a value left deferred
    that is no sequence. One without a VR was read as implicit VR from a file whose transfer
    syntax says explicit (pydicom reads such a data set as it finds it, its Pixel Data "OB or
    OW"): copied, it had no VR to write (a TypeError; a ValueError for the ambiguous one), so
    it is converted, as the writer converts a deferred one when it reads it."""
    if not isinstance(raw, RawDataElement):
        return False
    if copied and raw.VR is not None and " or " not in raw.VR:
        return True
    return _deferred_value(item, raw)


def _deferred_value(item: Dataset, raw: RawDataElement) -> bool:
    """A value left in the file (deferred: a long one at the top level) that pydicom reads as
    no sequence, its VR asked of pydicom's own hook as it will read it. A deferred sequence
    is read and walked: a C-GET reads with a defer size of 1 KiB, and the sequences of one
    longer went unchecked (their depth, their values) into pynetdicom's re-encoding."""
    if raw.value is not None:
        return False
    found: dict[str, Any] = {}
    pydicom_hooks.raw_element_vr(raw, found, encoding=None, ds=item)
    return bool(found["VR"] != "SQ")


_ITEM_TAG = b"\xfe\xff\x00\xe0"  # an encapsulated value begins with an item (PS3.5 A.4)


def _encoded_alone(
    item: Dataset, tag: int, ancestors: list[Dataset], encodings: Any, implicit_vr: bool
) -> Any:
    """The element at `tag` of `item`, its ambiguous VR resolved as the writer resolves it
    (from the item and its ancestors, PS3.5 Annex A), encoded into a scratch buffer."""
    elem = item[tag]
    if elem.VR == "SQ":
        return elem
    if elem.VR in BINARY_FORMATS and isinstance(elem.value, bytes):
        # A binary number value of the wrong length (PS3.5 6.2), left as its bytes when read
        # (dicomfile.configure_pydicom); pydicom gives a known tag its dictionary VR back,
        # which it then cannot write. Written as UN, its bytes kept, as the metadata shows it.
        elem.VR = "UN"
    if " or " in elem.VR:
        # pydicom's ancestors begin with the element's own data set (nearest first)
        correct_ambiguous_vr_element(elem, item, True, [item, *ancestors])  # in place
    value = elem.value
    if (
        elem.VR in BULK_VRS  # bytes the writer writes as they are (an odd length padded)
        and isinstance(value, bytes)
        and (not elem.is_undefined_length or value.startswith(_ITEM_TAG))
    ):
        return elem  # written as it is: a copy (of the Pixel Data) would cost its size
    scratch = DicomBytesIO()
    scratch.is_little_endian, scratch.is_implicit_VR = True, implicit_vr
    write_data_element(scratch, elem, encodings)
    return elem
