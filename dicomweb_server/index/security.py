"""The security tables: API keys, and the hash-chained audit trail appended to under an
advisory lock and walked a page at a time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dicomweb_server.audit import GENESIS, AuditEvent, AuditRow, Patient, PatientOfStudy
from dicomweb_server.index.pool import (
    DATABASE_ERROR,
    REFUSED_VALUE,
    Pooled,
    unavailable,
)
from dicomweb_server.index.rows import ApiKey
from dicomweb_server.index.store import ADVISORY_LOCK_CLASS

__all__ = ["Security"]

# Second key of the advisory lock that serialises appends to the audit chain (owners are > 0
# and the schema lock is 0).
AUDIT_LOCK_KEY = -1
_APPEND_AUDIT = "SELECT dicomweb_append_audit($1, $2, $3, $4, $5, $6)"
# Audit rows fetched per round trip while walking the chain.
AUDIT_FETCH_ROWS = 1000
# A page of the chain with each row's patients: looked up row by row (the primary key), not
# joined. `LEFT JOIN audit_patients USING (seq)` read audit_patients from its first row for
# every page (a merge join on the whole primary key, or a hash join on a scan of the whole
# table: the page's lower bound is not carried to the nullable side of an outer join), a
# walk of the chain quadratic in its length (found by review: a page past 250,000 rows read
# 84,000 patient rows, 11 ms instead of 0.4).
_AUDIT_PAGE = (
    "SELECT a.*, (SELECT p.patients FROM audit_patients p WHERE p.seq = a.seq) AS patients"
    " FROM audit_log a WHERE a.seq > $1 ORDER BY a.seq LIMIT $2"
)


class Security(Pooled):
    """API keys and audit rows."""

    # API keys

    async def add_api_key(self, key_id: str, secret_sha256: bytes, role: str, name: str) -> None:
        await self._execute(
            "INSERT INTO api_key (key_id, secret_sha256, role, name) VALUES ($1, $2, $3, $4)",
            key_id, secret_sha256, role, name,
        )  # fmt: skip

    async def api_key(self, key_id: str) -> ApiKey | None:
        row = await self._fetchrow("SELECT * FROM api_key WHERE key_id = $1", key_id)
        return None if row is None else ApiKey(**dict(row))

    async def api_keys(self) -> list[ApiKey]:
        return [
            ApiKey(**dict(r))
            for r in await self._fetch("SELECT * FROM api_key ORDER BY created_at")
        ]

    async def revoke_api_key(self, key_id: str) -> bool:
        rows = await self._fetch(
            "UPDATE api_key SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL"
            " RETURNING key_id",
            key_id,
        )
        return bool(rows)

    # The audit trail

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append events to the chain in one round trip: schema.sql's dicomweb_append_audit
        links them under a transaction-scoped advisory lock, so that processes sharing the
        database take turns and each row links to the true last one. (It was a transaction
        of five round trips: lock, last hash, insert, and its BEGIN and COMMIT; with one
        client a batch holds a few requests, each of which paid one or two of them.)
        The rows are audit_log's row type, in its column order, without seq and hashes;
        their patients go to audit_patients (schema.sql), as JSON."""
        rows = [
            (None, e.time, e.caller, e.client, e.action, list(e.uids), e.outcome, e.nbytes,
             e.detail, None, None)
            for e in events
        ]  # fmt: skip
        canonical = [e.canonical() for e in events]
        patients = [json.dumps(e.patients, ensure_ascii=False) if e.patients else None
                    for e in events]  # fmt: skip
        try:
            await self._execute(
                _APPEND_AUDIT, ADVISORY_LOCK_CLASS, AUDIT_LOCK_KEY, GENESIS, rows, canonical,
                patients,
            )  # fmt: skip
        except REFUSED_VALUE as exc:
            raise ValueError(f"the audit trail refused a value: {exc}") from exc
        except DATABASE_ERROR as exc:  # full, read-only, ...
            raise unavailable(exc) from exc

    async def audit_patients(self, study_uids: Sequence[str]) -> dict[str, Patient]:
        """The patient of each of these studies that is stored (auditlog.py: one query for a
        batch of events, not one per request)."""
        rows = await self._fetch(
            "SELECT s.study_instance_uid, p.patient_id, p.issuer_of_patient_id, p.patient_name"
            " FROM study s JOIN patient p ON p.pk = s.patient_fk"
            " WHERE s.study_instance_uid = ANY($1::text[])",
            list(study_uids),
        )
        return {
            r["study_instance_uid"]: (r["patient_id"], r["issuer_of_patient_id"],
                                      r["patient_name"] or "")
            for r in rows
        }  # fmt: skip

    async def audit_rows(self, after_seq: int = 0) -> AsyncIterator[AuditRow]:
        """Every audit row after `after_seq`, in chain order, a page at a time."""
        while True:
            rows = await self._fetch(_AUDIT_PAGE, after_seq, AUDIT_FETCH_ROWS)
            for r in rows:
                event = AuditEvent(
                    r["at"], r["caller"], r["client"], r["action"], tuple(r["uids"]),
                    r["outcome"], r["bytes"], r["detail"], _patients_of(r["patients"]),
                )  # fmt: skip
                yield AuditRow(r["seq"], event, bytes(r["prev_hash"]), bytes(r["hash"]))
            if len(rows) < AUDIT_FETCH_ROWS:
                return
            after_seq = rows[-1]["seq"]


# What audit_patients may hold of a row: rows of four texts (audit.PatientOfStudy), or of
# three (written before the study was recorded with the patient).
_PATIENT_WIDTHS = (3, 4)


def _patients_of(value: Any) -> tuple[PatientOfStudy, ...]:
    """A row's patients as audit_patients holds them, None when it holds none. A value the
    writer cannot have written (no patient, a one-dimensional array, a NULL in it: SQL
    access can insert one, the table refuses updates only) is read as one patient whose ID
    shows it: the row then names a patient, so its hash no longer matches and `audit
    verify` says so. It raised instead, or (an empty array) was read as no patient at all
    and the row verified; and `audit export` ended at it (found by review)."""
    if value is None:
        return ()
    if value and all(
        isinstance(p, list) and len(p) in _PATIENT_WIDTHS and all(isinstance(t, str) for t in p)
        for p in value
    ):
        return tuple(tuple(p) for p in value)
    return ((f"<not as written: {json.dumps(value, ensure_ascii=False)}>", "", ""),)
