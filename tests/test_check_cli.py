"""The `check` and `reindex` commands around their walks (commands.py, cli.main): a study
named with --study that the index does not hold, output into a pipe closed early, a run
stopped midway by the database or the blob store."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from dicomweb_server import check
from dicomweb_server.commands import run_check
from dicomweb_server.config import Settings
from dicomweb_server.index.walk import Walk
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db


async def _stow(client: httpx.AsyncClient, datasets: list[Any]) -> None:
    body = multipart_body([to_bytes(ds) for ds in datasets])
    r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


@pytest.fixture
async def locker(clean_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own, to hold a table's lock in a transaction (rolled back)."""
    conn = await asyncpg.connect(clean_db)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("walk", ["instances", "files"])
async def test_the_database_gone_midway(
    settings: Settings,
    app_client: httpx.AsyncClient,
    locker: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    walk: str,
) -> None:
    """The database not answering after the first page of rows (or batch of files), whose
    next one is read while the last is stat'ed: "check stopped" and why, exit status 1.
    Until now the error came wrapped in the task group's ExceptionGroup, which run_check did
    not catch: a traceback."""
    monkeypatch.setattr(check, "CHECK_PAGE_ROWS", 2)
    monkeypatch.setattr(check, "CHECK_LOOKUP_FILES", 2)
    await _stow(app_client, [make_instance() for _ in range(5)])
    method, table = {
        "instances": ("blob_sizes", "instance"),
        "files": ("referenced_keys", "blob_reservation"),
    }[walk]
    real = getattr(Walk, method)
    calls = 0

    async def second_blocked(self: Walk, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the database holds it past the query timeout
            await locker.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        return await real(self, *args)

    monkeypatch.setattr(Walk, method, second_blocked)
    try:
        status = await run_check(dataclasses.replace(settings, query_timeout_s=0.5), None)
    finally:
        await locker.execute("ROLLBACK")
    err = capsys.readouterr().err
    assert status == 1
    assert "dicomweb-server: check stopped: database unavailable" in err, err


async def test_a_directory_unreadable_midway(
    settings: Settings,
    app_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A blob directory that cannot be listed, met in the listing of a batch after the
    first (listed while the last is looked up): "check stopped" naming it, exit status 1,
    not a traceback."""
    monkeypatch.setattr(check, "CHECK_LOOKUP_FILES", 2)
    await _stow(app_client, [make_instance() for _ in range(5)])
    real = check._next_files
    calls = 0

    def refused(listing: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # what os.scandir raises for a directory of another owner, mode 700
            raise PermissionError(13, "Permission denied", str(settings.blob_dir / "ab"))
        return real(listing)

    monkeypatch.setattr(check, "_next_files", refused)
    assert await run_check(settings, None) == 1
    err = capsys.readouterr().err
    assert f"check stopped: {settings.blob_dir / 'ab'}: Permission denied" in err, err
