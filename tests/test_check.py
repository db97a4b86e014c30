"""`check`: the index against the blob store, read-only, no file parsed (check.py)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server import check
from dicomweb_server.blobstore.files import blob_path
from dicomweb_server.check import CheckReport, check_archive
from dicomweb_server.index.database import Index
from tests.helpers import ROOT, make_instance, multipart_body, run_cli, stow_headers, to_bytes

pytestmark = pytest.mark.db


def _tree(root: Path) -> dict[str, int]:
    """Every file under `root` with its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


async def _rows(dsn: str) -> dict[str, Any]:
    """What the index holds of the instances and reservations, to see that nothing changed."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "instances": [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT st.study_instance_uid, i.sop_instance_uid, i.blob_key, i.size_bytes"
                    " FROM instance i JOIN series se ON se.pk = i.series_fk"
                    " JOIN study st ON st.pk = se.study_fk ORDER BY i.pk"
                )
            ],
            "reservations": sorted(
                tuple(r) for r in await conn.fetch("SELECT blob_key, owner FROM blob_reservation")
            ),
        }
    finally:
        await conn.close()


def test_check_command(tmp_path: Path, clean_db: str, samples: Path) -> None:
    """A clean archive: exit 0. A blob deleted, one cut short, an orphan file and a stray one:
    each reported on a line of its own, exit 1. `--study` checks that study's instances only,
    orphans not looked for. Nothing is changed, the files nor the index."""
    data = tmp_path / "data"
    common = ["--data-dir", str(data), "--database-url", clean_db]
    assert run_cli("load", *common, str(samples / "generated/coverage")).returncode == 0
    r = run_cli("check", *common)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.splitlines() == [
        "checked 19 instances: 0 missing, 0 of another size than recorded, 0 unreadable;"
        " 19 blob files: 0 orphans (0 bytes)"
    ]

    rows = anyio.run(_rows, clean_db)["instances"]
    (study_a, sop_a, key_a, _), (study_b, sop_b, key_b, size_b) = rows[0], rows[1]
    assert study_a != study_b
    blobs = data / "blobs"
    blob_path(blobs, key_a).unlink()
    with blob_path(blobs, key_b).open("r+b") as fh:
        fh.truncate(100)
    orphan_key = uuid.uuid4().hex
    orphan = blob_path(blobs, orphan_key)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 1000)
    stray = blobs / "ab" / "stray.dcm"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"y" * 10)
    spooled = blobs / "tmp" / "12345" / "spooled"  # a process's spool file: not looked into
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"z")
    before = (_tree(data / "blobs"), anyio.run(_rows, clean_db))

    r = run_cli("check", *common)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(
        [
            f"study {study_a} series {_series(rows, sop_a, clean_db)} instance {sop_a}"
            f" blob {key_a}: missing",
            f"study {study_b} series {_series(rows, sop_b, clean_db)} instance {sop_b}"
            f" blob {key_b}: 100 bytes, not {size_b}",
            f"orphan {orphan}: 1000 bytes, held by no instance and no reservation",
            f"orphan {stray}: 10 bytes, not named and placed as a blob key",
        ]
    )
    assert lines[-1] == (
        "checked 19 instances: 1 missing, 1 of another size than recorded, 0 unreadable;"
        " 20 blob files: 2 orphans (1010 bytes)"
    )

    r = run_cli("check", *common, "--study", study_b)
    assert r.returncode == 1
    n_b = sum(1 for row in rows if row[0] == study_b)
    assert r.stdout.splitlines() == [
        f"study {study_b} series {_series(rows, sop_b, clean_db)} instance {sop_b}"
        f" blob {key_b}: 100 bytes, not {size_b}",
        f"checked {n_b} instances: 0 missing, 1 of another size than recorded, 0 unreadable;"
        " orphan files not looked for (--study)",
    ]
    intact = next(row[0] for row in rows if row[0] not in (study_a, study_b))
    r = run_cli("check", *common, "--study", intact)
    assert r.returncode == 0, r.stdout
    assert (_tree(data / "blobs"), anyio.run(_rows, clean_db)) == before


def _series(rows: list[tuple[Any, ...]], sop: str, dsn: str) -> str:
    async def fetch() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            uid: str = await conn.fetchval(
                "SELECT se.series_instance_uid FROM instance i JOIN series se"
                " ON se.pk = i.series_fk WHERE i.sop_instance_uid = $1",
                sop,
            )
            return uid
        finally:
            await conn.close()

    return anyio.run(fetch)


def test_check_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data directory with no archive in it: said in a line, exit 1, and no embedded
    PostgreSQL created there (nor a blob directory)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)  # the embedded path, in every CI run
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("check", "--data-dir", str(empty))
    assert r.returncode == 1
    assert "no blob directory" in r.stderr
    (empty / "blobs").mkdir()
    r = run_cli("check", "--data-dir", str(empty))
    assert r.returncode == 1
    assert "no embedded PostgreSQL" in r.stderr
    assert [p.name for p in empty.iterdir()] == ["blobs"]


@pytest.fixture
async def reader(app: Starlette) -> AsyncIterator[Index]:
    """An index opened as `check` opens it (read-only), beside the app's."""
    index = await Index.open(app.state.settings.database_url, max_size=2, timeout_s=30,
                             read_only=True)  # fmt: skip
    try:
        yield index
    finally:
        await index.close()


