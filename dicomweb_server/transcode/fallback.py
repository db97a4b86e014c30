"""A last-resort JPEG decoder: libjpeg-turbo through imagecodecs, as a pydicom decoding plugin
(FALLBACK_PLUGIN) added after pydicom's own for JPEG Baseline, JPEG Extended and JPEG Lossless
(FALLBACK_SYNTAXES; register_fallback).

pydicom tries its plugins in turn for each frame (pylibjpeg's libjpeg first, then Pillow for
8-bit JPEG) and this one only when all of them raised: a frame that decodes today decodes as
it did. Thomas Richter's libjpeg refuses some real files that libjpeg-turbo and dcmtk's
dcmdjpeg read: pydicom's own 12-bit JPEG Extended test file (JPEG-lossy.dcm), whose scan
header's spectral selection is not the 0-63 a sequential scan has (libjpeg-turbo warns
"Invalid SOS parameters for sequential JPEG" and decodes it as dcmdjpeg does, to the same
values). Pillow decodes 8-bit samples only.

The frame is given to pydicom as pylibjpeg gives it: the samples the codestream holds, no
colour transform (libjpeg-turbo's colour space set to its output's, a null conversion),
pixel-interleaved, in unsigned words of Bits Allocated; pydicom then makes YCbCr RGB when
asked (as_rgb), corrects unused bits and signs, as for any plugin's frame. libjpeg-turbo's
chroma upsampling (YBR_FULL_422's half-width Cb and Cr) is its "fancy" (triangle) filter,
which differs from libjpeg's by at most a few values in a sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.uid import UID

__all__ = [
    "DECODER_DEPENDENCIES",
    "FALLBACK_PLUGIN",
    "FALLBACK_SYNTAXES",
    "decode_frame",
    "is_available",
    "register_fallback",
]

FALLBACK_PLUGIN = "imagecodecs"
FALLBACK_SYNTAXES = (
    UID("1.2.840.10008.1.2.4.50"),  # JPEG Baseline (Process 1)
    UID("1.2.840.10008.1.2.4.51"),  # JPEG Extended (Process 2 & 4)
    UID("1.2.840.10008.1.2.4.57"),  # JPEG Lossless, Non-Hierarchical (Process 14)
    UID("1.2.840.10008.1.2.4.70"),  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
)
# What pydicom reports missing when the plugin is not available (its plugin protocol).
DECODER_DEPENDENCIES = {uid: ("imagecodecs",) for uid in FALLBACK_SYNTAXES}


def is_available(uid: str) -> bool:
    """Whether imagecodecs (with libjpeg-turbo) is installed to decode `uid` (pydicom's plugin
    protocol)."""
    if uid not in FALLBACK_SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's codestream decoded as pydicom's plugins return it (see the module's
    docstring); ValueError when it does not hold the pixels the runner describes."""
    import imagecodecs

    samples, bits = runner.samples_per_pixel, runner.bits_allocated
    if samples not in (1, 3) or bits not in (8, 16):
        raise ValueError(
            f"{samples} samples of {bits} bits allocated are no JPEG pixels this decoder makes"
        )
    # A null colour conversion: libjpeg-turbo converts nothing when the output colour space is
    # the one it takes the codestream's to be (which is also all its lossless mode allows).
    kwargs: dict[str, Any] = (
        {"colorspace": "YCbCr", "outcolorspace": "YCbCr"} if samples == 3 else {}
    )
    arr = np.asarray(imagecodecs.jpeg8_decode(src, **kwargs))
    shape = (runner.rows, runner.columns) + ((samples,) if samples > 1 else ())
    if arr.shape != shape:
        raise ValueError(f"the codestream holds {arr.shape} samples, not the {shape} expected")
    if arr.dtype.itemsize * 8 > bits:
        raise ValueError(f"the codestream's samples are wider than {bits} bits allocated")
    return np.ascontiguousarray(arr, dtype=f"<u{bits // 8}").tobytes()


def register_fallback() -> None:
    """Add FALLBACK_PLUGIN to pydicom's decoders of FALLBACK_SYNTAXES, after theirs (pydicom
    tries plugins in the order they were added); once per process."""
    for uid in FALLBACK_SYNTAXES:
        decoder = get_decoder(uid)
        if FALLBACK_PLUGIN in decoder.available_plugins or not is_available(uid):
            continue
        decoder.add_plugin(FALLBACK_PLUGIN, (__name__, "decode_frame"))
