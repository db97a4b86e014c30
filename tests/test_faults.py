"""Faults: a full disk (a real, tiny tmpfs) and a database that goes away and comes back."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server.config import Settings
from tests.helpers import (
    ROOT,
    TEST_HOSTS,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

# Size of the blob store's filesystem in the disk-full test.
TINY_FS = "512k"


@pytest.fixture
def tiny_blob_dir(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs mounted where the blob store lives (root is needed to mount)."""
    blob_dir = tmp_path / "data" / "blobs"
    blob_dir.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TINY_FS}", "tmpfs", str(blob_dir)], check=True
    )
    try:
        yield blob_dir
    finally:
        subprocess.run(["umount", "-l", str(blob_dir)], check=False)


async def test_disk_full_fails_cleanly_with_out_of_resources(
    tiny_blob_dir: Path, tmp_path: Path, clean_db: str
) -> None:
    from dicomweb_server.app import create_app

    settings = Settings(data_dir=tmp_path / "data", database_url=clean_db, allowed_hosts=TEST_HOSTS)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            small = make_instance(rows=16, cols=16)
            r = await client.post(
                f"{ROOT}/studies", content=multipart_body([to_bytes(small)]), headers=stow_headers()
            )
            assert r.status_code == 200
            big = [to_bytes(make_instance(rows=256, cols=256)) for _ in range(6)]  # 6 x 128 KiB
            r = await client.post(
                f"{ROOT}/studies", content=multipart_body(big), headers=stow_headers()
            )
            assert r.status_code in (202, 409), r.text
            reasons = [f["00081197"]["Value"][0] for f in r.json()["00081198"]["Value"]]
            assert reasons and set(reasons) == {0xA700}
            r = await client.get(
                inst_url(small), headers={"Accept": "multipart/related; transfer-syntax=*"}
            )
            ((_, body),) = split_multipart(r.content, r.headers["content-type"])
            assert body == to_bytes(small)  # what was stored before is intact
            r = await client.get(f"{ROOT}/instances")
            stored = len(r.json())
    files = [
        p
        for p in tiny_blob_dir.rglob("*")
        if p.is_file() and p.relative_to(tiny_blob_dir).parts[0] != "tmp"
    ]
    assert len(files) == stored, "a blob without a row, or a row without a blob"


async def test_database_away_then_back(tmp_path: Path) -> None:
    """Requests meanwhile get 503 with Retry-After; service resumes without a restart."""
    from dicomweb_server.app import create_app
    from dicomweb_server.embedded_db import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path / "pg")
    settings = Settings(data_dir=tmp_path / "data", database_url=pg.dsn, allowed_hosts=TEST_HOSTS)
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                ds = make_instance()
                r = await client.post(
                    f"{ROOT}/studies",
                    content=multipart_body([to_bytes(ds)]),
                    headers=stow_headers(),
                )
                assert r.status_code == 200
                pg.stop()
                for url in (f"{ROOT}/studies", inst_url(ds) + "/metadata"):
                    r = await client.get(url)
                    assert r.status_code == 503, (url, r.text)
                    assert r.headers["retry-after"]
                    # What failed (a socket path, an address) is logged, not told.
                    assert r.json()["message"] == "database unavailable; try again later"
                r = await client.post(
                    f"{ROOT}/studies",
                    content=multipart_body([to_bytes(make_instance())]),
                    headers=stow_headers(),
                )
                assert r.status_code == 503
                pg = EmbeddedPostgres(tmp_path / "pg")
                r = await client.get(f"{ROOT}/studies")
                assert r.status_code == 200 and len(r.json()) == 1
    finally:
        pg.stop()
    leftovers = [p for p in (settings.blob_dir / "tmp").rglob("*") if p.is_file()]
    assert leftovers == []


async def test_process_lock_is_retaken_after_a_database_restart(tmp_path: Path) -> None:
    """After the database comes back, our reservations must not look like a dead process's."""
    from dicomweb_server.embedded_db import EmbeddedPostgres
    from dicomweb_server.index.database import Index

    pg = EmbeddedPostgres(tmp_path / "pg")
    index = await Index.open(pg.dsn, max_size=2, timeout_s=10)
    other = None
    try:
        from dicomweb_server.app import SCHEMA_PATH

        await index.apply_schema(SCHEMA_PATH.read_text())
        owner = await index.claim_owner(pg.dsn)
        pg.stop()
        pg = EmbeddedPostgres(tmp_path / "pg")
        from dicomweb_server.errors import ServiceUnavailableError

        for _ in range(2):  # the pool may hand out one dead connection first: a 503
            try:
                await index.reserve("0" * 32)  # re-takes the lock before reserving
                break
            except ServiceUnavailableError:
                continue
        other = await Index.open(pg.dsn, max_size=2, timeout_s=10)
        await other.claim_owner(pg.dsn)
        assert not await other.owner_is_dead(owner)
        assert await other.dead_owners([owner]) == set()
    finally:
        for ix in (index, other):
            if ix is not None:
                await ix.close()
        pg.stop()


