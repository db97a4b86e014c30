"""Bulkdata and Pixel Data resources of a study, series or instance (PS3.18 10.4.1.1.5 and
10.4.1.1.6; payloads 10.4.3.3.5 and 10.4.3.3.6), and a Study, Series or Instance resource asked
for as bulk data (B.10): every value the metadata gives a BulkDataURI, one part each, in
retrieve order, each part's Content-Location the BulkDataURI of the metadata.

The Pixel Data of an encapsulated instance goes as its single BulkDataURI does
(retrieve.pixeldata.pixel_data_plan): uncompressed for octet-stream, its frames for
`transfer-syntax=*` or an image type, one part each, located at `{BulkDataURI}/frames/{n}`
(the frame's URL under its bulk data, as PS3.18 has long named compressed frames in bulk data
payloads).
Native Pixel Data is its value, or its frames in an image type when only that is accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomweb_server.dicomfile import PIXEL_DATA_TAGS, bulk_prefix
from dicomweb_server.errors import NotAcceptableError, NotFoundError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.negotiate import bulkdata_unacceptable
from dicomweb_server.metadata import not_found
from dicomweb_server.multipart import Prefixed, close_all
from dicomweb_server.retrieve.frames import frame_media, frame_parts
from dicomweb_server.retrieve.instances import Part
from dicomweb_server.retrieve.pixeldata import (
    AS_FRAMES,
    DECODED,
    STORED_FRAMES,
    decoded_pixel_data,
    encapsulated_pixels,
    pixel_data_plan,
    stored_bulk_value,
)

__all__ = ["PIXEL_DATA_PATHS", "BulkPayload", "bulk_payload", "located_frames"]

# Top-level Pixel Data, Float Pixel Data and Double Float Pixel Data (PS3.18 10.4.3.3.6: not
# the Pixel Data of an Icon Image Sequence, nor a private element).
PIXEL_DATA_PATHS = frozenset(f"{tag:08X}" for tag in PIXEL_DATA_TAGS)
_PIXEL_DATA = "7FE00010"  # the one with frames that can be converted


@dataclass(frozen=True)
class _Value:
    inst: StoredInstance
    path: str  # tag path, upper case: "7FE00010", "54000100/0/54001010"
    entry: list[Any] | None  # recorded byte range, when there is one
    plans: list[str] | None  # encapsulated Pixel Data: what it may be sent as, in order


@dataclass
class BulkPayload:
    """What a bulk data request answers with: its parts (None when the resource holds no bulk
    data at all), and the values left out and why (a Warning). Values found unsendable while
    the parts are made (a decoder failing on a value's first frame) are added as they are
    found: those found before the response starts can still be named in its headers."""

    parts: AsyncIterator[Part] | None
    reasons: dict[str, None] = field(default_factory=dict)  # each reason once, in order
    skipped: int = 0

    def leave_out(self, reason: str) -> None:
        self.reasons[reason] = None
        self.skipped += 1

    def warnings(self) -> list[str]:
        if not self.skipped:
            return []
        return [f"{self.skipped} bulk data value(s) not sent: {'; '.join(self.reasons)}"]


async def bulk_payload(
    svc: Services,
    base_url: str,
    accept: str | None,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    *,
    pixel_only: bool = False,
) -> BulkPayload:
    """The bulk data (`pixel_only`: the Pixel Data) of the instances of a study, series or
    instance. Negotiated before anything is sent: a value that cannot be sent as any type the
    client accepts is left out ("all bulk data ... that can be converted to one of the requested
    media types"), and 406 when that leaves nothing of a resource that has bulk data."""
    listing = await svc.index.bulk_listing(study, series, sop)
    if not listing:
        raise not_found(series, sop)
    plain_why = bulkdata_unacceptable(accept)
    values: list[_Value] = []
    payload = BulkPayload(None)
    for inst, paths, ranges in listing:
        for path in paths:
            if pixel_only and path not in PIXEL_DATA_PATHS:
                continue
            try:
                plans = _plans(inst, path, accept, plain_why)
            except NotAcceptableError as exc:  # TranscodeError included
                payload.leave_out(exc.message)
                continue
            values.append(_Value(inst, path, ranges.get(path), plans))
    if not values and payload.skipped:
        raise NotAcceptableError("; ".join(payload.reasons))
    if values:
        payload.parts = _parts(svc, base_url, values, accept, payload)
    return payload


def _plans(
    inst: StoredInstance, path: str, accept: str | None, plain_why: str | None
) -> list[str] | None:
    """How the value at `path` can be sent as a type the client accepts (bulk_payload): the
    Pixel Data's plans, None for the value as stored; NotAcceptableError when it cannot be.
    `plain_why`: why octet-stream bulk data is not acceptable, None when it is."""
    if path == _PIXEL_DATA and encapsulated_pixels(inst):
        return pixel_data_plan(inst, accept)
    if path == _PIXEL_DATA and inst.number_of_frames > 0 and plain_why is not None:
        frame_media(inst, accept)  # 406 unless the frames go in a type accepted
        return [AS_FRAMES]
    if plain_why is not None:
        raise NotAcceptableError(plain_why)
    return None


async def _parts(
    svc: Services, base_url: str, values: list[_Value], accept: str | None, payload: BulkPayload
) -> AsyncIterator[Part]:
    """The values' parts in turn. A value that fails before its first part is sent (a decoder
    failing on its first frame, nested compressed pixels that cannot be decoded) is left out
    (payload.leave_out), and so is one whose frames cannot be made in the image type asked
    (encapsulated frames of a syntax the encoder does not take, known only once its frames
    are negotiated: the response broke off there); one that fails after is a failure of the
    response."""
    for v in values:
        inst = v.inst
        location = base_url + bulk_prefix(inst.study_uid, inst.series_uid, inst.sop_instance_uid)
        location += v.path
        started = False
        try:
            if v.plans is None:
                value = await stored_bulk_value(svc, inst, v.path, v.entry)
                started = True
                yield {**value.headers, "Content-Location": location}, value.read(0, value.length)
                continue
            async for part in _pixel_data_parts(svc, inst, v.plans, accept, location):
                started = True
                yield part
        # TranscodeError included; NotFoundError: frames no offset table maps, found fewer
        # than Number of Frames says when they are split (a later value broke off there).
        except (NotAcceptableError, NotFoundError) as exc:
            if started:
                raise
            payload.leave_out(f"{location}: {exc.message}")


async def _pixel_data_parts(
    svc: Services, inst: StoredInstance, plans: list[str], accept: str | None, location: str
) -> AsyncIterator[Part]:
    """Encapsulated Pixel Data by the first of its plans whose first frame can be made: a
    decoder failing there passes to the next plan, before this value's first part is sent."""
    failure: NotAcceptableError | None = None
    for plan in plans:
        try:
            if plan == DECODED:
                value = await decoded_pixel_data(svc, inst)
                chunks = value.read(0, value.length)
                first = await anext(chunks, b"")  # the first frame decoded, or the failure
                headers = {**value.headers, "Content-Location": location}
                yield headers, Prefixed([first] if first else [], chunks)
                return
            frames = range(1, inst.number_of_frames + 1)  # not a list: see frame_parts
            asked = STORED_FRAMES if plan == STORED_FRAMES else accept
            _, parts = await frame_parts(svc, inst, frames, asked)
        except NotAcceptableError as exc:  # TranscodeError included
            failure = exc
            continue
        async for part in located_frames(parts, location, frames):
            yield part
        return
    assert failure is not None
    raise failure


async def located_frames(
    parts: AsyncIterator[Part], location: str, frames: Sequence[int]
) -> AsyncIterator[Part]:
    """Frame parts of Pixel Data at `location`, each located at `{location}/frames/{n}`; the
    parts are closed when this is (a client gone mid-response leaves no read open)."""
    try:
        for n in frames:
            part = await anext(parts, None)
            if part is None:
                return
            headers, body = part
            yield {**headers, "Content-Location": f"{location}/frames/{n}"}, body
    finally:
        await close_all(parts)
