"""Rendering pixel data as consumer images (PS3.18 8.3.5, 10.4.1.1.3): LUTs, fit, encode.

With transcode.py, the pixel layer: the only modules importing numpy, Pillow and
pydicom.pixels. Synchronous; called in worker threads behind the app's limiter.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from dicomweb_server.rendered import THUMBNAIL_SIZE, RenderParams
from dicomweb_server.transcode import TranscodeError, frame_array

__all__ = ["MAX_ANIMATION_FRAMES", "render_animation", "render_frame", "render_icon"]

# Frames of a multi-frame instance put into one animated GIF, at most.
MAX_ANIMATION_FRAMES = 512


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
    try:
        arr = frame_array(path, ds, frame)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        raise TranscodeError(f"cannot decode frame {frame} to render it: {exc}") from None
    if int(ds.get("SamplesPerPixel") or 1) == 1 and arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    pixels = _display(arr, ds, params.window)
    img = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    return _encode(_fit(img, params, thumbnail), media, params.quality)


def render_animation(path: Path, params: RenderParams) -> bytes:
    """Every frame of a multi-frame instance as an animated GIF (PS3.18 8.7.4: image/gif may
    carry several frames), at the instance's Frame Time or 10 frames per second."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    nframes = min(int(ds.get("NumberOfFrames") or 1), MAX_ANIMATION_FRAMES)
    images = []
    for n in range(1, nframes + 1):
        try:
            arr = frame_array(path, ds, n)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
            raise TranscodeError(f"cannot decode frame {n} to render it: {exc}") from None
        if arr.ndim == 3 and int(ds.get("SamplesPerPixel") or 1) == 1:
            arr = arr[..., 0]
        pixels = _display(arr, ds, params.window)
        img = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
        images.append(
            _fit(img, params, thumbnail=False).convert("P", palette=Image.Palette.ADAPTIVE)
        )
    frame_ms = int(float(ds.get("FrameTime") or 100))
    buf = io.BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
    )
    return buf.getvalue()


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
