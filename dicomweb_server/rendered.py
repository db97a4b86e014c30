"""Rendered and thumbnail request parameters (PS3.18 8.3.5.1, 10.4.1.1.3). Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dicomweb_server.errors import BadRequestError, NotAcceptableError
from dicomweb_server.media import parse_accept

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_VIEWPORT_PIXELS",
    "RENDERED_MEDIA_TYPES",
    "THUMBNAIL_SIZE",
    "RenderParams",
    "negotiate_rendered",
    "parse_render_params",
]

# PS3.18 Table 8.7.4-1: rendered media types we produce; the first is the default.
RENDERED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")
# JPEG quality when the request gives none (PS3.18 8.3.5.1.3 leaves it to the server).
DEFAULT_QUALITY = 90
# Largest viewport edge, pixels (a bigger one is a 400: it could only exhaust memory).
MAX_VIEWPORT_PIXELS = 8192
# Longest edge of a thumbnail when the request gives no viewport, pixels.
THUMBNAIL_SIZE = 128
_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_NUMBER = r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"


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
    items = [v.strip() for v in value.split(",")]
    if len(items) not in count:
        raise BadRequestError(f"{name} needs {' or '.join(map(str, count))} values, got {value!r}")
    return items


def _window(value: str) -> tuple[float, float, str]:
    items = _numbers("window", value, (2, 3))
    if not all(re.fullmatch(_NUMBER, v) for v in items[:2]):
        raise BadRequestError(f"window center and width must be numbers: {value!r}")
    center, width = float(items[0]), float(items[1])
    function = items[2].upper() if len(items) == 3 else "LINEAR"
    if function not in _FUNCTIONS:
        raise BadRequestError(f"window function must be one of {', '.join(_FUNCTIONS)}")
    if (width < 1 and function != "LINEAR_EXACT") or width <= 0:
        raise BadRequestError("window width must be at least 1 (PS3.3 C.11.2.1.2)")
    return center, width, function


def _viewport(value: str) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    items = _numbers("viewport", value, (2, 6))
    if not all(re.fullmatch(r"\d{1,6}", v) for v in items):
        raise BadRequestError(f"viewport values must be non-negative integers: {value!r}")
    vw, vh = int(items[0]), int(items[1])
    if not (1 <= vw <= MAX_VIEWPORT_PIXELS and 1 <= vh <= MAX_VIEWPORT_PIXELS):
        raise BadRequestError(f"viewport width and height must be 1 to {MAX_VIEWPORT_PIXELS}")
    if len(items) == 2:
        return (vw, vh), None
    sx, sy, sw, sh = (int(v) for v in items[2:])
    if sw == 0 or sh == 0:
        raise BadRequestError("viewport source width and height must not be 0")
    return (vw, vh), (sx, sy, sw, sh)


def parse_render_params(params: Mapping[str, str]) -> RenderParams:
    """`window`, `viewport`, `quality` (PS3.18 8.3.5.1); 400 when malformed."""
    window = _window(params["window"]) if params.get("window") else None
    viewport, region = _viewport(params["viewport"]) if params.get("viewport") else (None, None)
    quality = DEFAULT_QUALITY
    if params.get("quality"):
        q = params["quality"]
        if not re.fullmatch(r"\d{1,3}", q) or not 1 <= int(q) <= 100:
            raise BadRequestError(f"quality must be an integer from 1 to 100, got {q!r}")
        quality = int(q)
    return RenderParams(window, viewport, region, quality)


def negotiate_rendered(accept: str | None) -> str:
    """image/jpeg by default; image/png or image/gif when asked (PS3.18 8.7.4)."""
    for rng in parse_accept(accept):
        for media in RENDERED_MEDIA_TYPES:
            if rng.matches(media):
                return media
    raise NotAcceptableError(f"rendered images are available as {', '.join(RENDERED_MEDIA_TYPES)}")
