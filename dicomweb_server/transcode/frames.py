"""Frames decoded, or decoded and re-encoded, one at a time: from a stored file (frame_array,
decode_frames, encode_frames), from a frame's codestream alone (decode_codestream,
convert_codestream) or from an item's nested Pixel Data (decode_item_pixels); the bound on what
one decode makes (DECODE_MAX_BYTES); files decoded whole, kept for their next frames; a stored
file read by pydicom, its sequences too deep a TranscodeError (read_stored,
MAX_CONVERTED_SEQUENCE_DEPTH). Frames as stored whose places ingest could not record:
fragments.py."""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.decoders.rle import _rle_decode_segment
from pydicom.pixels.utils import pack_bits, pixel_array, unpack_bits
from pydicom.uid import UID

from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
)
from dicomweb_server.transcode.codecs import (
    ENCODERS,
    RLE_LOSSLESS,
    PixelInfo,
    TranscodeError,
    keeps_ybr,
)
from dicomweb_server.transcode.inflated import hold, inflated
from dicomweb_server.transcode.plugins import DECODE_ERRORS, decoded

__all__ = [
    "DECODE_MAX_BYTES",
    "MAX_CONVERTED_SEQUENCE_DEPTH",
    "WHOLE_FILE_KEEP_MAX_BYTES",
    "cannot",
    "check_dataset_size",
    "convert_codestream",
    "decode_codestream",
    "decode_frames",
    "decode_item_pixels",
    "decoded_bytes",
    "encode_frames",
    "frame_array",
    "frame_bytes",
    "pixels",
    "read_stored",
    "too_deep",
    "too_deep_to_read",
]

# Sequences nested in a stored data set that is converted (re-encoded, rendered, sent to a
# DIMSE peer in another syntax), at most: the most STOW-RS and C-STORE take
# (dicomfile.MAX_SEQUENCE_DEPTH, which transcode does not import; tests/test_deep_stored.py
# checks they are equal). pydicom reads sequences of undefined length and writes every
# sequence recursively: an instance stored before that limit, nested 200 levels and more,
# raised a bare RecursionError (a 500 for a rendering, a traceback for a C-GET), and its
# writer overflowed the C stack (the process killed by SIGSEGV) near 300 levels of defined
# length re-encoded from implicit to explicit VR.
MAX_CONVERTED_SEQUENCE_DEPTH = 64


def too_deep() -> str:
    """The reason a data set nested deeper than MAX_CONVERTED_SEQUENCE_DEPTH is not converted."""
    return (
        f"its sequences nest deeper than {MAX_CONVERTED_SEQUENCE_DEPTH} levels,"
        " the most this archive converts"
    )


def too_deep_to_read() -> TranscodeError:
    """The failure (a 406, an icon, a failed sub-operation) of reading a stored file whose
    sequences pydicom's recursive reader runs out of stack on (a RecursionError)."""
    return TranscodeError(f"cannot read the stored instance: {too_deep()}")


def read_stored(path: Path | BinaryIO, **kwargs: Any) -> Dataset:
    """pydicom.dcmread(path, **kwargs) of a stored file (or the open file); too_deep_to_read
    when pydicom's recursive reader runs out of stack on its sequences (see
    MAX_CONVERTED_SEQUENCE_DEPTH). The header of a stored Deflated file (a path and
    stop_before_pixels, with or without defer_size) is inflated only as far as its Pixel Data
    (_deflated_header), every value read: pydicom reads a deferred value again at its offset
    in the file, which an inflated data set's values have not."""
    try:
        if (
            isinstance(path, Path)
            and kwargs.get("stop_before_pixels") is True
            and kwargs.keys() <= {"stop_before_pixels", "defer_size"}
        ):
            head = _deflated_header(path)
            if head is not None:
                return head
        return pydicom.dcmread(path, **kwargs)
    except RecursionError:
        raise too_deep_to_read() from None


# Compressed bytes read, and most bytes inflated, at a time by _Inflating.
_INFLATE_STEP_BYTES = 64 * 1024


