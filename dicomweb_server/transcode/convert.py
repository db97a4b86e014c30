"""Whole instances converted to another transfer syntax: written to a file as they are made,
a frame at a time (to_transfer_syntax), or in memory (converted_dataset); and the uncompressed
Pixel Data of a 1-bit instance stored compressed (one_bit_pixel_data)."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID

from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from dicomweb_server.transcode.codecs import (
    ENCODERS,
    PixelInfo,
    converted_keeps_ybr,
    made_photometric,
)
from dicomweb_server.transcode.frames import (
    cannot,
    check_dataset_size,
    frame_bytes,
    pixels,
    read_stored,
)
from dicomweb_server.transcode.lossy import Sizes, lossy_method, mark_lossy
from dicomweb_server.transcode.pixelwrite import (
    CONVERT_COPY_BYTES,
    NATIVE_PIXEL_MAX_BYTES,
    Watch,
    as_bytes,
    bounded_writer,
    copied,
    prepended,
    word_width,
    write_encapsulated,
    write_native,
)
from dicomweb_server.transcode.plugins import DECODE_ERRORS, decoded
from dicomweb_server.transcode.writable import check_writable
from dicomweb_server.vr import WORD_WIDTHS, swapped_words

__all__ = [
    "CONVERT_COPY_BYTES",
    "NATIVE_PIXEL_MAX_BYTES",
    "Step",
    "converted_dataset",
    "one_bit_pixel_data",
    "to_transfer_syntax",
]


# What a conversion holds while it decodes a frame, or copies a chunk, of the Pixel Data,
# and while it converts an instance in memory (to_transfer_syntax's `step`): nothing by
# default; a DIMSE conversion takes its turn in the process (conversion._DECODING).
Step = Callable[[], AbstractContextManager[object]]


def to_transfer_syntax(
    src: Path,
    dst: Path,
    transfer_syntax_uid: str,
    step: Step = contextlib.nullcontext,
    max_bytes: int | None = None,
    watch: Watch | None = None,
) -> None:
    """Write `src` to `dst` in `transfer_syntax_uid` (a key of ENCODERS, or Implicit VR Little
    Endian: the Explicit VR Little Endian conversion written without VRs, for a DIMSE peer
    that takes only that). The SOP Instance UID is kept; lossy output is marked with Lossy
    Image Compression (PS3.3 C.7.6.1.1.5).

    Written as it is made (_write_streamed): the header, then the Pixel Data frame by frame
    (uncompressed, and Float or Double Float Pixel Data, in chunks of CONVERT_COPY_BYTES),
    so that memory holds a frame, not the instance. Deflated files (inflated whole, at most
    dicomfile.MAX_INFLATED_BYTES), 1-bit Pixel Data compressed or big endian (its frames
    share bytes) and instances with no pixels to copy are converted in memory
    (converted_dataset), the same bytes.

    `step` is held while each frame is decoded (each chunk copied), and while an instance is
    converted in memory, not between them: conversions sharing one step interleave a frame
    at a time. `max_bytes`: `dst` grows to at most this many bytes, else a ValueError
    (TranscodeError) as soon as a write would pass it, not once the instance is written.
    `watch`: told of each write as it reaches `dst` (Watch)."""
    what = f"write {UID(transfer_syntax_uid).name}"
    implicit = transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN
    target = EXPLICIT_VR_LITTLE_ENDIAN if implicit else transfer_syntax_uid
    try:
        head = read_stored(src, stop_before_pixels=True)
        ts = UID(str(head.file_meta.TransferSyntaxUID))
        what = f"convert {ts.name} to {UID(transfer_syntax_uid).name}"
        # 1-bit pixels decoded (compressed) or unpacked (big endian) whole: frames share
        # bytes; little endian ones are copied as they are.
        one_bit = head.get("BitsAllocated") == 1 and ts not in _LITTLE_ENDIAN_NATIVE
        whole = ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN or one_bit
        if not whole and decoded(
            ts,
            lambda plugin: _write_streamed(
                src, dst, target, plugin, implicit, step, max_bytes, watch
            ),
        ):
            return
        with step():
            ds = converted_dataset(src, target)
            if implicit:
                check_writable(ds, implicit_vr=True)
                ds.file_meta.TransferSyntaxUID = UID(IMPLICIT_VR_LITTLE_ENDIAN)
            with bounded_writer(dst, max_bytes, watch) as out:
                ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    except DECODE_ERRORS as exc:
        raise cannot(src, what, exc) from None


_PIXEL_DATA = 0x7FE00010
# Float and Double Float Pixel Data (PS3.3 C.7.6.24), never encapsulated (PS3.5 8.2): copied
# in chunks as native Pixel Data is, swapped by their VR's word (OF 4 bytes, OD 8); read
# whole, a 100 MB value took 308 MB from big endian, 201 MB from little.
_FLOAT_PIXEL_DATA = {0x7FE00008: "OF", 0x7FE00009: "OD"}
_LITTLE_ENDIAN_NATIVE = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
# Values longer than this are left in the file when a header is read for a conversion (the
# Pixel Data above all); each is read when it is written.
_CONVERT_DEFER_BYTES = 64 * 1024


def _write_streamed(
    src: Path,
    dst: Path,
    target: str,
    plugin: str,
    implicit: bool = False,
    step: Step = contextlib.nullcontext,
    max_bytes: int | None = None,
    watch: Watch | None = None,
) -> bool:
    """`src` converted to `target` into `dst` as converted_dataset and dcmwrite would write
    it, byte for byte (test_convert_stream checks so on the corpus), with one frame in memory at
    a time; False when `src` has no top-level Pixel Data, or Float (Double Float) Pixel Data
    to copy (nothing written). Decoding uses `plugin` (see decoded). `implicit`: Explicit VR
    Little Endian written as Implicit VR Little Endian. `step`, `max_bytes`, `watch`: see
    to_transfer_syntax."""
    with step():
        ds = read_stored(src, defer_size=_CONVERT_DEFER_BYTES)
        # The Pixel Data, else the first float pixels (any others go with the tail, whole).
        tag = next((t for t in (_PIXEL_DATA, *_FLOAT_PIXEL_DATA) if t in ds), None)
        if tag is None:
            return False
        raw, vr = ds.get_item(tag, keep_deferred=True), _FLOAT_PIXEL_DATA.get(tag, "")
        if vr and (  # float pixels copied only, with their own VR, whole words (swapped_words)
            raw.VR not in (None, vr)
            or (raw.length if isinstance(raw, RawDataElement) else len(raw.value)) % WORD_WIDTHS[vr]
            or UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed
            or ENCODERS[target].encode is not None
        ):
            return False
        conversion = _Streamed(ds, target, plugin, implicit, tag)  # checked, split here
    conversion.step = step
    with open(src, "rb") as f, bounded_writer(dst, max_bytes, watch) as out:
        conversion.write(f, out, dst.parent)
    return True


_END = object()


def _stepped(items: Iterable[Any], step: Step) -> Iterator[Any]:
    """The items of `items`, each made (a frame decoded, a chunk read) while `step` is held;
    it is released before the item is given on (written)."""
    it = iter(items)
    while True:
        with step():
            item = next(it, _END)
        if item is _END:
            return
        yield item


# The decoded frames of a conversion, each an array and what it was decoded to, on demand.
_Frames = Callable[[], Iterator[tuple[np.ndarray, dict[str, Any]]]]


class _Streamed:
    """One instance's streamed conversion (_write_streamed): its header (the data set before
    the Pixel Data), where its Pixel Data is, the elements after it, and how to decode it."""

    def __init__(
        self, ds: Dataset, target: str, plugin: str, implicit: bool = False, tag: int = _PIXEL_DATA
    ) -> None:
        self.ds, self.target, self.plugin, self.implicit = ds, target, plugin, implicit
        self.tag = tag  # Pixel Data, or Float or Double Float Pixel Data (copied only)
        self.step: Step = contextlib.nullcontext  # see to_transfer_syntax
        self.ts = ts = UID(str(ds.file_meta.TransferSyntaxUID))
        self.info = PixelInfo.of(ds)
        self.codec = ENCODERS[target]
        self.as_rgb = not converted_keeps_ybr(self.info, target)  # YCbCr kept as YBR_FULL, or RGB
        if not self.codec.accepts(self.info):  # e.g. float data to a codec (available_targets)
            raise ValueError(f"{UID(target).name} does not take these pixels")
        if decodes := ts.is_compressed or self.codec.encode is not None:  # frame by frame
            check_dataset_size(ds, 1)
        pixels = ds.get_item(tag, keep_deferred=True)
        # Float pixels read as implicit VR have none: written with their own, as pydicom does.
        self.vr = str(pixels.VR or _FLOAT_PIXEL_DATA.get(tag))
        # What pydicom's own reading of a file for its frames gives the decoder (iter_pixels),
        # and Number of Frames, read to decode only: a copy uses neither, and failed on a value
        # pydicom cannot read ("ab": stored as 1 frame, vr.frame_count; found by review).
        self.options: dict[str, Any] = {}
        if decodes:
            self.options = as_pixel_options(ds)
            self.options["transfer_syntax_uid"] = ts
            self.options["pixel_keyword"] = "PixelData"
            if not ts.is_implicit_VR:
                self.options["pixel_vr"] = self.vr
        _drop_extended_offsets(ds)  # read into `options` above; the stored fragments' offsets
        check_writable(ds, implicit_vr=implicit)
        self.kept: bytes | None = pixels.value  # None: left in the file, at value_tell
        self.offset = 0 if self.kept is not None else int(cast(RawDataElement, pixels).value_tell)
        # As the file states it: pydicom reads a value cut short by the end of the file as
        # what there is, which is not the instance's Pixel Data.
        length = int(pixels.length) if isinstance(pixels, RawDataElement) else len(self.kept or b"")
        self.length = length
        self.tail = self._split_tail()
        self.nframes = int(ds.get("NumberOfFrames") or 1) if decodes else 1

    def _split_tail(self) -> Dataset:
        """The elements after the Pixel Data, read now (before the header is cut short at the
        Pixel Data) and written after it; the header, in little endian from here on."""
        ds, tail = self.ds, Dataset()
        for tag in [t for t in ds.keys() if t > self.tag]:
            tail.add(ds[tag])
            del ds[tag]
        del ds[self.tag]
        if not self.ts.is_little_endian:  # reads every element: none is left raw, in big endian
            _swap_binary_values(ds)
            _swap_binary_values(tail)
            ds.set_original_encoding(False, True, ds.original_character_set)
        return tail

    def write(self, f: BinaryIO, out: BinaryIO, scratch: Path) -> None:
        """The converted instance into `out`, its stored Pixel Data read from `f` (the source
        file); lossy fragments wait in a scratch file in the directory `scratch`."""
        value: BinaryIO = f if self.kept is None else io.BytesIO(self.kept)
        value.seek(self.offset)
        method = lossy_method(self.ts, value) if self.ts.is_compressed else None
        value.seek(self.offset)
        written = IMPLICIT_VR_LITTLE_ENDIAN if self.implicit else self.target
        self.ds.file_meta.TransferSyntaxUID = UID(written)
        decoder = get_decoder(self.ts)

        def frames() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
            decoding = decoder.iter_array(
                value, decoding_plugin=self.plugin, as_rgb=self.as_rgb, **self.options
            )
            yield from _stepped(decoding, self.step)

        if self.codec.encode is not None:
            self._write_encoded(out, frames, method, self.codec.encode, scratch)
        elif self.ts.is_compressed:
            self._write_decoded(out, frames, method)
        else:
            self._write_copied(out, value)
        if len(self.tail):
            fp = DicomFileLike(out)
            fp.is_little_endian, fp.is_implicit_VR = True, self.implicit
            write_dataset(fp, self.tail)

    def _header(self, out: BinaryIO) -> None:
        self.ds.save_as(
            out, implicit_vr=self.implicit, little_endian=True, enforce_file_format=True
        )

    def _write_encoded(
        self,
        out: BinaryIO,
        frames: _Frames,
        method: str | None,
        encode: Callable[[np.ndarray, PixelInfo], bytes],
        scratch: Path,
    ) -> None:
        """Encapsulated in the target syntax: each frame decoded, then encoded."""
        info = _made_colour(self.info, self.target)
        _decoded_colour(self.ds, info)
        if not self.codec.lossy:
            mark_lossy(self.ds, method)
            self._header(out)
            codestreams = (encode(arr, info) for arr, _ in frames())
            write_encapsulated(out, codestreams, self.nframes)
            return
        # The ratio goes in the header, before the Pixel Data, and is known once every frame
        # is encoded: the fragments wait in a scratch file (lossy, so small).
        sizes = Sizes()
        with tempfile.TemporaryFile(dir=scratch) as encoded:
            arrays = (a for a, _ in frames())
            write_encapsulated(encoded, sizes.of(encode, info, arrays), self.nframes)
            mark_lossy(self.ds, method, sizes.ratio())
            self._header(out)
            encoded.seek(0)
            shutil.copyfileobj(encoded, out, CONVERT_COPY_BYTES)

    def _write_decoded(self, out: BinaryIO, frames: _Frames, method: str | None) -> None:
        """Compressed to native: the frames decoded; the header says what they decoded to
        (YBR_FULL kept, else RGB; pixel-interleaved, Planar Configuration 0)."""
        ds, info, nframes = self.ds, self.info, self.nframes
        decoded = frames()
        first, props = next(decoded)
        ds.PhotometricInterpretation = props["photometric_interpretation"]
        if info.samples_per_pixel > 1:
            ds.PlanarConfiguration = props["planar_configuration"]
        if "NumberOfFrames" in ds or nframes > 1:
            ds.NumberOfFrames = nframes
        mark_lossy(ds, method)
        self._header(out)
        # Not an itertools.chain: it keeps its arguments, the list holding the first frame
        # too, to its end, so the first frame was held for the whole conversion.
        arrays = prepended([first], (a for a, _ in decoded))
        del first  # held by `arrays` until written, not for the whole conversion
        vr = None if self.implicit else "OB" if info.bits_allocated <= 8 else "OW"
        write_native(out, vr, as_bytes(arrays), nframes)

    def _write_copied(self, out: BinaryIO, value: BinaryIO) -> None:
        """Native to native: the bytes as they are, swapped from big endian."""
        if self.length == 0xFFFFFFFF:  # read to its delimiter: item tags, not pixels
            raise ValueError(
                f"its Pixel Data has an undefined length, which {self.ts.name} does not allow"
                " (PS3.5 A.4: only encapsulated Pixel Data has one)"
            )
        self._header(out)
        floats = self.tag != _PIXEL_DATA
        width = WORD_WIDTHS[self.vr] if floats else word_width(self.info, self.vr)
        width = 1 if self.ts.is_little_endian else width
        chunks = _stepped(copied(value, self.length, width), self.step)
        # As pydicom writes it: Implicit VR Pixel Data is OW (PS3.5 A.1).
        wide = self.ts.is_implicit_VR or self.info.bits_allocated > 8
        vr = self.vr if floats else "OW" if wide else "OB"
        write_native(out, None if self.implicit else vr, chunks, None, self.length, self.tag)


def one_bit_pixel_data(src: Path) -> bytes:
    """The Pixel Data of a 1-bit instance stored compressed (or deflated) as its uncompressed
    value, as Explicit VR Little Endian holds it and the conversion to it makes it
    (_convert_pixels): every frame decoded, then bit-packed as one run (PS3.5 8.1.1: the
    frames follow each other with no padding, so a frame need not start on a byte), padded
    to an even length (PS3.5 7.1.1). Runs in a worker thread."""
    ds = read_stored(src)
    try:
        data = frame_bytes(pixels(ds), 1)
    except DECODE_ERRORS as exc:
        raise cannot(src, "decode the 1-bit Pixel Data", exc) from None
    return data + b"\0" if len(data) % 2 else data


def converted_dataset(src: Path, transfer_syntax_uid: str) -> Dataset:
    """`src` read and converted to `transfer_syntax_uid` (a key of ENCODERS), in memory: the
    data set of a WADO conversion, or of a DIMSE C-STORE sub-operation to a peer that did not
    accept the stored syntax. The SOP Instance UID is kept."""
    ds = read_stored(src)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        if not ts.is_little_endian:  # every target is little endian
            # Visits every element, nested ones included, so that none is left raw (as
            # read, in big endian bytes): below, the data set is marked little endian.
            _swap_binary_values(ds, top=True)
        if "PixelData" in ds and transfer_syntax_uid != ts:
            method = lossy_method(ts, ds.PixelData) if ts.is_compressed else None
            mark_lossy(ds, method, _convert_pixels(ds, ts, transfer_syntax_uid))
    except DECODE_ERRORS as exc:
        raise cannot(src, f"convert {ts.name} to {UID(transfer_syntax_uid).name}", exc) from None
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    if "PixelData" in ds and transfer_syntax_uid != ts:
        _drop_extended_offsets(ds)
    try:
        check_writable(ds)
    except ValueError as exc:
        raise cannot(src, f"write {UID(transfer_syntax_uid).name}", exc) from None
    if not ts.is_little_endian:
        # Every element is decoded now and its binary values swapped: the data set is little
        # endian. Otherwise pydicom refuses to save it little endian without forcing, and
        # pynetdicom sends a data set read as big endian only as big endian.
        ds.set_original_encoding(False, True, ds.original_character_set)
    return ds


# Extended Offset Table and its Lengths (PS3.3 C.7.6.3.1.8): offsets of the stored fragments.
_EXTENDED_OFFSETS = (0x7FE00001, 0x7FE00002)


def _drop_extended_offsets(ds: Dataset) -> None:
    """The Extended Offset Table of converted Pixel Data removed: it gives the offsets and
    lengths of the stored fragments, not of the frames made (a decoder that reads it, as
    pydicom's does, takes the wrong bytes for every frame), and it may be present only with
    encapsulated Pixel Data of one fragment per frame (PS3.3 C.7.6.3.1.8, PS3.5 A.4)."""
    for tag in _EXTENDED_OFFSETS:
        if tag in ds:
            del ds[tag]


def _swap_binary_values(ds: Dataset, top: bool = False) -> None:
    """The OW, OF, OL, OD and OV values of a data set read as big endian, nested items
    included, swapped to little endian in place (pydicom writes them as they were read: a
    palette's [0 256 ...] became [0 1 ...]). The top level's Pixel Data is left to
    _convert_pixels, which swaps it by Bits Allocated."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_binary_values(item)
            continue
        if str(elem.VR) not in WORD_WIDTHS or not isinstance(elem.value, bytes | bytearray):
            continue
        if top and elem.tag == 0x7FE00010:
            continue
        elem.value = swapped_words(bytes(elem.value), str(elem.VR))


def _convert_pixels(ds: Dataset, ts: UID, target: str) -> float | None:
    """The Pixel Data of `ds` in `target`; the compression ratio when `target` is lossy."""
    info = PixelInfo.of(ds)
    codec = ENCODERS[target]
    if not codec.accepts(info):  # e.g. 1-bit or float data to a codec (available_targets)
        raise ValueError(f"{UID(target).name} does not take these pixels")
    if codec.encode is None:  # to Explicit VR Little Endian
        _to_explicit_little(ds, ts, info)
        return None
    arr = pixels(ds, as_rgb=not converted_keeps_ybr(info, target))  # as _made_colour says
    info = _made_colour(info, target)
    frames = arr if int(ds.get("NumberOfFrames") or 1) > 1 else arr[np.newaxis]
    sizes = Sizes()
    ds.PixelData = encapsulate(list(sizes.of(codec.encode, info, frames)), has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    _decoded_colour(ds, info)
    return sizes.ratio() if codec.lossy else None


def _to_explicit_little(ds: Dataset, ts: UID, info: PixelInfo) -> None:
    """_convert_pixels to Explicit VR Little Endian: the Pixel Data of `ds` decoded, or its
    words swapped from big endian, in place."""
    if ts.is_compressed and info.bits_allocated == 1:
        # PS3.5 8.1.1: 1-bit Pixel Data is bit-packed, frames following each other with
        # no padding between them; pydicom's decompress() leaves a byte per pixel.
        ds.PixelData = frame_bytes(pixels(ds), 1)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = False
    elif ts.is_compressed:
        # pydicom sets Photometric Interpretation (and Planar Configuration 0) to what it
        # decoded: YBR_FULL kept (converted_keeps_ybr), other YCbCr converted to RGB.
        as_rgb = not converted_keeps_ybr(info, EXPLICIT_VR_LITTLE_ENDIAN)
        decoded(
            ts,
            lambda plugin: ds.decompress(
                as_rgb=as_rgb, generate_instance_uid=False, decoding_plugin=plugin
            ),
        )
    elif not ts.is_little_endian and info.bits_allocated > 1:
        # Big endian: the words swapped, as they are streamed (_write_streamed), bytes
        # past the pixels included; colour untouched.
        value = bytes(ds.PixelData)
        width = word_width(info, str(ds["PixelData"].VR))
        ds.PixelData = b"".join(copied(io.BytesIO(value), len(value), width))
        ds["PixelData"].VR = "OW" if info.bits_allocated > 8 else "OB"
    elif not ts.is_little_endian:  # 1-bit big endian: bits in 16-bit words, unpacked
        ds.PixelData = frame_bytes(pixels(ds, as_rgb=False), 1)
        ds["PixelData"].VR = "OB"
    # Implicit VR and deflated: the pixel bytes are already little endian, unchanged.


def _made_colour(info: PixelInfo, target: str) -> PixelInfo:
    """What colour frames decoded for `target` are in (made_photometric): YCbCr samples
    kept as YBR_FULL where `target` may hold them (converted_keeps_ybr: a lossless syntax, or
    uncompressed from YBR_FULL; PS3.5 8.2.1-8.2.4 list YBR_FULL for JPEG Lossless, RLE,
    JPEG-LS and JPEG 2000), for converted to RGB they would change (PS3.3 C.7.6.3.1.2: the
    conversion rounds) under a syntax that claims to be lossless; else RGB (YBR_RCT in
    HTJ2K, colour transformed). Pixel-interleaved either way."""
    if info.samples_per_pixel != 3:
        return info
    photometric = made_photometric(info, target)
    return replace(info, photometric=photometric, planar_configuration=0)


def _decoded_colour(ds: Dataset, info: PixelInfo) -> None:
    """The header of frames made as _made_colour says."""
    if info.samples_per_pixel == 3:
        ds.PhotometricInterpretation = info.photometric
        ds.PlanarConfiguration = 0
