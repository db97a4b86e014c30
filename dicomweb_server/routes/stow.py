"""STOW-RS handler (PS3.18 10.5)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.audit import ARCHIVE_FAULT
from dicomweb_server.ingest import StoreInterruptedError, store_parts, stow_status
from dicomweb_server.media.headers import check_body_coding
from dicomweb_server.media.mediatypes import APPLICATION_DICOM, stow_boundary
from dicomweb_server.media.negotiate import negotiate_dicom_model
from dicomweb_server.multipart import iter_parts
from dicomweb_server.response_json import InstanceOutcome, stow_response
from dicomweb_server.routes.common import accept_of, base_url, services, uid_param, warning_header
from dicomweb_server.routes.responses import model_response
from dicomweb_server.stow_json import store_json_parts

__all__ = ["store_instances"]

# Reasons of failed parts repeated in Warning headers, at most.
_MAX_WARNINGS = 10


async def store_instances(request: Request) -> Response:
    # The Store Instances Response Module, in JSON or XML (PS3.18 10.5.3, Annex I): one
    # document, or one part when XML is asked as multipart/related (as Example B.23 shows)
    media = negotiate_dicom_model(accept_of(request), multipart=True, single=True)
    boundary, part_type = stow_boundary(request.headers.get("content-type"))
    check_body_coding(request.headers.getlist("content-encoding"))
    study = uid_param(request, "study") if "study" in request.path_params else None
    base_url(request)  # a Host that is no host is a 400 before anything is stored (review)
    settings = request.app.state.settings
    events = iter_parts(
        request.stream(),
        boundary,
        max_part_bytes=settings.max_part_bytes,
        max_request_bytes=settings.max_request_bytes,
    )
    known: list[InstanceOutcome] = []  # each outcome as it is known
    try:
        if part_type != APPLICATION_DICOM:  # metadata and bulk data (PS3.18 10.5.1.4)
            outcomes = await store_json_parts(events, services(request), study, part_type, known)
        else:
            outcomes = await store_parts(events, services(request), study, known)
    except StoreInterruptedError as exc:
        # The body broke off after instances were stored: its status (400, 408, 413), and the
        # Store Instances Response of what was stored, the reason first in the Warning.
        response = await _response(request, media, exc.outcomes, exc.status, [exc.message])
        response.headers.update(exc.headers)  # e.g. a 408's Connection: close
        return response
    except BaseException:
        # The request failed in another way (its client gone: 499; the database away: 503)
        # after some of its instances were stored, which stay: the audit trail names them
        # (found by audit review: its row named none).
        _audited(request, known)
        raise
    return await _response(request, media, outcomes, stow_status(outcomes), [])


async def _response(
    request: Request, media: str, outcomes: list[InstanceOutcome], status: int, notes: list[str]
) -> Response:
    _audited(request, outcomes)
    studies = {o.retrieve_path.split("/")[2] for o in outcomes if o.retrieve_path}
    study_path = f"/studies/{studies.pop()}" if len(studies) == 1 else None
    doc = stow_response(outcomes, base_url(request), study_path)
    reasons = notes + [o.reason for o in outcomes if o.reason][:_MAX_WARNINGS]
    return await model_response(doc, media, status, warning_header(reasons))


def _audited(request: Request, outcomes: list[InstanceOutcome]) -> None:
    """The audit trail names each stored instance as study/series/instance, and the patients
    the stored data sets name (PS3.15 A.5.3.7's Patient participant: known here, no query)."""
    request.state.audit_uids = [
        "/".join(o.retrieve_path.split("/")[2::2]) for o in outcomes if o.retrieve_path
    ]
    # Each with the study it was stored in: the export gives each patient its own message,
    # with its own studies (audit.dicom_audit_messages).
    request.state.audit_patients = [
        (*o.patient, o.retrieve_path.split("/")[2])
        for o in outcomes if o.patient is not None and o.retrieve_path
    ]  # fmt: skip
    request.state.audit_detail = _audit_detail(outcomes)


def _audit_detail(outcomes: list[InstanceOutcome]) -> str:
    """The audit detail of a STOW some of whose instances failed (else none: the query
    string's): the counts, and first, where no text of the client's (a query string) can
    put it, how many failed for the archive's own doing, ARCHIVE_FAULT (a full disk, a
    processing failure): a 409 so is the archive failing (audit._outcome_indicator), as the
    same failure of a C-STORE is."""
    failed = sum(o.failure is not None for o in outcomes)
    if not failed:
        return ""
    counts = f"stored={len(outcomes) - failed} failed={failed}"
    faults = sum(o.archive_failed for o in outcomes)
    return f"{ARCHIVE_FAULT}{faults} not stored; {counts}" if faults else counts
