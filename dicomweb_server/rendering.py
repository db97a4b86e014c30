"""The rendered and thumbnail resources (PS3.18 8.3.5, 10.4.1.1.3): which instance stands for
a study or series, one rendered frame or animation (cached), and the icons that stand for what
cannot be rendered (field notes 7). Rendering itself is render.py's, in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import anyio

from dicomweb_server.blobstore.files import scratch_space
from dicomweb_server.departure import ClientGone, stopped_if_gone
from dicomweb_server.errors import NotAcceptableError, NotFoundError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import VIDEO_TRANSFER_SYNTAXES
from dicomweb_server.render import render_animation, render_frame, render_icon
from dicomweb_server.rendered import RenderParams
from dicomweb_server.report import render_report
from dicomweb_server.transcode.codecs import TranscodeError, decodable, missing_codec

__all__ = ["REPORT_CLASS_PREFIX", "rendered_image", "rendered_report", "representative"]

# Structured Report Storage SOP classes (PS3.4 Table B.5-1: 1.2.840.10008.5.1.4.1.1.88.x).
REPORT_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def representative(instances: list[StoredInstance]) -> StoredInstance:
    """The image that stands for a study or series: the middle image of the first series that
    has images (instances arrive ordered by series and instance number); else the first."""
    images = [i for i in instances if i.number_of_frames > 0]
    if not images:
        return instances[0]
    first_series = [i for i in images if i.series_uid == images[0].series_uid]
    return first_series[len(first_series) // 2]


async def rendered_image(
    svc: Services,
    inst: StoredInstance,
    frame: int,
    params: RenderParams,
    media: str,
    thumbnail: bool,
    animate: bool = False,
) -> bytes:
    """One rendered frame or thumbnail, from the cache when it was made before; with `animate`
    (an instance-level request), a multi-frame instance asked for as GIF is animated.

    A thumbnail is never an error (field notes 7): an instance without pixel data, a video
    and pixel data this server cannot decode get an icon naming their kind. Their rendered
    resource stays a 406: it promises an image of the content.

    Cached by blob key and the row's revision (StoredInstance.revision): whether there is an
    image or an icon is the row's to say."""
    job = _Job(inst, frame, params, media, thumbnail, animate)
    key = job.key
    while True:
        cached = svc.images.get(key)
        if cached is not None:
            return cached
        making = _MAKING.get((id(svc.images), key))
        if making is None:
            break
        with contextlib.suppress(_Abandoned):  # its request went away: make it here
            return await asyncio.shield(making)
    return await _made_here(svc, job, key)


async def _made_here(svc: Services, job: _Job, key: tuple[object, ...]) -> bytes:
    """rendered_image when neither the cache nor a request making it has the image: made
    here, its future in _MAKING for the requests asking meanwhile. Called with nothing
    awaited since the cache was looked up, so none can have begun making it meanwhile."""
    flight = (id(svc.images), key)
    making = _MAKING[flight] = asyncio.get_running_loop().create_future()
    try:
        data = await _rendered(svc, job)
    except BaseException as exc:
        # Its client gone (cancelled, or stopped before the rendering began: departure.py),
        # the requests waiting for it are not: they make it themselves.
        fault = _Abandoned() if isinstance(exc, asyncio.CancelledError | ClientGone) else exc
        making.set_exception(fault)
        making.exception()  # retrieved: no "never retrieved" warning when nobody waited
        raise
    else:
        making.set_result(data)
        return data
    finally:
        del _MAKING[flight]


@dataclass(frozen=True, slots=True)
class _Job:
    """One rendering asked for: what rendered_image was given."""

    inst: StoredInstance
    frame: int
    params: RenderParams
    media: str
    thumbnail: bool
    animate: bool

    @property
    def key(self) -> tuple[object, ...]:
        """The cache key: by blob and revision, not by the whole row."""
        inst = self.inst
        return (inst.blob_key, inst.revision, self.frame, self.params, self.media,
                self.thumbnail, self.animate)  # fmt: skip


