"""Rendering pixel data as consumer images (PS3.18 8.3.5, 10.4.1.1.3): LUTs, fit, encode.

With transcode/, the pixel layer: the only modules importing numpy, Pillow and
pydicom.pixels. Synchronous; called in worker threads behind the app's limiter.
"""

from __future__ import annotations

import io
from collections import abc
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.sequence import Sequence

from dicomweb_server.dicom_json import first_number
from dicomweb_server.iccprofile import colour_managed
from dicomweb_server.rendered import (
    THUMBNAIL_SIZE,
    RenderParams,
    check_animation,
    output_size,
    region_box,
)
from dicomweb_server.transcode.codecs import TranscodeError
from dicomweb_server.transcode.frames import frame_array, read_stored
from dicomweb_server.transcode.inflated import hold
from dicomweb_server.transcode.plugins import DECODE_ERRORS
from dicomweb_server.vr import swapped_words

__all__ = [
    "JPEG_MAX_EDGE",
    "MAX_ANIMATION_FRAMES",
    "render_animation",
    "render_frame",
    "render_icon",
]

# Frames of a multi-frame instance put into one animated GIF, at most.
MAX_ANIMATION_FRAMES = 512
# Longest edge of a JPEG image, pixels: libjpeg's JPEG_MAX_DIMENSION (ITU-T T.81 allows 65535).
JPEG_MAX_EDGE = 65500
_FLOAT64_MAX = float(np.finfo(np.float64).max)
# Values of a rendered file's header longer than this are not read with it (pydicom's
# defer_size) but from the file when used: an ICC Profile (0028,2000) of megabytes (up to
# MAX_ICC_PROFILE_BYTES is used, a stored one may be longer) is read only for iccprofile=yes
# or srgb, Overlay Data and private values not at all; each rendering of an instance read
# and held its whole profile, iccprofile=no or not. Above the longest LUT Data rendering
# reads (65536 entries of 16 bits, 128 KiB: PS3.3 C.11.1.1), which comes with the header.
_HEADER_DEFER_BYTES = 256 * 1024
# ICC Profile (0028,2000): of the Image Pixel group (0028), but no LUT (_copy).
_ICC_PROFILE = 0x00282000


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output 0..1.

    Center and width are finite and width > 0 (rendered.py and first_number see to it), but
    either may be huge (`window=1e300,1`), the width tiny (a Window Width of 1e-300), or the
    values huge (a rescaled value): see _ratio. SIGMOID is computed as 1/2 (1 + tanh(2 t)),
    t = (x - c) / w, the same function as the standard's 1 / (1 + exp(-4 t)), whose exp
    overflows for a value only some hundred widths below the center."""
    with np.errstate(over="ignore"):
        if function == "SIGMOID":
            out: np.ndarray = 0.5 * (1.0 + np.tanh(2.0 * _ratio(x, center, width)))
            return out
        if function == "LINEAR_EXACT":
            return np.clip(_ratio(x, center, width) + 0.5, 0.0, 1.0)
        if width <= 1:  # LINEAR of width 1 is a threshold: x <= c - 1/2 is the minimum
            return (x > center - 0.5).astype(np.float64)
        return np.clip(_ratio(x, center - 0.5, width - 1) + 0.5, 0.0, 1.0)


def _ratio(x: np.ndarray, origin: float, scale: float) -> np.ndarray:
    """(x - origin) / scale, the difference taken of halves (halving is exact): the
    difference of two finite float64 values may not be one (1e308 - -1e308), and an overflow
    there would saturate a value that lies inside the window. The half difference is divided
    by the scale itself, then doubled: a subnormal scale (a width of 5e-324) halves to 0, and
    x = origin then made 0 / 0, NaN (a value at the center shown black, not mid grey). Only a
    quotient past float64 overflows, to +-inf, which the caller's clip or tanh saturates as
    the function does in the limit; no NaN comes of finite values and a scale > 0."""
    with np.errstate(over="ignore"):
        out: np.ndarray = (x * 0.5 - origin * 0.5) / scale * 2.0
        return out


def _voi_lut(x: np.ndarray, ds: Dataset, float_pixels: bool) -> np.ndarray | None:
    """The first item of the VOI LUT Sequence applied (PS3.3 C.11.2.1.1), output 0..1: the
    LUT's entries over 2^n - 1, n its Descriptor's third value (the range of its output), not
    the frame's own minimum and maximum. None when the item cannot be read. pydicom's
    apply_voi_lut is not used: it indexes an 8-bit LUT of more than 256 entries with 8-bit
    integers, which wrap."""
    lut = _lut(_first_item(ds, "VOILUTSequence"), ds, _voi_input_signed(ds, float_pixels))
    if lut is None:
        return None
    table, first, bits = lut
    out: np.ndarray = np.clip(_looked_up(x, table, first) / float(2**bits - 1), 0.0, 1.0)
    return out


def _voi_input_signed(ds: Dataset, float_pixels: bool) -> bool:
    """Whether the VOI LUT's input may be negative, which makes its Descriptor's second value
    SS (PS3.3 C.11.2.1.1): as Pixel Representation says when no Modality LUT applies; SS when
    the Rescale Slope and Intercept may give negative values (a CT of unsigned stored values
    and intercept -1024: its LUT from -1024 on was read from 64512, a black image); US after
    a Modality LUT Sequence, whose entries are unsigned. Float pixel data is signed (IEEE 754;
    it has no Pixel Representation, PS3.3 C.7.6.3.1) and no Modality LUT Sequence applies to
    it (_modality_lut): one present made its VOI LUT from -1024 start at 64512."""
    if float_pixels:
        return True
    if _first_item(ds, "ModalityLUTSequence") is not None:
        return False
    signed = bool(ds.get("PixelRepresentation") == 1)
    slope, intercept = first_number(ds, "RescaleSlope"), first_number(ds, "RescaleIntercept")
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:  # as apply_modality_lut
        return signed
    bits = ds.get("BitsStored")
    bits = bits if isinstance(bits, int) and 1 <= bits <= 64 else 16
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = 1.0 if slope is None else slope
    return bool(min(lo * slope, hi * slope) + (intercept or 0.0) < 0)


def _modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT (PS3.3 C.11.1): the Modality LUT Sequence's first item, its first
    value mapped signed when Pixel Representation is 1 (C.11.1.1: whatever the VR it was
    read with), else Rescale Slope and Intercept (_rescaled). ValueError
    when the item cannot be read. pydicom's LUT path is not used: it took a first value of
    -512 read as US 65024 as 65024 and subtracted it from the pixels' own integer type
    (OverflowError, so the image was shown unscaled and its window skipped), and refused a
    Descriptor of 12 bits."""
    # A LUT maps integer stored values; float pixel data has none (its NaN indexed the
    # table at -2^63: a 406).
    item = None if arr.dtype.kind == "f" else _first_item(ds, "ModalityLUTSequence")
    if item is None:
        return _rescaled(arr, ds)
    lut = _lut(item, ds, bool(ds.get("PixelRepresentation") == 1))
    if lut is None:
        raise ValueError("the Modality LUT Sequence cannot be read")
    table, first, _ = lut
    return _looked_up(arr, table, first).astype(np.float64)


