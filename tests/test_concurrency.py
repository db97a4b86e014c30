"""Concurrent STOW against one PostgreSQL: one copy per instance, exact aggregates; processes
sharing the database and blob store (`serve --workers N`, `reindex` beside `serve`)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import anyio
import asyncpg
import httpx
import pydicom
import pytest
from pydicom.uid import UID, RLELossless, generate_uid
from starlette.applications import Starlette

from dicomweb_server.app import open_services, recover
from dicomweb_server.blobstore.files import FileSystemBlobStore
from dicomweb_server.config import Settings
from dicomweb_server.errors import FailureReason
from dicomweb_server.index import store as index_store
from dicomweb_server.index.database import Index
from dicomweb_server.index.store import ADVISORY_LOCK_CLASS, OWNER_PROBE_INTERVAL_S
from dicomweb_server.ingest import Services, store_file
from tests.helpers import (
    ROOT,
    app_process,
    inst_url,
    make_instance,
    multipart_body,
    pending_reservations,
    split_multipart,
    stow_headers,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db


async def test_same_instances_from_eight_clients(
    app: Starlette, app_client: httpx.AsyncClient, pg_dsn: str
) -> None:
    files = [to_bytes(make_instance()) for _ in range(20)]

    async def client() -> int:
        r = await app_client.post(
            f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers()
        )
        return r.status_code

    statuses = await asyncio.gather(*(client() for _ in range(8)))
    assert statuses == [200] * 8
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM instance") == 20
        assert await pending_reservations(conn, app.state.services.index) == 0
    finally:
        await conn.close()


async def test_aggregates_under_concurrent_stow_to_one_study(app_client: httpx.AsyncClient) -> None:
    study = generate_uid()
    modalities = ["CT", "MR", "PT", "US"]
    series = {m: generate_uid() for m in modalities}

    async def send(i: int) -> int:
        m = modalities[i % 4]
        ds = make_instance(study=study, series=series[m], modality=m)
        r = await app_client.post(
            f"{ROOT}/studies/{study}",
            content=multipart_body([to_bytes(ds)]),
            headers=stow_headers(),
        )
        return r.status_code

    assert set(await asyncio.gather(*(send(i) for i in range(40)))) == {200}
    r = await app_client.get(f"{ROOT}/studies", params={"StudyInstanceUID": study})
    (doc,) = r.json()
    assert values(doc, "00201208") == [40]
    assert values(doc, "00201206") == [4]
    assert values(doc, "00080061") == sorted(modalities)
    r = await app_client.get(f"{ROOT}/studies/{study}/series")
    assert sorted(values(s, "00201209")[0] for s in r.json()) == [10, 10, 10, 10]  # type: ignore[type-var]


async def test_sop_classes_in_study_do_not_depend_on_the_order_of_arrival(
    app_client: httpx.AsyncClient,
) -> None:
    """SOPClassesInStudy in UID order, as ModalitiesInStudy is and as `reindex` recomputes it:
    it was in order of first arrival, so two archives given the same instances (one of them
    loaded concurrently), or one archive before and after a reindex, answered differently."""
    study = generate_uid()
    classes = [
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.2",
    ]
    for sop_class in classes:  # one at a time: arrival order is this order
        ds = make_instance(study=study)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        r = await app_client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
        )
        assert r.status_code == 200
    r = await app_client.get(
        f"{ROOT}/studies", params={"StudyInstanceUID": study, "includefield": "SOPClassesInStudy"}
    )
    (doc,) = r.json()
    assert values(doc, "00080062") == sorted(classes)


def _blobs(settings: Settings) -> list[Path]:
    """The blob files of the store (spool and scratch files left out)."""
    root = settings.blob_dir
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]


# The backend holding a process lock (index.claim_owner), looked at without taking it.
_LOCK_HOLDER = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2"
)


async def _lock_held(conn: asyncpg.Connection, owner: int) -> bool:
    return bool(await conn.fetch(_LOCK_HOLDER, ADVISORY_LOCK_CLASS, owner))


async def _free_lock_of(conn: asyncpg.Connection, owner: int) -> None:
    """The connection holding `owner`'s process lock dropped, as a database restart, an idle
    timeout or an administrator drops it; returns once the lock is free."""
    (pid,) = [r[0] for r in await conn.fetch(_LOCK_HOLDER, ADVISORY_LOCK_CLASS, owner)]
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    while await _lock_held(conn, owner):  # until its backend is gone
        await anyio.sleep(0.01)


async def _ended_or_waiting(conn: asyncpg.Connection, ended: anyio.Event) -> None:
    """Returns once `ended` is set or another session waits for a lock held here."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND datname = current_database()"
    )
    while not ended.is_set() and not await conn.fetchval(waiting):
        await anyio.sleep(0.01)


