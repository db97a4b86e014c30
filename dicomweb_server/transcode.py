"""Decoding and re-encoding pixel data: the codec registry (STYLE.md rule 9).

With render.py, the pixel layer: the only modules importing numpy, Pillow, imagecodecs and
pydicom.pixels. Functions here are synchronous and CPU-bound; callers run them in worker threads
behind the app's CapacityLimiter (STYLE.md rule 8).

Decoding: whatever pydicom and its installed plugins decode (pylibjpeg-libjpeg, -openjpeg, -rle,
pyjpegls). Encoding targets (ENCODERS): Explicit VR Little Endian; RLE Lossless, JPEG-LS
Lossless and JPEG 2000 Lossless through pydicom's encoders; HTJ2K Lossless, HTJ2K Lossless
RPCL and HTJ2K (reversible) through imagecodecs (OpenJPH); JPEG Baseline (lossy, only when
asked for by name) through imagecodecs (libjpeg-turbo).
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.decoders.rle import _rle_decode_segment
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import as_pixel_options, pack_bits, pixel_array, unpack_bits
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from dicomweb_server.errors import NotAcceptableError, NotFoundError
from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from dicomweb_server.vr import WORD_WIDTHS, frame_count, swapped_words

__all__ = [
    "CONVERT_COPY_BYTES",
    "DECODE_ERRORS",
    "DECODE_MAX_BYTES",
    "ENCODERS",
    "HTJ2K_DECOMPOSITIONS",
    "HTJ2K_RPCL_BASE_PIXELS",
    "JPEG_BASELINE_QUALITY",
    "Codec",
    "CodecPanicError",
    "PixelInfo",
    "TranscodeError",
    "available_targets",
    "convert_codestream",
    "converted_dataset",
    "decodable",
    "decode_frames",
    "decode_item_pixels",
    "decoded_bytes",
    "encode_frames",
    "frame_array",
    "keeps_ybr",
    "lossy_method",
    "one_bit_pixel_data",
    "stored_frames",
    "to_transfer_syntax",
]

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K_ANY = "1.2.840.10008.1.2.4.203"  # lossless or lossy: ours is reversible, i.e. lossless
# PS3.5 10.18: RPCL codestreams have enough decompositions for their lowest resolution to be at
# most this many pixels on a side (a thumbnail read from the first bytes).
HTJ2K_RPCL_BASE_PIXELS = 64
# Wavelet decompositions of our HTJ2K codestreams at least (OpenJPH's default).
HTJ2K_DECOMPOSITIONS = 5
NATIVE = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)
# PS3.3 C.7.6.1.1.5.1 method of the one lossy encoding made here (JPEG Baseline).
_LOSSY_ENCODE_METHOD = "ISO_10918_1"
# Quality of JPEG Baseline (lossy) output, 1-100.
JPEG_BASELINE_QUALITY = 90


class TranscodeError(NotAcceptableError):
    """The pixel data cannot be converted as asked (a codec is missing or fails)."""


@dataclass(frozen=True)
class PixelInfo:
    """What an encoder needs to know about an instance's pixels (from its metadata)."""

    bits_allocated: int
    bits_stored: int
    samples_per_pixel: int
    pixel_representation: int
    photometric: str
    rows: int = 0
    columns: int = 0
    is_float: bool = False  # Float or Double Float Pixel Data: no integer codec applies
    planar_configuration: int = 0

    @classmethod
    def of(cls, ds: Dataset) -> PixelInfo:
        bits = int(ds.get("BitsAllocated") or 8)
        return cls(
            bits,
            int(ds.get("BitsStored") or bits),
            int(ds.get("SamplesPerPixel") or 1),
            int(ds.get("PixelRepresentation") or 0),
            str(ds.get("PhotometricInterpretation") or "MONOCHROME2"),
            int(ds.get("Rows") or 0),
            int(ds.get("Columns") or 0),
            "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
            int(ds.get("PlanarConfiguration") or 0),
        )


@dataclass(frozen=True)
class Codec:
    transfer_syntax_uid: str
    lossy: bool
    library: str  # what to install when it is missing
    accepts: Callable[[PixelInfo], bool]
    encode: Callable[[np.ndarray, PixelInfo], bytes] | None  # None: native (uncompressed)
    available: Callable[[], bool]


def _pydicom_encoder_available(uid: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return bool(get_encoder(uid).is_available)
        except (NotImplementedError, ValueError):
            return False

    return check


def _imagecodecs_available(codec: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            import imagecodecs
        except ImportError:
            return False
        return bool(getattr(imagecodecs, codec).available)

    return check


def _decoded_photometric(info: PixelInfo) -> str:
    """Colour comes out of pydicom's decoders as RGB (YCbCr converted)."""
    return "RGB" if info.samples_per_pixel == 3 else info.photometric


def _pydicom_encode(uid: str) -> Callable[[np.ndarray, PixelInfo], bytes]:
    def encode(arr: np.ndarray, info: PixelInfo) -> bytes:
        # JPEG-LS colour of an instance whose metadata says Planar Configuration 1: encoded
        # with ILV 0 (component by component, PS3.5 8.2.3 / ITU-T T.87), which decoders give
        # back colour-by-plane, so that a client that reads the frame by the metadata's
        # value (OHIF's loader does, for every syntax but JPEG Lossless) reads it right;
        # pydicom takes the layout from the ILV. The array is pixel-interleaved either way.
        planar = int(
            uid == JPEG_LS_LOSSLESS
            and info.samples_per_pixel == 3
            and info.planar_configuration == 1
        )
        opts: dict[str, Any] = {
            "rows": arr.shape[0],
            "columns": arr.shape[1],
            "samples_per_pixel": info.samples_per_pixel,
            "bits_allocated": info.bits_allocated,
            "bits_stored": info.bits_stored,
            "pixel_representation": info.pixel_representation,
            "photometric_interpretation": _decoded_photometric(info),
            "number_of_frames": 1,
            "planar_configuration": planar,
        }
        encoder = get_encoder(uid)  # pylibjpeg-rle's RLE encoder is Rust: _unpanicked
        return bytes(_unpanicked(lambda: encoder.encode(_native_order(arr), **opts)))

    return encode


def _htj2k_encode(arr: np.ndarray, info: PixelInfo) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.htj2k_encode(_native_order(arr), level=0))


def _htj2k_rpcl_encode(arr: np.ndarray, info: PixelInfo) -> bytes:
    """HTJ2K Lossless RPCL (PS3.5 10.18, the syntax of progressive loading): RPCL progression
    order (OpenJPH's own), Tile Length Markers with a tile-part per resolution (the breakpoints
    a streaming client reads up to), and enough decompositions for the lowest resolution to be
    at most HTJ2K_RPCL_BASE_PIXELS on a side."""
    import imagecodecs

    side = max(arr.shape[0], arr.shape[1])
    needed = (
        math.ceil(math.log2(side / HTJ2K_RPCL_BASE_PIXELS)) if side > HTJ2K_RPCL_BASE_PIXELS else 0
    )
    codestream = imagecodecs.htj2k_encode(
        _native_order(arr), level=0, tlm=True, tilepart=True,
        resolutions=max(HTJ2K_DECOMPOSITIONS, needed),
    )  # fmt: skip
    return bytes(codestream)


def _jpeg_encode(arr: np.ndarray, info: PixelInfo) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(_native_order(arr), level=JPEG_BASELINE_QUALITY))