def _rescaled(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rescale Slope and Intercept applied, when both are given (as pydicom's
    apply_modality_lut). Each is VM 1 (PS3.3 C.11.1); of several values the first is taken,
    as dcmtk does and as _voi_input_signed reads them: pydicom multiplied by the whole list,
    which numpy broadcast along the rows (`1\\2` on a 2-column image scaled the second column
    by 2) or refused (then the image was shown unscaled). ValueError for a slope or intercept
    that is no finite number, and for a slope of 0, which maps every value to the intercept
    (a blank image): taken as invalid, as dcmtk does."""
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return arr
    slope, intercept = first_number(ds, "RescaleSlope"), first_number(ds, "RescaleIntercept")
    if slope is None or intercept is None:
        raise ValueError("a Rescale Slope or Intercept that is not a number")
    if slope == 0:
        raise ValueError("a Rescale Slope of 0")
    out: np.ndarray = arr.astype(np.float64) * slope + intercept
    return out


def _looked_up(x: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """table[x - first]: values below the first mapped one take the first entry, above the
    last the last (PS3.3 C.11.1.1, C.11.2.1.1)."""
    index = np.clip(np.round(np.clip(x, -1e18, 1e18)) - first, 0, table.size - 1)
    out: np.ndarray = table[index.astype(np.intp)]
    return out


def _lut(item: Dataset | None, ds: Dataset, signed: bool) -> tuple[np.ndarray, int, int] | None:
    """(entries, first value mapped, bits per entry) of a LUT item; None when it cannot be
    read. The Descriptor's first and third values are unsigned whatever its VR (read as SS,
    an entry count of 40000 comes as -25536), the second is signed when `signed` (its
    caller's rule). Entries of 8 bits come two to a word of OW data, or one to a word (US, or
    OW words as many as entries: written so often that dcmtk reads it so)."""
    descriptor = None if item is None else item.get("LUTDescriptor")
    # A list, or pydicom's MultiValue (Implicit VR: the US or SS resolved after reading).
    if item is None or "LUTData" not in item or not isinstance(descriptor, abc.Sequence):
        return None
    if len(descriptor) != 3 or not all(isinstance(v, int) for v in descriptor):
        return None
    entries, bits = (int(descriptor[0]) & 0xFFFF) or 65536, int(descriptor[2]) & 0xFFFF
    first = int(descriptor[1]) & 0xFFFF
    if not 1 <= bits <= 16:
        return None
    if first >= 32768 and signed:
        first -= 65536
    data = _lut_data(item["LUTData"].value, ds, entries, bits)
    if data is None or data.size < entries or data.dtype.kind not in "ui":
        return None
    return data[:entries], first, bits


def _lut_data(value: object, ds: Dataset, entries: int, bits: int) -> np.ndarray | None:
    """LUT Data as read by pydicom (OW bytes, US values or one value) as an array."""
    if isinstance(value, bytes | bytearray):
        if ds.original_encoding[1] is False:  # OW of a big endian data set
            value = swapped_words(bytes(value), "OW")
        if bits <= 8 and len(value) < 2 * entries:
            return np.frombuffer(value, np.uint8)
        return np.frombuffer(value[: len(value) - len(value) % 2], "<u2")
    if isinstance(value, int):
        return np.asarray([value])
    if isinstance(value, abc.Iterable):
        return np.asarray(list(value))
    return None


def _normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to 0..1. Halved first: the range of two finite float64 values may not be one
    (-1e308 to 1e308), and halving is exact."""
    lo, hi = float(np.min(x)) / 2, float(np.max(x)) / 2
    return np.zeros_like(x, dtype=np.float64) if hi <= lo else (x / 2 - lo) / (hi - lo)


