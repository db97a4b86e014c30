"""The audit trail (issue 7): one chained row per request, tampering detected, DICOM export."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server.app import create_app
from dicomweb_server.audit import AuditEvent, ChainVerifier, chain, dicom_audit_messages
from dicomweb_server.auth import create_api_key
from dicomweb_server.cli import main
from dicomweb_server.config import Settings
from dicomweb_server.index.database import Index
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db


@pytest.fixture
async def empty_audit(clean_db: str) -> AsyncIterator[str]:
    """An empty audit_log; the append-only triggers are bypassed the way a database owner
    could (session_replication_role), before and after the test."""

    async def truncate() -> None:
        conn = await asyncpg.connect(clean_db)
        try:
            if await conn.fetchval("SELECT to_regclass('audit_patients') IS NOT NULL"):
                await _as_owner(conn, "TRUNCATE audit_log, audit_patients RESTART IDENTITY")
        finally:
            await conn.close()

    await truncate()
    yield clean_db
    await truncate()


async def _as_owner(conn: asyncpg.Connection, *statements: str) -> None:
    """Run statements with triggers off, as someone who owns the database could."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)


@pytest.fixture
async def audited(
    settings: Settings, empty_audit: str
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(dataclasses.replace(settings, auth="apikey"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app, client


async def _rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT * FROM audit_log ORDER BY seq"))
    finally:
        await conn.close()


async def _verify(index: Index, anchors: dict[int, bytes] | None = None) -> str | None:
    verifier = ChainVerifier(dict(anchors or {}))
    async for row in index.audit_rows():
        if not verifier.feed(row):
            break
    return verifier.finish()


async def test_each_request_appends_one_row(
    audited: tuple[Starlette, httpx.AsyncClient], empty_audit: str
) -> None:
    app, client = audited
    key_id, token = await create_api_key(app.state.services.index, "admin")
    creds = {"Authorization": f"Bearer {token}"}
    ds = make_instance()
    body = multipart_body([to_bytes(ds)])
    assert (await client.post(f"{ROOT}/studies", content=body,
                              headers=stow_headers() | creds)).status_code == 200  # fmt: skip
    assert (await client.get(f"{ROOT}/studies?PatientID=PAT-1", headers=creds)).status_code == 200
    meta = await client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata", headers=creds)
    assert (await client.get(f"{ROOT}/studies")).status_code == 401
    await app.state.audit.flush()
    rows = await _rows(empty_audit)
    assert [(r["action"], r["outcome"]) for r in rows] == [
        ("store_instances", 200), ("search_for_studies", 200),
        ("retrieve_study_metadata", 200), ("search_for_studies", 401),
    ]  # fmt: skip
    stow, qido, wado, denied = rows
    assert stow["caller"] == f"apikey:{key_id}" and stow["client"] == "192.0.2.7"
    assert stow["uids"] == [f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"]
    assert stow["bytes"] == len(body)
    assert qido["detail"] == "PatientID=PAT-1"
    assert (
        wado["uids"] == [str(ds.StudyInstanceUID)] and wado["bytes"] == meta.num_bytes_downloaded
    )  # on the wire (gzip)
    assert denied["caller"] == "-"
    assert await _verify(app.state.services.index) is None


async def test_tampering_is_detected(
    audited: tuple[Starlette, httpx.AsyncClient], empty_audit: str
) -> None:
    app, client = audited
    index: Index = app.state.services.index
    for n in range(6):
        await client.get(f"{ROOT}/studies?n={n}")  # six 401 rows
    await app.state.audit.flush()
    assert await _verify(index) is None
    conn = await asyncpg.connect(empty_audit)
    try:
        # The table refuses changes outright ...
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE audit_log SET outcome = 200 WHERE seq = 3")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM audit_log WHERE seq = 3")
        # ... and what an owner does anyway is found by walking the chain.
        original = await conn.fetch("SELECT * FROM audit_log ORDER BY seq")
        swap = ("UPDATE audit_log SET seq = -2 WHERE seq = 2",
                "UPDATE audit_log SET seq = 2 WHERE seq = 4",
                "UPDATE audit_log SET seq = 4 WHERE seq = -2")  # fmt: skip
        insert = (
            "UPDATE audit_log SET seq = seq * 10",  # a copy slotted between 3 and 4
            "INSERT INTO audit_log SELECT 35, at, 'mallory', client, action, uids,"
            " outcome, bytes, detail, prev_hash, hash FROM audit_log WHERE seq = 30",
        )
        cases = {
            "altered": (("UPDATE audit_log SET outcome = 0 WHERE seq = 3",), "row 3: its content"),
            "deleted": (("DELETE FROM audit_log WHERE seq = 3",), "row 4: its link"),
            "reordered": (swap, "row 2: its link"),
            "inserted": (insert, "row 35: its link"),
        }  # fmt: skip
        for why, (statements, expected) in cases.items():
            await _as_owner(conn, *statements)
            problem = await _verify(index)
            assert problem is not None and problem.startswith(expected), (why, problem)
            await _restore(conn, original)
            assert await _verify(index) is None
        # Rows cut from the end leave a consistent chain: only an anchor kept elsewhere tells.
        head = (original[-1]["seq"], bytes(original[-1]["hash"]))
        await _as_owner(conn, "DELETE FROM audit_log WHERE seq >= 5")
        assert await _verify(index) is None
        problem = await _verify(index, dict([head]))
        assert problem is not None and "missing" in problem
    finally:
        await conn.close()


async def _restore(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
    await _as_owner(conn, "DELETE FROM audit_log")
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.executemany(
            "INSERT INTO audit_log VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [tuple(r.values()) for r in rows],
        )


async def test_concurrent_writers_keep_one_chain(empty_audit: str) -> None:
    """Two processes (two pools) appending at once: every row links to the one before."""
    indexes = [await Index.open(empty_audit, max_size=4, timeout_s=30) for _ in range(2)]

    async def writer(index: Index, name: str) -> None:
        for n in range(20):
            event = AuditEvent(datetime.now(UTC), name, "local", "test", (), 200, n, "")
            await index.append_audit([event, dataclasses.replace(event, detail="second")])

    try:
        await asyncio.gather(*(writer(ix, f"w{i}") for i, ix in enumerate(indexes)))
        assert len(await _rows(empty_audit)) == 80
        assert await _verify(indexes[0]) is None
    finally:
        for ix in indexes:
            await ix.close()


async def test_an_append_is_one_round_trip(empty_audit: str) -> None:
    """A batch of events is appended in one statement (schema.sql's dicomweb_append_audit),
    not a transaction of five round trips, and its rows link as audit.chain links them."""
    index = await Index.open(empty_audit, max_size=1, timeout_s=30)
    try:
        queries: list[str] = []
        async with index._pool.acquire() as conn:  # the pool's only connection
            conn.add_query_logger(lambda record: queries.append(record.query))
        at = datetime(2026, 1, 2, 3, 4, 5, 6, UTC)
        events = [AuditEvent(at, "c", "h", "a", ("1.2", "3"), 200, n, "d") for n in range(4)]
        await index.append_audit(events[:1])  # the first: asyncpg learns the row type
        await asyncio.sleep(0.01)  # query loggers are called soon, not at once
        queries.clear()
        await index.append_audit(events[1:])
        await asyncio.sleep(0.01)
        assert len(queries) == 1
        rows = await _rows(empty_audit)
        assert [(bytes(r["prev_hash"]), bytes(r["hash"])) for r in rows] == chain(bytes(32), events)
        assert [r["uids"] for r in rows] == [["1.2", "3"]] * 4
        assert await _verify(index) is None
    finally:
        await index.close()


def test_canonical_encoding_is_stable() -> None:
    event = AuditEvent(datetime(2026, 1, 2, 3, 4, 5, 6, UTC), "c", "h", "a", ("1.2",), 200, 5,
                       "PatientName=Ä*")  # fmt: skip
    assert (
        event.canonical()
        == (
            '["dicomweb-audit-1","2026-01-02T03:04:05.000006+00:00","c","h","a",["1.2"],200,5,'
            '"PatientName=Ä*"]'
        ).encode()
    )
    (prev, digest), (prev2, _) = chain(bytes(32), [event, event])
    assert prev == bytes(32) and prev2 == digest


async def test_cli_keys_verify_and_export(
    empty_audit: str,
    tmp_path: object,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(str(tmp_path))  # the commands open the archive's default ./data
    db = ["--database-url", empty_audit]
    assert await asyncio.to_thread(main, ["apikey", "create", "--role", "write", *db]) == 0
    token = capsys.readouterr().out.split()[-1]
    key_id = token.split("_")[1]
    assert await asyncio.to_thread(main, ["apikey", "list", *db]) == 0
    assert key_id in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["apikey", "revoke", key_id, *db]) == 0
    assert await asyncio.to_thread(main, ["apikey", "revoke", key_id, *db]) == 1
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["audit", "verify", *db]) == 0
    assert "intact: 3 rows" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["audit", "head", *db]) == 0
    head = capsys.readouterr().out.strip()
    assert await asyncio.to_thread(main, ["audit", "export", *db]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [m["action"] for m in lines] == ["apikey_create", "apikey_revoke", "apikey_revoke"]
    ident = lines[0]["AuditMessage"]["EventIdentification"]
    assert ident["EventID"]["csd-code"] == "110113"  # Security Alert (PS3.15 A.5.3.11)
    assert ident["EventTypeCode"][0]["csd-code"] == "110137"
    assert lines[2]["AuditMessage"]["EventIdentification"]["EventOutcomeIndicator"] == 4
    conn = await asyncpg.connect(empty_audit)
    try:
        await _as_owner(conn, "UPDATE audit_log SET detail = 'role=read' WHERE seq = 1")
    finally:
        await conn.close()
    assert await asyncio.to_thread(main, ["audit", "verify", *db]) == 1
    assert "TAMPERED: row 1" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["audit", "verify", "--anchor", head, *db]) == 1


def test_dicom_audit_messages() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    stow = AuditEvent(at, "apikey:1", "10.0.0.9", "store_instances", ("1.2/1.3/1.4", "1.2/1.3/1.5"),
                      200, 100)  # fmt: skip
    qido = AuditEvent(at, "oidc:bob", "10.0.0.9", "search_for_studies", (), 200, 9, "PatientID=7")
    from dicomweb_server.audit import AuditRow

    msg = dicom_audit_messages(AuditRow(1, stow, bytes(32), bytes(32)), "src")[0]["AuditMessage"]
    assert msg["EventIdentification"]["EventID"]["csd-code"] == "110104"
    assert msg["EventIdentification"]["EventActionCode"] == "C"
    (study,) = msg["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == "1.2"
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study["ParticipantObjectDescription"]["NumberOfInstances"] == 2
    caller, server = msg["ActiveParticipant"]
    assert caller["RoleIDCode"]["csd-code"] == "110153" and caller["UserIsRequestor"]
    assert server["RoleIDCode"]["csd-code"] == "110152"
    msg = dicom_audit_messages(AuditRow(2, qido, bytes(32), bytes(32)), "src")[0]["AuditMessage"]
    assert msg["EventIdentification"]["EventID"]["csd-code"] == "110112"
    (query,) = msg["ParticipantObjectIdentification"]
    assert query["ParticipantObjectQuery"] == "UGF0aWVudElEPTc="  # base64 of the query
    for action, code, event_id, action_code, indicator in (
        ("search_for_studies", 403, "110113", "E", 4),
        ("apikey_list", 200, "110112", "E", 0),
        ("store_instances", 202, "110104", "C", 4),  # some instances failed
        ("dimse_store", 0x0000, "110104", "C", 0),
        ("dimse_store", 0xA700, "110104", "C", 8),  # out of resources: the archive failed
        ("dimse_store", 0xA900, "110104", "C", 4),  # refused data set
        ("dimse_find", 0x0000, "110112", "E", 0),
        ("dimse_move", 0x0000, "110104", "R", 0),
        ("dimse_associate", 0x03010103, "110114", "E", 4),  # rejected: a failed Login
        ("dimse_associate", 0x02000003, "110114", "E", 4),  # no presentation context
        ("dimse_abort", 0x07000000, "110114", "E", 4),  # ended without release: Logout
        ("dimse_store", 0xFF00, "110104", "C", 4),  # the association ended first
        ("dimse_move", 0xA701, "110104", "R", 8),  # the matching failed
        ("dimse_move", 0xA702, "110104", "R", 4),  # too many matches, or every one refused
        ("dimse_get", 0xA702, "110104", "R", 4),
    ):
        event = AuditEvent(at, "ae:CT1", "10.0.0.3", action, (), code)
        ident = dicom_audit_messages(AuditRow(3, event, bytes(32), bytes(32)), "src")[0][
            "AuditMessage"
        ]["EventIdentification"]
        assert (ident["EventID"]["csd-code"], ident["EventActionCode"]) == (event_id, action_code)
        assert ident["EventOutcomeIndicator"] == indicator, (action, hex(code))


def test_a_data_set_over_the_limit_is_a_refused_request_on_both_paths() -> None:
    """Found by review: a C-STORE data set over DICOMWEB_MAX_PART_BYTES (audited 0xA700)
    was exported as a serious failure (8), STOW's 413 for the same limit as a minor one (4).
    Both are now 4; a 0xA700 of the archive's own (its database, its disk) stays 8, even
    when the peer's SOP Instance UID says otherwise."""
    from dicomweb_server.audit import OVER_LIMIT

    at = datetime(2026, 1, 2, tzinfo=UTC)
    over = f"{OVER_LIMIT}a data set of more than 9 bytes (DICOMWEB_MAX_PART_BYTES), aborted; sop=1"
    for action, code, detail, indicator in (
        ("store_instances", 413, "", 4),
        ("dimse_store", 0xA700, over, 4),
        ("dimse_store", 0xA700, "sop=1.2", 8),  # the database did not answer
        ("dimse_store", 0xA700, f"sop={OVER_LIMIT}", 8),
    ):
        ident = _identification(AuditEvent(at, "ae:CT1", "10.0.0.3", action, (), code, 10, detail))
        assert ident["EventOutcomeIndicator"] == indicator, (action, detail)


def test_whose_failure_it_is_decides_on_both_paths() -> None:
    """Found by review: a full disk was a serious failure (8) over DIMSE (0xA700) and a
    refused request (4) over STOW-RS (409), a Deflate bomb the other way round. The archive
    out of its own resources is 8 on both (a 409 whose detail begins ARCHIVE_FAULT, which
    routes/stow.py writes first, where no query string can put it); a limit the peer
    passed (OVER_LIMIT) is 4 on both. Partly stored (202) stays 4, as 0xB000 does."""
    from dicomweb_server.audit import ARCHIVE_FAULT, OVER_LIMIT

    at = datetime(2026, 1, 2, tzinfo=UTC)
    fault = f"{ARCHIVE_FAULT}1 not stored; stored=0 failed=1"
    for action, code, detail, indicator in (
        ("store_instances", 409, fault, 8),
        ("store_study_instances", 409, fault, 8),
        ("dimse_store", 0xA700, "sop=1.2; storage error: No space left on device", 8),
        ("store_instances", 409, "stored=0 failed=1", 4),  # its content, or a limit passed
        ("store_instances", 202, f"{ARCHIVE_FAULT}1 not stored; stored=1 failed=1", 4),
        ("search_for_studies", 409, fault, 4),  # a query string: not the archive's text
        ("dimse_store", 0xA700, f"{OVER_LIMIT}sop=1.2; the Deflated data set inflates", 4),
    ):
        ident = _identification(AuditEvent(at, "ae:CT1", "10.0.0.3", action, (), code, 10, detail))
        assert ident["EventOutcomeIndicator"] == indicator, (action, detail)


def _identification(event: AuditEvent) -> dict[str, Any]:
    """The EventIdentification of the PS3.15 message `event` exports as."""
    from dicomweb_server.audit import AuditRow

    message = dicom_audit_messages(AuditRow(1, event, bytes(32), bytes(32)), "src")[0]
    ident: dict[str, Any] = message["AuditMessage"]["EventIdentification"]
    return ident


def test_sub_operations_the_archive_could_not_send_are_its_failure() -> None:
    """Found by review: 0xA702 (every C-MOVE/C-GET sub-operation failed) became a refused
    request (4) whatever failed them, so an archive that lost or could not decode the files
    it was asked for exported as the peer's doing, where a 5xx is a serious failure (8). A
    row whose detail begins ARCHIVE_FAULT (dimse/handlers.py: a sub-operation the archive
    could not read or convert) stays 8; the peer's doing, or the same text from a peer (its
    destination AE title), stays 4, as does a partial success (0xB000)."""
    from dicomweb_server.audit import ARCHIVE_FAULT

    at = datetime(2026, 1, 2, tzinfo=UTC)
    counts = "matched=2 completed=0 warning=0 failed=2"
    for action, code, detail, indicator in (
        ("dimse_get", 0xA702, f"{ARCHIVE_FAULT}2 not read or converted; {counts}", 8),
        ("dimse_move", 0xA702, f"{ARCHIVE_FAULT}1 not read or converted; destination=P", 8),
        ("dimse_get", 0xA702, counts, 4),  # the requestor took no SCP role for them
        ("dimse_move", 0xA702, f"destination={ARCHIVE_FAULT}x {counts}", 4),
        ("dimse_get", 0xB000, f"{ARCHIVE_FAULT}1 not read or converted; {counts}", 4),
    ):
        ident = _identification(AuditEvent(at, "ae:CT1", "10.0.0.3", action, (), code, 0, detail))
        assert ident["EventOutcomeIndicator"] == indicator, (action, detail)
        assert ident["EventOutcomeDescription"] == detail


def test_why_a_failure_failed_is_exported() -> None:
    """Found by review: the detail of a row (why an association was refused, why a C-STORE
    was not served) was in the table but not in the export. PS3.15 A.5.1's schema has an
    optional EventOutcomeDescription in EventIdentification: a failure's detail goes there,
    where the detail says how the action ended (not a query string, nor a key's role)."""
    from dicomweb_server.audit import AuditRow

    at = datetime(2026, 1, 2, tzinfo=UTC)
    refused = "rejected (A-ASSOCIATE-RJ, permanent): calling AE title not recognised"
    for action, code, detail, description in (
        ("dimse_associate", 0x03010103, refused, refused),
        ("dimse_abort", 0x07000000, "aborted by the peer (A-ABORT, service user)",
         "aborted by the peer (A-ABORT, service user)"),
        ("dimse_store", 0xFF00, "sop=1.2 received whole; not served", "sop=1.2 received whole;"
         " not served"),
        ("dimse_move", 0xA702, "destination=PEER matched=2 failed=2", "destination=PEER"
         " matched=2 failed=2"),
        ("reindex", 202, "updated=1 unchanged=0 failed=1", "updated=1 unchanged=0 failed=1"),
        ("dimse_store", 0x0000, "sop=1.2", None),  # a success
        ("dimse_find", 0xA900, "PatientID=7 matches=0", None),  # a query: the query
        ("search_for_studies", 400, "PatientID=7", None),
        ("search_for_studies", 403, "PatientID=7", None),  # a query string, not why
        ("apikey_revoke", 404, "key=7", None),
        ("dimse_abort", 0x07000200, "", None),
    ):  # fmt: skip
        event = AuditEvent(at, "ae:CT1", "10.0.0.3", action, (), code, 0, detail)
        ident = dicom_audit_messages(AuditRow(1, event, bytes(32), bytes(32)), "src")[0][
            "AuditMessage"
        ]["EventIdentification"]
        assert ident.get("EventOutcomeDescription") == description, (action, hex(code))


async def test_one_odd_event_does_not_cost_the_others(empty_audit: str) -> None:
    """A lone surrogate (a token's `sub`) or a NUL is stored escaped; the batch is written
    whole and the chain holds (found by review: the batch used to be dropped)."""
    from dicomweb_server.auditlog import running_audit_log

    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        async with running_audit_log(index) as audit:
            for n in range(10):
                caller = "oidc:\ud800" if n == 5 else f"oidc:user{n}"
                await audit.record(AuditEvent(datetime.now(UTC), caller, "h", "a", ("1\x002",)))
            await audit.flush()
        rows = await _rows(empty_audit)
        assert len(rows) == 10 and rows[5]["caller"] == "oidc:\\ud800"
        assert rows[0]["uids"] == ["1\\02"]
        assert await _verify(index) is None
    finally:
        await index.close()


async def test_shutdown_counts_the_events_it_could_not_write(
    empty_audit: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The database gone at shutdown: the events of the batch waiting for it are counted as
    unwritten with those still queued (found by review: it said 0 with 2 lost)."""
    from dicomweb_server import auditlog

    monkeypatch.setattr(auditlog, "AUDIT_DRAIN_S", 0.5)
    monkeypatch.setattr(auditlog, "AUDIT_RETRY_S", 0.05)
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    await index.close()  # the database is away: every append fails and is retried
    caplog.set_level(logging.ERROR, logger="dicomweb_server.auditlog")
    async with auditlog.running_audit_log(index) as audit:
        for n in range(2):
            await audit.record(AuditEvent(datetime.now(UTC), f"u{n}", "h", "a", ()))
        await asyncio.sleep(0.3)  # the writer has taken both into a batch
        assert audit.unwritten == 2
    assert "shutdown with 2 events unwritten" in caplog.text
    assert await _rows(empty_audit) == []


async def test_an_event_held_through_the_linger_is_counted_unwritten(
    empty_audit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer holds the first event of a batch while later ones gather: it is neither
    queued nor being appended, and used to be left out of `unwritten`."""
    from dicomweb_server import auditlog

    monkeypatch.setattr(auditlog, "AUDIT_LINGER_S", 1.0)
    index = await Index.open(empty_audit, max_size=2, timeout_s=30)
    try:
        async with auditlog.running_audit_log(index) as audit:
            await audit.record(AuditEvent(datetime.now(UTC), "u", "h", "a", ()))
            await asyncio.sleep(0.2)  # the writer has taken it and lingers
            assert audit.unwritten == 1
            await asyncio.wait_for(audit.flush(), 10)
            assert audit.unwritten == 0
        assert len(await _rows(empty_audit)) == 1
    finally:
        await index.close()


async def test_an_unrouted_path_is_recorded_as_sent(
    audited: tuple[Starlette, httpx.AsyncClient], empty_audit: str
) -> None:
    """A path no route serves is the action as sent, percent-encoded: decoded, `%0D%0A` put
    line breaks into the audit trail (found by review)."""
    app, client = audited
    r = await client.get("/x%0D%0Aforged%20row")
    assert r.status_code in (401, 404)
    await app.state.audit.flush()
    (row,) = await _rows(empty_audit)
    assert row["action"] == "GET /x%0D%0Aforged%20row"
