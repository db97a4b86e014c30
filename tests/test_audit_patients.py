"""The Patient participant object of the audit export (PS3.15 A.5.3.6, A.5.3.7): recorded
with each event that touched stored instances, in the hashed content of its row, from the
data sets a STOW or C-STORE stored and, for a retrieve, from the index when the event is
appended (auditlog.py, one query a batch). A chain written before patients were recorded
verifies still; with real requests, a real PostgreSQL, the `audit export` command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from starlette.applications import Starlette

from dicomweb_server.app import create_app
from dicomweb_server.audit import AuditEvent, ChainVerifier, chain, dicom_audit_messages
from dicomweb_server.auditlog import AuditLog
from dicomweb_server.cli import main
from dicomweb_server.config import Settings
from dicomweb_server.index.database import Index
from tests.dimse_support import audit_seq, get_study, in_thread, running_archive, store_one
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes
from tests.test_audit import _as_owner, empty_audit  # noqa: F401 (a fixture)

pytestmark = pytest.mark.db

PATIENT_NUMBER = {"csd-code": "2", "codeSystemName": "RFC-3881", "originalText": "Patient Number"}


@pytest.fixture
async def served(
    settings: Settings,
    empty_audit: str,  # noqa: F811
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.9", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app, client


def _patients(message: dict[str, Any]) -> list[dict[str, Any]]:
    objects = message["AuditMessage"]["ParticipantObjectIdentification"]
    return [o for o in objects if o["ParticipantObjectTypeCodeRole"] == 1]


def _studies(message: dict[str, Any]) -> list[str]:
    objects = message["AuditMessage"]["ParticipantObjectIdentification"]
    return [o["ParticipantObjectID"] for o in objects if o["ParticipantObjectIDTypeCode"].get(
        "csd-code") == "110180"]  # fmt: skip


def _patient(pid: str, name: str) -> dict[str, Any]:
    return {
        "ParticipantObjectID": pid,
        "ParticipantObjectTypeCode": 1,
        "ParticipantObjectTypeCodeRole": 1,
        "ParticipantObjectIDTypeCode": PATIENT_NUMBER,
        "ParticipantObjectName": name,
    }


async def _export(dsn: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["audit", "export", "--database-url", dsn]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


async def test_stow_retrieve_and_metadata_name_the_patient(
    served: tuple[Starlette, httpx.AsyncClient],
    empty_audit: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each message of a transfer names its patient (ID with its issuer, name); a query
    names none (A.5.3.10), nor does a retrieve of nothing stored. Recorded when the event
    was: a patient renamed since is exported as the event saw it."""
    monkeypatch.chdir(tmp_path)
    app, client = served
    ds = make_instance(patient_id="PID-7", patient_name="Roe^Jane", IssuerOfPatientID="HOSP")
    other = make_instance(patient_id="PID-8", patient_name="Poe^Ed")
    body = multipart_body([to_bytes(ds), to_bytes(other)])
    assert (await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())).is_success
    path = f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    instance = f"{path}/instances/{ds.SOPInstanceUID}"
    assert (await client.get(instance, headers={"Accept": "application/dicom"})).is_success
    assert (await client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata")).is_success
    assert (await client.get(f"{instance}/frames/1")).is_success
    assert (await client.get(f"{ROOT}/studies?PatientID=PID-7")).is_success
    assert (await client.get(f"{ROOT}/studies/1.2.3.999/metadata")).status_code == 404
    assert app.state.audit is not None
    await app.state.audit.flush()
    conn = await asyncpg.connect(empty_audit)
    try:  # the export reads the trail, not the index
        await conn.execute("UPDATE patient SET patient_name = 'Renamed^Since'")
    finally:
        await conn.close()
    messages = await _export(empty_audit, capsys)
    by_action = {m["action"]: m for m in reversed(messages)}  # the first of each
    jane, ed = _patient("PID-7^^^HOSP", "Roe^Jane"), _patient("PID-8", "Poe^Ed")
    # A.5.3.7: "information about a single patient": the STOW of two patients' instances is
    # a message for each, with that patient's study only, both of the same row.
    stored = [m for m in messages if m["action"] == "store_instances"]
    assert [_patients(m) for m in stored] == [[jane], [ed]]
    assert [_studies(m) for m in stored] == [[ds.StudyInstanceUID], [other.StudyInstanceUID]]
    assert stored[0]["seq"] == stored[1]["seq"] and stored[0]["hash"] == stored[1]["hash"]
    for action in ("retrieve_instance", "retrieve_study_metadata", "retrieve_instance_frames"):
        assert by_action[action]["status"] == 200
        assert _patients(by_action[action]) == [jane], action
    query = by_action["search_for_studies"]["AuditMessage"]
    assert query["EventIdentification"]["EventID"]["csd-code"] == "110112"
    assert _patients(by_action["search_for_studies"]) == []
    missing = [m for m in messages if m["status"] == 404]
    assert len(missing) == 1 and _patients(missing[0]) == []
    assert await asyncio.to_thread(main, ["audit", "verify", "--database-url", empty_audit]) == 0


async def test_dimse_store_and_get_name_the_patient(
    settings: Settings,
    empty_audit: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A C-STORE names the patient of its data set, a C-GET those of the study it sent."""
    monkeypatch.chdir(tmp_path)
    ds = make_instance(patient_id="PID-9", patient_name="Moe^Al")
    async with running_archive(settings) as archive:
        assert (await store_one(archive, ds)).Status == 0
        statuses = await in_thread(get_study, archive, ds.StudyInstanceUID, CTImageStorage,
                                   lambda _event: 0x0000)  # fmt: skip
        assert statuses[-1].Status == 0
        await audit_seq(archive)
    messages = {m["action"]: m for m in await _export(empty_audit, capsys)}
    for action in ("dimse_store", "dimse_get"):
        assert _patients(messages[action]) == [_patient("PID-9", "Moe^Al")], action


async def test_a_chain_written_before_patients_verifies(empty_audit: str) -> None:  # noqa: F811
    """Rows written by the previous release (version 1 hashes computed here independently)
    verify once rows naming patients follow them; a process of that release, appending
    as it does (the five-argument dicomweb_append_audit, its rows of the old shape), still
    can; a patient added to an old row, or taken from a new one, is found."""
    conn = await asyncpg.connect(empty_audit)
    try:
        prev = bytes(32)
        for n in range(3):
            at = datetime(2025, 6, 1, 12, 0, n, 5, UTC)
            items = ["dicomweb-audit-1", at.isoformat(timespec="microseconds"), "apikey:k",
                     "192.0.2.1", "retrieve_study", [f"1.2.{n}"], 200, 100 + n, ""]  # fmt: skip
            canonical = json.dumps(items, separators=(",", ":")).encode()
            digest = hashlib.sha256(prev + canonical).digest()
            await conn.execute(
                "INSERT INTO audit_log (at, caller, client, action, uids, outcome, bytes,"
                " detail, prev_hash, hash) VALUES ($1, 'apikey:k', '192.0.2.1',"
                " 'retrieve_study', $2, 200, $3, '', $4, $5)",
                at, [f"1.2.{n}"], 100 + n, prev, digest,
            )  # fmt: skip
            prev = digest
    finally:
        await conn.close()
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        at = datetime(2026, 1, 2, tzinfo=UTC)
        named = AuditEvent(at, "c", "h", "retrieve_study", ("1.2.9",), 200, 1, "",
                           (("P1", "", "Doe^J"),))  # fmt: skip
        await index.append_audit([named, dataclasses.replace(named, patients=())])
        old = dataclasses.replace(named, patients=(), caller="old release")
        conn = await asyncpg.connect(empty_audit)
        try:  # as the previous release's index/security.py appends
            row = (None, old.time, old.caller, old.client, old.action, list(old.uids),
                   old.outcome, old.nbytes, old.detail, None, None)  # fmt: skip
            await conn.execute(
                "SELECT dicomweb_append_audit($1, $2, $3, $4, $5)",
                1, -1, bytes(32), [row], [old.canonical()],
            )  # fmt: skip
        finally:
            await conn.close()
        assert await _verify(index) is None
        rows = [row async for row in index.audit_rows()]
        assert [r.event.patients for r in rows] == [(), (), (), (("P1", "", "Doe^J"),), (), ()]
        assert rows[3].event.canonical().startswith(b'["dicomweb-audit-2",')
        assert rows[4].event.canonical().startswith(b'["dicomweb-audit-1",')
        altered = "row {}: its content does not match its hash (altered)"
        conn = await asyncpg.connect(empty_audit)
        try:
            forge = "INSERT INTO audit_patients VALUES (2, '{{P1,\"\",Doe^J}}')"
            await _as_owner(conn, forge)
            assert await _verify(index) == altered.format(2)
            await _as_owner(conn, "DELETE FROM audit_patients WHERE seq = 2")
            await _as_owner(conn, "UPDATE audit_patients SET patients = '{{P2,\"\",Doe^J}}'")
            assert await _verify(index) == altered.format(4)
            await _as_owner(conn, "DELETE FROM audit_patients WHERE seq = 4")
            assert await _verify(index) == altered.format(4)
            await _as_owner(conn, "INSERT INTO audit_patients VALUES (4, '{{P1,\"\",Doe^J}}')")
            assert await _verify(index) is None
            with pytest.raises(asyncpg.RaiseError, match="audit_patients is append-only"):
                await conn.execute("DELETE FROM audit_patients")
        finally:
            await conn.close()
    finally:
        await index.close()


async def _verify(index: Index) -> str | None:
    verifier = ChainVerifier()
    async for row in index.audit_rows():
        if not verifier.feed(row):
            break
    return verifier.finish()


async def test_a_batch_of_retrieves_costs_one_patient_query(
    empty_audit: str,  # noqa: F811
) -> None:
    """The writer looks up the patients of a whole batch in one query (not one per request),
    and none for a batch that needs none; the rows link as audit.chain links them."""
    index = await Index.open(empty_audit, max_size=1, timeout_s=30)
    try:
        conn = await asyncpg.connect(empty_audit)
        try:  # two stored studies of one patient, as the index holds them
            pk = await conn.fetchval(
                "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name)"
                " VALUES ('P-2', 'ISS', 'Lee^Kim') RETURNING pk"
            )
            for study in ("1.2.40", "1.2.41"):
                await conn.execute(
                    "INSERT INTO study (patient_fk, study_instance_uid, attrs)"
                    " VALUES ($1, $2, '{}')",
                    pk, study,
                )  # fmt: skip
        finally:
            await conn.close()
        queries: list[str] = []
        async with index._pool.acquire() as pooled:  # the pool's only connection
            pooled.add_query_logger(lambda record: queries.append(record.query))
        at = datetime(2026, 1, 2, tzinfo=UTC)
        events = [
            AuditEvent(at, "c", "h", "retrieve_series", (f"{s}/1.3",), 200, 1, "")
            for s in ("1.2.40", "1.2.41", "1.2.40", "1.2.99")
        ] + [AuditEvent(at, "c", "h", "search_for_studies", ("1.2.40",), 200, 1, "")]
        audit = AuditLog(index)
        await audit._append(events)
        await asyncio.sleep(0.01)  # query loggers are called soon, not at once
        lookups = [q for q in queries if "FROM study s JOIN patient" in q]
        appends = [q for q in queries if "dicomweb_append_audit" in q]
        assert len(lookups) == 1 and len(appends) == 1  # (and asyncpg's type introspection)
        rows = [row async for row in index.audit_rows()]
        kim = ("P-2", "ISS", "Lee^Kim")
        assert [r.event.patients for r in rows] == [
            ((*kim, "1.2.40"),), ((*kim, "1.2.41"),), ((*kim, "1.2.40"),), (), ()
        ]  # fmt: skip
        written = [r.event for r in rows]
        assert [(r.prev_hash, r.hash) for r in rows] == chain(bytes(32), written)
        queries.clear()
        await audit._append(events[4:])  # a query: no patient, no lookup
        await asyncio.sleep(0.01)
        assert queries == appends
    finally:
        await index.close()


def test_export_of_patients() -> None:
    """Only DICOM Instances Transferred and Accessed have the Patient participant; an empty
    Patient ID is exported as dcm4chee-arc does, a patient without a name without one."""
    from dicomweb_server.audit import AuditRow

    at = datetime(2026, 1, 2, tzinfo=UTC)
    patients = (("", "", "", "1.2"), ("A", "", "X^Y", "1.2"))
    event = AuditEvent(at, "c", "h", "retrieve_study", ("1.2",), 200, 1, "", patients)
    messages = dicom_audit_messages(AuditRow(1, event, bytes(32), bytes(32)), "SRC")
    unnamed = _patient("<none>", "")
    del unnamed["ParticipantObjectName"]
    assert [_patients(m) for m in messages] == [[unnamed], [_patient("A", "X^Y")]]
    denied = dataclasses.replace(event, outcome=403)  # a Security Alert: no patient
    (alert,) = dicom_audit_messages(AuditRow(1, denied, bytes(32), bytes(32)), "S")
    assert _patients(alert) == []
    assert dataclasses.replace(event, patients=patients * 2).patients == patients
