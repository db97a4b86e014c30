"""The `check` and `reindex` commands around their walks (commands.py, cli.main): a study
named with --study that the index does not hold, output into a pipe closed early, a run
stopped midway by the database or the blob store."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server import check
from dicomweb_server.blobstore.files import blob_path
from dicomweb_server.cli import EXIT_BROKEN_PIPE
from dicomweb_server.commands import run_check
from dicomweb_server.config import Settings
from dicomweb_server.index.database import Index
from dicomweb_server.index.walk import Walk
from tests.helpers import ROOT, make_instance, multipart_body, run_cli, stow_headers, to_bytes
from tests.test_audit import empty_audit  # noqa: F401  (a fixture)

pytestmark = pytest.mark.db


async def _stow(client: httpx.AsyncClient, datasets: list[Any]) -> None:
    body = multipart_body([to_bytes(ds) for ds in datasets])
    r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


def _orphans(blobs: Path, n: int) -> None:
    for _ in range(n):
        path = blob_path(blobs, uuid.uuid4().hex)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


async def test_a_study_not_in_the_index_is_named(
    settings: Settings,
    app: Starlette,
    app_client: httpx.AsyncClient,
    empty_audit: str,  # noqa: F811  (the fixture imported above: the reindex rows go after)
) -> None:
    """`check --study` and `reindex --study` with a UID the index holds no instance of (a
    typo): a line naming it, exit status 1, the studies that are there checked (reindexed)
    all the same. Until now: "checked 0 instances", exit 0, a typo passed for a healthy
    study."""
    kept = make_instance(study="1.2.3.4")
    await _stow(app_client, [kept, make_instance(study="1.2.3.4")])
    common = ["--data-dir", str(settings.data_dir), "--database-url", str(settings.database_url)]
    r = run_cli("check", *common, "--study", "1.2.3.4")
    assert (r.returncode, r.stdout.splitlines()[-1].split(":")[0]) == (0, "checked 2 instances")
    r = run_cli("check", *common, "--study", "1.2.3.5", "--study", "1.2.3.4")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "dicomweb-server: no study 1.2.3.5 in the index (--study)" in r.stderr.splitlines()
    assert "1.2.3.4" not in r.stderr
    assert r.stdout.splitlines() == [
        "checked 2 instances: 0 missing, 0 of another size than recorded, 0 unreadable;"
        " orphan files not looked for (--study)"
    ]
    r = run_cli("reindex", *common, "--study", "1.2.3.4", "--study", "1.2.3.5")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "dicomweb-server: no study 1.2.3.5 in the index (--study)" in r.stderr.splitlines()
    assert r.stdout.splitlines() == ["updated 0, unchanged 2, failed 0"]
    r = run_cli("reindex", *common, "--study", "1.2.3.4")
    assert r.returncode == 0, r.stdout + r.stderr
    conn = await asyncpg.connect(empty_audit)
    try:
        details = await conn.fetch("SELECT detail FROM audit_log WHERE action = 'reindex'")
    finally:
        await conn.close()
    assert [row["detail"].split(" studies=")[1] for row in details] == [
        "1.2.3.4,1.2.3.5 not_in_index=1.2.3.5",
        "1.2.3.4",
    ]
    index: Index = app.state.services.index
    named = ["1.2.3.9", "1.2.3.4", "1.2.3.8", "1.2.3.9"]
    assert await index.unknown_studies(named) == ["1.2.3.9", "1.2.3.8"]  # once, in order


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("orphans", [0, 400])
def test_output_into_a_closed_pipe(
    tmp_path: Path, clean_db: str, samples: Path, unbuffered: bool, orphans: int
) -> None:
    """`check | head`: the reader gone (before the summary, or while orphans are listed,
    stdout block-buffered or not) is an exit with status 141 (128 + SIGPIPE), nothing on
    stderr. Until now: a BrokenPipeError traceback, or "check stopped: None: Broken pipe"
    (taken for a blob directory unreadable) and exit status 1."""
    data = tmp_path / "data"
    common = ["--data-dir", str(data), "--database-url", clean_db]
    assert run_cli("load", *common, str(samples / "generated/coverage")).returncode == 0
    _orphans(data / "blobs", orphans)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)  # the reader gone before the first line
    try:
        r = subprocess.run(
            [sys.executable, "-m", "dicomweb_server", "check", *common],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert r.returncode == EXIT_BROKEN_PIPE == 141, r.stderr
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr


def test_a_closed_pipe_stops_the_embedded_cluster(
    tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check` with no --database-url on a data directory whose embedded PostgreSQL is not
    running starts it, and stops it when done: also when the output's reader went away
    (exit status 141). No process is left listed as its user."""
    monkeypatch.delenv("DATABASE_URL", raising=False)  # the embedded path, in every CI run
    data = tmp_path / "data"
    sample = next((samples / "generated/coverage").rglob("*.dcm"))
    assert run_cli("load", "--data-dir", str(data), str(sample)).returncode == 0
    pg = data / "postgres"
    assert not (pg / "postmaster.pid").exists()
    _orphans(data / "blobs", 400)
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "dicomweb_server", "check", "--data-dir", str(data)],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert r.returncode == EXIT_BROKEN_PIPE, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (pg / "postmaster.pid").exists()  # stopped
    assert (pg / ".handle_pids.json").read_text() == "[]"
    r = run_cli("check", "--data-dir", str(data))
    assert r.returncode == 1 and r.stdout.splitlines()[-1].endswith("400 orphans (400 bytes)")
    assert not (pg / "postmaster.pid").exists()


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
