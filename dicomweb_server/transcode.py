"""Decoding and re-encoding pixel data: the only importer of pydicom.pixels and numpy.

Codec work is CPU-bound and runs in worker threads behind the app's CapacityLimiter (STYLE.md
rule 8); these functions are synchronous and are called through `anyio.to_thread.run_sync`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pack_bits, pixel_array
from pydicom.uid import UID

from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.media import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
from dicomweb_server.rendered import THUMBNAIL_SIZE, RenderParams

__all__ = [
    "TranscodeError",
    "decode_frames",
    "render_frame",
    "render_icon",
    "stored_frames",
    "to_explicit_little_endian",
]


class TranscodeError(NotAcceptableError):
    """The pixel data cannot be converted as asked (a codec is missing or fails)."""


def _frame_bytes(arr: np.ndarray, bits_allocated: int, planar: bool = False) -> bytes:
    """Native bytes of decoded pixels: little endian, bit-packed when 1-bit, colour planes
    separated when the instance says Planar Configuration 1 (PS3.3 C.7.6.3.1.3)."""
    if bits_allocated == 1:
        return bytes(pack_bits(arr))
    if planar and arr.ndim >= 3:
        arr = np.moveaxis(arr, -1, -3)
    return bytes(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())


def decode_frames(path: Path, frames: list[int]) -> list[bytes]:
    """Frames (1-based) decoded to native little-endian bytes (Explicit VR Little Endian).

    Colour data that a decoder delivers as YCbCr is converted to RGB (pydicom's default), and
    colour samples are interleaved (Planar Configuration 0).
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    bits = int(ds.get("BitsAllocated") or 8)
    planar = int(ds.get("SamplesPerPixel") or 1) > 1 and ds.get("PlanarConfiguration") == 1
    deflated = ds.file_meta.TransferSyntaxUID == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    out = []
    for n in frames:
        try:
            # No random access into a deflate stream: decode the whole data set.
            arr = _all_frames(path)[n - 1] if deflated else _one_frame(path, n)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
            uid = UID(str(ds.file_meta.TransferSyntaxUID))
            raise TranscodeError(
                f"cannot decode frame {n} of {uid.name} ({uid}): {exc}; ask for "
                "transfer-syntax=* to receive the frames as stored"
            ) from None
        out.append(_frame_bytes(arr, bits, planar))
    return out


def _one_frame(path: Path, n: int) -> np.ndarray:
    """Frame n, reading and decoding only that frame when pydicom's lazy reader can."""
    try:
        frame: np.ndarray = pixel_array(str(path), index=n - 1)
        return frame
    except (AttributeError, ValueError, KeyError):
        # Files pydicom reads only with repairs (e.g. Pixel Data written implicitly in an
        # explicit VR file): decode through a full read instead.
        one: np.ndarray = _all_frames(path)[n - 1]
        return one


def _all_frames(path: Path) -> np.ndarray:
    full = pydicom.dcmread(path)
    arr = full.pixel_array
    return arr if int(full.get("NumberOfFrames") or 1) > 1 else arr[np.newaxis]


def stored_frames(path: Path, frames: list[int]) -> list[bytes]:
    """Frames of encapsulated pixel data as stored, for files whose fragment-to-frame mapping
    could not be recorded at ingest (no offset table and fragments != frames)."""
    ds = pydicom.dcmread(path)
    nframes = int(ds.get("NumberOfFrames") or 1)
    all_frames = list(generate_frames(ds.PixelData, number_of_frames=nframes))
    return [all_frames[n - 1] for n in frames]


def to_explicit_little_endian(src: Path, dst: Path) -> None:
    """Write `src` to `dst` in Explicit VR Little Endian, decompressing when needed."""
    ds = pydicom.dcmread(src)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        if ts.is_compressed and "PixelData" in ds:
            # The SOP Instance UID stays: a lossless conversion is the same instance (PS3.5 8.2).
            ds.decompress(generate_instance_uid=False)
        elif ts != EXPLICIT_VR_LITTLE_ENDIAN and "PixelData" in ds and not ts.is_little_endian:
            arr = ds.pixel_array
            planar = ds.get("PlanarConfiguration") == 1
            ds.PixelData = _frame_bytes(arr, int(ds.BitsAllocated), planar)
            if int(ds.BitsAllocated) > 8:
                ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
        ds.save_as(dst, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise TranscodeError(
            f"cannot convert {ts.name} ({ts}) to Explicit VR Little Endian: {exc}; ask for "
            "transfer-syntax=* to receive the instance as stored"
        ) from None


# --- Rendering (PS3.18 8.3.5, 10.4.1.1.3): pixels -> a consumer image -------------------------


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output 0..1."""
    if function == "SIGMOID":
        out: np.ndarray = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        return out
    if function == "LINEAR_EXACT" or width <= 1:
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x, dtype=np.float64) if hi <= lo else (x - lo) / (hi - lo)


def _first_number(value: Any) -> float:
    """The first of a possibly multi-valued DS (Window Center and Width may have several)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _grey(arr: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None) -> np.ndarray:
    """Modality LUT, then VOI (the request's window, else the instance's, else min-max)."""
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if window is not None:
        y = _window(x, *window)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        y = _window(x, _first_number(ds.WindowCenter), _first_number(ds.WindowWidth), function)
    elif "VOILUTSequence" in ds:
        y = _normalise(apply_voi_lut(x, ds).astype(np.float64))
    else:
        y = _normalise(x)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        y = 1.0 - y  # PS3.3 C.7.6.3.1.2: minimum is white
    return np.round(y * 255.0).astype(np.uint8)


def _display(arr: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None) -> np.ndarray:
    """8-bit greyscale (H, W) or RGB (H, W, 3) ready for Pillow."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        return _grey(arr, ds, window)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    # Colour from pydicom is RGB (YCbCr already converted); scale >8-bit samples down.
    if arr.dtype != np.uint8:
        top = float(arr.max()) or 1.0
        arr = np.round(arr.astype(np.float64) / top * 255.0).astype(np.uint8)
    return arr


def _encode(img: Image.Image, media: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if media == "image/png":
        img.save(buf, format="PNG")
    elif media == "image/gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="GIF")
    else:
        img.convert("L" if img.mode == "L" else "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _fit(img: Image.Image, params: RenderParams, thumbnail: bool) -> Image.Image:
    if params.region is not None:
        sx, sy, sw, sh = params.region
        img = img.crop((min(sx, sx + sw), min(sy, sy + sh), max(sx, sx + sw), max(sy, sy + sh)))
        if sw < 0:  # PS3.18 8.3.5.1.2: a negative source extent flips the image
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if params.viewport is not None:
        box = params.viewport
    elif thumbnail:
        box = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    else:
        return img
    scale = min(box[0] / img.width, box[1] / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def render_frame(
    path: Path, frame: int, params: RenderParams, media: str, thumbnail: bool
) -> bytes:
    """Frame `frame` (1-based) as a consumer image: LUTs applied, fitted, encoded."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    deflated = ds.file_meta.TransferSyntaxUID == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    try:
        arr = _all_frames(path)[frame - 1] if deflated else _one_frame(path, frame)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        raise TranscodeError(f"cannot decode frame {frame} to render it: {exc}") from None
    if int(ds.get("SamplesPerPixel") or 1) == 1 and arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    pixels = _display(arr, ds, params.window)
    img = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    return _encode(_fit(img, params, thumbnail), media, params.quality)


def render_icon(label: str, params: RenderParams, media: str) -> bytes:
    """An icon for an instance without pixel data (SR, PDF, ...): its modality on a tile."""
    side = THUMBNAIL_SIZE
    img = Image.new("RGB", (side, side), (52, 58, 64))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, side - 9, side - 9), outline=(173, 181, 189), width=3)
    text = label[:8] or "DICOM"
    left, top, right, bottom = draw.textbbox((0, 0), text)
    draw.text(
        ((side - (right - left)) / 2, (side - (bottom - top)) / 2), text, fill=(248, 249, 250)
    )
    return _encode(_fit(img, params, thumbnail=True), media, params.quality)
