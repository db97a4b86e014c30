"""The codec registry (STYLE.md rule 9): transfer syntax constants, what an encoder needs to
know of an instance's pixels (PixelInfo), the encoders (ENCODERS), what can be decoded
(decodable, available_targets, missing_codec) and the colour space frames are sent in
(keeps_ybr).

Decoding: whatever pydicom and its installed plugins decode (pylibjpeg-libjpeg, -openjpeg, -rle,
pyjpegls). Encoding targets (ENCODERS): Explicit VR Little Endian; RLE Lossless, JPEG-LS
Lossless and JPEG 2000 Lossless through pydicom's encoders; HTJ2K Lossless, HTJ2K Lossless
RPCL and HTJ2K (reversible) through imagecodecs (OpenJPH); JPEG Baseline (lossy, only when
asked for by name) through imagecodecs (libjpeg-turbo).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID, AllTransferSyntaxes

from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.media.mediatypes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from dicomweb_server.transcode.plugins import unpanicked

__all__ = [
    "ENCODERS",
    "HTJ2K_ANY",
    "HTJ2K_DECOMPOSITIONS",
    "HTJ2K_LOSSLESS",
    "HTJ2K_LOSSLESS_RPCL",
    "HTJ2K_RPCL_BASE_PIXELS",
    "JPEG_2000_LOSSLESS",
    "JPEG_BASELINE",
    "JPEG_BASELINE_QUALITY",
    "JPEG_LOSSLESS_SV1",
    "JPEG_LS_LOSSLESS",
    "NATIVE",
    "RLE_LOSSLESS",
    "Codec",
    "PixelInfo",
    "TranscodeError",
    "available_targets",
    "codec_fingerprint",
    "converted_keeps_ybr",
    "decodable",
    "keeps_ybr",
    "made_photometric",
    "missing_codec",
    "segments",
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


def made_photometric(info: PixelInfo, target: str) -> str:
    """The Photometric Interpretation of colour decoded and made into `target`: YCbCr kept
    as YBR_FULL (converted_keeps_ybr: YBR_FULL_422 arrives upsampled), else RGB, which
    pydicom's decoders make of YCbCr; YBR_RCT for RGB made into HTJ2K, whose encoder
    (OpenJPH) applies the reversible colour transform to it (PS3.5 8.2.4, 8.2.14: the
    attribute then says YBR_RCT). pydicom's encoders check it against PS3.5 8.2 and use it:
    JPEG 2000 gets no multi-component transform (pydicom's choice for RGB; for YBR_FULL the
    components must be those it names)."""
    if info.samples_per_pixel != 3:
        return info.photometric
    if target == JPEG_BASELINE:
        # _jpeg_encode's codestream holds YCbCr, chrominance halved horizontally; the
        # attributes describe the compressed data stream (PS3.5 8.2.1, CP 156): labelled
        # RGB, a decoder that trusts the label (pydicom warns) could skip the conversion.
        return "YBR_FULL_422"
    if converted_keeps_ybr(info, target):
        return "YBR_FULL"
    return "YBR_RCT" if target in (HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K_ANY) else "RGB"


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
            "photometric_interpretation": made_photometric(info, uid),
            "number_of_frames": 1,
            "planar_configuration": planar,
        }
        encoder = get_encoder(uid)  # pylibjpeg-rle's RLE encoder is Rust: unpanicked
        return bytes(unpanicked(lambda: encoder.encode(_native_order(arr), **opts)))

    return encode


def _htj2k_colour(info: PixelInfo) -> dict[str, Any]:
    """OpenJPH applies the reversible colour transform (RCT) to three components unless told
    they are not RGB; YCbCr samples are coded without it, for a codestream with a
    multi-component transform must be labelled YBR_RCT (PS3.5 8.2.4, 8.2.14), which decoders
    take as RGB once the transform is undone."""
    return {"rgb": False} if keeps_ybr(info, HTJ2K_LOSSLESS) else {}


def _htj2k_encode(arr: np.ndarray, info: PixelInfo) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.htj2k_encode(_native_order(arr), level=0, **_htj2k_colour(info)))


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
        resolutions=max(HTJ2K_DECOMPOSITIONS, needed), **_htj2k_colour(info),
    )  # fmt: skip
    return bytes(codestream)


def _jpeg_encode(arr: np.ndarray, info: PixelInfo) -> bytes:
    """JPEG Baseline of RGB (made_photometric): libjpeg converts it to YCbCr and halves the
    chrominance horizontally (4:2:2), what YBR_FULL_422 names (PS3.3 C.7.6.3.1.2; its default,
    4:2:0, halves it vertically too, which that label does not say)."""
    import imagecodecs

    subsampling = "422" if info.samples_per_pixel == 3 else None
    return bytes(
        imagecodecs.jpeg8_encode(
            _native_order(arr), level=JPEG_BASELINE_QUALITY, subsampling=subsampling
        )
    )


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
    for marker, pos in segments(codestream, 2):
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


def _ybr_fits(info: PixelInfo, target: str) -> bool:
    """Whether the colour space `target` is made in may hold these samples: YBR_FULL, which
    YCbCr kept (converted_keeps_ybr) is labelled, only with 8 bits allocated and at most 8 stored in
    RLE Lossless and JPEG-LS (PS3.5 Tables 8.2.2-1 and 8.2.3-1); RGB made of it would not
    hold the samples stored (pydicom converts 8-bit YCbCr only, with rounding)."""
    kept = converted_keeps_ybr(info, target)
    return not kept or (info.bits_allocated == 8 and info.bits_stored <= 8)


def _rle_accepts(info: PixelInfo) -> bool:
    # PS3.5 G.2 allows 32-bit samples, but pydicom's RLE encoders take 8 and 16 bits only.
    return (
        _integer(1, 16)(info) and info.bits_allocated in (8, 16) and _ybr_fits(info, RLE_LOSSLESS)
    )


def _jpeg_ls_accepts(info: PixelInfo) -> bool:
    # pyjpegls overflows its output buffer on images of a few pixels.
    return _integer(2, 16, min_side=8)(info) and _ybr_fits(info, JPEG_LS_LOSSLESS)


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
        JPEG_LS_LOSSLESS, False, "pyjpegls", _jpeg_ls_accepts,
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


def codec_fingerprint() -> str:
    """What this process can decode and encode, as text: available_targets depends on it, and
    so does every Available Transfer Syntax UID that metadata lists. A codec plugin installed
    or removed without a new server version changes the bytes of a metadata body, and so must
    change its entity tag."""
    encoders = [uid for uid, codec in ENCODERS.items() if codec.available()]
    decoders = [str(uid) for uid in AllTransferSyntaxes if decodable(uid)]
    return "encode " + ",".join(encoders) + "; decode " + ",".join(decoders)


def missing_codec(stored_ts: str) -> str:
    """A sentence naming what is missing to decode `stored_ts` (for 406 messages)."""
    uid = UID(stored_ts)
    try:
        missing = get_decoder(stored_ts).missing_dependencies
    except (NotImplementedError, ValueError):
        return f"pydicom has no decoder for {uid.name} ({uid})"
    return f"decoding {uid.name} ({uid}) needs: {'; '.join(missing) or 'a decoder plugin'}"


def keeps_ybr(info: PixelInfo, target: str) -> bool:
    """Whether frames served on their own (frames, Pixel Data bulk data) in `target` are
    decoded without converting colour, so that their samples are in the colour space the
    instance's metadata, the only description a client has of a frame, gives: converted to
    RGB under YBR metadata, Cornerstone and pydicom converted them a second time.

    - YBR_FULL stays YBR_FULL, uncompressed or re-encoded (PS3.5 8.2.2 note 4 permits leaving
      it so).
    - YBR_FULL_422 is sent as RGB, uncompressed or re-encoded: its subsampled layout is not
      remade, and Cornerstone (OHIF's loader) takes a frame of 3 samples a pixel under
      YBR_FULL_422 as RGB whatever its syntax, converting only one of the subsampled length
      (isColorConversionRequired), as Orthanc and dcm4chee send it (found by review: its
      YCbCr samples re-encoded as HTJ2K, JPEG 2000 or JPEG-LS were shown as RGB).
    - JPEG Baseline is made from RGB: its encoder converts to YCbCr itself and decoders back.
    - YBR_ICT and YBR_RCT come out of the JPEG 2000 decoder as RGB, which clients take them as.
    """
    if info.samples_per_pixel != 3 or target == JPEG_BASELINE:
        return False
    return info.photometric.strip() == "YBR_FULL"


def converted_keeps_ybr(info: PixelInfo, target: str) -> bool:
    """Whether a whole instance converted to `target` keeps its YCbCr samples, labelled
    YBR_FULL in its own header (convert.py): converted to RGB, they changed (the conversion
    rounds) under a lossless syntax. As keeps_ybr, and YBR_FULL_422 re-encoded (its samples
    upsampled); decoded to Explicit VR Little Endian it is RGB (the subsampled layout is not
    remade)."""
    if keeps_ybr(info, target):
        return True
    space = info.photometric.strip()
    return (
        info.samples_per_pixel == 3
        and space == "YBR_FULL_422"
        and target not in (JPEG_BASELINE, EXPLICIT_VR_LITTLE_ENDIAN)
    )


def segments(codestream: bytes, pos: int) -> Iterator[tuple[int, int]]:
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