def _jpeg_lossless_encode(arr: np.ndarray, info: PixelInfo) -> bytes:
    """JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, Selection Value 1;
    PS3.5 A.4.1), by libjpeg-turbo's lossless mode: predictor 1, no point transform, the
    sample precision of Bits Stored. Signed samples are coded as their Bits Stored low bits
    (two's complement), as DICOM decoders read them back; colour stays RGB (no transform)."""
    import imagecodecs

    data = _native_order(arr)
    if info.pixel_representation == 1:
        unsigned = data.view(np.uint8 if data.dtype.itemsize == 1 else np.uint16)
        data = np.bitwise_and(unsigned, (1 << info.bits_stored) - 1, dtype=unsigned.dtype)
    colour: dict[str, Any] = {}
    if info.samples_per_pixel == 3:
        colour = {"colorspace": "RGB", "outcolorspace": "RGB"}
    codestream = bytes(
        imagecodecs.jpeg8_encode(
            data, lossless=True, predictor=1, bitspersample=info.bits_stored, **colour
        )
    )
    return _unlabelled_colour(codestream) if keeps_ybr(info, JPEG_LOSSLESS_SV1) else codestream


def _unlabelled_colour(codestream: bytes) -> bytes:
    """A JPEG whose samples are YCbCr (frames kept YBR_FULL, keeps_ybr), coded untransformed:
    the Adobe APP14 segment that names them RGB is dropped and the components numbered 1, 2,
    3, the JFIF convention for YCbCr, so a decoder that reads markers (pydicom's) converts
    them as the Photometric Interpretation says, like one that does not (Cornerstone's)."""
    out = bytearray(codestream)
    app14 = []
    for marker, pos in _segments(codestream, 2):
        if marker == 0xC3:  # SOF3: Lf, P, Y, X, Nf, then Nf x (Ci, HiVi, Tqi)
            for k in range(codestream[pos + 9]):
                out[pos + 10 + 3 * k] = k + 1
        elif marker == 0xDA:  # SOS: Ls, Ns, then Ns x (Csj, TdjTaj)
            for k in range(codestream[pos + 4]):
                out[pos + 5 + 2 * k] = k + 1
        elif marker == 0xEE:  # APP14 (Adobe): dropped below, from the end
            app14.append((pos, 2 + int.from_bytes(codestream[pos + 2 : pos + 4], "big")))
    for pos, length in reversed(app14):
        del out[pos : pos + length]
    return bytes(out)


def _integer(min_bits: int, max_bits: int, min_side: int = 1) -> Callable[[PixelInfo], bool]:
    def accepts(info: PixelInfo) -> bool:
        return (
            not info.is_float
            and info.bits_allocated in (8, 16, 32)
            and min_bits <= info.bits_stored <= max_bits
            and info.samples_per_pixel in (1, 3)
            and min(info.rows, info.columns) >= min_side
        )

    return accepts


def _rle_accepts(info: PixelInfo) -> bool:
    # PS3.5 G.2 allows 32-bit samples, but pydicom's RLE encoders take 8 and 16 bits only.
    return _integer(1, 16)(info) and info.bits_allocated in (8, 16)


def _jpeg_lossless_accepts(info: PixelInfo) -> bool:
    # libjpeg-turbo codes 2 to 16 bits per sample, in 8 or 16-bit words.
    return _integer(2, 16)(info) and info.bits_allocated in (8, 16)


def _native_order(arr: np.ndarray) -> np.ndarray:
    """Contiguous, in the machine's byte order (decoders of big endian files return '>u2')."""
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