async def _check(app: Starlette, reader: Index, studies: list[str] | None = None) -> CheckReport:
    lines: list[str] = []
    report = await check_archive(reader, app.state.services.blobs.root, studies, lines.append)
    report.lines = lines  # type: ignore[attr-defined]
    return report


async def _stow(client: httpx.AsyncClient, datasets: list[Any]) -> None:
    body = multipart_body([to_bytes(ds) for ds in datasets])
    r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


async def test_a_store_in_progress_is_no_orphan(
    app: Starlette, app_client: httpx.AsyncClient, reader: Index
) -> None:
    """A blob placed under a reserved key (a store between placement and commit, or one a
    crash left for the next start's recovery) is not an orphan; the same file once its
    reservation is gone (and no instance holds it) is."""
    await _stow(app_client, [make_instance()])
    svc = app.state.services
    key = await svc.index.reserve_key(svc.blobs.new_key)
    path = svc.blobs.local_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placed, not committed yet")
    report = await _check(app, reader)
    assert report.clean, report.lines  # type: ignore[attr-defined]
    assert (report.instances, report.files) == (1, 2)
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        await conn.execute("DELETE FROM blob_reservation WHERE blob_key = $1", key)
    finally:
        await conn.close()
    report = await _check(app, reader)
    assert report.lines == [  # type: ignore[attr-defined]
        f"orphan {path}: 25 bytes, held by no instance and no reservation"
    ]
    assert (report.orphans, report.orphan_bytes, report.clean) == (1, 25, False)