# The functional groups that hold an enhanced multi-frame image's Modality LUT (Pixel Value
# Transformation, PS3.3 C.7.6.16.2.9) and VOI LUT (Frame VOI LUT, C.7.6.16.2.10), and the
# attributes of each, which stand in for the top-level ones of the same names.
_FRAME_LUT_GROUPS = {
    "PixelValueTransformationSequence": (
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "ModalityLUTSequence",
    ),
    "FrameVOILUTSequence": (
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "WindowCenterWidthExplanation",
        "VOILUTSequence",
    ),
}


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of sequence `keyword` of ds; None when absent, empty or not a sequence."""
    value = ds.get(keyword)
    return value[0] if isinstance(value, Sequence) and len(value) else None


def _copy(ds: Dataset) -> Dataset:
    """A new data set of ds's elements (shared, not copied), read as ds was: its encoding and
    its File Meta Information, by which pydicom reads OW LUT and segmented palette data. A
    value left unread (_HEADER_DEFER_BYTES) is read, into ds, only when it is of the image's
    LUTs and palettes (group 0028, _display's and _grey's), and not the ICC Profile: the
    copy is for them; iterating ds read every one (a profile, Overlay Data, private values
    of any size) for each rendering of an enhanced or big endian palette image."""
    out = Dataset()
    implicit, little = ds.original_encoding
    out.set_original_encoding(implicit, little, ds.original_character_set)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for tag in sorted(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        unread = isinstance(raw, RawDataElement) and raw.value is None and raw.length
        if unread and (tag >> 16 != 0x0028 or tag == _ICC_PROFILE):
            continue
        out.add(ds[tag])
    return out


def _frame_luts(ds: Dataset, n: int) -> Dataset:
    """The data set whose LUT attributes are frame n's (1-based). An enhanced multi-frame
    image keeps them in functional groups (PS3.3 C.7.6.16), the frame's own (item n of the
    Per-Frame Functional Groups Sequence) or those shared by every frame: the frame's group
    first, then the shared one, then the top-level attributes (PS3.4 N.2: the Modality and
    VOI LUTs of the frame shown). ds itself when no group gives them (every other image)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    sources = [_first_item(ds, "SharedFunctionalGroupsSequence")]
    if isinstance(per_frame, Sequence) and len(per_frame) >= n:
        sources.insert(0, per_frame[n - 1])
    groups: dict[str, Dataset] = {}
    for group in _FRAME_LUT_GROUPS:
        for source in sources:
            item = None if source is None else _first_item(source, group)
            if item is not None:
                groups[group] = item
                break
    if not groups:
        return ds
    frame = _copy(ds)  # ds is not changed: its next frame may differ
    for group, item in groups.items():
        for keyword in _FRAME_LUT_GROUPS[group]:
            if keyword in frame:  # the group replaces the top-level set as a whole
                del frame[keyword]
            value = item.data_element(keyword) if keyword in item else None
            if value is not None:
                frame.add(value)
    return frame