ENCODERS: dict[str, Codec] = {
    EXPLICIT_VR_LITTLE_ENDIAN: Codec(
        EXPLICIT_VR_LITTLE_ENDIAN, False, "pydicom", lambda _i: True, None, lambda: True
    ),
    RLE_LOSSLESS: Codec(
        RLE_LOSSLESS, False, "pylibjpeg-rle", _rle_accepts,
        _pydicom_encode(RLE_LOSSLESS), _pydicom_encoder_available(RLE_LOSSLESS),
    ),
    JPEG_LS_LOSSLESS: Codec(
        # pyjpegls overflows its output buffer on images of a few pixels.
        JPEG_LS_LOSSLESS, False, "pyjpegls", _integer(2, 16, min_side=8),
        _pydicom_encode(JPEG_LS_LOSSLESS), _pydicom_encoder_available(JPEG_LS_LOSSLESS),
    ),
    JPEG_2000_LOSSLESS: Codec(
        # OpenJPEG's 6 resolution levels need at least 32 pixels per side.
        JPEG_2000_LOSSLESS, False, "pylibjpeg-openjpeg", _integer(1, 24, min_side=32),
        _pydicom_encode(JPEG_2000_LOSSLESS), _pydicom_encoder_available(JPEG_2000_LOSSLESS),
    ),
    HTJ2K_LOSSLESS: Codec(
        HTJ2K_LOSSLESS, False, "imagecodecs", _integer(1, 16),
        _htj2k_encode, _imagecodecs_available("HTJ2K"),
    ),
    HTJ2K_LOSSLESS_RPCL: Codec(
        HTJ2K_LOSSLESS_RPCL, False, "imagecodecs", _integer(1, 16),
        _htj2k_rpcl_encode, _imagecodecs_available("HTJ2K"),
    ),
    HTJ2K_ANY: Codec(
        HTJ2K_ANY, False, "imagecodecs", _integer(1, 16),
        _htj2k_encode, _imagecodecs_available("HTJ2K"),
    ),
    JPEG_LOSSLESS_SV1: Codec(
        # the default syntax of image/jpeg (PS3.18 Table 8.7.3-5)
        JPEG_LOSSLESS_SV1, False, "imagecodecs", _jpeg_lossless_accepts,
        _jpeg_lossless_encode, _imagecodecs_available("JPEG8"),
    ),
    JPEG_BASELINE: Codec(
        JPEG_BASELINE, True, "imagecodecs", _integer(8, 8),
        _jpeg_encode, _imagecodecs_available("JPEG8"),
    ),
}  # fmt: skip


def decodable(transfer_syntax_uid: str) -> bool:
    if transfer_syntax_uid in NATIVE:
        return True
    try:
        return bool(get_decoder(transfer_syntax_uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def available_targets(stored_ts: str, info: PixelInfo | None) -> tuple[str, ...]:
    """Transfer syntaxes this instance can be sent in besides its own (PS3.18 8.7.3.5).

    Instances without pixel data can always be re-encoded as Explicit VR Little Endian.
    """
    if info is None:
        return (EXPLICIT_VR_LITTLE_ENDIAN,)
    if not decodable(stored_ts):
        return ()
    return tuple(
        uid for uid, codec in ENCODERS.items() if codec.accepts(info) and codec.available()
    )


def missing_codec(stored_ts: str) -> str:
    """A sentence naming what is missing to decode `stored_ts` (for 406 messages)."""
    uid = UID(stored_ts)
    try:
        missing = get_decoder(stored_ts).missing_dependencies
    except (NotImplementedError, ValueError):
        return f"pydicom has no decoder for {uid.name} ({uid})"
    return f"decoding {uid.name} ({uid}) needs: {'; '.join(missing) or 'a decoder plugin'}"


def _frame_bytes(arr: np.ndarray, bits_allocated: int, planar: bool = False) -> bytes:
    """Native bytes of decoded pixels: little endian, bit-packed when 1-bit, colour planes
    separated when the instance says Planar Configuration 1 (PS3.3 C.7.6.3.1.3)."""
    if bits_allocated == 1:
        return bytes(pack_bits(arr))
    if planar and arr.ndim >= 3:
        arr = np.moveaxis(arr, -1, -3)
    return bytes(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())


# Decoder plugins preferred where pydicom offers several: for JPEG-LS, pyjpegls (CharLS)
# decodes a 512 x 512 16-bit frame in about 9 ms; left to choose, pydicom took 38-100 ms
# (pylibjpeg's libjpeg). Used only when installed; the result is the same array.
PREFERRED_DECODERS = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
}


@functools.lru_cache(maxsize=64)
def decoding_plugin(transfer_syntax_uid: str) -> str:
    """The pydicom decoding plugin to ask for: the preferred one if installed, else ""
    (pydicom's own choice)."""
    plugin = PREFERRED_DECODERS.get(transfer_syntax_uid, "")
    try:
        available = get_decoder(transfer_syntax_uid).available_plugins
    except (NotImplementedError, ValueError):
        return ""
    return plugin if plugin in available else ""


# What decoding, converting or encoding the pixels of a stored file may raise when the file is
# malformed (pydicom and the codecs assume well-formed input: a damaged offset table raises
# StopIteration, an absurd Number of Frames a MemoryError from numpy's allocation): the
# instance cannot be converted, a 4xx or an icon, never a 500.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    NotImplementedError,
    RuntimeError,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    StopIteration,
    MemoryError,
    OverflowError,
    EOFError,
    struct.error,
)
_T = TypeVar("_T")


class CodecPanicError(RuntimeError):
    """A codec written in Rust panicked (one of DECODE_ERRORS, as RuntimeError)."""


def _unpanicked(call: Callable[[], _T]) -> _T:
    """`call()`, a Rust codec's panic raised as CodecPanicError. pylibjpeg-rle's decoder
    panics on RLE segments longer than Rows x Columns says (an index out of bounds), and pyo3
    raises a panic as `pyo3_runtime.PanicException`, which derives from BaseException, not
    Exception: it passed every `except` for decoder errors, and the server's own 500 handler,
    and reached hypercorn, which answered a bare 500. Each pyo3 extension makes its own
    PanicException class, none importable: it is known by its name."""
    try:
        return call()
    except Exception:
        raise
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit, cancellation
        raise CodecPanicError(f"the codec failed on this data ({exc})") from None


