"""The audit trail's records, its hash chain, and their DICOM audit messages (pure).

Every row carries SHA-256(previous row's hash || canonical bytes of its own content), the first
row chaining from 32 zero bytes. An altered row no longer matches its hash; a deleted, inserted
or reordered row breaks the link of the row after it. A rewrite of the whole chain from some row
on is only caught against an anchor kept elsewhere (`audit head` prints one, `audit verify
--anchor` checks it): a hash chain without a secret cannot tell a consistent forgery apart.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ARCHIVE_FAULT",
    "GENESIS",
    "OVER_LIMIT",
    "AuditEvent",
    "AuditRow",
    "ChainVerifier",
    "Patient",
    "chain",
    "dicom_audit_messages",
    "parse_anchor",
    "patient_studies",
]

# The "previous hash" of the first row.
GENESIS = bytes(32)
# Version of the canonical encoding, hashed with each row. A row that names no patient is
# encoded as version 1 was (every row written before patients were recorded is such a row,
# and verifies as it did); one that names patients, as version 2: version 1's items, then
# the patients. Which version a row is follows from its content, not from a stored field
# that could be altered apart from it: patients removed from a version 2 row, or added to a
# version 1 row, no longer match its hash.
_CANONICAL_VERSION = "dicomweb-audit-1"
_CANONICAL_VERSION_PATIENTS = "dicomweb-audit-2"

# A patient whose data an event touched, as the stored data set named it: (Patient ID,
# Issuer of Patient ID, Patient's Name), "" where absent; the name as PS3.5 PN text
# (its component groups joined by "=").
Patient = tuple[str, str, str]
# A patient with the Study Instance UID of the study it was named for: what an event records
# (AuditEvent.patients), so that its export can give each patient a message of its own with
# its own studies (PS3.15 A.5.3.6, A.5.3.7: "information about a single patient"). Typed
# loosely: a row written before the study was recorded with the patient holds the three
# texts of a Patient only, and is hashed, so read, as it is.
PatientOfStudy = tuple[str, ...]


@dataclass(frozen=True)
class AuditEvent:
    """One audited action (the content of an audit row)."""

    time: datetime  # UTC, microsecond precision (what PostgreSQL keeps)
    caller: str  # "apikey:<id>", "oidc:<subject>", "anonymous", "cli:<user>"; "-": unknown
    client: str  # the client's network address, or "local" for the command line
    # The PS3.18 transaction name (store_instances, …), an admin action, a DIMSE operation
    # (dimse_store, dimse_find, dimse_move, dimse_get), or an association refused or ended
    # without release (dimse_associate, dimse_abort).
    action: str
    # The objects touched, each as "study[/series[/instance]]" UIDs: the path of a WADO or
    # STOW request, and each instance a STOW stored.
    uids: tuple[str, ...] = ()
    # The HTTP status answered (499 or 500 for a response that broke off mid-body: guard.py);
    # a DIMSE status for `dimse_*` actions, and for dimse_associate
    # and dimse_abort the PDU that refused or ended the association (dimse/connections.py).
    outcome: int = 200
    # Body bytes received (STOW) or sent (everything else; a HEAD: 0); of a DIMSE operation,
    # the data set bytes received (C-STORE) or sent (C-FIND, C-MOVE, C-GET).
    nbytes: int = 0
    detail: str = ""  # the query string of a search, the role of a new key, …
    # The patients of the instances touched (PS3.15 A.5.3.6, A.5.3.7: the Patient
    # participant object), each with the study it was named for (PatientOfStudy), each pair
    # once, recorded with the event: they stay in the trail when the data goes. Of a STOW or
    # C-STORE, from the data sets stored; of a retrieve, from the index when the event is
    # appended (auditlog.py). Empty for events that touch no stored data (a query, a refused
    # request) and for rows written before patients were recorded.
    patients: tuple[PatientOfStudy, ...] = ()

    def __post_init__(self) -> None:
        # Text that PostgreSQL and UTF-8 can hold, whoever made the event (a token's `sub`
        # may carry a lone surrogate, a query a NUL): the row and its hash agree.
        for name in ("caller", "client", "action", "detail"):
            object.__setattr__(self, name, _storable(getattr(self, name)))
        object.__setattr__(self, "uids", tuple(_storable(u) for u in self.uids))
        patients = (tuple(_storable(text) for text in p) for p in self.patients)
        object.__setattr__(self, "patients", tuple(dict.fromkeys(patients)))

    def canonical(self) -> bytes:
        """The bytes that are hashed: a JSON array in a fixed order, UTF-8, no whitespace."""
        items: list[Any] = [
            _CANONICAL_VERSION_PATIENTS if self.patients else _CANONICAL_VERSION,
            self.time.astimezone(UTC).isoformat(timespec="microseconds"),
            self.caller,
            self.client,
            self.action,
            list(self.uids),
            self.outcome,
            self.nbytes,
            self.detail,
        ]
        if self.patients:
            items.append([list(p) for p in self.patients])
        return json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _storable(text: str) -> str:
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class AuditRow:
    seq: int
    event: AuditEvent
    prev_hash: bytes
    hash: bytes


def chain(prev_hash: bytes, events: Sequence[AuditEvent]) -> list[tuple[bytes, bytes]]:
    """(prev_hash, hash) of each event appended after a row whose hash is `prev_hash`."""
    out = []
    for event in events:
        digest = hashlib.sha256(prev_hash + event.canonical()).digest()
        out.append((prev_hash, digest))
        prev_hash = digest
    return out


@dataclass
class ChainVerifier:
    """Walks rows in `seq` order and remembers the first one that does not fit the chain."""

    anchors: dict[int, bytes] = field(default_factory=dict)  # seq -> hash recorded elsewhere
    count: int = 0
    head: tuple[int, bytes] = (0, GENESIS)
    problem: str | None = None

    def feed(self, row: AuditRow) -> bool:
        """False (and `problem` set) at the first row that breaks the chain."""
        if self.problem is not None:
            return False
        prev = self.head[1]
        if row.prev_hash != prev:
            self.problem = (
                f"row {row.seq}: its link to the previous row is broken"
                " (a row before it was deleted, inserted or reordered)"
            )
        elif hashlib.sha256(prev + row.event.canonical()).digest() != row.hash:
            self.problem = f"row {row.seq}: its content does not match its hash (altered)"
        elif row.seq in self.anchors and self.anchors.pop(row.seq) != row.hash:
            self.problem = f"row {row.seq}: its hash differs from the anchor (chain rewritten)"
        if self.problem is not None:
            return False
        self.count += 1
        self.head = (row.seq, row.hash)
        return True

    def finish(self) -> str | None:
        """The first problem, or an anchor that was never reached (rows deleted at the end)."""
        if self.problem is None and self.anchors:
            seq = min(self.anchors)
            self.problem = f"row {seq}: anchored but missing (rows deleted at the end of the chain)"
        return self.problem


def parse_anchor(text: str) -> tuple[int, bytes]:
    """`SEQ:HEX` as printed by `audit head`."""
    seq, _, digest = text.partition(":")
    try:
        value = (int(seq), bytes.fromhex(digest))
    except ValueError:
        raise ValueError(f"anchor {text!r} is not SEQ:HEX") from None
    if len(value[1]) != 32:
        raise ValueError(f"anchor {text!r}: the hash must be 64 hex digits")
    return value


# PS3.16 DCM codes of the events (PS3.15 A.5.3) and object types used below.
_QUERY = ("110112", "Query")
_TRANSFERRED = ("110104", "DICOM Instances Transferred")
_ACCESSED = ("110103", "DICOM Instances Accessed")
_SECURITY_ALERT = ("110113", "Security Alert")
_USER_AUTHENTICATION = ("110114", "User Authentication")
_USER_SECURITY_CHANGED = ("110137", "User Security Attributes Changed")
_LOGIN = ("110122", "Login")
_LOGOUT = ("110123", "Logout")
_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")
_SOURCE_ROLE = ("110153", "Source Role ID")
_DESTINATION_ROLE = ("110152", "Destination Role ID")
_STUDY_UID = ("110180", "Study Instance UID")
# The Patient participant object's ID type (PS3.15 A.5.3.6, A.5.3.7; PS3.15 A.5.2.5, the
# RFC 3881 code set): "Patient Number".
_PATIENT_NUMBER = {"csd-code": "2", "codeSystemName": "RFC-3881", "originalText": "Patient Number"}
# ParticipantObjectID of a patient whose data set has no (or an empty) Patient ID: the
# field is mandatory. What dcm4chee-arc writes (its audit documentation, "Patient ID or
# <none> if unknown").
_NO_PATIENT_ID = "<none>"
# The events whose message has a Patient participant object: DICOM Instances Accessed
# (A.5.3.6) and DICOM Instances Transferred (A.5.3.7), each "Patient (1)". Not a Query
# (A.5.3.10: the query only, "the message does not record the response to the query").
_WITH_PATIENT = (_ACCESSED, _TRANSFERRED)
# The SOP Class UID that PS3.15 A.5.3.10 puts in ParticipantObjectID of a query: for QIDO-RS,
# Study Root Query/Retrieve Information Model - FIND (the model QIDO-RS answers from).
_STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _code(code: tuple[str, str]) -> dict[str, str]:
    return {"csd-code": code[0], "codeSystemName": "DCM", "originalText": code[1]}


# DIMSE statuses of a failure of the archive rather than of the request (PS3.7 C.4, PS3.4
# B.2.3, C.4.2.1.5): Processing Failure; Out of Resources, the database, the disk or the
# time allowed having failed it (0xA700), the matching (0xA701). Not 0xA702, Unable to
# perform sub-operations: more than MAX_RETRIEVE_INSTANCES matched, or every sub-operation
# failed (the destination refusing them or not reached), the request's doing or the
# peer's, as a 4xx is; unless a sub-operation failed for the archive (ARCHIVE_FAULT).
_DIMSE_SERIOUS = frozenset({0x0110, 0xA700, 0xA701})
_CANNOT_PERFORM = 0xA702
# The detail of a C-MOVE/C-GET row some of whose sub-operations failed for the archive
# (an instance it could not read or convert: its disk, its codecs) begins with this: an
# 0xA702 so is the archive failing (8), as a 5xx is, not the peer refusing (found by review:
# every 0xA702 became a refused request, an archive that lost its files too). So does that
# of a STOW-RS answered 409 one of whose instances failed for the archive (routes/stow.py:
# 0xA700 of a full disk or quota, 0x0110), which is then 8 as a C-STORE with that status
# is. At the start of the detail, where no text of the peer's (a destination AE title, a
# query string) can put it.
ARCHIVE_FAULT = "archive fault: "
# The detail of a DIMSE row failed for what the peer sent beyond a limit of the archive
# begins with this: a C-STORE data set over DICOMWEB_MAX_PART_BYTES, audited 0xA700
# (dimse/connections.py), or a Deflated one inflating past dicomfile.MAX_INFLATED_BYTES
# (dimse/handlers.py). A refused request (4), as STOW's 413 or 409 for the same limit is,
# not the archive failing. At the start of the detail, where no text of the peer's (a SOP
# Instance UID) can put it.
OVER_LIMIT = "over the limit: "
# The STOW-RS transactions (PS3.18 10.5), whose 409 may be the archive's failure.
_STOW_ACTIONS = ("store_instances", "store_study_instances")
# Actions whose detail says how they ended (the others' is a query string, or what an
# admin action changed): exported as the EventOutcomeDescription of a failure.
_DETAIL_IS_OUTCOME = ("dimse_", "reindex")


def _outcome_indicator(event: AuditEvent) -> int:
    """PS3.15 A.5.1 EventOutcomeIndicator: 0 success, 4 minor failure (the request was
    refused), 8 serious failure (the server failed). HTTP statuses, or DIMSE ones.

    Whose failure it is decides, the same on both front doors: a limit the peer passed (an
    oversize data set, a Deflate bomb) is its request refused, 4, as any 4xx; the archive
    unable to do what it was asked for want of its own resources (a full disk or quota:
    0xA700 of a C-STORE, or of a STOW-RS instance, which PS3.18 Table 10.5.3-1 answers 409)
    is the archive failing, 8, as a 5xx. Found by review: a full disk was 8 over DIMSE and 4
    over STOW-RS, a Deflate bomb 4 over STOW-RS and 8 over DIMSE."""
    status = event.outcome
    if event.action.startswith("dimse_"):
        if status == 0x0000:
            return 0
        if status == _CANNOT_PERFORM and event.detail.startswith(ARCHIVE_FAULT):
            return 8
        serious = status in _DIMSE_SERIOUS and not event.detail.startswith(OVER_LIMIT)
        return 8 if serious else 4
    if status == 409 and event.action in _STOW_ACTIONS and event.detail.startswith(ARCHIVE_FAULT):
        return 8  # nothing stored, some of it for the archive's own failure (as 0xA702)
    if status == 202:  # STOW: some instances failed (PS3.18 Table 10.5.3-1)
        return 4
    if status < 400:
        return 0
    return 4 if status < 500 else 8


def _event_of(event: AuditEvent) -> tuple[tuple[str, str], str, list[tuple[str, str]]]:
    """(EventID, EventActionCode, EventTypeCodes) of an action."""
    # An association is a DIMSE peer's session, its calling AE title the only identity it
    # gives (PS3.15 A.5.3.12: a log on or log off, "whether successful or not"): a request
    # refused is a failed Login, as a 401 is; an association ended without A-RELEASE, a
    # Logout that failed. Not a Security Alert (A.5.3.11 is about securing the channel, and
    # an association limit reached is no attack), nor Network Entry (A.5.3.9: a node joining
    # or leaving the network).
    if event.action == "dimse_associate":
        return _USER_AUTHENTICATION, "E", [_LOGIN]
    if event.action == "dimse_abort":
        return _USER_AUTHENTICATION, "E", [_LOGOUT]
    if event.action == "dimse_find":
        return _QUERY, "E", []
    if event.action == "dimse_store":
        return _TRANSFERRED, "C", []
    if event.action.startswith("dimse_"):
        return _TRANSFERRED, "R", []
    if event.outcome == 401:
        return _USER_AUTHENTICATION, "E", [_LOGIN]
    if event.outcome == 403:
        return _SECURITY_ALERT, "E", [_RESTRICTED_FUNCTION]
    if event.action.startswith("search_for_"):
        return _QUERY, "E", []
    if event.action == "store_instances" or event.action == "store_study_instances":
        return _TRANSFERRED, "C", []
    if event.action == "apikey_list":  # reading the keys' descriptions, not changing them
        return _QUERY, "E", []
    if event.action.startswith("apikey_"):
        return _SECURITY_ALERT, "E", [_USER_SECURITY_CHANGED]
    if event.action == "reindex":  # every stored instance read, the index's copy updated
        return _ACCESSED, "U", []
    return _TRANSFERRED, "R", []


def patient_studies(event: AuditEvent) -> list[str]:
    """The studies whose patients an event should name and does not yet: those it touched,
    when its message is one with a Patient participant (auditlog.py looks them up)."""
    if event.patients or not event.uids or _event_of(event)[0] not in _WITH_PATIENT:
        return []
    return list(_studies(event.uids))


def _studies(paths: Sequence[str]) -> dict[str, tuple[set[str], list[str]]]:
    """study UID -> (series UIDs, SOP instance UIDs) of "study[/series[/instance]]" paths."""
    out: dict[str, tuple[set[str], list[str]]] = {}
    for path in paths:
        study, *rest = path.split("/")
        series, instances = out.setdefault(study, (set(), []))
        if rest:
            series.add(rest[0])
        if len(rest) > 1:
            instances.append(rest[1])
    return out


def dicom_audit_messages(row: AuditRow, source_id: str) -> list[dict[str, Any]]:
    """The row as DICOM audit messages (PS3.15 A.5.1), in JSON: the XML schema's elements
    become keys and its attributes nested keys; `seq` and `hash` tie each back to the chain.

    One message, but for a DICOM Instances Accessed or Transferred event that touched the
    data of several patients: A.5.3.6 says its message "shall only include information about
    a single patient" and A.5.3.7 that it "may only" (found by review: one message named
    every patient of a STOW or C-MOVE that spanned patients, with all their studies). It is
    one message per patient then, each with that patient's studies (those the event
    recorded it for), and the studies no patient was recorded for (not stored when a
    retrieve's patients were looked up) in one more, without a patient."""
    event_id = _event_of(row.event)[0]
    if event_id not in _WITH_PATIENT or not row.event.patients:
        return [_message(row, source_id, None, None)]
    studies = list(_studies(row.event.uids))
    mine: dict[Patient, list[str]] = {}
    for entry in row.event.patients:
        patient: Patient = (entry[0], entry[1], entry[2])
        # A patient recorded without its study (written before they were recorded with it):
        # every study of the event.
        mine.setdefault(patient, []).extend(entry[3:] or studies)
    messages = [_message(row, source_id, patient, set(of)) for patient, of in mine.items()]
    claimed = {study for of in mine.values() for study in of}
    if any(study not in claimed for study in studies):
        messages.append(_message(row, source_id, None, set(studies) - claimed))
    return messages


def _message(
    row: AuditRow, source_id: str, patient: Patient | None, studies: set[str] | None
) -> dict[str, Any]:
    """The message of a row, naming this patient (None: none), with these of its studies
    (None: all)."""
    ev = row.event
    event_id, action_code, type_codes = _event_of(ev)
    receiving = action_code == "C"
    indicator = _outcome_indicator(ev)
    ident: dict[str, Any] = {
        "EventActionCode": action_code,
        "EventDateTime": ev.time.astimezone(UTC).isoformat(timespec="microseconds"),
        "EventOutcomeIndicator": indicator,
        "EventID": _code(event_id),
    }
    if type_codes:
        ident["EventTypeCode"] = [_code(c) for c in type_codes]
    # Why a failure failed (why an association was refused or ended, a C-STORE not served,
    # a C-MOVE's counts): EventOutcomeDescription, optional free text in the A.5.1 schema's
    # EventIdentification. Not for a query: its detail is the query (ParticipantObjectQuery).
    if indicator and ev.detail and event_id != _QUERY and ev.action.startswith(_DETAIL_IS_OUTCOME):
        ident["EventOutcomeDescription"] = ev.detail
    # PS3.15 A.5.3: the side data (or a query) flows from is the source.
    caller_is_source = receiving or event_id == _QUERY
    message: dict[str, Any] = {
        "EventIdentification": ident,
        "ActiveParticipant": _participants(ev, source_id, caller_is_source),
        "AuditSourceIdentification": {"AuditSourceID": source_id, "AuditSourceTypeCode": 4},
        "ParticipantObjectIdentification": _objects(ev, event_id, patient, studies),
    }
    return {"seq": row.seq, "hash": row.hash.hex(), "action": ev.action, "bytes": ev.nbytes,
            "status": ev.outcome, "AuditMessage": message}  # fmt: skip


def _participants(ev: AuditEvent, source_id: str, caller_is_source: bool) -> list[dict[str, Any]]:
    """ActiveParticipant: the caller (the requestor), then this server."""
    caller = {
        "UserID": ev.caller,
        "UserIsRequestor": True,
        "RoleIDCode": _code(_SOURCE_ROLE if caller_is_source else _DESTINATION_ROLE),
        "NetworkAccessPointID": ev.client,
        "NetworkAccessPointTypeCode": 2,  # an IP address
    }
    server = {
        "UserID": source_id,
        "UserIsRequestor": False,
        "RoleIDCode": _code(_DESTINATION_ROLE if caller_is_source else _SOURCE_ROLE),
    }
    return [caller, server]


def _objects(
    ev: AuditEvent, event_id: tuple[str, str], patient: Patient | None, only: set[str] | None
) -> list[dict[str, Any]]:
    """ParticipantObjectIdentification: the query of a Query event, then each study touched
    (of those `only` names, when it names some), then the patient."""
    objects: list[dict[str, Any]] = []
    if event_id == _QUERY:
        objects.append({
            "ParticipantObjectID": _STUDY_ROOT_FIND,
            "ParticipantObjectTypeCode": 2,  # system object
            "ParticipantObjectTypeCodeRole": 3,  # report
            "ParticipantObjectIDTypeCode": {"csd-code": "110181", "codeSystemName": "DCM",
                                            "originalText": "SOP Class UID"},
            "ParticipantObjectQuery": base64.b64encode(ev.detail.encode("utf-8")).decode("ascii"),
        })  # fmt: skip
    for study, (series, instances) in _studies(ev.uids).items():
        if only is not None and study not in only:
            continue
        obj: dict[str, Any] = {
            "ParticipantObjectID": study,
            "ParticipantObjectTypeCode": 2,
            "ParticipantObjectTypeCodeRole": 3,
            "ParticipantObjectIDTypeCode": _code(_STUDY_UID),
        }
        if series or instances:  # PS3.15 A.5.2.7: what of the study was touched
            obj["ParticipantObjectDescription"] = {
                "Series": sorted(series), "NumberOfInstances": len(instances),
                "Instance": [{"UID": uid} for uid in instances],
            }  # fmt: skip
        objects.append(obj)
    # One at most (PS3.15 A.5.3.6, A.5.3.7: "Patient (1)"): a row that touched several
    # patients is one message each (dicom_audit_messages).
    if patient is not None and event_id in _WITH_PATIENT:
        objects.append(_patient(patient))
    return objects


# HL7 v2 escape sequences (HL7 v2.5 2.7.4) of the delimiters a CX value may not hold as
# text: a Patient ID (LO) or Issuer of Patient ID may hold "^" or "&", which unescaped read
# as other components of the CX (found by review: Patient ID "12^34" was exported as ID
# "12" with check digit "34"; an issuer "A&B", as namespace "A", universal ID "B").
_HL7_ESCAPED = str.maketrans({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\",
                              "~": "\\R\\"})  # fmt: skip


def _patient(patient: Patient) -> dict[str, Any]:
    """The Patient participant object (PS3.15 A.5.3.6, A.5.3.7). Its ID with the Issuer of
    Patient ID as the HL7 CX assigning authority (`ID^^^ISSUER`), as IHE ITI's ATNA and
    dcm4chee-arc write it: a Patient ID is unique only within its issuer. Each escaped as
    HL7 escapes text (_HL7_ESCAPED)."""
    pid, issuer, name = patient
    cx = (pid or _NO_PATIENT_ID).translate(_HL7_ESCAPED)
    if issuer:
        cx += "^^^" + issuer.translate(_HL7_ESCAPED)
    obj: dict[str, Any] = {
        "ParticipantObjectID": cx,
        "ParticipantObjectTypeCode": 1,  # person
        "ParticipantObjectTypeCodeRole": 1,  # patient
        "ParticipantObjectIDTypeCode": _PATIENT_NUMBER,
    }
    if name:
        obj["ParticipantObjectName"] = name
    return obj
