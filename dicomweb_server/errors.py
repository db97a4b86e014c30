"""Errors the server reports and the status codes of PS3.18 and PS3.4.

Framework-free: `app.py` renders a `DicomWebError` as an HTTP response.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BadRequestError",
    "ConflictError",
    "DicomWebError",
    "FailureReason",
    "ForbiddenError",
    "MethodNotAllowedError",
    "NotAcceptableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RangeNotSatisfiableError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "WarningReason",
    "original_os_error",
]


class DicomWebError(Exception):
    """An error with an HTTP status and a reason meant for the client."""

    status: int = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequestError(DicomWebError):
    status = 400


class UnauthorizedError(DicomWebError):
    """No credentials, or credentials that do not hold (sent with WWW-Authenticate)."""

    status = 401


class ForbiddenError(DicomWebError):
    """A known caller without the role the request needs."""

    status = 403


class NotFoundError(DicomWebError):
    status = 404


class MethodNotAllowedError(DicomWebError):
    status = 405


class NotAcceptableError(DicomWebError):
    """No representation the request accepts (RFC 9110 15.5.7). The answer depended on
    Accept, so it says so with `Vary: Accept` (RFC 9110 12.5.5), merged into any Vary given:
    a cache must not serve this 406 to a request that accepts something else."""

    status = 406

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        _add_vary(self.headers, "Accept")


class RequestTimeoutError(DicomWebError):
    """A request body that stopped coming (RFC 9110 15.5.9); the connection is closed."""

    status = 408


class ConflictError(DicomWebError):
    status = 409


class PayloadTooLargeError(DicomWebError):
    status = 413


class UnsupportedMediaTypeError(DicomWebError):
    status = 415


class RangeNotSatisfiableError(DicomWebError):
    """A Range none of whose bytes exist (RFC 9110 15.5.17); sent with `Content-Range: */n`."""

    status = 416


class ServiceUnavailableError(DicomWebError):
    status = 503


def _add_vary(headers: dict[str, str], field: str) -> None:
    """Add `field` to the Vary of `headers` (names matched without case, once each)."""
    key = next((k for k in headers if k.lower() == "vary"), "Vary")
    names = [n.strip() for n in headers.get(key, "").split(",") if n.strip()]
    if field.lower() not in {n.lower() for n in names} and "*" not in names:
        names.append(field)
    headers[key] = ", ".join(names)


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values used in a STOW-RS response.

    PS3.18 10.5.3 refers to the C-STORE failure statuses of PS3.4 Annex B.2.3
    (Table B.2-1) and the general statuses of PS3.7 Annex C.
    """

    # PS3.7 C.4.2: general processing failure (e.g. an unexpected error while storing).
    PROCESSING_FAILURE = 0x0110
    # PS3.7 C.5.5: Duplicate SOP Instance; stored with different content (our policy: refuse).
    DUPLICATE_SOP_INSTANCE = 0x0111
    # PS3.7 C.5: Referenced SOP Class not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    # PS3.4 Table B.2-1: Refused: Out of Resources (disk full, part or request too large).
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 Table B.2-1: Error: Data Set does not match SOP Class (required UIDs missing or
    # malformed).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 Table B.2-1: Error: Cannot understand (not a DICOM Part 10 file).
    CANNOT_UNDERSTAND = 0xC000
    # PS3.18 10.5.3 (Table 10.5.3-2 and CP-1749): Referenced Transfer Syntax not supported.
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    # PS3.18 10.5.3.2: the Study Instance UID of the instance does not match the one in the
    # target resource (POST /studies/{study}); dcm4chee and Microsoft report this as 0xA900-range.
    STUDY_INSTANCE_UID_MISMATCH = 0xA901


class WarningReason(IntEnum):
    """Warning Reason (0008,1196) values, PS3.4 Table B.2-1."""

    # Coercion of Data Elements: the stored instance differs from what was sent.
    COERCION_OF_DATA_ELEMENTS = 0xB000
    # Elements Discarded.
    ELEMENTS_DISCARDED = 0xB006
    # Data Set does not match SOP Class (stored anyway).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


def original_os_error(exc: BaseException | None) -> OSError | None:
    """The OSError that `exc` stands for: `exc` itself, or one it was raised from
    (`raise ... from`, through OSErrors only): the first with an errno. pydicom's writer
    re-raises a failure to write an element as a new exception of the same type, of its
    message alone, raised from it (pydicom.tag.tag_in_exception, once per enclosing
    sequence): an OSError with no errno nor strerror. None when there is no such OSError.
    An exception raised while another was handled (__context__ alone) is its own error, not
    the other's: that chain is not followed. Used for a full disk (blobstore.files
    out_of_space) and for a failure reason's strerror (ingest.storage_failure)."""
    while isinstance(exc, OSError):
        if exc.errno is not None:
            return exc
        exc = exc.__cause__
    return None