class _Abandoned(Exception):
    """The request making a rendering was cancelled (its client went away): a request that
    waited for it makes it itself."""


# Renderings under way, by cache and key: a request for one already being made waits for it
# rather than decoding the same frame again (twelve identical requests for a 1760 x 1760
# JPEG 2000 at once took 2.2 s, each decoding it: a viewer's panels, a class opening one
# teaching case).
_MAKING: dict[tuple[int, tuple[object, ...]], asyncio.Future[bytes]] = {}


async def _rendered(svc: Services, job: _Job) -> bytes:
    """rendered_image, made (not in the cache under `job.key`, and not being made by another
    request), then put in the cache."""
    inst, thumbnail = job.inst, job.thumbnail
    if inst.number_of_frames == 0 and not thumbnail:
        raise NotAcceptableError("the instance has no pixel data to render as an image")
    if inst.number_of_frames and job.frame > inst.number_of_frames:
        raise NotFoundError(
            f"frame {job.frame} does not exist: the instance has {inst.number_of_frames}"
        )
    ts = inst.transfer_syntax_uid
    if inst.number_of_frames and not decodable(ts) and not thumbnail:
        raise TranscodeError(f"cannot decode the pixel data to render it: {missing_codec(ts)}")
    if inst.number_of_frames == 0 or not decodable(ts):
        data = await _icon(inst, job.params, job.media)
    else:
        try:
            data = await _render(svc, job)
        except TranscodeError:
            if not thumbnail:
                raise
            data = await _icon(inst, job.params, job.media)
    svc.images.put(job.key, data)
    return data


async def rendered_report(svc: Services, inst: StoredInstance, media: str) -> bytes:
    """A Structured Report rendered as text (report.render_report), cached as images are."""
    key = (inst.blob_key, inst.revision, 0, None, media, False, False)
    cached = svc.images.get(key)
    if cached is not None:
        return cached
    path = await svc.blobs.checked_path(inst)
    async with stopped_if_gone():
        data = await anyio.to_thread.run_sync(render_report, path, media, limiter=svc.limiter)
    svc.images.put(key, data)
    return data


async def _render(svc: Services, job: _Job) -> bytes:
    """The image rendered in a worker thread: not begun for a client that went away while
    it waited for one (departure.py); one under way ends with its image, which is cached."""
    # LostBlobError for a file missing or cut short: not a decoder's failure (a 406), nor
    # the icon a thumbnail gets for pixel data that cannot be decoded.
    path = await svc.blobs.checked_path(job.inst)
    async with stopped_if_gone():
        with scratch_space(svc.scratch_dir):  # a Deflated file inflated there
            if (
                job.animate
                and job.media == "image/gif"
                and job.inst.number_of_frames > 1
                and not job.thumbnail
            ):
                return await anyio.to_thread.run_sync(
                    render_animation, path, job.params, svc.scratch_dir, limiter=svc.limiter
                )
            return await anyio.to_thread.run_sync(
                render_frame, path, job.frame, job.params, job.media, job.thumbnail,
                svc.scratch_dir, limiter=svc.limiter,
            )  # fmt: skip


async def _icon(inst: StoredInstance, params: RenderParams, media: str) -> bytes:
    label = _ICON_LABELS.get(inst.sop_class_uid)
    if label is None:
        label = "VIDEO" if inst.transfer_syntax_uid in VIDEO_TRANSFER_SYNTAXES else "DICOM"
    return await anyio.to_thread.run_sync(render_icon, label, params, media)


# Icons of common non-image SOP classes (field notes 7: a thumbnail, never an error), and of
# video (PS3.4 Table B.5-1: Video Endoscopic, Microscopic and Photographic Image Storage),
# shown when a frame of it cannot be rendered (MPEG and HEVC streams are not decoded here).
_ICON_LABELS = {
    "1.2.840.10008.5.1.4.1.1.104.1": "PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "CDA",
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.9.1.1": "ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "ECG",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "VIDEO",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "VIDEO",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "VIDEO",
}