def _grey(arr: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None) -> np.ndarray:
    """Modality LUT, then VOI (the request's window, else the instance's, else min-max). An
    invalid Rescale Slope or Intercept leaves the values unscaled, and then only the request's
    window or min-max applies: the instance's window is in rescaled units."""
    try:
        with np.errstate(over="ignore"):
            x = _modality_lut(arr, ds).astype(np.float64)
        # A Rescale Slope as large as DS allows (1e308) overflows float64: such values
        # saturate at the largest float, so the VOI below only sees finite ones.
        x = np.clip(x, -_FLOAT64_MAX, _FLOAT64_MAX)
        scaled = True
    except (ValueError, TypeError, OverflowError):
        x, scaled = arr.astype(np.float64), False
    nan = np.isnan(x)  # float pixel data may hold NaN: shown black, left out of min-max
    if nan.any():
        x = np.where(nan, 0.0 if nan.all() else float(np.nanmin(x)), x)
    center, width = first_number(ds, "WindowCenter"), first_number(ds, "WindowWidth")
    if window is None and scaled and center is not None and width is not None and width > 0:
        window = (center, width, str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper())
    y: np.ndarray | None = None
    if window is not None:
        center, width, function = window
        if function == "LINEAR" and width <= 1 and arr.dtype.kind == "f":
            # LINEAR's half-unit terms place integer values in bins; of width 1 it is a
            # threshold. Float pixel data (a parametric map) windowed 0.5/1 means 0..1
            # mapped exactly, as LINEAR_EXACT does: as a threshold, a blank image.
            function = "LINEAR_EXACT"
        y = _window(x, center, width, function)
    elif scaled and "VOILUTSequence" in ds:
        y = _voi_lut(x, ds, arr.dtype.kind == "f")
    if y is None:
        y = _normalise(x)
    # PS3.3 C.7.6.3.1.2: MONOCHROME1's minimum is white; C.11.6.1.2: a Presentation LUT
    # Shape of INVERSE inverts the output of the VOI (for MONOCHROME1 it is the same
    # inversion, done once).
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")) == "INVERSE":
        y = 1.0 - y
    y[nan] = 0.0  # black on screen, whatever the inversion
    return np.round(y * 255.0).astype(np.uint8)


def _display(
    arr: np.ndarray, ds: Dataset, n: int, window: tuple[float, float, str] | None
) -> np.ndarray:
    """Frame n, 8-bit greyscale (H, W) or RGB (H, W, 3) ready for Pillow."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        return _grey(arr, _frame_luts(ds, n), window)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, _little_endian_palette(ds))
    # Colour from pydicom is RGB (YCbCr already converted); scale >8-bit samples down.
    if arr.dtype != np.uint8:
        top = _colour_top(arr, ds, photometric)
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, top) / top * 255.0).astype(np.uint8)
    return arr


_PALETTE_DATA = tuple(f"{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha"))


def _little_endian_palette(ds: Dataset) -> Dataset:
    """ds, its palette tables in little endian order: pydicom reads a non-segmented table's
    OW words in the machine's order, and a big endian file's came out byte-swapped (a
    palette of [0 256 512 ...] as [0 1 2 ...]: a black image). A copy; ds is kept as read,
    for the next frame."""
    if ds.original_encoding[1] is not False or not any(k in ds for k in _PALETTE_DATA):
        return ds
    out = _copy(ds)
    for keyword in _PALETTE_DATA:
        if keyword in ds and isinstance(ds[keyword].value, bytes | bytearray):
            setattr(out, keyword, swapped_words(bytes(ds[keyword].value), "OW"))
    return out


def _bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Integer samples cut to Bits Stored: the bits above High Bit are not part of the value
    (PS3.5 8.1.1) and some decoders (JPEG-LS of a 16-bit precision) keep them; signed
    values sign-extended from Bits Stored."""
    bits = ds.get("BitsStored")
    if arr.dtype.kind not in "ui" or not isinstance(bits, int):
        return arr
    width = 8 * arr.dtype.itemsize
    if not 1 <= bits < width:
        return arr
    mask = (1 << bits) - 1
    v = arr.astype(np.int64) & mask
    if arr.dtype.kind == "i":
        sign = 1 << (bits - 1)
        v = (v ^ sign) - sign
    out: np.ndarray = v.astype(arr.dtype)
    return out


