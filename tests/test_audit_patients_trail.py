"""The patients of the audit trail as a reader meets them (found by review): the export of
an event that touched several patients is a message per patient (PS3.15 A.5.3.6, A.5.3.7);
audit_patients rows that the writer cannot have written are tampering, told, not a crash;
a walk of the chain reads each page's patients only; and patients' texts of every kind
verify. A real PostgreSQL, the `audit` commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from dicomweb_server.audit import AuditEvent
from dicomweb_server.auditlog import AuditLog
from dicomweb_server.cli import main
from dicomweb_server.index.database import Index
from dicomweb_server.index.security import AUDIT_FETCH_ROWS
from tests.test_audit import empty_audit  # noqa: F401 (a fixture)

pytestmark = pytest.mark.db

AT = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


async def _cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


async def _export(dsn: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert await _cli("audit", "export", "--database-url", dsn) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _objects(message: dict[str, Any], role: int) -> list[str]:
    objects = message["AuditMessage"]["ParticipantObjectIdentification"]
    return [o["ParticipantObjectID"] for o in objects if o["ParticipantObjectTypeCodeRole"] == role]


async def test_a_retrieve_spanning_patients_is_a_message_per_patient(
    empty_audit: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A.5.3.6 "shall only include information about a single patient", A.5.3.7 "may
    only": a retrieve (a study-root C-MOVE, say) of two patients' studies and of one no
    longer stored is three messages: each patient with its own study, and the study of
    no known patient without one. They were one, naming both patients and every study."""
    conn = await asyncpg.connect(empty_audit)
    try:
        for pid, study in (("P-A", "1.2.50"), ("P-B", "1.2.51")):
            pk = await conn.fetchval(
                "INSERT INTO patient (patient_id, patient_name) VALUES ($1, $1) RETURNING pk", pid
            )
            await conn.execute(
                "INSERT INTO study (patient_fk, study_instance_uid, attrs) VALUES ($1, $2, '{}')",
                pk, study,
            )  # fmt: skip
    finally:
        await conn.close()
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        uids = ("1.2.50/1.3/1.4", "1.2.51/1.3", "1.2.50/1.3/1.5", "1.2.99")
        await AuditLog(index)._append([AuditEvent(AT, "ae:PEER", "h", "dimse_move", uids, 0)])
    finally:
        await index.close()
    messages = await _export(empty_audit, capsys)
    assert [(_objects(m, 1), _objects(m, 3)) for m in messages] == [
        (["P-A"], ["1.2.50"]), (["P-B"], ["1.2.51"]), ([], ["1.2.99"]),
    ]  # fmt: skip
    first = messages[0]["AuditMessage"]["ParticipantObjectIdentification"][0]
    assert first["ParticipantObjectDescription"]["NumberOfInstances"] == 2
    assert len({(m["seq"], m["hash"]) for m in messages}) == 1
    assert await _cli("audit", "verify", "--database-url", empty_audit) == 0


async def test_patients_not_as_written_are_tampering_told(
    empty_audit: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """INSERT is all audit_patients' triggers allow, and all an attacker needs: a row for an
    event that named no patient, holding no patient (an empty array: it verified), a flat
    array or a NULL (verify and export raised, the export of every later row lost)."""
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        events = [AuditEvent(AT, "c", "h", "retrieve_study", (f"1.2.{n}",), 200) for n in range(4)]
        await index.append_audit(events)
    finally:
        await index.close()
    conn = await asyncpg.connect(empty_audit)
    try:
        for seq, value in ((1, "{}"), (2, "{a,b,c}"), (3, "{{NULL,b,c,d}}")):
            await conn.execute(f"INSERT INTO audit_patients VALUES ({seq}, '{value}')")
    finally:
        await conn.close()
    capsys.readouterr()
    assert await _cli("audit", "verify", "--database-url", empty_audit) == 1
    out = capsys.readouterr().out
    assert "TAMPERED: row 1: its content does not match its hash (altered)" in out
    messages = await _export(empty_audit, capsys)
    assert [m["seq"] for m in messages] == [1, 2, 3, 4]
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        rows = [row async for row in index.audit_rows()]
    finally:
        await index.close()
    altered = [r.seq for r in rows
               if hashlib.sha256(r.prev_hash + r.event.canonical()).digest() != r.hash]  # fmt: skip
    assert altered == [1, 2, 3]


async def test_a_page_of_the_chain_reads_its_own_patients_only(
    empty_audit: str,  # noqa: F811
) -> None:
    """A walk of the chain reads each row's patients, not audit_patients from its start at
    every page: that made it quadratic in the chain's length. The plan PostgreSQL chose for
    the page query the walk ran, as it ran it."""
    conn = await asyncpg.connect(empty_audit)
    try:
        await conn.execute(
            "INSERT INTO audit_log (at, caller, client, action, uids, outcome, bytes, detail,"
            " prev_hash, hash) SELECT now(), 'c', 'h', 'retrieve_study', ARRAY['1.2.' || g],"
            " 200, 1, '', '\\x00', '\\x00' FROM generate_series(1, 20000) g"
        )
        await conn.execute(
            "INSERT INTO audit_patients SELECT seq, ARRAY[ARRAY['P' || seq, '', 'N', '1.2']]"
            " FROM audit_log"
        )
        await conn.execute("ANALYZE audit_log, audit_patients")
        index = await Index.open(empty_audit, max_size=1, timeout_s=30)
        try:
            queries: list[tuple[str, tuple[Any, ...]]] = []
            async with index._pool.acquire() as pooled:  # the pool's only connection
                pooled.add_query_logger(lambda record: queries.append((record.query, record.args)))
            after = 20000 - AUDIT_FETCH_ROWS
            assert len([row async for row in index.audit_rows(after)]) == AUDIT_FETCH_ROWS
        finally:
            await index.close()
        await asyncio.sleep(0.01)  # query loggers are called soon, not at once
        sql, args = next(q for q in queries if "audit_patients" in q[0] and q[1][0] == after)
        (plan,) = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))
    finally:
        await conn.close()

    def read(node: dict[str, Any]) -> int:
        rows = 0
        if node.get("Relation Name") == "audit_patients":
            rows = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node[
                "Actual Loops"
            ]
        return rows + sum(read(child) for child in node.get("Plans", ()))

    assert read(plan["Plan"]) <= AUDIT_FETCH_ROWS


