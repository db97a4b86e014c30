"""Decoding and re-encoding pixel data: the only importer of pydicom.pixels and numpy.

Codec work is CPU-bound and runs in worker threads behind the app's CapacityLimiter (STYLE.md
rule 8); these functions are synchronous and are called through `anyio.to_thread.run_sync`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import pack_bits, pixel_array
from pydicom.uid import UID

from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.media import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN

__all__ = [
    "TranscodeError",
    "decode_frames",
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