class _Inflating:
    """The inflated data set of a Deflated file (PS3.5 A.5) as a file pydicom reads, inflated
    only as far as it has been read; what was inflated is kept (pydicom seeks back a few
    bytes, and the header's values are held by the data set read from it anyway)."""

    def __init__(self, fp: BinaryIO, name: str) -> None:
        self.name = name
        self._fp = fp
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._tail = b""  # compressed bytes read but not yet inflated
        self._data = bytearray()
        self._pos = 0

    def _fill(self, upto: int | None) -> None:
        """Inflates until `upto` bytes are held (None: all of it) or the stream ends. Once
        the file is all read, the inflater may still hold output of its last bytes (decoded
        no further when a step's output was full: up to a few hundred bytes, lost at the
        end of the data set until found by review); a stream cut short raises zlib.error,
        as dcmread's zlib.decompress does."""
        while (upto is None or len(self._data) < upto) and not self._inflater.eof:
            if not self._tail:
                self._tail = self._fp.read(_INFLATE_STEP_BYTES)
                if not self._tail:
                    self._data += self._inflater.flush()
                    if not self._inflater.eof:
                        raise zlib.error("incomplete or truncated Deflated data set")
                    return
            self._data += self._inflater.decompress(self._tail, _INFLATE_STEP_BYTES)
            self._tail = self._inflater.unconsumed_tail

    def read(self, size: int = -1) -> bytes:
        self._fill(None if size < 0 else self._pos + size)
        end = len(self._data) if size < 0 else min(len(self._data), self._pos + size)
        out = bytes(self._data[self._pos : end])
        self._pos = max(self._pos, end)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(None)
        base = (0, self._pos, len(self._data))[whence]
        self._pos = max(0, base + offset)
        return self._pos


def _deflated_header(path: Path) -> Dataset | None:
    """The data set of a Deflated file up to its Pixel Data, as dcmread(stop_before_pixels=True)
    reads it but inflated no further (dcmread inflates the whole file first: every frame of a
    120-frame instance converted one by one inflated it 120 times over, 51 s); None when the
    file is not Deflated (or has no preamble: dcmread says why)."""
    with path.open("rb") as fp:
        try:
            preamble = read_preamble(fp, False)
        except InvalidDicomError:
            return None
        meta = _read_file_meta_info(fp)  # pydicom's own, which dcmread calls
        if meta.get("TransferSyntaxUID") != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return None
        stream = cast(BinaryIO, _Inflating(fp, str(path)))
        data = read_dataset(stream, False, True, stop_when=_at_pixel_data)
    ds = FileDataset(str(path), data, preamble, meta, False, True)
    ds.set_original_encoding(False, True, data._character_set)
    return ds


def frame_bytes(arr: np.ndarray, bits_allocated: int, planar: bool = False) -> bytes:
    """Native bytes of decoded pixels: little endian, bit-packed when 1-bit, colour planes
    separated when the instance says Planar Configuration 1 (PS3.3 C.7.6.3.1.3)."""
    if bits_allocated == 1:
        return bytes(pack_bits(arr))
    if planar and arr.ndim >= 3:
        arr = np.moveaxis(arr, -1, -3)
    return bytes(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())


def pixels(ds: Dataset, as_rgb: bool = True) -> np.ndarray:
    """`ds.pixel_array`, decoded with the preferred plugin."""
    check_dataset_size(ds, int(ds.get("NumberOfFrames") or 1))
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts == RLE_LOSSLESS and int(ds.get("BitsAllocated") or 0) == 1:
        nframes = int(ds.get("NumberOfFrames") or 1)
        frames = [
            _rle_one_bit(f, int(ds.Rows), int(ds.Columns))
            for f in generate_frames(ds.PixelData, number_of_frames=nframes)
        ]
        return np.stack(frames) if nframes > 1 else frames[0]

    def decode(plugin: str) -> np.ndarray:
        ds.pixel_array_options(decoding_plugin=plugin, as_rgb=as_rgb)
        arr: np.ndarray = ds.pixel_array
        return arr

    return decoded(ts, decode)


