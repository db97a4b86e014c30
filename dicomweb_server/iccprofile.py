"""ICC profiles of rendered images (PS3.18 8.3.5.1.5, the `iccprofile` query parameter): the
instance's own profile embedded, or the image converted to sRGB and an sRGB profile embedded.

With render.py, the pixel layer: Pillow's ImageCms (LittleCMS) does the conversion.
Synchronous; called in worker threads behind the app's limiter.
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
from collections import OrderedDict

from PIL import Image, ImageCms
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

__all__ = ["MAX_ICC_PROFILE_BYTES", "MAX_PNG_ICC_PROFILE_BYTES", "colour_managed", "srgb_profile"]

# The ICC header's Color Space Signature (bytes 16 to 19): an RGB profile, the only kind PS3.3
# C.11.15.1.1 allows in ICC Profile (0028,2000) and the only kind an RGB JPEG or PNG may carry.
_RGB_SIGNATURE = b"RGB "
# The ICC header's Profile/Device Class (bytes 12 to 15) of the profiles used: PS3.3
# C.11.15.1.1 requires an input device profile ("scnr"); a display ("mntr") or colour space
# ("spac") profile of RGB describes the pixels' colours the same way (RGB to the PCS), and
# the well-known RGB spaces' profiles (sRGB, Adobe RGB) are of these classes. Any other (an
# abstract, device link, output or named colour profile) describes no image's colours: taken
# as absent (LittleCMS links an RGB abstract or device link profile to sRGB all the same,
# and it was embedded as the image's).
_IMAGE_CLASSES = frozenset({b"scnr", b"mntr", b"spac"})
# The largest instance ICC Profile used: the most a JPEG carries, 255 APP2 ICC_PROFILE
# segments of 65519 profile bytes (ICC.1 B.4: segment number and count are one byte each).
# Pillow's JPEG writer wraps the count of more (a 20 MB stored value, a profile LittleCMS
# reads followed by padding: 306 segments, count 50, and a reader found no profile); the
# value is held while rendering, and profiles are kilobytes to a few megabytes. A larger one
# is taken as absent, as one LittleCMS cannot read.
MAX_ICC_PROFILE_BYTES = 255 * 65519
# The largest instance ICC Profile embedded in a PNG (an iCCP chunk, PS3.18 8.3.5.1.5 note 6):
# what Pillow reads back, its PngImagePlugin.MAX_TEXT_CHUNK (ImageFile.SAFEBLOCK, 1 MiB of
# inflated profile; Pillow 13 refuses to open a PNG whose iCCP chunk inflates to more, a
# ValueError). A larger profile that is used (at most MAX_ICC_PROFILE_BYTES, which a JPEG
# carries) is not embedded in a PNG: asked for with "yes", the pixels are converted from it
# to sRGB and the sRGB profile embedded, as for "srgb" (colour_managed).
MAX_PNG_ICC_PROFILE_BYTES = 1024 * 1024
# The most profile bytes each rendered media type embeds.
_EMBEDDED_MAX_BYTES = {"image/png": MAX_PNG_ICC_PROFILE_BYTES}
# Profiles _usable has judged, by SHA-256: by digest, not by the bytes, so that what is kept
# is small whatever the profiles (an lru_cache by profile kept up to 16 values of any size).
_USABLE_KEPT = 16
_usable_kept: OrderedDict[bytes, bool] = OrderedDict()
_usable_lock = threading.Lock()  # renderings run in worker threads


@functools.cache
def srgb_profile() -> bytes:
    """LittleCMS's built-in sRGB profile (IEC 61966-2.1), serialised."""
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def colour_managed(
    img: Image.Image, ds: Dataset, frame: int, choice: str, media: str
) -> tuple[Image.Image, bytes | None]:
    """The rendering `img` of frame `frame` (1-based) of `ds`, and the ICC profile to embed in
    it as `media`, as `choice` asks (PS3.18 8.3.5.1.5; rendered.py chose among the request's
    values):

    - "no": no profile;
    - "yes": the profile that describes the image, the instance's ICC Profile (0028,2000) for
      the frame (_source_profile), sent with the pixels unchanged; when the instance has none,
      the one 8.3.5.1.5 leaves to the server, "a well-known color space ... appropriate to
      the type and source of the image": sRGB, the space a browser assumes of an image
      without a profile, so the pixels are those sent without one. An instance profile
      larger than `media` carries (MAX_PNG_ICC_PROFILE_BYTES for PNG) is answered as "srgb"
      is: the sRGB profile describes the pixels converted to it, where the sRGB profile on
      the pixels unchanged would show them in wrong colours;
    - "srgb": the pixels converted from the instance's profile to sRGB (LittleCMS, perceptual
      intent, which PS3.3 C.11.15.1.1 recommends the instance's profile carry), and the sRGB
      profile; an instance without a profile is taken to be in sRGB already (as above).

    A greyscale rendering with a profile is sent as RGB (R = G = B): the sRGB profile is an
    RGB profile and a JPEG or PNG carries a profile of its own colour space only. The
    instance's profile of a MONOCHROME image describes its preferred Palette Color rendering
    (PS3.3 C.8.12.5.1.4), which this server does not apply: it is not used. A profile
    LittleCMS cannot read or link to sRGB (one whose PCS is not XYZ or Lab among them), or not
    an RGB one of an image class (PS3.3 C.11.15.1.1 allows only RGB input profiles), or larger
    than a JPEG carries (MAX_ICC_PROFILE_BYTES), is taken as absent."""
    if choice == "no":
        return img, None
    source = _source_profile(ds, frame) if img.mode == "RGB" else None
    embeds = _EMBEDDED_MAX_BYTES.get(media, MAX_ICC_PROFILE_BYTES)
    if choice == "yes" and source is not None and len(source) <= embeds:
        return img, source
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if source is not None:  # "srgb", or "yes" with a profile `media` does not carry
        converted = ImageCms.applyTransform(rgb, _to_srgb(source))
        assert converted is not None  # applyTransform returns None only with inPlace=True
        rgb = converted
    return rgb, srgb_profile()