@pytest.mark.parametrize("stage", ["close", "parse"])
async def test_store_cancelled_while_closing_or_parsing_leaves_no_spool_file(
    app: Starlette, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S4: a STOW cancelled (client gone) while its spool file is closed or parsed in a worker
    thread must remove that file, not leave it until the next start."""
    import threading
    import time

    import anyio

    from dicomweb_server import dicomfile, ingest
    from dicomweb_server.blobstore import files

    svc = app.state.services
    entered = threading.Event()

    def slow(real: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            entered.set()
            time.sleep(0.3)  # the cancellation arrives meanwhile
            return real(*args)

        return wrapper

    if stage == "parse":
        monkeypatch.setattr(ingest, "parse_file", slow(dicomfile.parse_file))
    else:
        monkeypatch.setattr(files._FileWriter, "_write_out", slow(files._FileWriter._write_out))
    writer = await svc.blobs.open_writer()
    await writer.write(to_bytes(make_instance()))
    with anyio.move_on_after(0.05) as scope:
        await ingest.store_file(writer, svc, None)
    assert scope.cancelled_caught and entered.is_set()
    assert not writer.path.exists(), "the spool file of the cancelled store leaked"
    assert [p for p in svc.blobs.tmp_dir.iterdir()] == []
    root = svc.blobs.root  # placed in the same worker-thread call, then removed by the undo
    assert [p for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "tmp"] == []
    assert (await app_get_instances(app)) == 204


async def app_get_instances(app: Starlette) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return (await client.get(f"{ROOT}/instances")).status_code


@pytest.mark.parametrize("errno_", [28, 5])  # ENOSPC, EIO
@pytest.mark.parametrize("where", ["spool fsync", "after the rename"])
async def test_failed_place_leaves_neither_copy(
    app: Starlette, errno_: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placing a blob fails, at the spool file's fsync (before its rename into place) or
    after its rename (a directory fsync error): the STOW fails for that instance with the
    storage error, and no blob, spool file or reservation remains."""
    import os

    from dicomweb_server.blobstore import files

    svc = app.state.services
    real_place, real_fsync = files._place, files._fsync_path

    def rename_then_fail(src: Path, dest: Path) -> None:
        real_place(src, dest)
        raise OSError(errno_, os.strerror(errno_))

    def fail_for_spool_files(path: Path, flags: int = os.O_RDONLY) -> None:
        if svc.blobs.tmp_dir in path.parents:
            raise OSError(errno_, os.strerror(errno_))
        real_fsync(path, flags)

    if where == "spool fsync":
        monkeypatch.setattr(files, "_fsync_path", fail_for_spool_files)
    else:
        monkeypatch.setattr(files, "_place", rename_then_fail)
    ds = make_instance()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
        )
        assert r.status_code == 409, r.text
        (failed,) = r.json()["00081198"]["Value"]
        assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
        assert failed["00081197"]["Value"] == [0xA700 if errno_ == 28 else 0x0110]
        assert (await client.get(f"{ROOT}/instances")).status_code == 204
    root = svc.blobs.root
    assert [p for p in root.rglob("*") if p.is_file()] == []
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        reserved = {r[0] for r in await conn.fetch("SELECT blob_key FROM blob_reservation")}
    finally:
        await conn.close()
    assert reserved == set(svc.index.spare_keys), "the failed blob's reservation remains"


async def test_refused_parts_leave_no_reservation(app: Starlette) -> None:
    """A part refused after its blob key was reserved (not DICOM, or of another study) leaves
    neither a spool file nor a reservation: blob_reservation holds the spare keys only."""
    ds = make_instance()
    other = make_instance()
    parts = [b"not DICOM at all", to_bytes(other), to_bytes(ds)]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            f"{ROOT}/studies/{ds.StudyInstanceUID}",
            content=multipart_body(parts),
            headers=stow_headers(),
        )
        assert r.status_code == 202, r.text
        failed = [f["00081197"]["Value"][0] for f in r.json()["00081198"]["Value"]]
        assert sorted(failed) == [0xA901, 0xC000]  # another study; not understood
    svc = app.state.services
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        reserved = {r[0] for r in await conn.fetch("SELECT blob_key FROM blob_reservation")}
        stored = await conn.fetchval("SELECT count(*) FROM instance")
    finally:
        await conn.close()
    assert stored == 1
    assert reserved == set(svc.index.spare_keys)
    assert list(svc.blobs.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("path", ["duplicate", "refused commit"])
async def test_a_blob_whose_delete_fails_keeps_its_reservation(
    app: Starlette, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A store that does not commit deletes its blob while its reservation is dropped
    (Index.releasing): when the delete fails (or the process dies there), the reservation
    stays for `recover`. Released first, the blob was left with neither row nor reservation,
    an orphan no recovery finds. Paths: a second copy of a stored instance (its blob is
    discarded) and a commit the database refused (the same SOP Instance UID, other content)."""
    from dicomweb_server.blobstore.files import FileSystemBlobStore

    svc = app.state.services
    ds = make_instance()
    again = (
        ds
        if path == "duplicate"
        else make_instance(
            sop=ds.SOPInstanceUID,
            study=ds.StudyInstanceUID,
            series=ds.SeriesInstanceUID,
            patient_name="Other^Content",
        )
    )
    failed: list[str] = []

    async def refuse(self: FileSystemBlobStore, key: str) -> None:
        failed.append(key)
        raise OSError(5, "Input/output error")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
        )
        assert r.status_code == 200, r.text
        monkeypatch.setattr(FileSystemBlobStore, "delete", refuse)
        await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(again)]), headers=stow_headers()
        )
    (key,) = set(failed)  # _commit tried, then _undo
    assert svc.blobs.local_path(key).is_file()
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        reserved = {r[0] for r in await conn.fetch("SELECT blob_key FROM blob_reservation")}
        stored = {r[0] for r in await conn.fetch("SELECT blob_key FROM instance")}
    finally:
        await conn.close()
    assert key not in stored
    assert key in reserved, "the undeleted blob has neither row nor reservation"