async def test_patients_texts_of_every_kind_verify(
    empty_audit: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Non-ASCII, PN delimiters, control characters, a NUL (stored as `\\0`, as the other
    texts of a row), a lone surrogate, a backslash, JSON's own syntax, a long name: the
    row as stored hashes as it was hashed when written, and exports as it was given."""
    texts = ["Ñoño^José=山田^太郎=やまだ^たろう", "a\x01b\x1fc\x7f", "x\x00y", "\ud800z",
             'q"\\u0000\\', "[1]", "N" * 10_000, "", " ^^^ "]  # fmt: skip
    patients = tuple((t, f"I{n}", t, "1.2.7") for n, t in enumerate(texts))
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        event = AuditEvent(AT, "c", "h", "retrieve_study", ("1.2.7",), 200, 1, "", patients)
        await index.append_audit([event, event])
        rows = [row async for row in index.audit_rows()]
    finally:
        await index.close()
    assert [r.event.patients for r in rows] == [event.patients] * 2
    assert event.patients[2][0] == "x\\0y" and event.patients[3][0] == "\\ud800z"
    assert await _cli("audit", "verify", "--database-url", empty_audit) == 0
    messages = await _export(empty_audit, capsys)
    assert [_objects(m, 1)[0] for m in messages[:3]] == [
        "Ñoño\\S\\José=山田\\S\\太郎=やまだ\\S\\たろう^^^I0", f"{texts[1]}^^^I1", "x\\E\\0y^^^I2"
    ]  # fmt: skip
    names = [m["AuditMessage"]["ParticipantObjectIdentification"][-1] for m in messages[:3]]
    assert [n["ParticipantObjectName"] for n in names] == [texts[0], texts[1], "x\\0y"]
    assert len(messages) == 2 * len(texts)


def test_the_patient_id_is_escaped_as_hl7_cx_text() -> None:
    """ParticipantObjectID is an HL7 CX (`ID^^^ISSUER`): a "^" or "&" of the Patient ID or of
    its issuer is escaped (HL7 v2.5 2.7.4), else read as another component ("12^34": ID 12,
    check digit 34). The name, PN text and no CX, as it is."""
    from dicomweb_server.audit import AuditRow, dicom_audit_messages

    patients = (("12^34", "A&B", "Doe^J", "1.2"), ("5~6|7\\8", "", "", "1.3"))
    event = AuditEvent(AT, "c", "h", "retrieve_study", ("1.2", "1.3"), 200, 1, "", patients)
    messages = dicom_audit_messages(AuditRow(1, event, bytes(32), bytes(32)), "SRC")
    assert [_objects(m, 1) for m in messages] == [
        ["12\\S\\34^^^A\\T\\B"], ["5\\R\\6\\F\\7\\E\\8"]
    ]  # fmt: skip
    patient = messages[0]["AuditMessage"]["ParticipantObjectIdentification"][-1]
    assert patient["ParticipantObjectName"] == "Doe^J"
