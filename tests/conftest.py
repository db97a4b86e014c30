"""Fixtures: a real PostgreSQL (DATABASE_URL or an embedded cluster), fresh apps, sample data."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server.config import Settings
from tests.helpers import TEST_HOSTS

SAMPLES = Path(
    os.environ.get("DICOMWEB_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples")
)
TABLES = "patient, study, series, instance, blob_reservation, api_key"


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DATABASE_URL when set, else an embedded PostgreSQL for the whole session."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dicomweb_server.embedded_db import EmbeddedPostgres

        server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "cluster")
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture
async def clean_db(pg_dsn: str) -> AsyncIterator[str]:
    """An empty index (schema applied, tables truncated)."""
    from dicomweb_server.app import SCHEMA_PATH

    conn = await asyncpg.connect(pg_dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('instance') IS NOT NULL")
        if exists:
            await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        else:  # a test run first in its process: the app has not applied it yet
            await conn.execute(SCHEMA_PATH.read_text())
    finally:
        await conn.close()
    yield pg_dsn


@pytest.fixture
def settings(tmp_path: Path, clean_db: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=clean_db, allowed_hosts=TEST_HOSTS)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    from dicomweb_server.app import create_app

    application = create_app(settings)
    # httpx's ASGITransport does not run the lifespan: enter it here.
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def app_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "MANIFEST.tsv").exists():
        pytest.fail(f"sample corpus not found at {SAMPLES} (set DICOMWEB_SAMPLES)")
    return SAMPLES


# The DIMSE front door's tests (test_dimse*.py): a storage SCP to move to, and the archive
# with it configured as a C-MOVE destination.


@pytest.fixture
def peer() -> Iterator[Any]:
    from tests.dimse_support import running_peer

    with running_peer() as p:
        yield p


@pytest.fixture
async def archive(settings: Settings, peer: Any, tmp_path: Path) -> AsyncIterator[Any]:
    from tests.dimse_support import archive_with_peer

    async with archive_with_peer(settings, peer, tmp_path) as a:
        yield a


# How long a test's spool files may take to go after it ended (pynetdicom's threads delete them).
SPOOL_CLEANUP_WAIT_S = 2.0


@pytest.fixture
def no_spool_left_behind() -> Iterator[None]:
    """Fails a test that leaves a file pynetdicom received a data set into (tmp*.dcm in
    the temporary directory), the archive's or a test client's."""

    def spooled() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("tmp*.dcm"))

    before = spooled()
    yield
    deadline = time.monotonic() + SPOOL_CLEANUP_WAIT_S  # a thread may still be deleting
    while (left := spooled() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"spool files left behind: {sorted(left)}"