def _decoded(transfer_syntax_uid: str, decode: Callable[[str], _T]) -> _T:
    """`decode(plugin)` with the preferred plugin; if that one fails, again with pydicom's own
    choice among all installed (naming a plugin makes pydicom try that one only). A codec's
    panic is a CodecPanicError (_unpanicked)."""
    plugin = decoding_plugin(transfer_syntax_uid)
    if plugin:
        try:
            return _unpanicked(lambda: decode(plugin))
        except DECODE_ERRORS:
            pass
    return _unpanicked(lambda: decode(""))


def keeps_ybr(info: PixelInfo, target: str) -> bool:
    """Whether frames served on their own (frames, Pixel Data bulk data) in `target` are
    decoded without converting colour, so that their samples are in the colour space the
    instance's metadata, the only description a client has of a frame, gives: converted to
    RGB under YBR metadata, Cornerstone and pydicom converted them a second time.

    - YBR_FULL stays YBR_FULL, uncompressed or re-encoded (PS3.5 8.2.2 note 4 permits leaving
      it so).
    - YBR_FULL_422 re-encoded (JPEG-LS, JPEG 2000, HTJ2K, RLE, JPEG Lossless) holds its YCbCr
      samples, upsampled; uncompressed it is sent as RGB (its subsampled layout is not
      remade; Cornerstone recognises RGB by the frame's length, as from Orthanc and dcm4chee).
    - JPEG Baseline is made from RGB: its encoder converts to YCbCr itself and decoders back.
    - YBR_ICT and YBR_RCT come out of the JPEG 2000 decoder as RGB, which clients take them as.
    """
    if info.samples_per_pixel != 3 or target == JPEG_BASELINE:
        return False
    space = info.photometric.strip()
    return space == "YBR_FULL" or (space == "YBR_FULL_422" and target != EXPLICIT_VR_LITTLE_ENDIAN)


def _pixels(ds: Dataset, as_rgb: bool = True) -> np.ndarray:
    """`ds.pixel_array`, decoded with the preferred plugin."""
    _check_dataset_size(ds, int(ds.get("NumberOfFrames") or 1))
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

    return _decoded(ts, decode)


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


# The most bytes one decode makes: a frame, or an instance decoded whole (_pixels). Decoders
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


def _check_dataset_size(ds: Dataset, frames: int) -> None:
    _check_decoded_size(
        int(ds.get("Rows") or 0),
        int(ds.get("Columns") or 0),
        int(ds.get("SamplesPerPixel") or 1),
        int(ds.get("BitsAllocated") or 8),
        frames,
    )


def frame_array(path: Path, ds: Dataset, n: int, as_rgb: bool = True) -> np.ndarray:
    """Frame n (1-based), decoded; reads only that frame when the file allows it. `as_rgb`:
    YCbCr converted to RGB (pydicom's default), else left as it is (keeps_ybr)."""
    _check_dataset_size(ds, 1)
    ts = ds.file_meta.TransferSyntaxUID
    if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN or (
        ts == RLE_LOSSLESS and ds.get("BitsAllocated") == 1
    ):
        # no random access into deflate; 1-bit RLE is decoded by _pixels, not by pydicom
        return _whole_file_frame(path, n, as_rgb)
    if not UID(str(ts)).is_compressed:
        _check_native_frame(path, ds, n)
    try:
        frame: np.ndarray = _decoded(
            str(ds.file_meta.TransferSyntaxUID),
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


@functools.lru_cache(maxsize=1024)
def _value_bytes_of(name: str, size: int, _mtime_ns: int) -> int | None:
    with open(name, "rb") as fp:
        head = pydicom.dcmread(fp, stop_before_pixels=True)  # leaves fp at the pixel tag
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


# The frames of the last file decoded whole (Deflated, 1-bit RLE, files pydicom reads only
# whole), kept for its next frame: every frame of a 256-frame Deflated instance, asked one by
# one or drawn as an animation, decoded the whole file 256 times (33 s, against 0.7 s for the
# same frames uncompressed). One file per process, so memory stays at one decoded instance
# (a Deflated one inflates to at most dicomfile.MAX_INFLATED_BYTES). Blobs never change
# under their key; the file's size and time are part of the key all the same.
_WHOLE_LOCK = threading.Lock()
# A file decoded whole into more than this is not kept (1-bit RLE and the files pydicom reads
# only whole have no inflated-size bound).
WHOLE_FILE_KEEP_MAX_BYTES = 64 * 1024 * 1024
_whole: tuple[tuple[str, int, int, bool], np.ndarray] | None = None


def _whole_file_frame(path: Path, n: int, as_rgb: bool) -> np.ndarray:
    """Frame n (1-based) of a file decoded whole, a copy (the decoded file is shared)."""
    global _whole
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, as_rgb)
    with _WHOLE_LOCK:
        cached = _whole[1] if _whole is not None and _whole[0] == key else None
    if cached is None:
        full = pydicom.dcmread(path)
        arr = _pixels(full, as_rgb)
        # Frames by the array's shape, not by Number of Frames: pydicom counts the frames a
        # value holds when the attribute is absent (a Deflated file whose Columns was halved
        # came out as two frames, and frame 1 was both, a 3-D "frame" Pillow refused: a 500).
        one = 2 if int(full.get("SamplesPerPixel") or 1) == 1 else 3  # a frame's dimensions
        cached = arr if arr.ndim > one else arr[np.newaxis]
        if cached.nbytes <= WHOLE_FILE_KEEP_MAX_BYTES:
            with _WHOLE_LOCK:
                _whole = (key, cached)
    frame: np.ndarray = cached[n - 1].copy()
    return frame


def _cannot(path: Path | None, what: str, exc: Exception) -> TranscodeError:
    return TranscodeError(f"cannot {what}: {exc}; ask for transfer-syntax=* for the stored bytes")