def _to_srgb(profile: bytes) -> ImageCms.ImageCmsTransform:
    """A transform of RGB pixels from `profile` to sRGB, perceptual intent. Built for each
    image, not kept: a LittleCMS transform keeps a one-pixel cache and is not to be shared by
    threads. PyCMSError when LittleCMS cannot read the profile or link it to sRGB."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    dst = ImageCms.ImageCmsProfile(io.BytesIO(srgb_profile()))
    return ImageCms.buildTransform(src, dst, "RGB", "RGB", ImageCms.Intent.PERCEPTUAL)


def _usable(profile: bytes) -> bool:
    """Whether LittleCMS reads `profile` and links it to sRGB (_to_srgb); kept by digest."""
    key = hashlib.sha256(profile).digest()
    with _usable_lock:
        known = _usable_kept.get(key)
        if known is not None:
            _usable_kept.move_to_end(key)
    if known is not None:
        return known
    try:
        _to_srgb(profile)
        usable = True
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError):
        usable = False
    with _usable_lock:
        _usable_kept[key] = usable
        while len(_usable_kept) > _USABLE_KEPT:
            _usable_kept.popitem(last=False)
    return usable


def _source_profile(ds: Dataset, frame: int) -> bytes | None:
    """The ICC Profile (0028,2000) that applies to frame `frame` of a colour image: the data
    set's own, else (a whole slide image, PS3.3 C.8.12.5) that of the Optical Path Sequence
    item the frame's Optical Path Identification names (per-frame functional group first,
    then the shared one), else that of the only item. None when there is none, or it is not
    an RGB profile of an image class (_IMAGE_CLASSES) that LittleCMS can read and link to
    sRGB, or is larger than MAX_ICC_PROFILE_BYTES."""
    if str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME"):
        return None
    value = ds.get("ICCProfile")
    if value is None:
        paths = ds.get("OpticalPathSequence")
        if not isinstance(paths, Sequence) or not len(paths):
            return None
        wanted = _optical_path_of(ds, frame)
        items = [p for p in paths if wanted is None or p.get("OpticalPathIdentifier") == wanted]
        if len(items) != 1:
            return None
        value = items[0].get("ICCProfile")
    if not isinstance(value, bytes | bytearray):
        return None
    # The profile is as long as its header's Profile Size says (ICC.1 7.2.2), LittleCMS's
    # reading too: what follows is no part of it, an OB value's padding byte (PS3.5 7.1.1: an
    # odd-sized profile stored with one) or more.
    size = int.from_bytes(value[:4], "big")
    end = size if 0 < size < len(value) else len(value)
    if (
        end > MAX_ICC_PROFILE_BYTES
        or bytes(value[16:20]) != _RGB_SIGNATURE
        or bytes(value[12:16]) not in _IMAGE_CLASSES
    ):
        return None  # not copied: a stored value may be of any length
    profile = bytes(value[:end])
    return profile if _usable(profile) else None


def _optical_path_of(ds: Dataset, frame: int) -> str | None:
    """The Optical Path Identifier (0048,0106) of frame `frame`, from its Optical Path
    Identification Sequence (PS3.3 C.8.12.6.1): the frame's functional group, else the shared
    one; None when neither names one."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if isinstance(per_frame, Sequence) and len(per_frame) >= frame >= 1:
        groups.append(per_frame[frame - 1])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if isinstance(shared, Sequence) and len(shared):
        groups.append(shared[0])
    for group in groups:
        ident = group.get("OpticalPathIdentificationSequence")
        if isinstance(ident, Sequence) and len(ident) and "OpticalPathIdentifier" in ident[0]:
            return str(ident[0].OpticalPathIdentifier)
    return None
