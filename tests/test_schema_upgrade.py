"""schema.sql, applied at every start, brings an index made by an earlier schema up to date:
the same tables, columns, indexes and functions as a new index, and a server that works on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from dicomweb_server.app import create_app
from dicomweb_server.config import Settings
from tests.helpers import ROOT, TEST_HOSTS, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db

SCHEMA = Path(__file__).parents[1] / "schema.sql"
EARLIER = sorted((Path(__file__).parent / "schemas").glob("*.sql"))

_SHAPE = {
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default"
    " FROM information_schema.columns WHERE table_schema = 'public'",
    "indexes": "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'",
    # Ours only: not those of an extension (pg_trgm's).
    "functions": "SELECT p.oid::regprocedure::text FROM pg_proc p"
    " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
    " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')",
}


def _dsn_of(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def _database(pg_dsn: str, name: str) -> AsyncIterator[str]:
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
        yield _dsn_of(pg_dsn, name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def _shape(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {k: sorted(tuple(r) for r in await conn.fetch(q)) for k, q in _SHAPE.items()}
    finally:
        await conn.close()


async def _apply(dsn: str, *schemas: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(schema.read_text())
    finally:
        await conn.close()


@pytest.fixture
async def fresh_shape(pg_dsn: str) -> AsyncIterator[dict[str, list[tuple[object, ...]]]]:
    async for dsn in _database(pg_dsn, "dicomweb_schema_fresh"):
        await _apply(dsn, SCHEMA)
        yield await _shape(dsn)


@pytest.mark.parametrize("earlier", EARLIER, ids=lambda p: p.stem)
async def test_an_index_of_an_earlier_schema_is_brought_up_to_date(
    pg_dsn: str,
    fresh_shape: dict[str, list[tuple[object, ...]]],
    earlier: Path,
    tmp_path: Path,
) -> None:
    async for dsn in _database(pg_dsn, "dicomweb_schema_upgrade"):
        await _apply(dsn, earlier)
        assert await _shape(dsn) != fresh_shape
        await _apply(dsn, SCHEMA)
        assert await _shape(dsn) == fresh_shape
        # And the server works on it: store, then find by a name (a column added later).
        settings = Settings(data_dir=tmp_path / "d", database_url=dsn, allowed_hosts=TEST_HOSTS)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                body = multipart_body([to_bytes(make_instance(patient_name="Upgrade^Ann"))])
                r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
                assert r.status_code == 200, r.text
                r = await client.get(f"{ROOT}/studies", params={"PatientName": "upgr*"})
                assert r.status_code == 200 and len(r.json()) == 1


async def test_applying_the_schema_again_waits_for_no_reader(pg_dsn: str) -> None:
    """schema.sql is applied at every start of every command and worker: on an index that
    has every column it must not queue an ACCESS EXCLUSIVE lock behind a long read (every
    query after it would wait too; found by review)."""
    async for dsn in _database(pg_dsn, "dicomweb_schema_again"):
        await _apply(dsn, SCHEMA)
        reader = await asyncpg.connect(dsn)
        again = await asyncpg.connect(dsn)
        try:
            async with reader.transaction():
                await reader.fetch("SELECT count(*) FROM study, series")
                await again.execute("SET lock_timeout = '2s'")
                await again.execute(SCHEMA.read_text())  # would time out waiting
        finally:
            await reader.close()
            await again.close()


async def test_names_stored_before_their_text_columns_existed_are_found_by_wildcards(
    pg_dsn: str, tmp_path: Path
) -> None:
    """The first schema had no *_name_text columns (the target of the trigram prefilter of PN
    wildcard matching): the studies it stored were found by no PatientName=upg* nor
    ReferringPhysicianName=*smi* search after an upgrade, until `reindex` (found by upgrading
    a 2026-11-25 archive in place). Rows as that release wrote them: lower-cased groups."""
    async for dsn in _database(pg_dsn, "dicomweb_schema_names"):
        await _apply(dsn, EARLIER[[p.stem for p in EARLIER].index("2026-11-25-first")])
        conn = await asyncpg.connect(dsn)
        try:
            patient = await conn.fetchval(
                "INSERT INTO patient (patient_id, patient_name) VALUES ('OLD-1', 'Upgrade^Ann')"
                " RETURNING pk"
            )
            await conn.execute(
                "INSERT INTO study (patient_fk, study_instance_uid, patient_name,"
                " referring_physician_name, patient_id, num_series, num_instances, attrs)"
                " VALUES ($1, '1.2.3.4', '{upgrade^ann,アップ^アン}', '{smith^jo}', 'OLD-1',"
                " 1, 1, $2)",
                patient,
                '{"0020000D": {"vr": "UI", "Value": ["1.2.3.4"]}}',
            )
        finally:
            await conn.close()
        settings = Settings(data_dir=tmp_path / "d", database_url=dsn, allowed_hosts=TEST_HOSTS)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for key, value in (
                    ("PatientName", "upg*"),
                    ("PatientName", "*ann"),
                    ("PatientName", "*=アップ*"),
                    ("ReferringPhysicianName", "*smi*"),
                ):
                    r = await client.get(f"{ROOT}/studies", params={key: value})
                    assert r.status_code == 200, (key, value, r.status_code)
                    assert [s["0020000D"]["Value"] for s in r.json()] == [["1.2.3.4"]]


async def test_applying_the_schema_again_waits_for_no_writer(pg_dsn: str) -> None:
    """Nor a SHARE (ROW EXCLUSIVE) lock behind a write in progress: CREATE INDEX IF NOT EXISTS
    (CREATE OR REPLACE TRIGGER) takes it before it looks, and held to the end of the schema's
    transaction it stopped every STOW meanwhile, and deadlocked with a `reindex` that had
    rewritten a series row and went on to its study row (found by a load run: a process
    started beside `reindex` and the two met, one of them ended by `deadlock detected`)."""
    tables = ("patient", "study", "series", "instance", "blob_reservation", "audit_log", "api_key")
    async for dsn in _database(pg_dsn, "dicomweb_schema_writer"):
        await _apply(dsn, SCHEMA)
        writer = await asyncpg.connect(dsn)
        again = await asyncpg.connect(dsn)
        try:
            async with writer.transaction():
                # The locks a commit or a reindex of an instance holds while it runs.
                await writer.execute(f"LOCK TABLE {', '.join(tables)} IN ROW EXCLUSIVE MODE")
                await again.execute("SET lock_timeout = '2s'")
                async with again.transaction():  # as Index.apply_schema applies it
                    await again.execute(SCHEMA.read_text())  # would time out waiting
        finally:
            await writer.close()
            await again.close()


async def test_applying_the_schema_again_rearms_the_audit_triggers(pg_dsn: str) -> None:
    """A start re-arms the audit trail's append-only triggers when they are not as defined:
    CREATE OR REPLACE TRIGGER at every start re-enabled one an owner had disabled, and once
    triggers were created only when missing (by name), a disabled one stayed off for good
    (found by review), as did one redefined to refuse less."""
    async for dsn in _database(pg_dsn, "dicomweb_schema_triggers"):
        await _apply(dsn, SCHEMA)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(  # a row for the row trigger to refuse the deletion of
                "INSERT INTO audit_log (at, caller, client, action, uids, outcome, bytes,"
                " detail, prev_hash, hash) VALUES (now(), '-', '-', 'x', '{}', 200, 0, '',"
                " '', '')"
            )
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            await conn.execute(
                "CREATE OR REPLACE TRIGGER audit_log_no_truncate BEFORE INSERT ON audit_log"
                " FOR EACH STATEMENT EXECUTE FUNCTION dicomweb_audit_append_only()"
            )
            await _apply(dsn, SCHEMA)
            for statement in ("DELETE FROM audit_log", "TRUNCATE audit_log"):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(statement)
            armed = await conn.fetch(
                "SELECT tgname, tgenabled::text FROM pg_trigger"
                " WHERE tgrelid = 'audit_log'::regclass ORDER BY tgname"
            )
            assert [tuple(r) for r in armed] == [
                ("audit_log_append_only", "O"),
                ("audit_log_no_truncate", "O"),
            ]
        finally:
            await conn.close()