def _rle_one_bit(codestream: bytes, rows: int, columns: int) -> np.ndarray:
    """One frame of 1-bit RLE Lossless, which pydicom's decoders refuse: a single segment
    (PS3.5 G.3.1 header: the segment count, then 15 offsets) of the frame's bit-packed bytes
    (PS3.5 8.1.1; each frame is encoded on its own, A.4, so it starts on a byte), PackBits
    coded (G.3.1, decoded by pydicom's own segment decoder). Returns 0/1 pixels, rows x
    columns."""
    (count, offset) = struct.unpack_from("<2I", codestream)
    if count != 1 or not 64 <= offset < len(codestream):
        raise ValueError(f"1-bit RLE frame with {count} segments at offset {offset}, not 1")
    packed = _rle_decode_segment(codestream[offset:])
    pixels = rows * columns
    if len(packed) * 8 < pixels:
        raise ValueError(f"1-bit RLE segment of {len(packed)} bytes for {pixels} pixels")
    return np.asarray(unpack_bits(bytes(packed))[:pixels], dtype=np.uint8).reshape(rows, columns)


# The most bytes one decode makes: a frame, or an instance decoded whole (pixels). Decoders
# size their output by the Image Pixel attributes, and a file of a few bytes can claim
# 65535 x 65535 x 3 16-bit pixels (25 GB, allocated and filled). At most one decode per core
# runs at a time (the app's CapacityLimiter).
DECODE_MAX_BYTES = 1024**3


