"""Rendered and thumbnail request parameters (PS3.18 8.3.5.1, 10.4.1.1.3). Pure."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from dicomweb_server.errors import BadRequestError, NotAcceptableError
from dicomweb_server.media.mediatypes import malformed_ranges, parse_accept

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_ANIMATION_PIXELS",
    "MAX_REGION_EDGE",
    "MAX_REGION_VALUE_CHARS",
    "MAX_VIEWPORT_PIXELS",
    "RENDERED_MEDIA_TYPES",
    "THUMBNAIL_SIZE",
    "Region",
    "RenderParams",
    "check_animation",
    "ignored_render_params",
    "negotiate_rendered",
    "output_size",
    "parse_render_params",
    "region_box",
    "render_query",
]

# PS3.18 Table 8.7.4-1: rendered media types we produce; the first is the default.
RENDERED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")
# JPEG quality when the request gives none (PS3.18 8.3.5.1.3 leaves it to the server).
DEFAULT_QUALITY = 90
# Largest viewport edge, pixels (a bigger one is a 400: it could only exhaust memory). The
# output of one rendered frame is at most this square (64 Mi pixels, 192 MiB as RGB), more than
# any display shows.
MAX_VIEWPORT_PIXELS = 8192
# Farthest edge of a viewport's source region (|sx| + |sw|, |sy| + |sh|), pixels. PS3.18
# 8.3.5.1.3 gives the region in the pixel coordinates of the image, and Rows and Columns are US
# (PS3.3 C.7.6.3.1, PS3.5 Table 6.2-1): no image reaches past 65535, so a region that does is
# refused as malformed before any pixel is read. The region must also lie inside the image it
# is cut from (region_box): it selects pixels that exist, never more memory than the decoded
# frame.
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
# PS3.18 8.3.5.1.4 names the functions "linear", "linear-exact" and "sigmoid"; the VOI LUT
# Function spellings (PS3.3 C.11.2.1.2: LINEAR_EXACT) are taken too, in any case.
_FUNCTION_NAMES = {"LINEAR": "LINEAR", "LINEAR-EXACT": "LINEAR_EXACT",
                   "LINEAR_EXACT": "LINEAR_EXACT", "SIGMOID": "SIGMOID"}  # fmt: skip
# The source region's sx, sy, sw, sh are "decimal numbers" (PS3.18 8.3.5.1.3): ASCII digits,
# a sign and a fraction, no exponent (no region needs one), each at most
# MAX_REGION_VALUE_CHARS long: a client's computed coordinate has as many digits as its
# float printed (`170.66666666666666`, 18 characters; 6 fraction digits were the limit, and
# such a value a 400). Taken exactly (Fraction), not as float, so that the pixels a region
# covers are those its decimal numbers say (`47.99999999999999999` is 48.0 as a float).
_DECIMAL = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
# Characters of one source region value, at most: a float printed in full (17 significant
# digits, a sign, a point and leading zeros, up to 24 characters, as JavaScript and Python
# print them) with room to spare. Longer is a 400; Python refuses to parse integers of more
# than 4300 digits (a ValueError, a 500).
MAX_REGION_VALUE_CHARS = 32
# Values of `iccprofile` (PS3.18 8.3.5.1.5, case-sensitive %s strings), and the rendered media
# types that cannot embed an ICC profile: with any value but "no", negotiate_rendered passes
# over them, and a request that accepts nothing else is a 400.
_ICC_VALUES = ("no", "yes", "srgb", "adobergb", "rommrgb")
_NO_ICC_MEDIA = frozenset({"image/gif"})
# The `iccprofile` values this server applies (iccprofile.py): Pillow's LittleCMS has a
# built-in sRGB profile and none of Adobe RGB or ROMM RGB.
_ICC_APPLIED = ("no", "yes", "srgb")
# An `annotation` value (PS3.18 8.3.5.1.1): a keyword. This server burns in none.
_KEYWORD = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
# Numbers are ASCII digits: Python's `\d`, int() and float() also take the digits of other
# scripts (U+0661, Arabic-Indic one; U+FF11, fullwidth one) and surrounding whitespace.
_NUMBER = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?"


# (sx, sy, sw, sh) of a viewport's source region, exact (PS3.18 8.3.5.1.3).
Region = tuple[Fraction, Fraction, Fraction | None, Fraction | None]


@dataclass(frozen=True)
class RenderParams:
    # (center, width, function) from `window`; None: the instance's own VOI, else min-max.
    window: tuple[float, float, str] | None = None
    # (width, height) of the output; None: the image size (thumbnails: THUMBNAIL_SIZE).
    viewport: tuple[int, int] | None = None
    # (sx, sy, sw, sh) source region of `viewport`, in image pixels, exact (PS3.18 8.3.5.1.3): sx
    # and sy its top-left corner (>= 0), |sw| and |sh| its size, a negative one flipping it;
    # None for sw (sh): to the image's right (bottom) edge. None: the whole image.
    region: Region | None = None
    quality: int = DEFAULT_QUALITY
    # The `iccprofile` value applied (PS3.18 8.3.5.1.5): "no", "yes" or "srgb".
    icc: str = "no"


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
    # str.upper() maps some letters of other scripts into ASCII (U+0131, dotless i, is I).
    name = items[2].upper() if len(items) == 3 and items[2].isascii() else "?"
    function = _FUNCTION_NAMES.get(name, "") if len(items) == 3 else "LINEAR"
    if not function:
        raise BadRequestError(
            "window function must be one of linear, linear-exact, sigmoid (PS3.18 8.3.5.1.4)"
        )
    # PS3.3 C.11.2.1.2.1: LINEAR's "Window Width (0028,1051) shall always be greater than or
    # equal to 1"; LINEAR_EXACT's and SIGMOID's (C.11.2.1.3.2, C.11.2.1.3.1) "greater than 0".
    if width <= 0 or (width < 1 and function == "LINEAR"):
        raise BadRequestError(
            "window width must be at least 1 for linear (PS3.3 C.11.2.1.2.1), more than 0 for "
            "linear-exact and sigmoid (C.11.2.1.3)"
        )
    return center, width, function


def _viewport(value: str, thumbnail: bool) -> tuple[tuple[int, int], Region | None]:
    """`vw,vh[,[sx],[sy],[sw],[sh]]` (PS3.18 8.3.5.1.3): values may be elided (`512,512,,,256,
    256`), trailing ones with their commas (`512,512,10`); sx and sy default to 0, sw and sh
    to the image's right and bottom edges. A thumbnail takes vw,vh only (8.3.5.2)."""
    items = value.split(",")
    if not 2 <= len(items) <= 6:
        raise BadRequestError(f"viewport is vw,vh[,sx,sy,sw,sh], got {value!r}")
    if thumbnail and len(items) > 2:
        raise BadRequestError(
            "a thumbnail's viewport is vw,vh only: no source region (PS3.18 8.3.5.1.3)"
        )
    if not all(re.fullmatch(r"[0-9]{1,6}", v) for v in items[:2]):
        raise BadRequestError(f"viewport width and height must be integers: {value!r}")
    vw, vh = int(items[0]), int(items[1])
    if not (1 <= vw <= MAX_VIEWPORT_PIXELS and 1 <= vh <= MAX_VIEWPORT_PIXELS):
        raise BadRequestError(f"viewport width and height must be 1 to {MAX_VIEWPORT_PIXELS}")
    if len(items) == 2:
        return (vw, vh), None
    rest = items[2:] + [""] * (6 - len(items))
    if not all(
        v == "" or (len(v) <= MAX_REGION_VALUE_CHARS and re.fullmatch(_DECIMAL, v)) for v in rest
    ):
        raise BadRequestError(
            f"viewport sx, sy, sw and sh must be decimal numbers of at most "
            f"{MAX_REGION_VALUE_CHARS} characters: {value[:160]!r}"
        )
    values = [None if v == "" else Fraction(v) for v in rest]
    # "decimal numbers whose absolute values specify ... the top-left corner"
    sx, sy = (abs(v or Fraction(0)) for v in values[:2])
    sw, sh = values[2:]
    if sw == 0 or sh == 0:
        raise BadRequestError("viewport source width and height must not be 0")
    if (
        sx + abs(sw or Fraction(0)) > MAX_REGION_EDGE
        or sy + abs(sh or Fraction(0)) > MAX_REGION_EDGE
    ):
        raise BadRequestError(
            f"viewport source region {value!r} reaches past {MAX_REGION_EDGE}, the largest "
            "image edge (Rows and Columns are US, PS3.3 C.7.6.3.1)"
        )
    return (vw, vh), (sx, sy, sw, sh)