def decode_frames(path: Path, frames: list[int]) -> list[bytes]:
    """Frames (1-based) decoded to native little-endian bytes (Explicit VR Little Endian).

    Colour that a decoder delivers as YCbCr is converted to RGB (pydicom's default), except
    YBR_FULL, which stays so (keeps_ybr).
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    info = PixelInfo.of(ds)
    planar = info.samples_per_pixel > 1 and ds.get("PlanarConfiguration") == 1
    out = []
    for n in frames:
        try:
            arr = frame_array(path, ds, n, not keeps_ybr(info, EXPLICIT_VR_LITTLE_ENDIAN))
            # Bit-packing refuses samples other than 0 and 1 (a JPEG frame's, under a Bits
            # Allocated of 1) with a ValueError: inside the `except`, not a 500.
            out.append(_frame_bytes(arr, info.bits_allocated, planar))
        except DECODE_ERRORS as exc:
            raise _cannot(path, f"decode frame {n}", exc) from None
    return out


def encode_frames(path: Path, frames: list[int], transfer_syntax_uid: str) -> list[bytes]:
    """Frames decoded, then encoded in `transfer_syntax_uid` (one codestream per frame)."""
    codec = ENCODERS[transfer_syntax_uid]
    assert codec.encode is not None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    info = PixelInfo.of(ds)
    out = []
    for n in frames:
        try:
            arr = frame_array(path, ds, n, not keeps_ybr(info, transfer_syntax_uid))
            out.append(codec.encode(arr, info))
        except DECODE_ERRORS as exc:
            raise _cannot(
                path, f"encode frame {n} as {UID(transfer_syntax_uid).name}", exc
            ) from None
    return out


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
        arr, _ = _decoded(
            transfer_syntax_uid,
            lambda plugin: get_decoder(transfer_syntax_uid).as_array(
                encapsulate([codestream]), **opts, decoding_plugin=plugin
            ),
        )
    except DECODE_ERRORS as exc:
        raise _cannot(None, f"decode a {UID(transfer_syntax_uid).name} frame", exc) from None
    return arr


def convert_codestream(codestream: bytes, stored_ts: str, info: PixelInfo, target: str) -> bytes:
    """A stored compressed frame decoded, then sent uncompressed or re-encoded as `target`;
    in the colour space the metadata gives (keeps_ybr), for it is all a client knows."""
    arr = decode_codestream(codestream, stored_ts, info, not keeps_ybr(info, target))
    codec = ENCODERS[target]
    try:
        if codec.encode is None:  # same layout as decode_frames gives
            planar = info.samples_per_pixel > 1 and info.planar_configuration == 1
            return _frame_bytes(arr, info.bits_allocated, planar)
        return codec.encode(arr, info)
    except DECODE_ERRORS as exc:
        raise _cannot(None, f"encode a frame as {UID(target).name}", exc) from None


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
        arr = _pixels(ds, as_rgb=not keeps_ybr(info, EXPLICIT_VR_LITTLE_ENDIAN))
        return _frame_bytes(arr, info.bits_allocated, planar)
    except DECODE_ERRORS as exc:
        raise _cannot(None, "decode the nested Pixel Data", exc) from None


def stored_frames(path: Path, frames: Sequence[int]) -> list[bytes]:
    """Frames of encapsulated pixel data as stored, for files whose fragment-to-frame mapping
    could not be recorded at ingest (no offset table and fragments != frames). pydicom splits
    them (by JPEG markers) reading the open file, up to the farthest frame asked for; memory
    holds the frames asked for, not the Pixel Data (the file was read whole, and every frame
    of it kept, for each request: 19 MB for one 15 KB frame of a 9 MB value)."""
    wanted, last = set(frames), max(frames)
    found: dict[int, bytes] = {}
    count = 0
    with path.open("rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)  # leaves fp at the pixel tag
        nframes = frame_count(ds.get("NumberOfFrames"))
        # The element's header: tag, VR, 2 reserved bytes, the length (PS3.5 7.1.2); or tag
        # and length when written implicitly in an explicit file (pydicom reads that too).
        if fp.read(8)[4:6].isalpha():
            fp.read(4)
        try:
            for count, frame in enumerate(generate_frames(fp, number_of_frames=nframes), 1):
                if count in wanted:
                    found[count] = frame
                if count >= last:
                    break
        except DECODE_ERRORS as exc:  # fewer fragments than frames, a damaged offset table
            raise NotFoundError(
                f"the stored pixel data does not hold the frames asked for: {exc}"
            ) from None
    if last > count:
        raise NotFoundError(f"the stored pixel data holds {count} frames")
    return [found[n] for n in frames]


def to_transfer_syntax(src: Path, dst: Path, transfer_syntax_uid: str) -> None:
    """Write `src` to `dst` in `transfer_syntax_uid` (a key of ENCODERS). The SOP Instance UID
    is kept; lossy output is marked with Lossy Image Compression (PS3.3 C.7.6.1.1.5).

    Written as it is made (_write_streamed): the header, then the Pixel Data frame by frame,
    so that memory holds a frame, not the instance. Deflated files (inflated whole, at most
    dicomfile.MAX_INFLATED_BYTES), 1-bit Pixel Data (its frames share bytes) and instances
    without Pixel Data are converted in memory (converted_dataset), the same bytes."""
    what = f"write {UID(transfer_syntax_uid).name}"
    try:
        head = pydicom.dcmread(src, stop_before_pixels=True)
        ts = UID(str(head.file_meta.TransferSyntaxUID))
        what = f"convert {ts.name} to {UID(transfer_syntax_uid).name}"
        whole = ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN or head.get("BitsAllocated") == 1
        if not whole and _decoded(
            ts, lambda plugin: _write_streamed(src, dst, transfer_syntax_uid, plugin)
        ):
            return
        ds = converted_dataset(src, transfer_syntax_uid)
        ds.save_as(dst, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except DECODE_ERRORS as exc:
        raise _cannot(src, what, exc) from None


_PIXEL_DATA = 0x7FE00010
# Values longer than this are left in the file when a header is read for a conversion (the
# Pixel Data above all); each is read when it is written.
_CONVERT_DEFER_BYTES = 64 * 1024
# Native Pixel Data is copied (or swapped, from big endian) in reads of this size.
CONVERT_COPY_BYTES = 1024 * 1024


def _write_streamed(src: Path, dst: Path, target: str, plugin: str) -> bool:
    """`src` converted to `target` into `dst` as converted_dataset and dcmwrite would write
    it, byte for byte (test_convert_stream checks so on the corpus), with one frame in memory at
    a time; False when `src` has no top-level Pixel Data (nothing written). Decoding uses
    `plugin` (see _decoded)."""
    ds = pydicom.dcmread(src, defer_size=_CONVERT_DEFER_BYTES)
    if _PIXEL_DATA not in ds:
        return False
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    info = PixelInfo.of(ds)
    codec = ENCODERS[target]
    if not codec.accepts(info):  # e.g. float data to a codec (available_targets)
        raise ValueError(f"{UID(target).name} does not take these pixels")
    if ts.is_compressed or codec.encode is not None:  # decoded a frame at a time
        _check_dataset_size(ds, 1)
    pixels = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    # What pydicom's own reading of a file for its frames gives the decoder (iter_pixels).
    options = as_pixel_options(ds)
    options["transfer_syntax_uid"] = ts
    options["pixel_keyword"] = "PixelData"
    if not ts.is_implicit_VR:
        options["pixel_vr"] = str(pixels.VR)
    _drop_extended_offsets(ds)  # read into `options` above; the stored fragments' offsets
    kept: bytes | None = pixels.value  # None: left in the file, at value_tell
    offset = 0 if kept is not None else int(cast(RawDataElement, pixels).value_tell)
    # As the file states it: pydicom reads a value cut short by the end of the file as
    # what there is, which is not the instance's Pixel Data.
    length = int(pixels.length) if isinstance(pixels, RawDataElement) else len(kept or b"")
    # Read now, before the header is cut short at the Pixel Data; written after it.
    tail = Dataset()
    for tag in [t for t in ds.keys() if t > _PIXEL_DATA]:
        tail.add(ds[tag])
        del ds[tag]
    del ds[_PIXEL_DATA]
    if not ts.is_little_endian:  # reads every element: none is left raw, in big endian
        _swap_binary_values(ds)
        _swap_binary_values(tail)
        ds.set_original_encoding(False, True, ds.original_character_set)
    nframes = int(ds.get("NumberOfFrames") or 1)
    with open(src, "rb") as f, open(dst, "wb") as out:
        value: BinaryIO = f if kept is None else io.BytesIO(kept)
        value.seek(offset)
        method = lossy_method(ts, value) if ts.is_compressed else None
        value.seek(offset)
        ds.file_meta.TransferSyntaxUID = UID(target)
        decoder = get_decoder(ts)

        def frames() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
            yield from decoder.iter_array(value, decoding_plugin=plugin, as_rgb=True, **options)

        def header() -> None:
            ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)

        if codec.encode is not None:
            if info.samples_per_pixel == 3:  # decoded as RGB, pixel-interleaved
                info = replace(info, photometric="RGB", planar_configuration=0)
            _decoded_colour(ds, info)
            encode = codec.encode
            if not codec.lossy:
                _mark_lossy(ds, method)
                header()
                _write_encapsulated(out, (encode(arr, info) for arr, _ in frames()), nframes)
            else:
                # The ratio goes in the header, before the Pixel Data, and is known once every
                # frame is encoded: the fragments wait in a scratch file (lossy, so small).
                sizes = _Sizes()
                with tempfile.TemporaryFile(dir=dst.parent) as encoded:
                    _write_encapsulated(
                        encoded, sizes.of(encode, info, (a for a, _ in frames())), nframes
                    )
                    _mark_lossy(ds, method, sizes.ratio())
                    header()
                    encoded.seek(0)
                    shutil.copyfileobj(encoded, out, CONVERT_COPY_BYTES)
        elif ts.is_compressed:
            decoded = frames()
            first, props = next(decoded)
            ds.PhotometricInterpretation = props["photometric_interpretation"]
            if info.samples_per_pixel > 1:
                ds.PlanarConfiguration = props["planar_configuration"]
            if "NumberOfFrames" in ds or nframes > 1:
                ds.NumberOfFrames = nframes
            _mark_lossy(ds, method)
            header()
            data = (arr.tobytes() for arr in itertools.chain([first], (a for a, _ in decoded)))
            _write_native(out, "OB" if info.bits_allocated <= 8 else "OW", data, nframes)
        else:  # native: the bytes as they are, swapped from big endian
            if length == 0xFFFFFFFF:  # read to its delimiter: item tags, not pixels
                raise ValueError(
                    f"its Pixel Data has an undefined length, which {ts.name} does not allow"
                    " (PS3.5 A.4: only encapsulated Pixel Data has one)"
                )
            header()
            width = 1 if ts.is_little_endian else _word_width(info, str(pixels.VR))
            chunks = _copied(value, length, width)
            # As pydicom writes it: Implicit VR Pixel Data is OW (PS3.5 A.1).
            wide = ts.is_implicit_VR or info.bits_allocated > 8
            _write_native(out, "OW" if wide else "OB", chunks, None, length)
        if len(tail):
            fp = DicomFileLike(out)
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, tail)
    return True


def _word_width(info: PixelInfo, vr: str) -> int:
    """The width of the words by which big endian Pixel Data is swapped (PS3.5 A.3): Bits
    Allocated, and 16 bits for OW, 8-bit pixels too."""
    width = info.bits_allocated // 8
    return 2 if width <= 1 and vr == "OW" else max(1, width)


def _copied(f: BinaryIO, length: int, width: int) -> Iterator[bytes]:
    """`length` bytes of `f` in chunks of CONVERT_COPY_BYTES, each `width`-byte word
    byte-swapped when `width` is over 1 (big endian to little)."""
    left = length
    while left > 0:
        chunk = f.read(min(CONVERT_COPY_BYTES, left))
        if not chunk:
            raise EOFError(f"the Pixel Data ends {left} bytes early")
        left -= len(chunk)
        if width > 1:
            chunk = np.frombuffer(chunk, f">u{width}").astype(f"<u{width}").tobytes()
        yield chunk


def _write_native(
    out: BinaryIO, vr: str, chunks: Iterator[bytes], frames: int | None, length: int = 0
) -> None:
    """Pixel Data of defined length (PS3.5 7.1.2), padded to even (7.1.1): `length` bytes
    given, or `frames` frames of the first one's length; its length is written once known."""
    start = out.tell()
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr.encode(), 0, 0))
    written, count, size = 0, 0, None
    for chunk in chunks:
        if frames is not None:
            size = len(chunk) if size is None else size
            if len(chunk) != size:
                raise ValueError(f"frame {count + 1} decoded to {len(chunk)} bytes, not {size}")
            count += 1
        out.write(chunk)
        written += len(chunk)
    if frames is not None and count != frames:
        raise ValueError(f"{count} frames decoded, not the {frames} of Number of Frames")
    if frames is None and written != length:
        raise EOFError(f"the Pixel Data ends {length - written} bytes early")
    if written >= 2**32 - 1:  # PS3.5 8.1.1: a 32-bit length
        raise ValueError(f"the uncompressed Pixel Data would be {written} bytes")
    if written % 2:
        out.write(b"\0")
    end = out.tell()
    out.seek(start + 8)
    out.write(struct.pack("<I", written + written % 2))
    out.seek(end)


