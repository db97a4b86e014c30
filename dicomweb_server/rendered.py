"""Rendered and thumbnail request parameters (PS3.18 8.3.5.1, 10.4.1.1.3). Pure."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from dicomweb_server.errors import BadRequestError, NotAcceptableError
from dicomweb_server.media.mediatypes import parse_accept

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_ANIMATION_PIXELS",
    "MAX_REGION_EDGE",
    "MAX_VIEWPORT_PIXELS",
    "RENDERED_MEDIA_TYPES",
    "THUMBNAIL_SIZE",
    "RenderParams",
    "check_animation",
    "check_region",
    "ignored_render_params",
    "negotiate_rendered",
    "output_size",
    "parse_render_params",
]

# PS3.18 Table 8.7.4-1: rendered media types we produce; the first is the default.
RENDERED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")
# JPEG quality when the request gives none (PS3.18 8.3.5.1.3 leaves it to the server).
DEFAULT_QUALITY = 90
# Largest viewport edge, pixels (a bigger one is a 400: it could only exhaust memory). The
# output of one rendered frame is at most this square (64 Mi pixels, 192 MiB as RGB), more than
# any display shows.
MAX_VIEWPORT_PIXELS = 8192
# Farthest edge of a viewport's source region (sx + sw, sy + sh), pixels. PS3.18 8.3.5.1.3
# gives the region in the pixel coordinates of the image, and Rows and Columns are US (PS3.3
# C.7.6.3.1, PS3.5 Table 6.2-1): no image reaches past 65535, so a region that does is refused
# as malformed before any pixel is read. The region must also lie inside the image it is cut
# from (check_region): it selects pixels that exist, never more memory than the decoded frame.
MAX_REGION_EDGE = 65535
# Pixels of an animated GIF, summed over its frames (frames x output width x height): 64 Mi,
# e.g. 256 frames of 512 x 512 (an XA run), 400 beyond. Pillow's GIF encoder holds every frame
# until the end, so time and memory grow with this product: at the limit, 256 frames of
# 512 x 512 noise took 7.6 s, 222 MB more at peak and an 88 MiB body; the audited request
# that had no bound (every frame at 8192 x 8192) took 109 s and 3.5 GB.
MAX_ANIMATION_PIXELS = 64 * 1024 * 1024
# Longest edge of a thumbnail when the request gives no viewport, pixels.
THUMBNAIL_SIZE = 128
_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# Numbers are ASCII digits: Python's `\d`, int() and float() also take the digits of other
# scripts (U+0661, Arabic-Indic one; U+FF11, fullwidth one) and surrounding whitespace.
_NUMBER = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?"


@dataclass(frozen=True)
class RenderParams:
    # (center, width, function) from `window`; None: the instance's own VOI, else min-max.
    window: tuple[float, float, str] | None = None
    # (width, height) of the output; None: the image size (thumbnails: THUMBNAIL_SIZE).
    viewport: tuple[int, int] | None = None
    # (sx, sy, sw, sh) source region of `viewport`, in image pixels; None: the whole image.
    region: tuple[int, int, int, int] | None = None
    quality: int = DEFAULT_QUALITY


def _numbers(name: str, value: str, count: tuple[int, ...]) -> list[str]:
    items = value.split(",")
    if len(items) not in count:
        raise BadRequestError(f"{name} needs {' or '.join(map(str, count))} values, got {value!r}")
    return items


def _window(value: str) -> tuple[float, float, str]:
    items = _numbers("window", value, (2, 3))
    if not all(re.fullmatch(_NUMBER, v) for v in items[:2]):
        raise BadRequestError(f"window center and width must be numbers: {value!r}")
    center, width = float(items[0]), float(items[1])
    if not (math.isfinite(center) and math.isfinite(width)):  # `1e309` is inf to float()
        raise BadRequestError(f"window center and width must be finite numbers: {value!r}")
    function = items[2].upper() if len(items) == 3 else "LINEAR"
    # str.upper() maps some letters of other scripts into ASCII (U+0131, dotless i, is I).
    if function not in _FUNCTIONS or not items[-1].isascii():
        raise BadRequestError(f"window function must be one of {', '.join(_FUNCTIONS)}")
    if (width < 1 and function != "LINEAR_EXACT") or width <= 0:
        raise BadRequestError("window width must be at least 1 (PS3.3 C.11.2.1.2)")
    return center, width, function


def _viewport(value: str) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    items = _numbers("viewport", value, (2, 6))
    # sw and sh may be negative: the region is then flipped (PS3.18 8.3.5.1.3).
    signed = (False, False, False, False, True, True)
    if not all(
        re.fullmatch(r"-?[0-9]{1,6}" if neg else r"[0-9]{1,6}", v)
        for v, neg in zip(items, signed, strict=False)
    ):
        raise BadRequestError(
            f"viewport values must be integers, non-negative but for sw and sh: {value!r}"
        )
    vw, vh = int(items[0]), int(items[1])
    if not (1 <= vw <= MAX_VIEWPORT_PIXELS and 1 <= vh <= MAX_VIEWPORT_PIXELS):
        raise BadRequestError(f"viewport width and height must be 1 to {MAX_VIEWPORT_PIXELS}")
    if len(items) == 2:
        return (vw, vh), None
    sx, sy, sw, sh = (int(v) for v in items[2:])
    if sw == 0 or sh == 0:
        raise BadRequestError("viewport source width and height must not be 0")
    if max(sx, sx + sw) > MAX_REGION_EDGE or max(sy, sy + sh) > MAX_REGION_EDGE:
        raise BadRequestError(
            f"viewport source region {sx},{sy},{sw},{sh} reaches past {MAX_REGION_EDGE}, the "
            "largest image edge (Rows and Columns are US, PS3.3 C.7.6.3.1)"
        )
    return (vw, vh), (sx, sy, sw, sh)


def check_region(region: tuple[int, int, int, int], width: int, height: int) -> None:
    """400 unless the source region (sx, sy, sw, sh) lies inside the width x height image.

    PS3.18 8.3.5.1.3 selects the region from the image, in its pixel coordinates; pixels past
    its edges do not exist, and painting them would cost memory in proportion to the request
    rather than to the image (a 20000 x 20000 region of a 512 x 512 image was 400 Mi pixels).
    Refused rather than clipped (STYLE.md rule 5): a clipped region would silently change the
    output's shape. A negative extent (a flip) spans the sw pixels before sx.
    """
    sx, sy, sw, sh = region
    left, right = sorted((sx, sx + sw))
    top, bottom = sorted((sy, sy + sh))
    if left < 0 or top < 0 or right > width or bottom > height:
        raise BadRequestError(
            f"viewport source region {sx},{sy},{sw},{sh} is not inside the image, which is "
            f"{width} x {height} pixels (PS3.18 8.3.5.1.3)"
        )


def output_size(width: int, height: int, params: RenderParams, thumbnail: bool) -> tuple[int, int]:
    """(width, height) of the rendering of a width x height image: its source region fitted
    inside the viewport (a thumbnail's: THUMBNAIL_SIZE square), aspect kept."""
    if params.region is not None:
        width, height = abs(params.region[2]), abs(params.region[3])
    if params.viewport is not None:
        box = params.viewport
    elif thumbnail:
        box = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    else:
        return width, height
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_animation(frames: int, size: tuple[int, int]) -> None:
    """400 when `frames` frames of `size` (output pixels) exceed MAX_ANIMATION_PIXELS;
    render_animation asks once it knows the size, before it decodes a second frame."""
    total = frames * size[0] * size[1]
    if total > MAX_ANIMATION_PIXELS:
        raise BadRequestError(
            f"an animated GIF of {frames} frames of {size[0]} x {size[1]} pixels would hold "
            f"{total} pixels, more than {MAX_ANIMATION_PIXELS}: ask for a smaller viewport, "
            "or for single frames (.../frames/{n}/rendered)"
        )


def parse_render_params(params: Mapping[str, str]) -> RenderParams:
    """`window`, `viewport`, `quality` (PS3.18 8.3.5.1); 400 when malformed."""
    window = _window(params["window"]) if params.get("window") else None
    viewport, region = _viewport(params["viewport"]) if params.get("viewport") else (None, None)
    quality = DEFAULT_QUALITY
    if params.get("quality"):
        q = params["quality"]
        if not re.fullmatch(r"[0-9]{1,3}", q) or not 1 <= int(q) <= 100:
            raise BadRequestError(f"quality must be an integer from 1 to 100, got {q!r}")
        quality = int(q)
    return RenderParams(window, viewport, region, quality)


# Query parameters of the rendered and thumbnail resources this server applies (PS3.18
# 8.3.5.1: window, viewport, quality; 8.3.3.1-2: accept, charset).
_APPLIED = frozenset({"window", "viewport", "quality", "accept", "charset"})


def ignored_render_params(params: Mapping[str, str]) -> list[str]:
    """A Warning text per query parameter accepted but not applied (STYLE rule 5: never
    dropped silently). PS3.18 8.3.1: "The origin server shall ignore any unsupported Query
    Parameters"; `annotation` and `iccprofile` (8.3.5.1.1, 8.3.5.1.5) are supported by the
    standard but not by this server, which burns in no annotation and embeds no ICC profile
    (`iccprofile=no` asks for none: nothing ignored)."""
    texts: list[str] = []
    for name in dict.fromkeys(params):
        if name in _APPLIED or (name == "iccprofile" and params[name] == "no"):
            continue
        if name in ("annotation", "iccprofile"):
            texts.append(f"{name} is not applied: the image is sent without it")
        else:
            texts.append(f"{name[:64]} is not a parameter of this resource; ignored")
    return texts


def negotiate_rendered(accept: str | None) -> str:
    """image/jpeg by default; image/png or image/gif when asked (PS3.18 8.7.4)."""
    for rng in parse_accept(accept):
        for media in RENDERED_MEDIA_TYPES:
            if rng.matches(media):
                return media
    raise NotAcceptableError(f"rendered images are available as {', '.join(RENDERED_MEDIA_TYPES)}")