async def test_a_store_failing_meanwhile_leaves_no_orphan(
    app: Starlette,
    app_client: httpx.AsyncClient,
    reader: Index,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store that fails between the listing of its blob and the lookup of its key (its blob
    deleted, then its reservation dropped: ingest._undo) left no orphan: the file is gone."""
    svc = app.state.services
    key = await svc.index.reserve_key(svc.blobs.new_key)
    path = svc.blobs.local_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placed, then refused")
    looked_up = reader.referenced_keys

    async def failing_meanwhile(keys: list[str]) -> set[str]:
        async with svc.index.releasing(key) as ours:
            assert ours
            await svc.blobs.delete(key)
        return await looked_up(keys)

    monkeypatch.setattr(reader, "referenced_keys", failing_meanwhile)
    report = await _check(app, reader)
    assert (report.files, report.clean) == (1, True), report.lines  # type: ignore[attr-defined]


async def test_an_instance_repaired_meanwhile_is_not_reported(
    app: Starlette,
    app_client: httpx.AsyncClient,
    reader: Index,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance whose blob was missing when its row was read, and that a re-send repaired
    before it was reported (its row now names the new blob: ingest._repair), is not reported;
    one still missing is."""
    lost, kept = make_instance(), make_instance()
    await _stow(app_client, [lost, kept])
    svc = app.state.services
    for ds in (lost, kept):
        (row,) = await svc.index.locate(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                        ds.SOPInstanceUID)  # fmt: skip
        svc.blobs.local_path(row.blob_key).unlink()
    read_again = reader.instances_by_key

    async def resent_meanwhile(pks: list[int]) -> Any:
        await _stow(app_client, [lost])
        return await read_again(pks)

    monkeypatch.setattr(reader, "instances_by_key", resent_meanwhile)
    report = await _check(app, reader)
    (line,) = report.lines  # type: ignore[attr-defined]
    assert f" instance {kept.SOPInstanceUID} blob " in line and line.endswith(": missing")
    assert (report.instances, report.damaged["missing"], report.files) == (2, 1, 1)


async def test_pages_and_batches(
    app: Starlette,
    app_client: httpx.AsyncClient,
    reader: Index,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows and files are walked a page at a time, the last page short or empty: every
    instance is checked once, a damaged one on the last page too, and a misplaced blob is
    an orphan while its instance is missing."""
    monkeypatch.setattr(check, "CHECK_PAGE_ROWS", 2)
    monkeypatch.setattr(check, "CHECK_LOOKUP_FILES", 2)
    datasets = [make_instance(study="1.2.3.4", series="1.2.3.4.1", sop=f"1.2.3.4.1.{n}")
                for n in range(1, 6)]  # fmt: skip
    for ds in datasets:
        await _stow(app_client, [ds])
    svc = app.state.services
    (last,) = await svc.index.locate("1.2.3.4", "1.2.3.4.1", "1.2.3.4.1.5")
    misplaced = svc.blobs.root / "00" / "00" / last.blob_key
    misplaced.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(svc.blobs.local_path(last.blob_key), misplaced)
    report = await _check(app, reader)
    assert (report.instances, report.files, report.damaged["missing"]) == (5, 5, 1)
    assert report.lines == [  # type: ignore[attr-defined]
        f"study 1.2.3.4 series 1.2.3.4.1 instance 1.2.3.4.1.5 blob {last.blob_key}: missing",
        f"orphan {misplaced}: {last.size_bytes} bytes, not named and placed as a blob key",
    ]
    shutil.move(misplaced, svc.blobs.local_path(last.blob_key))
    report = await _check(app, reader, ["1.2.3.4"])
    assert (report.instances, report.files, report.clean) == (5, None, True)
    assert (await _check(app, reader, ["1.2.3.9"])).instances == 0


async def test_check_beside_stores(
    app: Starlette, app_client: httpx.AsyncClient, reader: Index
) -> None:
    """Checks run while STOW requests store (and some fail, their blobs deleted): nothing a
    store in progress holds, nor an instance committed meanwhile, is reported."""
    good = [make_instance() for _ in range(60)]
    reports: list[CheckReport] = []
    done = anyio.Event()

    async def store(part: list[Any]) -> None:
        for ds in part:
            bad = make_instance(study=str(ds.StudyInstanceUID))
            bad.SOPInstanceUID = ds.SOPInstanceUID  # a duplicate with other content: 0x0111
            bad.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            await _stow(app_client, [ds])
            body = multipart_body([to_bytes(bad)])
            r = await app_client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
            assert r.status_code == 409, r.text

    async def checks() -> None:
        while not done.is_set():
            reports.append(await _check(app, reader))

    async with anyio.create_task_group() as tg:
        tg.start_soon(checks)
        async with anyio.create_task_group() as stores:
            for k in range(4):
                stores.start_soon(store, good[k::4])
        done.set()
    assert len(reports) >= 3
    assert [r.lines for r in reports if not r.clean] == []  # type: ignore[attr-defined]
    final = await _check(app, reader)
    assert (final.instances, final.files, final.clean) == (60, 60, True)


async def test_the_check_cannot_write(app: Starlette, reader: Index) -> None:
    """The sessions of a read-only index refuse a write (PostgreSQL's
    default_transaction_read_only): `check` cannot change the index whatever it runs."""
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await reader._execute("DELETE FROM blob_reservation")