@pytest.fixture
def lock_not_retaken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes started now do not probe their lock, so one whose lock connection a test
    drops stays taken for dead (Index.keeping_owner takes it again within a probe interval:
    a process starting in that interval is what these tests are about). The grace a process
    starting gives one that looks dead (Index.dead_owners) would only slow them down."""
    monkeypatch.setattr(index_store, "OWNER_PROBE_INTERVAL_S", 3600.0)
    monkeypatch.setattr(index_store, "RECOVERY_GRACE_S", 0.05)


@pytest.mark.usefixtures("lock_not_retaken")
async def test_recovery_by_another_process_never_deletes_a_committed_blob(
    settings: Settings, clean_db: str
) -> None:
    """A process whose lock connection dropped looks dead to a process starting meanwhile
    (another worker of `serve --workers N`, `reindex`, `load`), which rolls back its
    reservations. A store of the first process that commits in the middle of that roll-back
    must end either stored with its blob, or refused without one: the blob was deleted
    before the reservation was released, so the commit, still finding its reservation, stored
    a row whose file was gone (a 5xx on every retrieve of it)."""
    async with open_services(settings) as first:
        ds = make_instance()
        writer = await first.blobs.open_writer()
        await writer.write(to_bytes(ds))
        deleted, committed = anyio.Event(), anyio.Event()

        class Observed(FileSystemBlobStore):
            async def delete(self, key: str) -> None:
                placed = self.local_path(key).exists()  # not a spare key's
                await super().delete(key)
                if placed:
                    deleted.set()
                    await _ended_or_waiting(watch, committed)  # the first process commits

        conn = await asyncpg.connect(clean_db)
        watch = await asyncpg.connect(clean_db)
        second = await Index.open(clean_db, max_size=2, timeout_s=10)
        try:
            await second.claim_owner(clean_db)
            async with anyio.create_task_group() as tg:

                async def turn(sop: str) -> None:  # placed, reserved, not committed yet
                    await _free_lock_of(conn, first.index.owner)
                    blobs = Observed(settings.blob_dir, second.owner)
                    tg.start_soon(recover, second, blobs)
                    await deleted.wait()

                outcome = await store_file(writer, first, None, turn)
                committed.set()
            rows = await conn.fetch(
                "SELECT blob_key FROM instance WHERE sop_instance_uid = $1", ds.SOPInstanceUID
            )
            files = _blobs(settings)
            if outcome.failure is None:
                assert [first.blobs.local_path(r[0]) for r in rows] == files
            else:
                assert rows == [] and files == []
                assert outcome.reason == "the blob reservation was rolled back by another process"
            assert await conn.fetchval("SELECT count(*) FROM blob_reservation WHERE owner <> $1",
                                       first.index.owner) == 0  # fmt: skip
        finally:
            await second.close()
            await watch.close()
            await conn.close()


@pytest.mark.parametrize("same_study", [True, False])
async def test_one_instance_stored_by_two_processes_at_once(
    settings: Settings, clean_db: str, same_study: bool
) -> None:
    """Two processes storing one SOP Instance UID with different content (in the same study,
    or in two) commit at the same moment, both blobs placed: one is stored, the other is
    0x0111 and leaves no blob, no reservation, and no study or series row of its own."""
    sop, study = generate_uid(), generate_uid()
    datasets = [
        make_instance(sop=sop, study=study if same_study else None, PatientName=name)
        for name in ("First^Copy", "Second^Copy")
    ]
    placed = 0
    both_placed = anyio.Event()

    async def turn(_sop: str) -> None:
        nonlocal placed
        placed += 1
        if placed == 2:
            both_placed.set()
        await both_placed.wait()

    async with open_services(settings) as one, open_services(settings) as two:
        outcomes = {}

        async def store(n: int, svc: Services) -> None:
            writer = await svc.blobs.open_writer()
            await writer.write(to_bytes(datasets[n]))
            outcomes[n] = await store_file(writer, svc, None, turn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(store, 0, one)
            tg.start_soon(store, 1, two)
        stored = [n for n, o in outcomes.items() if o.failure is None]
        assert len(stored) == 1, outcomes
        (lost,) = {0, 1} - set(stored)
        assert outcomes[lost].failure == FailureReason.DUPLICATE_SOP_INSTANCE
        conn = await asyncpg.connect(clean_db)
        try:
            (key,) = [r[0] for r in await conn.fetch("SELECT blob_key FROM instance")]
            files = _blobs(settings)
            assert files == [one.blobs.local_path(key)]
            winner = datasets[stored[0]]
            rows = await conn.fetch(
                "SELECT study_instance_uid, num_instances, num_series FROM study"
            )
            assert [tuple(r) for r in rows] == [(winner.StudyInstanceUID, 1, 1)]
            series = await conn.fetch("SELECT series_instance_uid FROM series")
            assert [r[0] for r in series] == [winner.SeriesInstanceUID]
            spares = [*one.index.spare_keys, *two.index.spare_keys]
            left = await conn.fetchval(
                "SELECT count(*) FROM blob_reservation WHERE NOT blob_key = ANY($1::text[])",
                spares,
            )
            assert left == 0
        finally:
            await conn.close()


@pytest.mark.usefixtures("lock_not_retaken")
async def test_conversions_go_on_after_another_process_took_this_one_for_dead(
    settings: Settings, clean_db: str
) -> None:
    """A process starting while a server's lock connection is down (a database restart)
    takes the server for dead and removes its spool directory (app.recover), where the
    server makes the files of converted instances and of STOW-RS from JSON: each of those
    failed after that (500, 0x0110) until the server was restarted."""
    ds = make_instance()
    rle = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5'
    async with app_process(settings) as (app, client):
        r = await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
        )
        assert r.status_code == 200, r.text
        conn = await asyncpg.connect(clean_db)
        try:
            await _free_lock_of(conn, app.state.services.index.owner)
        finally:
            await conn.close()
        async with app_process(settings):
            assert not app.state.services.scratch_dir.exists()  # taken for dead
        r = await client.get(inst_url(ds), headers={"Accept": rle})
        assert r.status_code == 200, r.text
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == RLELossless
        async with app_process(settings):  # its lock is still free: taken for dead again
            assert not app.state.services.scratch_dir.exists()
        doc = make_instance(study=ds.StudyInstanceUID).to_json_dict()
        body = multipart_body([json.dumps([doc]).encode()], part_type="application/dicom+json")
        headers = stow_headers()
        headers["Content-Type"] = headers["Content-Type"].replace("dicom", "dicom+json")
        r = await client.post(f"{ROOT}/studies", content=body, headers=headers)
        assert r.status_code == 200, r.text


async def test_an_idle_process_takes_its_lock_again(settings: Settings, clean_db: str) -> None:
    """A process whose lock connection dropped (a database restart, an idle-session
    timeout) takes its lock again within a probe interval or two, storing or not: it was
    taken again only by its next store, so an idle server looked dead to every process
    starting meanwhile, which rolled back its reservations and removed its spool files."""
    async with app_process(settings) as (app, _):
        owner = app.state.services.index.owner
        conn = await asyncpg.connect(clean_db)
        try:
            await _free_lock_of(conn, owner)
            deadline = anyio.current_time() + 5 * OWNER_PROBE_INTERVAL_S
            while not await _lock_held(conn, owner):
                assert anyio.current_time() < deadline, "the process lock was not taken again"
                await anyio.sleep(0.05)
        finally:
            await conn.close()


async def test_a_process_starting_while_a_live_one_has_no_lock_gives_it_time(
    settings: Settings, clean_db: str
) -> None:
    """A live process whose lock connection just dropped (a database restart) has not taken
    its lock again for up to a probe interval. A process starting in that second took it for
    dead: it rolled back its reservations and removed its spool files, failing its stores in
    flight. The lock free once is no longer enough: it must still be free RECOVERY_GRACE_S
    later (Index.dead_owners), and the live process takes it back before."""
    async with app_process(settings) as (app, _):
        services = app.state.services
        key = await services.index.reserve_key(services.blobs.new_key)
        spool = await services.blobs.open_writer()
        await spool.write(b"in flight")
        await spool.close()  # written out (a spool file is made by its first write out)
        conn = await asyncpg.connect(clean_db)
        second = await Index.open(clean_db, max_size=2, timeout_s=10)
        try:
            await second.claim_owner(clean_db)
            await _free_lock_of(conn, services.index.owner)  # and the process starts now
            assert await recover(second, FileSystemBlobStore(settings.blob_dir, second.owner)) == 0
            assert await _lock_held(conn, services.index.owner)
            reserved = "SELECT count(*) FROM blob_reservation WHERE blob_key = $1"
            assert await conn.fetchval(reserved, key) == 1, "the live process's store was undone"
            assert spool.path.exists(), "the live process's spool file was removed"
        finally:
            await second.close()
            await conn.close()


async def test_a_start_after_a_clean_stop_does_not_wait(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped cleanly leaves nothing for the next start to recover: that start
    does not wait RECOVERY_GRACE_S (Index.dead_owners) for it. Its spool directory was
    left behind (`tmp/<owner>`, made by FileSystemBlobStore whether used or not), so every
    start, and every CLI command (`apikey`, `audit`, `load`, `reindex`), took the last
    process for one that looks dead and waited the grace."""
    monkeypatch.setattr(index_store, "RECOVERY_GRACE_S", 3600.0)
    async with open_services(settings) as first:
        assert first.scratch_dir.is_dir()
    with anyio.fail_after(60):  # far below the grace: the start waited for no one
        async with open_services(settings) as second:
            assert [p.name for p in second.scratch_dir.parent.iterdir()] == [
                str(second.index.owner)
            ]