def region_box(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), the pixels of a width x height image the source region covers (a
    fractional edge takes the pixel it cuts); 400 unless the region lies inside the image.

    PS3.18 8.3.5.1.3 selects the region from the image, in its pixel coordinates; pixels past
    its edges do not exist, and painting them would cost memory in proportion to the request
    rather than to the image (a 20000 x 20000 region of a 512 x 512 image was 400 Mi pixels).
    Refused rather than clipped (STYLE.md rule 5): a clipped region would silently change the
    output's shape. A negative sw or sh flips the region; it does not move it.
    """
    sx, sy, sw, sh = region
    right = width if sw is None else sx + abs(sw)
    bottom = height if sh is None else sy + abs(sh)
    if not (sx < right <= width and sy < bottom <= height):
        shown = ",".join("" if v is None else f"{float(v):g}" for v in region)
        raise BadRequestError(
            f"viewport source region {shown} is not inside the image, which is "
            f"{width} x {height} pixels (PS3.18 8.3.5.1.3)"
        )
    return math.floor(sx), math.floor(sy), math.ceil(right), math.ceil(bottom)


def output_size(width: int, height: int, params: RenderParams, thumbnail: bool) -> tuple[int, int]:
    """(width, height) of the rendering of a width x height image: its source region fitted
    inside the viewport (a thumbnail's: THUMBNAIL_SIZE square), aspect kept."""
    if params.region is not None:
        x0, y0, x1, y1 = region_box(params.region, width, height)
        width, height = x1 - x0, y1 - y0
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


# The rendering parameters (PS3.18 8.3.5.1), each one value or one list (`%s"window=" ...`):
# given again with another value they contradict each other, and taking either drops the
# other silently (STYLE rule 5), as QIDO's limit and flags (query._once).
_SINGLE = frozenset({"window", "viewport", "quality", "iccprofile", "annotation"})


def render_query(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The query parameters of a rendered or thumbnail request by name: 400 when one of
    _SINGLE is given twice with different values (`window=40,400&window=50,350`: which one
    the image shows was the last's, silently); given twice alike, it is that value. Other
    names: the last value (they are ignored, ignored_render_params warns of each)."""
    out: dict[str, str] = {}
    for name, value in items:
        if name in _SINGLE and out.get(name, value) != value:
            raise BadRequestError(
                f"{name} is given twice with different values ({out[name][:64]!r} and "
                f"{value[:64]!r}); give it once"
            )
        out[name] = value
    return out


def parse_render_params(params: Mapping[str, str], thumbnail: bool = False) -> RenderParams:
    """`window`, `viewport`, `quality`, `iccprofile` (PS3.18 8.3.5.1); 400 when malformed,
    when a thumbnail's viewport names a source region, or when no `iccprofile` value is one
    this server applies. `annotation` is checked too (ignored_render_params warns that it is
    not applied)."""
    window = _window(params["window"]) if params.get("window") else None
    viewport, region = (
        _viewport(params["viewport"], thumbnail) if params.get("viewport") else (None, None)
    )
    quality = DEFAULT_QUALITY
    if params.get("quality"):
        q = params["quality"]
        if not re.fullmatch(r"[0-9]{1,3}", q) or not 1 <= int(q) <= 100:
            raise BadRequestError(f"quality must be an integer from 1 to 100, got {q!r}")
        quality = int(q)
    if "annotation" in params:
        _annotation(params["annotation"])
    icc = _icc_choice(params["iccprofile"]) if "iccprofile" in params else "no"
    return RenderParams(window, viewport, region, quality, icc)


def _annotation(value: str) -> list[str]:
    """The keywords of `annotation` (PS3.18 8.3.5.1.1): "If any of the parameter values are
    not keywords, or there are no parameter values", 400."""
    items = value.split(",")
    if not all(re.fullmatch(_KEYWORD, v) for v in items):
        raise BadRequestError(
            f"annotation is a list of keywords (patient, technique), got {value[:64]!r}"
        )
    return items


def _iccprofile(value: str) -> list[str]:
    """The values of `iccprofile` (PS3.18 8.3.5.1.5): 1#("no" / "yes" / "srgb" / "adobergb"
    / "rommrgb"); anything else, or nothing, is a 400."""
    items = value.split(",")
    if not all(v in _ICC_VALUES for v in items):
        raise BadRequestError(
            f"iccprofile is one or more of {', '.join(_ICC_VALUES)}, got {value[:64]!r}"
        )
    return items


def _icc_choice(value: str) -> str:
    """The `iccprofile` value applied: the first of the request's values this server applies.
    PS3.18 8.3.5.1.5 lets the parameter hold a list (1#) without saying what several values
    mean; read as the client's choices in order of preference (`adobergb,srgb`: Adobe RGB,
    else sRGB). 400 when none is applied here (`adobergb`, `rommrgb`): the image cannot be
    in the colour space asked for, and one sent in another space, or with no profile, would
    be shown in wrong colours by a colour-managed client that relied on it; the standard's
    rule for a supported parameter whose value cannot be honoured is a 400 (8.3: "an
    invalid value"; 8.3.5.1.3: dimensions "not supported")."""
    items = _iccprofile(value)
    for item in items:
        if item in _ICC_APPLIED:
            return item
    raise BadRequestError(
        f"iccprofile {','.join(dict.fromkeys(items))} is not supported: this server embeds the "
        f"instance's ICC profile (yes) or converts to sRGB (srgb), and has no Adobe RGB or ROMM "
        f"RGB profile; ask for one of {', '.join(_ICC_APPLIED)} (several values are taken in "
        "order of preference)"
    )


# Query parameters of the rendered and thumbnail resources this server applies (PS3.18
# 8.3.5.1: window, viewport, quality; 8.3.3.1-2: accept, charset).
_APPLIED = frozenset({"window", "viewport", "quality", "iccprofile", "accept", "charset"})


def ignored_render_params(params: Mapping[str, str]) -> list[str]:
    """A Warning text per query parameter accepted but not applied (STYLE rule 5: never
    dropped silently). PS3.18 8.3.1: "The origin server shall ignore any unsupported Query
    Parameters"; `annotation` (8.3.5.1.1) is supported by the standard but not by this
    server, which burns in no annotation: its values get the Warning text 8.3.5.1.1 gives.
    Its values were checked by parse_render_params."""
    texts: list[str] = []
    for name in dict.fromkeys(params):
        if name in _APPLIED:
            continue
        if name == "annotation":
            values = ",".join(dict.fromkeys(_annotation(params[name])))
            texts.append(f"The following annotation values are not supported: {values}")
        else:
            texts.append(f"{name[:64]} is not a parameter of this resource; ignored")
    return texts


def _wants_profile(iccprofile: str | None) -> bool:
    """Whether an `iccprofile` value rules out the media types that cannot embed an ICC
    profile: PS3.18 8.3.5.1.5, "a 400 Bad Request error shall be returned if the parameter
    value is other than 'no'" (`no,yes` too: the value is other than "no")."""
    return iccprofile is not None and set(_iccprofile(iccprofile)) != {"no"}


def negotiate_rendered(accept: str | None, iccprofile: str | None = None) -> str:
    """The rendered media type (PS3.18 8.7.4): the first the request accepts, in its order of
    preference (image/jpeg for `*/*` or no Accept). An `iccprofile` value other than "no"
    passes over the types that cannot embed an ICC profile (image/gif) for the first
    acceptable one that can: `Accept: image/gif, image/png` is a PNG (it was a GIF, and so a
    400). 8.3.5.1.5's 400 ("If the Media Type does not support embedded ICC Profiles")
    concerns the type of the response, which the server chooses among the Acceptable Media
    Types (8.3.3.1, 8.7.5), the `accept` query parameter's first, then the header's
    (8.7.8.1). A 400 (8.3.5.1.5) when every acceptable type is one that cannot: GIF is
    supported here, so 8.3.3.1's answer in the default type, for a request none of whose
    types is supported, does not apply. 406 when the request accepts no rendered type."""
    profile = _wants_profile(iccprofile)
    refused: list[str] = []
    for rng in parse_accept(accept):
        for media in RENDERED_MEDIA_TYPES:
            if not rng.matches(media):
                continue
            if profile and media in _NO_ICC_MEDIA:
                refused.append(media)
                continue
            return media
    if refused:
        carriers = [m for m in RENDERED_MEDIA_TYPES if m not in _NO_ICC_MEDIA]
        raise BadRequestError(
            f"{' and '.join(dict.fromkeys(refused))} cannot embed an ICC profile: iccprofile may"
            f" only be no for it (PS3.18 8.3.5.1.5); {' and '.join(carriers)} can, and the"
            " request accepts neither"
        )
    reason = f"rendered images are available as {', '.join(RENDERED_MEDIA_TYPES)}"
    malformed = malformed_ranges(accept)
    if malformed:
        # PS3.18 8.7.7: ignored, and then nothing acceptable is left. `image/` is not read as
        # image/*: RFC 9110 12.5.1 gives it no meaning, and a wildcard must be asked for.
        shown = ", ".join(repr(m[:64]) for m in malformed[:4])
        reason += (
            f"; not media ranges, ignored: {shown} (RFC 9110 12.5.1: type/subtype; "
            "image/* accepts any image type)"
        )
    raise NotAcceptableError(reason)