def _write_encapsulated(out: BinaryIO, codestreams: Iterator[bytes], frames: int) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): one fragment per frame, padded to even, and a
    Basic Offset Table, filled in once the fragments are written (as pydicom's encapsulate
    with has_bot=True makes it)."""
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    table = out.tell() + 8
    out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * frames) + b"\0" * (4 * frames))
    offsets: list[int] = []
    position = 0
    for data in codestreams:
        if len(offsets) == frames:
            raise ValueError(f"more frames than the {frames} of Number of Frames")
        data = data + b"\0" if len(data) % 2 else data
        offsets.append(position)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)))
        out.write(data)
        position += 8 + len(data)
        if position > 0xFFFFFFFF:
            raise ValueError("the frames are too long for a Basic Offset Table")
    if len(offsets) != frames:
        raise ValueError(f"{len(offsets)} frames decoded, not the {frames} of Number of Frames")
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    end = out.tell()
    out.seek(table)
    out.write(struct.pack(f"<{frames}I", *offsets))
    out.seek(end)


# Stored syntaxes whose pixels were certainly compressed with loss, and their PS3.3
# C.7.6.1.1.5 method: a decoded copy says so even when the original did not.
_ALWAYS_LOSSY = {JPEG_BASELINE: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}


def lossy_method(ts: str, pixel_data: bytes | BinaryIO) -> str | None:
    """The PS3.3 C.7.6.1.1.5.1 method when encapsulated pixel data were compressed with loss,
    else None. Certain for JPEG baseline and extended; read from the first frame's codestream
    for the syntaxes that may be either (PS3.5 8.2.3, 8.2.4, 8.2.14):
    - JPEG-LS Near-Lossless: lossy when the scan's NEAR parameter is not 0 (ISO 14495-1 C.2.3);
    - JPEG 2000 and HTJ2K (not their lossless-only syntaxes): lossy when the coding style (COD)
      names the irreversible 9-7 wavelet (ISO 15444-1 A.6.1). The reversible 5-3 wavelet may
      still have been truncated; such data say nothing here, and only the original's own Lossy
      Image Compression attribute can tell.
    """
    method = _ALWAYS_LOSSY.get(ts)
    if method is not None or ts not in (JPEGLSNearLossless, JPEG2000, HTJ2K):
        return method
    try:
        fragments = generate_fragments(pixel_data)
        next(fragments)  # the Basic Offset Table
        first = next(fragments)
        if ts == JPEGLSNearLossless:
            return "ISO_14495_1" if _jpeg_ls_near(first) else None
        if _j2k_wavelet(first) == 0:
            return "ISO_15444_15" if ts == HTJ2K else "ISO_15444_1"
    except (StopIteration, ValueError, IndexError, struct.error):  # damaged: says nothing
        return None
    return None


def _jpeg_ls_near(codestream: bytes) -> int | None:
    """NEAR of the first scan of a JPEG-LS codestream (SOS: Ls, Ns, Ns x (Ci, Tmi), NEAR)."""
    if codestream[:2] != b"\xff\xd8":
        return None
    for marker, pos in _segments(codestream, 2):
        if marker == 0xDA:
            if pos + 5 > len(codestream):
                return None
            at = pos + 5 + 2 * codestream[pos + 4]
            return codestream[at] if at < len(codestream) else None
    return None


def _j2k_wavelet(codestream: bytes) -> int | None:
    """The wavelet of a JPEG 2000 main header's COD segment: 0 irreversible 9-7, 1 reversible
    5-3 (Lcod, Scod, SGcod (4 bytes), then decomposition levels, code-block width, height and
    style, then the transformation). The codestream may sit in a JP2 box: found by SOC+SIZ."""
    start = codestream.find(b"\xff\x4f\xff\x51")
    if start < 0:
        return None
    for marker, pos in _segments(codestream, start + 2):
        if marker in (0x90, 0x93):  # SOT, SOD: the main header ended without a COD
            return None
        if marker == 0x52:
            at = pos + 13
            return codestream[at] if at < len(codestream) else None
    return None


def _segments(codestream: bytes, pos: int) -> Iterator[tuple[int, int]]:
    """(marker, offset) of each marker segment from `pos` (0xFF, the marker, a 2-byte
    length counting itself), as long as the bytes read so; fill bytes (0xFF 0xFF) skipped."""
    while pos + 4 <= len(codestream) and codestream[pos] == 0xFF:
        marker = codestream[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        yield marker, pos
        (length,) = struct.unpack_from(">H", codestream, pos + 2)
        pos += 2 + length


def one_bit_pixel_data(src: Path) -> bytes:
    """The Pixel Data of a 1-bit instance stored compressed (or deflated) as its uncompressed
    value, as Explicit VR Little Endian holds it and the conversion to it makes it
    (_convert_pixels): every frame decoded, then bit-packed as one run (PS3.5 8.1.1: the
    frames follow each other with no padding, so a frame need not start on a byte), padded
    to an even length (PS3.5 7.1.1). Runs in a worker thread."""
    ds = pydicom.dcmread(src)
    try:
        data = _frame_bytes(_pixels(ds), 1)
    except DECODE_ERRORS as exc:
        raise _cannot(src, "decode the 1-bit Pixel Data", exc) from None
    return data + b"\0" if len(data) % 2 else data


def converted_dataset(src: Path, transfer_syntax_uid: str) -> Dataset:
    """`src` read and converted to `transfer_syntax_uid` (a key of ENCODERS), in memory: the
    data set of a WADO conversion, or of a DIMSE C-STORE sub-operation to a peer that did not
    accept the stored syntax. The SOP Instance UID is kept."""
    ds = pydicom.dcmread(src)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        if not ts.is_little_endian:  # every target is little endian
            # Visits every element, nested ones included, so that none is left raw (as
            # read, in big endian bytes): below, the data set is marked little endian.
            _swap_binary_values(ds, top=True)
        if "PixelData" in ds and transfer_syntax_uid != ts:
            method = lossy_method(ts, ds.PixelData) if ts.is_compressed else None
            _mark_lossy(ds, method, _convert_pixels(ds, ts, transfer_syntax_uid))
    except DECODE_ERRORS as exc:
        raise _cannot(src, f"convert {ts.name} to {UID(transfer_syntax_uid).name}", exc) from None
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    if "PixelData" in ds and transfer_syntax_uid != ts:
        _drop_extended_offsets(ds)
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
        if ts.is_compressed and info.bits_allocated == 1:
            # PS3.5 8.1.1: 1-bit Pixel Data is bit-packed, frames following each other with
            # no padding between them; pydicom's decompress() leaves a byte per pixel.
            ds.PixelData = _frame_bytes(_pixels(ds), 1)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = False
        elif ts.is_compressed:
            # pydicom converts YCbCr to RGB and sets Photometric Interpretation accordingly.
            _decoded(
                ts,
                lambda plugin: ds.decompress(generate_instance_uid=False, decoding_plugin=plugin),
            )
        elif not ts.is_little_endian and info.bits_allocated > 1:
            # Big endian: the words swapped, as they are streamed (_write_streamed), bytes
            # past the pixels included; colour untouched.
            value = bytes(ds.PixelData)
            width = _word_width(info, str(ds["PixelData"].VR))
            ds.PixelData = b"".join(_copied(io.BytesIO(value), len(value), width))
            ds["PixelData"].VR = "OW" if info.bits_allocated > 8 else "OB"
        elif not ts.is_little_endian:  # 1-bit big endian: bits in 16-bit words, unpacked
            ds.PixelData = _frame_bytes(_pixels(ds, as_rgb=False), 1)
            ds["PixelData"].VR = "OB"
        # Implicit VR and deflated: the pixel bytes are already little endian, unchanged.
        return None
    arr = _pixels(ds)  # colour converted to RGB, as _decoded_colour then says
    if info.samples_per_pixel == 3:  # and pixel-interleaved, Planar Configuration 0
        info = replace(info, photometric="RGB", planar_configuration=0)
    frames = arr if int(ds.get("NumberOfFrames") or 1) > 1 else arr[np.newaxis]
    sizes = _Sizes()
    ds.PixelData = encapsulate(list(sizes.of(codec.encode, info, frames)), has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    _decoded_colour(ds, info)
    return sizes.ratio() if codec.lossy else None


class _Sizes:
    """Bytes of frames before and after they are encoded: the compression ratio."""

    def __init__(self) -> None:
        self.decoded = self.encoded = 0

    def of(
        self,
        encode: Callable[[np.ndarray, PixelInfo], bytes],
        info: PixelInfo,
        frames: Iterable[np.ndarray],
    ) -> Iterator[bytes]:
        for arr in frames:
            data = encode(arr, info)
            self.decoded += arr.nbytes
            self.encoded += len(data)
            yield data

    def ratio(self) -> float:
        return self.decoded / max(1, self.encoded)


def _mark_lossy(ds: Dataset, stored: str | None, ratio: float | None = None) -> None:
    """Lossy Image Compression of a converted copy (PS3.3 C.7.6.1.1.5): `stored`, the method
    of a lossy stored syntax (lossy_method), counts when the data set does not say either way;
    `ratio`, a lossy encoding of the copy (JPEG Baseline), is one more step. C.7.6.1.1.5.1-2:
    the methods and ratios of successive lossy steps are values in the order applied, one
    ratio per method; a ratio is added only where every earlier step has its own."""
    said = "LossyImageCompression" in ds
    if not said and stored:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = stored
    if ratio is None:
        return
    lossy = ds.get("LossyImageCompression") == "01"
    methods = _values(ds, "LossyImageCompressionMethod") if lossy else []
    ratios = _values(ds, "LossyImageCompressionRatio") if lossy else []
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = [*methods, _LOSSY_ENCODE_METHOD]
    if len(ratios) == len(methods):
        ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"]


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return [str(v) for v in (value if isinstance(value, MultiValue) else [value])]


def _decoded_colour(ds: Dataset, info: PixelInfo) -> None:
    if info.samples_per_pixel == 3:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
