"""Lossy Image Compression (PS3.3 C.7.6.1.1.5): whether stored pixels were compressed with
loss, read from their codestream (lossy_method), and how a converted copy says so (mark_lossy,
with the compression ratio of its own lossy encoding measured by Sizes)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.uid import HTJ2K, JPEG2000, JPEGExtended12Bit, JPEGLSNearLossless

from dicomweb_server.transcode.codecs import JPEG_BASELINE, PixelInfo, segments

__all__ = ["Sizes", "lossy_method", "mark_lossy"]


# PS3.3 C.7.6.1.1.5.1 method of the one lossy encoding made here (JPEG Baseline).
_LOSSY_ENCODE_METHOD = "ISO_10918_1"

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
    for marker, pos in segments(codestream, 2):
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
    for marker, pos in segments(codestream, start + 2):
        if marker in (0x90, 0x93):  # SOT, SOD: the main header ended without a COD
            return None
        if marker == 0x52:
            at = pos + 13
            return codestream[at] if at < len(codestream) else None
    return None


class Sizes:
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


def mark_lossy(ds: Dataset, stored: str | None, ratio: float | None = None) -> None:
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
