"""A stored instance whose blob is gone (or cut short) is repaired by a re-send of the same data
set, over STOW-RS or C-STORE (duplicates.repair_lost_blob): the index once acknowledged it and
could not serve it, and the re-send did nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    pending_reservations,
    split_multipart,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

# Clients that re-send the same instance at once in the concurrency test.
SENDERS = 4


def _blob_files(app: Starlette) -> list[Path]:
    """Placed blobs (spool files aside)."""
    root = app.state.services.blobs.root
    return [p for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "tmp"]


async def _blob_path(app: Starlette, ds: Any) -> Path:
    svc = app.state.services
    (inst,) = await svc.index.locate(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path: Path = svc.blobs.local_path(inst.blob_key)
    return path


async def _stow(client: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )


async def _retrieved(client: httpx.AsyncClient, ds: Any) -> bytes:
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    r = await client.get(inst_url(ds), headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((_headers, part),) = split_multipart(r.content, r.headers["content-type"])
    return part


async def _nothing_left(app: Starlette) -> None:
    """No reservation but the spare keys, no spool file."""
    svc = app.state.services
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        assert await pending_reservations(conn, svc.index) == 0
    finally:
        await conn.close()
    assert [p for p in svc.blobs.tmp_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
async def test_a_resent_instance_replaces_its_lost_blob(
    app: Starlette, app_client: httpx.AsyncClient, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_instance()
    data = to_bytes(ds)
    assert (await _stow(app_client, data)).status_code == 200
    lost = await _blob_path(app, ds)
    if damage == "deleted":
        lost.unlink()
    else:
        lost.write_bytes(data[: len(data) // 2])
    # Meanwhile (conformance/STATEMENT.md): metadata from the index, the file's bytes a 500.
    r = await app_client.get(f"{inst_url(ds)}/metadata")
    assert r.status_code == 200, r.text
    any_syntax = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = await app_client.get(f"{inst_url(ds)}/frames/1", headers={"Accept": any_syntax})
    assert r.status_code == 500 and r.json()["status"] == 500

    r = await _stow(app_client, data)
    assert r.status_code == 200, r.text
    assert "00081198" not in r.json()
    restored = await _blob_path(app, ds)
    assert restored.read_bytes() == data
    assert not lost.exists() or lost == restored
    assert _blob_files(app) == [restored]
    assert await _retrieved(app_client, ds) == data
    (warning,) = [m for m in caplog.messages if ds.SOPInstanceUID in m and "replaces" in m]
    assert ("missing" if damage == "deleted" else "bytes, not") in warning
    await _nothing_left(app)

    # Whole again: a further re-send is the plain duplicate (its copy deleted).
    assert (await _stow(app_client, data)).status_code == 200
    assert await _blob_path(app, ds) == restored
    assert _blob_files(app) == [restored]
    await _nothing_left(app)


async def test_senders_repairing_at_once_leave_one_copy(
    app: Starlette, app_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """SENDERS re-sends at once: one copy replaces the lost blob (the instance row is locked
    and its blob key compared, Index.replace_blob), the others are deleted as duplicates."""
    ds = make_instance()
    data = to_bytes(ds)
    assert (await _stow(app_client, data)).status_code == 200
    (await _blob_path(app, ds)).unlink()
    statuses: list[int] = []

    async def send() -> None:
        statuses.append((await _stow(app_client, data)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(SENDERS):
            tg.start_soon(send)
    assert statuses == [200] * SENDERS
    assert len([m for m in caplog.messages if ds.SOPInstanceUID in m and "replaces" in m]) == 1
    restored = await _blob_path(app, ds)
    assert _blob_files(app) == [restored]
    assert await _retrieved(app_client, ds) == data
    await _nothing_left(app)


async def test_a_c_store_again_replaces_a_lost_blob(archive: Any) -> None:
    from tests.dimse_support import blobs, store_one, wado_instance

    ds = make_instance()
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert (await store_one(archive, ds)).Status == 0
    svc = archive.services
    (inst,) = await svc.index.locate(*uids)
    first = await wado_instance(archive, *uids)
    svc.blobs.local_path(inst.blob_key).unlink()

    assert (await store_one(archive, ds)).Status == 0
    (again,) = await svc.index.locate(*uids)
    assert again.blob_key != inst.blob_key
    tmp = svc.blobs.tmp_root
    placed = [p for p in blobs(archive) if tmp not in p.parents]
    assert placed == [svc.blobs.local_path(again.blob_key)]
    assert await wado_instance(archive, *uids) == first


async def test_a_replaced_blob_whose_delete_fails_is_left_reserved(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The damaged file under the old key is deleted after the commit, while the reservation
    the commit took for it is dropped: when the delete fails (or the process dies there) the
    re-send still succeeds, and the reservation stays so that `recover` finds the file."""
    from dicomweb_server.blobstore.files import FileSystemBlobStore

    ds = make_instance()
    data = to_bytes(ds)
    assert (await _stow(app_client, data)).status_code == 200
    damaged = await _blob_path(app, ds)
    damaged.write_bytes(data[:100])

    async def refuse(self: FileSystemBlobStore, key: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(FileSystemBlobStore, "delete", refuse)
    r = await _stow(app_client, data)
    assert r.status_code == 200, r.text
    assert await _retrieved(app_client, ds) == data
    assert damaged.is_file()
    conn = await asyncpg.connect(app.state.settings.database_url)
    try:
        reserved = {r[0] for r in await conn.fetch("SELECT blob_key FROM blob_reservation")}
    finally:
        await conn.close()
    assert damaged.name in reserved