def _colour_top(arr: np.ndarray, ds: Dataset, photometric: str) -> float:
    """The largest value colour samples can hold: 2**Bits Stored - 1 (PS3.3 C.7.6.3.1); for
    a palette, the largest its entries hold (8 or 16 bits, C.7.6.3.1.5: their data type's).
    Not the frame's own largest value: a dark frame stays dark, and frames of one instance
    compare."""
    if arr.dtype.kind not in "ui":
        return float(arr.max()) or 1.0  # not integer samples: no range to scale by
    bits = ds.get("BitsStored")
    if photometric == "PALETTE COLOR" or not isinstance(bits, int):
        return float(np.iinfo(arr.dtype).max)
    return float(2 ** min(max(bits, 1), 8 * arr.dtype.itemsize) - 1)


def _encode(img: Image.Image, media: str, quality: int, icc: bytes | None = None) -> bytes:
    """img as `media`, with the ICC profile `icc` embedded when given (PS3.18 8.3.5.1.5 notes
    4 and 6: a JPEG's APP2 ICC_PROFILE segments, a PNG's iCCP chunk); GIF carries none
    (negotiate_rendered never chooses it for a request that asks for one)."""
    if media == "image/jpeg" and max(img.size) > JPEG_MAX_EDGE:
        # Pillow's JPEG writer failed with an OSError mid-save (a 500); Rows and Columns
        # reach 65535 (US), a viewport asks for less.
        raise TranscodeError(
            f"a JPEG image has at most {JPEG_MAX_EDGE} pixels a side and this rendering is "
            f"{img.width} x {img.height}: ask for image/png, or for a smaller viewport"
        )
    buf = io.BytesIO()
    profile = {} if icc is None else {"icc_profile": icc}
    if media == "image/png":
        img.save(buf, format="PNG", **profile)
    elif media == "image/gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="GIF")
    else:
        img = img.convert("L" if img.mode == "L" else "RGB")
        img.save(buf, format="JPEG", quality=quality, **profile)
    return buf.getvalue()


def _region(pixels: np.ndarray, params: RenderParams) -> np.ndarray:
    """The viewport's source region of a displayable frame (PS3.18 8.3.5.1.3), 400 unless it
    lies inside the frame. Cut from the array (a copy of the region only), not by Pillow's
    crop: that pads a region past the image's edges, allocating it whatever the image, and
    its decompression-bomb check, meant for files of unknown size, refuses (500) or warns of
    large regions of images already decoded."""
    if params.region is None:
        return pixels
    x0, y0, x1, y1 = region_box(params.region, pixels.shape[1], pixels.shape[0])
    out = pixels[y0:y1, x0:x1]
    _, _, sw, sh = params.region
    if sw is not None and sw < 0:  # PS3.18 8.3.5.1.3: a negative sw flips horizontally
        out = out[:, ::-1]
    if sh is not None and sh < 0:
        out = out[::-1]
    return np.ascontiguousarray(out)


def _image(pixels: np.ndarray, params: RenderParams) -> Image.Image:
    pixels = _region(pixels, params)
    return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")


def _fit_size(img: Image.Image, params: RenderParams, thumbnail: bool) -> tuple[int, int]:
    """Size of the image (its source region already cut) fitted inside the viewport."""
    return output_size(img.width, img.height, replace(params, region=None), thumbnail)


