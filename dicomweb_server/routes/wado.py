"""WADO-RS handlers (PS3.18 10.4): locate, negotiate, stream."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.bulkdata import bulk_payload, located_frames
from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import (
    APPLICATION_DICOM,
    APPLICATION_OCTET_STREAM,
    EXPLICIT_VR_LITTLE_ENDIAN,
)
from dicomweb_server.media.negotiate import (
    frame_part_type,
    names_instances,
    negotiate_bulkdata,
    negotiate_dicom_model,
    single_parts,
    wants_bulkdata,
)
from dicomweb_server.metadata import metadata_json
from dicomweb_server.multipart import Prefixed, close_all, new_boundary
from dicomweb_server.retrieve.frames import frame_parts, frame_value, parse_frame_list
from dicomweb_server.retrieve.instances import instance_parts, locate
from dicomweb_server.retrieve.pixeldata import (
    DECODED,
    STORED_FRAMES,
    bulk_value,
    decoded_pixel_data,
    encapsulated_pixels,
    pixel_data_plan,
)
from dicomweb_server.routes.common import accept_of, base_url, services, uid_param, warning_header
from dicomweb_server.routes.metadata_body import metadata_response
from dicomweb_server.routes.responses import (
    cached_json_response,
    multipart_response,
    ranged_response,
    single_part_response,
)
from dicomweb_server.transcode.codecs import TranscodeError

__all__ = [
    "retrieve_bulkdata",
    "retrieve_bulkdata_resource",
    "retrieve_instance",
    "retrieve_instance_frames",
    "retrieve_instance_metadata",
    "retrieve_pixeldata",
    "retrieve_series",
    "retrieve_series_metadata",
    "retrieve_study",
    "retrieve_study_metadata",
]

_PIXEL_DATA = "7FE00010"


def _uids(request: Request) -> tuple[str, str | None, str | None]:
    p = request.path_params
    return (
        uid_param(request, "study"),
        uid_param(request, "series") if "series" in p else None,
        uid_param(request, "instance") if "instance" in p else None,
    )


async def _retrieve(request: Request) -> Response:
    accept = accept_of(request)
    if wants_bulkdata(accept):
        # A Study, Series or Instance resource asked for as bulk data (PS3.18 B.10); when
        # none can be sent so, a later range naming DICOM instances is tried (8.7.8.1).
        try:
            return await _bulk(request, pixel_only=False)
        except NotAcceptableError:
            if not names_instances(accept):
                raise
    svc = services(request)
    uids = _uids(request)
    found = await locate(svc, *uids)
    failed: list[NotAcceptableError] = []
    for _, _, single in single_parts(accept, _is_dicom) if uids[2] is not None else []:
        # `application/dicom`: the Part-10 file as the body
        try:
            return await single_part_response(*await instance_parts(svc, found, single))
        except NotAcceptableError as exc:
            failed.append(exc)
            continue  # the next range (PS3.18 8.7.8.1)
    try:
        parts, lengths = await instance_parts(svc, found, accept)
    except NotAcceptableError as exc:
        raise _after_single_parts(failed, exc) from None
    return await multipart_response(parts, APPLICATION_DICOM, lengths)


def _after_single_parts(
    failed: list[NotAcceptableError], exc: NotAcceptableError
) -> NotAcceptableError:
    """The 406 of a request whose single part ranges failed before the multipart negotiation
    did too: why the most preferred range a conversion failed on could not be met leads.
    The negotiation's own reason listed what could be sent, the target that had just failed
    among it, and the failure was not said. A range that failed on negotiation alone says
    what the multipart negotiation says (what can be sent, why nothing can be decoded), so
    only that is said, once: prefixed, the list came twice in one reason. A failure that
    says all the negotiation's reason does and more (the list, then why the value cannot be
    decoded) is said alone."""
    lead = next((e for e in failed if isinstance(e, TranscodeError)), None)
    if lead is None or lead.message in exc.message:
        return exc
    if exc.message in lead.message:
        return NotAcceptableError(lead.message, headers=exc.headers)
    return NotAcceptableError(f"{lead.message}; {exc.message}", headers=exc.headers)


def _is_dicom(essence: str) -> bool:
    return essence == APPLICATION_DICOM


def _is_octet_stream(essence: str) -> bool:
    return essence == APPLICATION_OCTET_STREAM


async def _bulk(request: Request, *, pixel_only: bool) -> Response:
    """Every bulk data value (or Pixel Data) of the resource, one part each; 204 when it has
    none, a Warning naming what could not be sent as the client accepts. A HEAD starts the
    first part, as a GET does, for the headers it decides (the multipart type, the Warning),
    and reads none of it."""
    payload = await bulk_payload(
        services(request), base_url(request), accept_of(request), *_uids(request),
        pixel_only=pixel_only,
    )  # fmt: skip
    if payload.parts is None:
        return Response(status_code=204, headers=warning_header(payload.warnings()))
    # The first part is made before the response starts (values failing before it are left
    # out and named in the Warning; 406 when none is left), and names the multipart type:
    # octet-stream, or the image type the frames are sent in.
    first = await anext(payload.parts, None)
    if first is None:
        raise NotAcceptableError("; ".join(payload.reasons))
    part_type = first[0]["Content-Type"].partition(";")[0].strip()
    if request.method == "HEAD":
        # The headers a GET sends (its multipart type is its first part's), no body read:
        # no Content-Length either, which a GET's streamed body does not have. The boundary
        # parameter is required of a multipart type (RFC 2046 5.1.1); a GET's is random too.
        await close_all(first[1], payload.parts)
        media = f'multipart/related; type="{part_type}"; boundary={new_boundary()}'
        head = Response(media_type=media, headers=warning_header(payload.warnings()))
        del head.headers["content-length"]
        return head
    response = await multipart_response(Prefixed([first], payload.parts), part_type)
    response.headers.update(warning_header(payload.warnings()))
    return response


async def retrieve_bulkdata_resource(request: Request) -> Response:
    """Study, Series and Instance Bulkdata resources (PS3.18 10.4.1.1.5)."""
    return await _bulk(request, pixel_only=False)


async def retrieve_pixeldata(request: Request) -> Response:
    """Study, Series and Instance Pixel Data resources (PS3.18 10.4.1.1.6)."""
    return await _bulk(request, pixel_only=True)


async def _metadata(request: Request) -> Response:
    study, series, sop = _uids(request)
    media = negotiate_dicom_model(accept_of(request), multipart=True, single=sop is not None)
    if sop is None:  # a study's or series': may be large (metadata_body)
        return await metadata_response(request, media, study, series)
    assert series is not None
    body = await metadata_json(services(request), base_url(request), study, series, sop)
    return await cached_json_response(request, body, media)


async def retrieve_study(request: Request) -> Response:
    return await _retrieve(request)


async def retrieve_series(request: Request) -> Response:
    return await _retrieve(request)


async def retrieve_instance(request: Request) -> Response:
    return await _retrieve(request)


async def retrieve_study_metadata(request: Request) -> Response:
    return await _metadata(request)


async def retrieve_series_metadata(request: Request) -> Response:
    return await _metadata(request)


async def retrieve_instance_metadata(request: Request) -> Response:
    return await _metadata(request)


async def retrieve_instance_frames(request: Request) -> Response:
    return await _frames(request, request.path_params["frames"])


async def _frames(request: Request, frame_list: str) -> Response:
    svc = services(request)
    frames = parse_frame_list(frame_list)
    (inst,) = await locate(svc, *_uids(request))
    if len(frames) == 1:
        # One frame is one value, so a Range header can apply to it (field notes 6), and the
        # answer says so either way (RFC 9110 14.3). Its length is known before it is sent:
        # a Content-Length, and a small frame goes as one plain response (viewers ask for
        # frames one at a time).
        whole = "range" not in request.headers
        accept = accept_of(request)
        failed: list[NotAcceptableError] = []
        for essence, _, single in single_parts(accept, frame_part_type):
            try:
                _, value = await frame_value(svc, inst, frames[0], single, whole)
            except NotAcceptableError as exc:
                failed.append(exc)
                continue  # the next range (PS3.18 8.7.8.1)
            # The frame's own type must be the one accepted (as stored, a JPEG-LS frame
            # asked for as octet-stream is image/jls): else the next range.
            if value.headers["Content-Type"].partition(";")[0] == essence:
                return await ranged_response(request, value, None)
        try:
            part_type, value = await frame_value(svc, inst, frames[0], accept, whole)
        except NotAcceptableError as exc:
            raise _after_single_parts(failed, exc) from None
        return await ranged_response(request, value, part_type)
    part_type, parts = await frame_parts(svc, inst, frames, accept_of(request))
    return await multipart_response(parts, part_type)


async def _pixel_data(
    request: Request,
    svc: Services,
    inst: StoredInstance,
    accept: str | None,
    location: str,
    single: bool = False,
) -> Response:
    """The plans of retrieve.pixeldata.pixel_data_plan, tried in turn: a decoder that fails on
    the first frame (before anything is sent) passes to the next plan, if the client accepts
    one.
    `single`: a single part response, the uncompressed value its body (accept names only
    that)."""
    failure: TranscodeError | None = None
    for plan in pixel_data_plan(inst, accept):
        try:
            if plan == DECODED:
                value = await decoded_pixel_data(svc, inst)
                value.headers["Content-Location"] = location
                part_type = None if single else APPLICATION_OCTET_STREAM
                return await ranged_response(request, value, part_type)
            frames = range(1, inst.number_of_frames + 1)  # not a list: see frame_parts
            asked = STORED_FRAMES if plan == STORED_FRAMES else accept
            part_type, parts = await frame_parts(svc, inst, frames, asked)
            return await multipart_response(located_frames(parts, location, frames), part_type)
        except TranscodeError as exc:
            failure = exc
    assert failure is not None
    raise failure


async def retrieve_bulkdata(request: Request) -> Response:
    study, series, sop = _uids(request)
    assert series is not None and sop is not None
    path = request.path_params["path"]
    accept = accept_of(request)
    pixel_path, _, frame_list = path.partition("/frames/")
    if frame_list and pixel_path.upper() == _PIXEL_DATA:
        # `{BulkDataURI}/frames/{n}`, where the frames of Pixel Data sent as bulk data are
        # located (bulkdata.located_frames): the instance's frames resource.
        return await _frames(request, frame_list)
    # "Bulkdata in a multipart response shall have a Content-Location header field that
    # corresponds to the URI contained in the corresponding Element in the Metadata"
    # (PS3.18 10.4.3.3.5): the BulkDataURI the metadata gives, absolute as it is there.
    location = f"{base_url(request)}/studies/{study}/series/{series}/instances/{sop}/bulk/{path}"
    # A single part answer is the value itself, uncompressed: asked for as octet-stream with
    # no transfer syntax, or Explicit VR Little Endian; else the next range (8.7.8.1).
    singles = [
        ts for _, ts, _ in single_parts(accept, _is_octet_stream)
        if ts in (None, EXPLICIT_VR_LITTLE_ENDIAN)
    ]  # fmt: skip
    failed: list[NotAcceptableError] = []
    if singles:
        uncompressed = f'multipart/related; type="{APPLICATION_OCTET_STREAM}"; transfer-syntax='
        try:
            return await _bulk_value(request, location, uncompressed + EXPLICIT_VR_LITTLE_ENDIAN,
                                     single=True)  # fmt: skip
        except NotAcceptableError as exc:
            failed.append(exc)
    try:
        return await _bulk_value(request, location, accept, single=False)
    except NotAcceptableError as exc:
        # The single part's reason (Pixel Data that cannot be decoded, and why) leads: an
        # Accept of octet-stream alone leaves the multipart negotiation no range to meet,
        # and its generic 406 had swallowed the reason.
        raise _after_single_parts(failed, exc) from None


async def _bulk_value(
    request: Request, location: str, accept: str | None, single: bool
) -> Response:
    study, series, sop = _uids(request)
    assert series is not None and sop is not None
    path = request.path_params["path"]
    svc = services(request)
    if path.upper() == _PIXEL_DATA:
        # Encapsulated Pixel Data by its BulkDataURI: uncompressed, as octet-stream bulk data
        # is (PS3.18 8.7.3.3.1); its frames as stored or in an image type when asked so.
        (inst,) = await locate(svc, study, series, sop)
        if encapsulated_pixels(inst):
            return await _pixel_data(request, svc, inst, accept, location, single)
    negotiate_bulkdata(accept)
    value = await bulk_value(svc, study, series, sop, path, head=request.method == "HEAD")
    value.headers["Content-Location"] = location
    return await ranged_response(request, value, None if single else APPLICATION_OCTET_STREAM)
