"""The JSON documents the services answer with, beyond the DICOM JSON of a data set
(dicom_json): the Store Instances Response of a STOW-RS request, from the InstanceOutcome of
each of its parts (PS3.18 10.5.3), and the root-relative BulkDataURIs of stored JSON made
absolute with the public base URL as a response is sent (QIDO-RS rows, metadata)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dicomweb_server.errors import FailureReason, WarningReason

__all__ = [
    "InstanceOutcome",
    "absolutize_bulk_uris",
    "absolutize_bulk_uris_bytes",
    "stow_response",
]

JsonDict = dict[str, Any]


def absolutize_bulk_uris(json_text: str, base_url: str) -> str:
    """Prefix the root-relative BulkDataURIs of stored JSON text with the public base URL.

    In JSON text produced by PostgreSQL's jsonb output, the sequence ``"BulkDataURI": "`` can only
    be a key followed by its value: quotes inside string values are escaped.
    """
    return json_text.replace(f"{_BULK_URI_KEY}/", f"{_BULK_URI_KEY}{_json_inner(base_url)}/")


def absolutize_bulk_uris_bytes(json_bytes: bytes, base_url: str) -> bytes:
    """`absolutize_bulk_uris` of UTF-8 JSON bytes."""
    key = _BULK_URI_KEY.encode("ascii")
    return json_bytes.replace(key + b"/", key + _json_inner(base_url).encode("ascii") + b"/")


def _json_inner(text: str) -> str:
    """`text` as the inside of a JSON string (escaped: the base URL comes from the request)."""
    return json.dumps(text)[1:-1]


_BULK_URI_KEY = '"BulkDataURI": "'


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one part of a STOW-RS request."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: FailureReason | None = None
    warning: WarningReason | None = None
    retrieve_path: str | None = None  # root-relative RetrieveURL of a stored instance
    duplicate: bool = False  # the same bytes were already stored: nothing new was written
    reason: str = ""  # human-readable, sent as a Warning header text too
    # Refused (0xA700) for a limit of the archive's that the sender passed (a Deflated data
    # set inflating past MAX_INFLATED_BYTES, JSON bulk data over its bounds): a refused
    # request in the audit trail, not the archive out of resources (its disk, its quota).
    over_limit: bool = False
    # The patient of a stored instance, as its data set names it: (Patient ID, Issuer of
    # Patient ID, Patient's Name), for the audit trail (audit.AuditEvent.patients).
    patient: tuple[str, str, str] | None = None

    @property
    def archive_failed(self) -> bool:
        """Whether it failed for the archive's own doing, not the request's: a processing
        failure (0x0110), or out of resources (0xA700: a full disk or quota) unless for a
        limit the request passed. The statuses the audit export counts serious failures of
        a C-STORE (audit._DIMSE_SERIOUS)."""
        if self.failure == FailureReason.PROCESSING_FAILURE:
            return True
        return self.failure == FailureReason.OUT_OF_RESOURCES and not self.over_limit


def _sop_ref(o: InstanceOutcome) -> JsonDict:
    item: JsonDict = {}
    if o.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
    if o.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
    return item


def stow_response(
    outcomes: Iterable[InstanceOutcome], base_url: str, study_path: str | None
) -> JsonDict:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-3)."""
    referenced: list[JsonDict] = []
    failed: list[JsonDict] = []
    for o in outcomes:
        item = _sop_ref(o)
        if o.failure is not None:
            item["00081197"] = {"vr": "US", "Value": [int(o.failure)]}
            failed.append(item)
            continue
        if o.retrieve_path:
            item["00081190"] = {"vr": "UR", "Value": [base_url + o.retrieve_path]}
        if o.warning is not None:
            item["00081196"] = {"vr": "US", "Value": [int(o.warning)]}
        referenced.append(item)
    # Retrieve URL is Type 2 (PS3.18 Table I.1-1): present, empty when the stored instances
    # are not all of one study (or none was stored).
    doc: JsonDict = {"00081190": {"vr": "UR"}}
    if study_path:
        doc["00081190"] = {"vr": "UR", "Value": [base_url + study_path]}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        doc["00081199"] = {"vr": "SQ", "Value": referenced}
    return doc