def decoded_bytes(rows: int, columns: int, samples: int, bits: int, frames: int) -> int:
    """Bytes of pixels so described, decoded: a byte per sample at least (decoders unpack
    1-bit data), whole bytes per sample otherwise, one frame at least."""
    return rows * columns * samples * max(1, -(-bits // 8)) * max(1, frames)


def _check_decoded_size(rows: int, columns: int, samples: int, bits: int, frames: int) -> None:
    """ValueError (a 406 with its reason) when pixels so described would decode to more than
    DECODE_MAX_BYTES."""
    size = decoded_bytes(rows, columns, samples, bits, frames)
    if size > DECODE_MAX_BYTES:
        raise ValueError(
            f"its pixels would decode to {size} bytes; at most {DECODE_MAX_BYTES} are decoded"
            " at once"
        )


def check_dataset_size(ds: Dataset, frames: int) -> None:
    _check_decoded_size(
        int(ds.get("Rows") or 0),
        int(ds.get("Columns") or 0),
        int(ds.get("SamplesPerPixel") or 1),
        int(ds.get("BitsAllocated") or 8),
        frames,
    )


def frame_array(
    path: Path, ds: Dataset, n: int, as_rgb: bool = True, scratch: Path | None = None
) -> np.ndarray:
    """Frame n (1-based), decoded; reads only that frame when the file allows it. `as_rgb`:
    YCbCr converted to RGB (pydicom's default), else left as it is (keeps_ybr). A Deflated
    file's frame is read from its inflated copy (inflated.inflated, made in `scratch`)."""
    check_dataset_size(ds, 1)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # No random access into deflate: the copy is Explicit VR Little Endian.
        with inflated(path, scratch) as copy:
            return _frame_of(copy, ds, n, as_rgb, UID(EXPLICIT_VR_LITTLE_ENDIAN))
    return _frame_of(path, ds, n, as_rgb, ts)


def _frame_of(path: Path, ds: Dataset, n: int, as_rgb: bool, ts: UID) -> np.ndarray:
    """frame_array of a file in transfer syntax `ts` (`ds` its header, or the header of the
    Deflated file it was inflated from)."""
    if ts == RLE_LOSSLESS and ds.get("BitsAllocated") == 1:
        return _whole_file_frame(path, n, as_rgb)  # decoded by pixels, not by pydicom
    if not ts.is_compressed:
        _check_native_frame(path, ds, n)
    try:
        frame: np.ndarray = decoded(
            str(ts),
            lambda plugin: pixel_array(
                str(path), index=n - 1, decoding_plugin=plugin, as_rgb=as_rgb
            ),
        )
        return frame
    except (AttributeError, ValueError, KeyError):
        # Files pydicom reads only with repairs (e.g. Pixel Data written implicitly in an
        # explicit VR file): decode through a full read instead.
        return _whole_file_frame(path, n, as_rgb)


def _check_native_frame(path: Path, ds: Dataset, n: int) -> None:
    """ValueError unless frame n (1-based) of native Pixel Data lies inside the value the
    file holds. pydicom reads a frame of a file by its offset alone, trusting Number of
    Frames: past the value it reads the elements after it, or nothing, and 1-bit frames are
    unpacked with numpy's unpackbits, which for an empty read returns its output
    uninitialised (numpy 2.4): frame 2 of a 1-bit SEG of one frame, rendered, drew the
    server's freed memory. A frame far past the value (Number of Frames 2^31 - 1) made
    pydicom seek past the largest offset of the file system, an OSError (a 500)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return  # pydicom refuses the frame itself
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # two luminance samples share one Cb and one Cr (PS3.3 C.7.6.3.1.2)
    held = _native_value_bytes(path)
    end = -(-n * rows * columns * samples * bits // 8)  # PS3.5 8.1.1: frames follow, packed
    if held is not None and end > held:
        frame = -(-rows * columns * samples * bits // 8)
        raise ValueError(
            f"frame {n} lies past the end of the Pixel Data: its {held} bytes hold"
            f" {held // frame if frame else 0} frame(s) of {frame} bytes"
        )


def _native_value_bytes(path: Path) -> int | None:
    """Bytes of the top-level (Float, Double Float) Pixel Data value of a native file that
    the file holds: its stated length (PS3.5 7.1), cut at the end of the file; None when
    there is none. Kept per file (a stat, not a parse, for its next frame: the parse costs
    0.3 to 0.9 ms, a third of decoding a frame); blobs never change under their key, and the
    file's size and time are part of the key all the same."""
    st = path.stat()
    return _value_bytes_of(str(path), st.st_size, st.st_mtime_ns)


# Values of a header longer than this are passed over, not read, by _value_bytes_of, which
# wants only where its Pixel Data starts: the first rendering of a file read its whole ICC
# Profile (16 MB and more) and its private values here, the rendering's own header read
# leaving them unread (render._HEADER_DEFER_BYTES).
_PASSED_OVER_BYTES = 1024


@functools.lru_cache(maxsize=1024)
def _value_bytes_of(name: str, size: int, _mtime_ns: int) -> int | None:
    with open(name, "rb") as fp:
        # leaves fp at the pixel tag
        head = read_stored(fp, stop_before_pixels=True, defer_size=_PASSED_OVER_BYTES)
        start = fp.tell()
        header = fp.read(12)
    ts = UID(str(head.file_meta.TransferSyntaxUID))
    order = "<" if ts.is_little_endian else ">"
    if len(header) < 8 or struct.unpack(f"{order}HH", header[:4])[0] != 0x7FE0:
        return None
    if ts.is_implicit_VR or not header[4:6].isalpha():  # Pixel Data written implicitly
        (length,), at = struct.unpack(f"{order}I", header[4:8]), start + 8
    elif header[4:6] in (b"OB", b"OW", b"OF", b"OD", b"UN"):  # PS3.5 7.1.2: 4-byte length
        (length,), at = struct.unpack(f"{order}I", header[8:12]), start + 12
    else:
        (length,), at = struct.unpack(f"{order}H", header[6:8]), start + 8
    if length == 0xFFFFFFFF:
        raise ValueError(
            "its Pixel Data has an undefined length, which a native transfer syntax does not"
            " allow (PS3.5 A.4: only encapsulated Pixel Data has one)"
        )
    return max(0, min(int(length), size - at))


# The frames of files decoded whole (1-bit RLE, files pydicom reads only whole), kept for
# their next frames, least recently used dropped first, WHOLE_FILE_KEEP_MAX_BYTES in all
# (a file decoded into more is not kept). One file was kept, so two clients reading two
# such files took the place from each other and each frame decoded its file again. Deflated
# files are read from an inflated copy instead (inflated.py), frame by frame. Blobs never
# change under their key; the file's size and time are part of the key all the same.
_WHOLE_LOCK = threading.Lock()
WHOLE_FILE_KEEP_MAX_BYTES = 64 * 1024 * 1024
_whole: OrderedDict[tuple[str, int, int, bool], np.ndarray] = OrderedDict()


def _whole_file_frame(path: Path, n: int, as_rgb: bool) -> np.ndarray:
    """Frame n (1-based) of a file decoded whole, a copy (the decoded file is shared)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, as_rgb)
    with _WHOLE_LOCK:
        cached = _whole.get(key)
        if cached is not None:
            _whole.move_to_end(key)
    if cached is None:
        full = read_stored(path)
        arr = pixels(full, as_rgb)
        # Frames by the array's shape, not by Number of Frames: pydicom counts the frames a
        # value holds when the attribute is absent (a Deflated file whose Columns was halved
        # came out as two frames, and frame 1 was both, a 3-D "frame" Pillow refused: a 500).
        one = 2 if int(full.get("SamplesPerPixel") or 1) == 1 else 3  # a frame's dimensions
        cached = arr if arr.ndim > one else arr[np.newaxis]
        if cached.nbytes <= WHOLE_FILE_KEEP_MAX_BYTES:
            with _WHOLE_LOCK:
                _whole[key] = cached
                total = sum(a.nbytes for a in _whole.values())
                while total > WHOLE_FILE_KEEP_MAX_BYTES:
                    total -= _whole.popitem(last=False)[1].nbytes
    frame: np.ndarray = cached[n - 1].copy()
    return frame


# pydicom's reader and writer re-raise a failure with the element's tag, its message and the
# formatted traceback (pydicom.tag.tag_in_exception): the traceback is not a reason to send.
_TRACEBACK = "\nTraceback (most recent call last):"


def cannot(path: Path | None, what: str, exc: Exception) -> TranscodeError:
    """The 406 of a conversion or decode that failed, with the codec's reason (its first
    lines, without a traceback: it named the server's files in a response body)."""
    reason = str(exc).split(_TRACEBACK, 1)[0].rstrip()
    return TranscodeError(
        f"cannot {what}: {reason}; ask for transfer-syntax=* for the stored bytes"
    )


def decode_frames(path: Path, frames: list[int], scratch: Path | None = None) -> list[bytes]:
    """Frames (1-based) decoded to native little-endian bytes (Explicit VR Little Endian).

    Colour that a decoder delivers as YCbCr is converted to RGB (pydicom's default), except
    YBR_FULL, which stays so (keeps_ybr). `scratch`: where a Deflated file is inflated.
    """
    ds = read_stored(path, stop_before_pixels=True)
    info = PixelInfo.of(ds)
    planar = info.samples_per_pixel > 1 and ds.get("PlanarConfiguration") == 1
    out = []
    with hold(path):  # a Deflated file inflated once for all its frames
        for n in frames:
            try:
                arr = frame_array(
                    path, ds, n, not keeps_ybr(info, EXPLICIT_VR_LITTLE_ENDIAN), scratch
                )
                # Bit-packing refuses samples other than 0 and 1 (a JPEG frame's, under a Bits
                # Allocated of 1) with a ValueError: inside the `except`, not a 500.
                out.append(frame_bytes(arr, info.bits_allocated, planar))
            except DECODE_ERRORS as exc:
                raise cannot(path, f"decode frame {n}", exc) from None
    return out


def encode_frames(
    path: Path, frames: list[int], transfer_syntax_uid: str, scratch: Path | None = None
) -> list[bytes]:
    """Frames decoded, then encoded in `transfer_syntax_uid` (one codestream per frame).
    `scratch`: where a Deflated file is inflated."""
    codec = ENCODERS[transfer_syntax_uid]
    assert codec.encode is not None
    ds = read_stored(path, stop_before_pixels=True)
    info = PixelInfo.of(ds)
    out = []
    as_rgb, decoded_info = _decoded_as(info, transfer_syntax_uid)
    with hold(path):  # a Deflated file inflated once for all its frames
        for n in frames:
            try:
                arr = frame_array(path, ds, n, as_rgb, scratch)
                out.append(codec.encode(arr, decoded_info))
            except DECODE_ERRORS as exc:
                raise cannot(
                    path, f"encode frame {n} as {UID(transfer_syntax_uid).name}", exc
                ) from None
    return out


def _decoded_as(info: PixelInfo, target: str) -> tuple[bool, PixelInfo]:
    """How a frame is decoded for `target` (as_rgb) and the pixel description its encoder is
    given: YBR_FULL kept (keeps_ybr), other colour decoded to RGB and described so, for the
    encoder codes what it is given (HTJ2K RGB with its reversible colour transform, JPEG
    Lossless RGB with the Adobe marker that says so; YBR_FULL_422 was coded as YCbCr)."""
    keep = keeps_ybr(info, target)
    if info.samples_per_pixel == 3 and not keep:
        info = replace(info, photometric="RGB")
    return not keep, info


def decode_codestream(
    codestream: bytes, transfer_syntax_uid: str, info: PixelInfo, as_rgb: bool = True
) -> np.ndarray:
    """One frame's compressed bytes (read by range at the offsets recorded at ingest) decoded,
    without opening the file: the pixel description comes from the index. `as_rgb` as for
    frame_array."""
    opts: dict[str, Any] = {
        "as_rgb": as_rgb,
        "rows": info.rows,
        "columns": info.columns,
        "samples_per_pixel": info.samples_per_pixel,
        "bits_allocated": info.bits_allocated,
        "bits_stored": info.bits_stored,
        "pixel_representation": info.pixel_representation,
        "photometric_interpretation": info.photometric,
        "number_of_frames": 1,
        "planar_configuration": 0,
    }
    try:
        _check_decoded_size(info.rows, info.columns, info.samples_per_pixel, info.bits_allocated, 1)
        if transfer_syntax_uid == RLE_LOSSLESS and info.bits_allocated == 1:
            return _rle_one_bit(codestream, info.rows, info.columns)
        arr, _ = decoded(
            transfer_syntax_uid,
            lambda plugin: get_decoder(transfer_syntax_uid).as_array(
                encapsulate([codestream]), **opts, decoding_plugin=plugin
            ),
        )
    except DECODE_ERRORS as exc:
        raise cannot(None, f"decode a {UID(transfer_syntax_uid).name} frame", exc) from None
    return arr


def convert_codestream(codestream: bytes, stored_ts: str, info: PixelInfo, target: str) -> bytes:
    """A stored compressed frame decoded, then sent uncompressed or re-encoded as `target`;
    in the colour space the metadata gives (keeps_ybr), for it is all a client knows."""
    as_rgb, decoded_info = _decoded_as(info, target)
    arr = decode_codestream(codestream, stored_ts, info, as_rgb)
    codec = ENCODERS[target]
    try:
        if codec.encode is None:  # same layout as decode_frames gives
            planar = info.samples_per_pixel > 1 and info.planar_configuration == 1
            return frame_bytes(arr, info.bits_allocated, planar)
        return codec.encode(arr, decoded_info)
    except DECODE_ERRORS as exc:
        raise cannot(None, f"encode a frame as {UID(target).name}", exc) from None


def decode_item_pixels(item: Dataset, transfer_syntax_uid: str) -> bytes:
    """Encapsulated Pixel Data nested in an item (an Icon Image Sequence's), decoded to its
    uncompressed value, every frame, little endian (octet-stream bulk data is uncompressed,
    PS3.18 8.7.3.3), colour as frames are (keeps_ybr). The item describes its own pixels."""
    ds = Dataset(item)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    info = PixelInfo.of(ds)
    planar = info.samples_per_pixel > 1 and info.planar_configuration == 1
    try:
        arr = pixels(ds, as_rgb=not keeps_ybr(info, EXPLICIT_VR_LITTLE_ENDIAN))
        return frame_bytes(arr, info.bits_allocated, planar)
    except DECODE_ERRORS as exc:
        raise cannot(None, "decode the nested Pixel Data", exc) from None