def _fit(img: Image.Image, params: RenderParams, thumbnail: bool) -> Image.Image:
    size = _fit_size(img, params, thumbnail)
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def _frame_pixels(
    path: Path,
    ds: Dataset,
    n: int,
    window: tuple[float, float, str] | None,
    scratch: Path | None = None,
) -> np.ndarray:
    """Frame n decoded, LUTs applied: 8-bit greyscale (H, W) or RGB (H, W, 3). `scratch`:
    where a Deflated file is inflated (frame_array)."""
    try:
        arr = frame_array(path, ds, n, scratch=scratch)
        if int(ds.get("SamplesPerPixel") or 1) == 1 and arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if int(ds.get("SamplesPerPixel") or 1) == 1:  # YCbCr converted: not samples any more
            arr = _bits_stored(arr, ds)
        out = _display(arr, ds, n, window)  # a palette without its tables raises here
    except DECODE_ERRORS as exc:
        raise TranscodeError(f"cannot decode frame {n} to render it: {exc}") from None
    # What Pillow makes an image of: (H, W) or (H, W, 3), not empty (a Rows of 0 windowed
    # reached the PNG writer, which refused it: a 500).
    if out.size == 0 or not (out.ndim == 2 or (out.ndim == 3 and out.shape[-1] == 3)):
        raise TranscodeError(f"frame {n} decoded to pixels of shape {out.shape}, not an image")
    return out


def _header(path: Path) -> Dataset:
    """The data set of a stored file up to its Pixel Data, its values longer than
    _HEADER_DEFER_BYTES read when used (not for a Deflated file: read_stored)."""
    return read_stored(path, stop_before_pixels=True, defer_size=_HEADER_DEFER_BYTES)


def render_frame(
    path: Path,
    frame: int,
    params: RenderParams,
    media: str,
    thumbnail: bool,
    scratch: Path | None = None,
) -> bytes:
    """Frame `frame` (1-based) as a consumer image: LUTs applied, fitted, encoded. `scratch`:
    where a Deflated file is inflated."""
    ds = _header(path)
    img = _image(_frame_pixels(path, ds, frame, params.window, scratch), params)
    img, icc = colour_managed(_fit(img, params, thumbnail), ds, frame, params.icc, media)
    return _encode(img, media, params.quality, icc)


def render_animation(path: Path, params: RenderParams, scratch: Path | None = None) -> bytes:
    """Every frame of a multi-frame instance as an animated GIF (PS3.18 8.7.4: image/gif may
    carry several frames), at the instance's Frame Time or 10 frames per second. 400 when
    frames x output pixels exceed MAX_ANIMATION_PIXELS, found from the first frame (all
    frames share its size), before any other is decoded. A Deflated file is inflated once,
    into `scratch`, for all its frames."""
    ds = _header(path)
    nframes = min(int(ds.get("NumberOfFrames") or 1), MAX_ANIMATION_FRAMES)
    images = []
    with hold(path):
        for n in range(1, nframes + 1):
            img = _image(_frame_pixels(path, ds, n, params.window, scratch), params)
            if n == 1:
                check_animation(nframes, _fit_size(img, params, thumbnail=False))
            images.append(_fit(img, params, False).convert("P", palette=Image.Palette.ADAPTIVE))
    frame_time = first_number(ds, "FrameTime")  # None when absent or invalid (`33,3`)
    frame_ms = int(frame_time) if frame_time is not None and 1 <= frame_time < 60_000 else 100
    buf = io.BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
    )
    return buf.getvalue()


def render_icon(label: str, params: RenderParams, media: str) -> bytes:
    """An icon for an instance without pixel data (SR, PDF, ...), or with pixel data that
    cannot be rendered as a thumbnail (video, an undecodable frame): its kind on a tile."""
    side = THUMBNAIL_SIZE
    img = Image.new("RGB", (side, side), (52, 58, 64))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, side - 9, side - 9), outline=(173, 181, 189), width=3)
    text = label[:8] or "DICOM"
    left, top, right, bottom = draw.textbbox((0, 0), text)
    draw.text(
        ((side - (right - left)) / 2, (side - (bottom - top)) / 2), text, fill=(248, 249, 250)
    )
    # Icons are thumbnails, whose viewport names no source region (PS3.18 8.3.5.1.3): _fit
    # fits the whole tile inside the viewport. Their colours are sRGB (no instance profile).
    img, icc = colour_managed(_fit(img, params, thumbnail=True), Dataset(), 1, params.icc, media)
    return _encode(img, media, params.quality, icc)
