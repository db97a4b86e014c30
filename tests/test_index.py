"""The index against a real PostgreSQL: query plans and the recovery of dead reservations."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomweb_server.attributes import Level
from dicomweb_server.blobstore.files import FileSystemBlobStore
from dicomweb_server.index.database import Index
from dicomweb_server.index.reads import _METADATA_FIRST, _METADATA_KEYS
from dicomweb_server.query import parse
from dicomweb_server.sql import compile_search
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db


@pytest.mark.parametrize(
    ("params", "index_name"),
    [
        ([("PatientID", "MRN1")], "study_patient_id"),
        ([("PatientName", "doe^john")], "study_patient_name"),
        ([("PatientName", "*smith*")], "study_patient_name_trgm"),
        ([("PatientName", "doe*")], "study_patient_name_trgm"),
        ([("StudyDate", "20200101-20201231")], "study_date_idx"),
        ([("AccessionNumber", "ACC1")], "study_accession"),
    ],
)
async def test_common_keys_can_use_an_index(
    app_client: httpx.AsyncClient, pg_dsn: str, params: list[tuple[str, str]], index_name: str
) -> None:
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(make_instance())]),
        headers=stow_headers(),
    )  # fmt: skip
    text, args = compile_search(parse(Level.STUDY, params, {}))
    plan, _ = await _plan(pg_dsn, text, args)
    assert index_name in plan, plan


async def _plan(pg_dsn: str, text: str, args: list[Any]) -> tuple[str, int]:
    """EXPLAIN of a search with only index-based scans allowed, and its row count. Tiny
    tables make any plan cheap: forbid the scans that need no index (a sequential scan, or
    walking the primary key for ORDER BY pk) and see which index is usable."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_indexscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {text}", *args))
        return plan, len(await conn.fetch(text, *args))
    finally:
        await conn.close()


async def test_request_attributes_single_value_can_use_its_index(
    app_client: httpx.AsyncClient, pg_dsn: str
) -> None:
    """The containment test sql.py writes for a key inside RequestAttributesSequence is the
    expression schema.sql indexes (series_request_attributes)."""
    item = Dataset()
    item.ScheduledProcedureStepID = "SPS1"
    ds = make_instance(RequestAttributesSequence=[item])
    await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    params = [("RequestAttributesSequence.ScheduledProcedureStepID", "SPS1")]
    text, args = compile_search(parse(Level.SERIES, params, {}))
    plan, rows = await _plan(pg_dsn, text, args)
    assert rows == 1
    assert "series_request_attributes" in plan, plan


async def test_start_rolls_back_reservations_of_dead_processes(
    tmp_path: Path, clean_db: str
) -> None:
    from dicomweb_server.app import SCHEMA_PATH, recover

    dead = await Index.open(clean_db, max_size=2, timeout_s=10)
    await dead.apply_schema(SCHEMA_PATH.read_text())
    await dead.claim_owner(clean_db)
    dead_blobs = FileSystemBlobStore(tmp_path / "blobs", dead.owner)
    writer = await dead_blobs.open_writer()
    await writer.write(b"half an instance")
    key = dead_blobs.new_key()
    await dead.reserve(key)
    await dead_blobs.commit(writer, key)
    # A row no process of this server made (a hand edit, a test): dropped, not a failed
    # start (blobs.delete refused it, and the server would not start again).
    await dead.reserve("not-a-blob-key")
    spool = await dead_blobs.open_writer()
    await spool.write(b"spooling")
    await spool.close()

    live = await Index.open(clean_db, max_size=2, timeout_s=10)
    await live.claim_owner(clean_db)
    live_blobs = FileSystemBlobStore(tmp_path / "blobs", live.owner)
    try:
        assert await recover(live, live_blobs) == 0, "a live owner's reservation was touched"
        await dead.close()  # the process "dies": its advisory lock is released
        assert await recover(live, live_blobs) == 1
        assert not await live_blobs.exists(key)
        assert not spool.path.exists()
        conn = await asyncpg.connect(clean_db)
        try:
            assert await conn.fetchval("SELECT count(*) FROM blob_reservation") == 0
        finally:
            await conn.close()
    finally:
        await live.close()


async def test_releasing_rolls_back_whatever_ends_it(
    clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Index.releasing ended early keeps the reservation and hands its connection back
    rolled back, quietly: its DELETE timed out waiting for the row (another process's
    commit or recovery holds it) and was a 503; it was cancelled waiting there, or in its
    block (a blob delete). Rolled back only for an error of the block, and not under a
    cancellation (which reaches the rollback too), the connection went back to the pool
    inside its transaction, and asyncpg logged an asyncio ERROR for each."""
    import logging

    import anyio

    from dicomweb_server.app import SCHEMA_PATH
    from dicomweb_server.errors import ServiceUnavailableError

    index = await Index.open(clean_db, max_size=2, timeout_s=0.3)
    await index.apply_schema(SCHEMA_PATH.read_text())
    await index.claim_owner(clean_db)
    other = await asyncpg.connect(clean_db)
    try:
        for way in ("timeout", "cancelled waiting", "cancelled in the block"):
            key = uuid.uuid4().hex  # a blob key: recover, at a later start, looks for it
            await index.reserve(key)
            async with other.transaction():
                if way != "cancelled in the block":
                    await other.execute(
                        "SELECT 1 FROM blob_reservation WHERE blob_key = $1 FOR UPDATE", key
                    )
                with caplog.at_level(logging.ERROR, logger="asyncio"):
                    if way == "timeout":
                        with pytest.raises(ServiceUnavailableError):
                            async with index.releasing(key):
                                raise AssertionError("not reached")
                    else:
                        with anyio.move_on_after(0.2):
                            async with index.releasing(key) as ours:
                                assert ours
                                await anyio.sleep(5)
            await anyio.sleep(0.2)  # the pool's release of a connection runs on its own
            assert [r.getMessage() for r in caplog.records] == [], way
            assert (
                await other.fetchval(
                    "SELECT count(*) FROM blob_reservation WHERE blob_key = $1", key
                )
                == 1
            ), way
            assert (
                await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
                )
                == 0
            ), way
    finally:
        await other.execute("DELETE FROM blob_reservation")  # the dead owner's, left for recover
        await other.close()
        await index.close()


async def test_a_lock_connection_whose_lock_query_fails_is_not_left_open(
    clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the process lock again (Store._ensure_owner_locked, after the lock connection
    dropped) connects, then asks for the lock; when that query fails with an error that
    means "database unavailable" (503), the new connection is closed, not left open: the
    keeper retries every OWNER_PROBE_INTERVAL_S, so each failure would leak one connection
    until max_connections. The failure is injected without mocking the database: the real
    connection asyncpg.connect made is handed over busy with a query of its own, so the
    lock query meets asyncpg's InterfaceError ("another operation is in progress")."""
    import asyncio

    import anyio

    from dicomweb_server.errors import ServiceUnavailableError

    tag = f"lock-leak-{uuid.uuid4().hex[:12]}"
    tagged = f"{clean_db}{'&' if '?' in clean_db else '?'}application_name={tag}"
    count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    index = await Index.open(clean_db, max_size=1, timeout_s=10)
    other = await asyncpg.connect(clean_db)
    busy: list[asyncio.Task[str]] = []
    real_connect = asyncpg.connect

    async def connect_busy(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        conn = await real_connect(*args, **kwargs)
        busy.append(asyncio.create_task(conn.execute("SELECT pg_sleep(0.5)")))
        await asyncio.sleep(0)  # the sleep is sent: the connection is busy with it
        return conn

    async def gone() -> None:
        """Until no backend of ours is left (a backend exits on its own, after its client)."""
        with anyio.move_on_after(5):
            while await other.fetchval(count, tag):
                await anyio.sleep(0.05)

    try:
        await index.claim_owner(tagged)
        assert await other.fetchval(count, tag) == 1  # the lock connection
        # The lock connection drops (its backend ended: an idle-session timeout, an admin),
        # and the client has seen it end, so the next store takes the lock again.
        await other.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            tag,
        )
        await gone()
        await anyio.sleep(0.1)
        monkeypatch.setattr(asyncpg, "connect", connect_busy)
        with pytest.raises(ServiceUnavailableError):
            await index.reserve(uuid.uuid4().hex)
        assert len(busy) == 1  # one connection was made, and its lock query failed
        await gone()  # (the failed attempt's connection is held by the traceback, if leaked)
        assert await other.fetchval(count, tag) == 0, "the lock connection was left open"
    finally:
        monkeypatch.undo()
        for task in busy:  # ended by the connection's close (or finished, if it leaked)
            with contextlib.suppress(Exception):
                await task
        await other.close()
        await index.close()


async def _drop_lock_connection(index: Index, other: asyncpg.Connection, dsn: str) -> None:
    """`index` takes its process lock, then the lock connection drops (its backend ended, as
    by an idle-session timeout) and the client has seen it end: the next store takes the
    lock again on a new connection."""
    import anyio

    tag = f"lock-{uuid.uuid4().hex[:12]}"
    await index.claim_owner(f"{dsn}{'&' if '?' in dsn else '?'}application_name={tag}")
    await other.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", tag
    )
    with anyio.move_on_after(5):
        count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        while await other.fetchval(count, tag):
            await anyio.sleep(0.05)
    await anyio.sleep(0.1)


async def _aborted(conn: asyncpg.Connection) -> None:
    """`conn` left in a failed transaction: every later query on it is refused
    (InFailedSQLTransactionError), a database error that is not a lost connection."""
    await conn.execute("BEGIN")
    with contextlib.suppress(asyncpg.DivisionByZeroError):
        await conn.execute("SELECT 1/0")


@contextlib.asynccontextmanager
async def _lock_taken_again_with(
    dsn: str, monkeypatch: pytest.MonkeyPatch, then: Callable[[asyncpg.Connection], Awaitable[None]]
) -> AsyncIterator[tuple[Index, list[asyncpg.Connection]]]:
    """An index whose lock connection dropped, and the connections it makes to take its lock
    again: each new one goes through `then` before the lock query runs on it."""
    index = await Index.open(dsn, max_size=1, timeout_s=10)
    other = await asyncpg.connect(dsn)
    made: list[asyncpg.Connection] = []
    real_connect = asyncpg.connect

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        conn = await real_connect(*args, **kwargs)
        made.append(conn)
        await then(conn)
        return conn

    try:
        await _drop_lock_connection(index, other, dsn)
        monkeypatch.setattr(asyncpg, "connect", connect)
        yield index, made
    finally:
        monkeypatch.undo()
        for conn in made:
            conn.terminate()
        await other.close()
        await index.close()


async def test_a_lock_connection_whose_lock_query_is_refused_is_closed(
    clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the process lock again, the new connection's lock query meets a database error
    other than "unavailable" (here: its transaction failed): a 503, and the connection is
    closed (was: the error escaped as a 500 and the connection stayed open)."""

    from dicomweb_server.errors import ServiceUnavailableError

    async with _lock_taken_again_with(clean_db, monkeypatch, _aborted) as (index, made):
        with pytest.raises(ServiceUnavailableError):
            await index.reserve(uuid.uuid4().hex)
        assert len(made) == 1
        assert made[0].is_closed(), "the lock connection was left open"


async def test_a_lock_connection_that_fails_its_probe_is_replaced(clean_db: str) -> None:
    """The once-a-second probe of the lock connection fails with an error that is not a lost
    connection (here a failed transaction; asyncpg's InternalClientError is another): the
    connection is replaced and the lock taken again, and meanwhile stores get 503s, never
    another error (was: the error escaped every store until restart)."""
    import anyio

    from dicomweb_server.errors import ServiceUnavailableError
    from dicomweb_server.index.store import OWNER_PROBE_INTERVAL_S

    index = await Index.open(clean_db, max_size=2, timeout_s=10)
    try:
        owner = await index.claim_owner(clean_db)
        assert index._owner_conn is not None
        first = index._owner_conn
        await _aborted(first)
        await anyio.sleep(OWNER_PROBE_INTERVAL_S + 0.05)  # the next store probes
        stored = False
        with anyio.move_on_after(10):
            while not stored:
                try:
                    await index.reserve(uuid.uuid4().hex)
                    stored = True
                except ServiceUnavailableError:  # the old backend still holds the lock
                    await anyio.sleep(0.1)
        assert stored
        assert first.is_closed()
        assert index._owner_conn is not first
        held = await index._fetch(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted",
            owner,
        )
        assert len(held) == 1
    finally:
        await index.close()


async def test_a_lock_connection_whose_lock_query_is_cancelled_is_closed(
    clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the process lock again, the store asking for it is cancelled (a STOW whose
    client left, the keeper at shutdown) while the new connection's lock query runs: the
    cancellation goes on, not turned into a 503, and the connection is closed (was: left
    open, holding the lock if the query had got it). The cancellation is delivered at the
    first await after the real connection is made: the lock query."""
    import asyncio

    async def cancel_soon(_conn: asyncpg.Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)

    async with _lock_taken_again_with(clean_db, monkeypatch, cancel_soon) as (index, made):
        store = asyncio.create_task(index.reserve(uuid.uuid4().hex))
        with pytest.raises(asyncio.CancelledError):
            await store
        assert len(made) == 1
        assert made[0].is_closed(), "the lock connection was left open"


async def test_a_process_lock_held_elsewhere_for_a_moment_is_a_retry(clean_db: str) -> None:
    """The lock connection dropped, and while it is taken again another session holds our
    owner id's lock (a process starting asks whether we live; our old backend not yet
    ended): a 503 saying to try again, with Retry-After, not "restart this server"; once it
    is let go, the next store takes the lock and goes on."""
    from dicomweb_server.errors import ServiceUnavailableError
    from dicomweb_server.index.store import ADVISORY_LOCK_CLASS

    index = await Index.open(clean_db, max_size=2, timeout_s=10)
    other = await asyncpg.connect(clean_db)
    try:
        owner = await index.claim_owner(clean_db)
        assert index._owner_conn is not None
        await index._owner_conn.close()  # our lock is let go (the connection dropped)
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, owner
        )
        with pytest.raises(ServiceUnavailableError, match="try again") as caught:
            await index.reserve(uuid.uuid4().hex)
        assert caught.value.headers == {"Retry-After": "1"}
        await other.execute("SELECT pg_advisory_unlock($1, $2)", ADVISORY_LOCK_CLASS, owner)
        await index.reserve(uuid.uuid4().hex)
        assert not await other.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, owner
        )  # ours again
    finally:
        await other.close()
        await index.close()


async def test_whether_an_owner_is_dead_is_asked_after_the_lock_connection_dropped(
    clean_db: str,
) -> None:
    """Start-up recovery asks whether other processes live on the lock connection. When that
    connection has dropped, it is taken again first, our own lock with it (was: the question
    went to the closed connection, and recovery failed with InterfaceError)."""
    from dicomweb_server.index.store import ADVISORY_LOCK_CLASS

    index = await Index.open(clean_db, max_size=1, timeout_s=10)
    other = await asyncpg.connect(clean_db)
    try:
        await _drop_lock_connection(index, other, clean_db)
        gone_owner = index.owner % (2**31 - 2) + 1  # not ours, and held by nobody
        assert await index.owner_is_dead(gone_owner)
        assert not await other.fetchval(  # ours again
            "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, index.owner
        )
        assert await other.fetchval(  # and the one asked about let go
            "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, gone_owner
        )
    finally:
        await other.close()
        await index.close()


async def test_a_lock_connection_gone_silent_is_replaced_within_seconds(clean_db: str) -> None:
    """Found by review: the probe of the lock connection waited the whole query timeout
    (30 s) for an answer. A connection gone silent (a database failover, a network cut: no
    reset, no answer) kept the lock lost that long, longer than RECOVERY_GRACE_S, so a
    process starting meanwhile took this live one for dead. Silence is made here by stopping
    the connection's backend (SIGSTOP): the probe gives up after OWNER_PROBE_TIMEOUT_S and
    the connection is replaced; once the old backend has ended, the lock is ours again."""
    import os
    import signal

    import anyio

    from dicomweb_server.index.store import ADVISORY_LOCK_CLASS, OWNER_PROBE_TIMEOUT_S

    index = await Index.open(clean_db, max_size=2, timeout_s=30)
    other = await asyncpg.connect(clean_db)
    pid = 0
    try:
        owner = await index.claim_owner(clean_db)
        first = index._owner_conn
        assert first is not None
        backend = pid = first.get_server_pid()
        if not Path(f"/proc/{pid}").exists():
            pytest.skip("the database server is not on this machine: its backend cannot be stopped")
        async with index.keeping_owner():
            os.kill(pid, signal.SIGSTOP)
            with anyio.fail_after(3 + OWNER_PROBE_TIMEOUT_S):  # 30 s before the fix
                while not first.is_closed():
                    await anyio.sleep(0.05)
            os.kill(pid, signal.SIGCONT)
            pid = 0
            held = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
                " AND objid = $2 AND granted AND pid <> $3"
            )
            with anyio.fail_after(10):
                while not await other.fetchval(held, ADVISORY_LOCK_CLASS, owner, backend):
                    await anyio.sleep(0.05)
            assert index._owner_conn is not first
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        await other.close()
        await index.close()


# Seconds between a pooled connection's backend ending and the next query on it: asyncpg
# refused that query with InternalClientError when it had read the backend's FATAL message
# but not yet the end of the connection, at about 1-5 ms here (timing-dependent: each is tried).
_AFTER_BACKEND_ENDED_S = (0.0, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005)


async def test_a_query_on_a_connection_whose_backend_ended_is_unavailable(clean_db: str) -> None:
    """A database restart, an idle-session timeout or an administrator ends the backend of an
    idle pooled connection: the next query on it is a 503 (UNAVAILABLE), never an error of
    asyncpg's own (InternalClientError "cannot switch to state 12; another operation (2) is
    in progress"), which was a 500 and ended a `reindex` with a traceback (found by review,
    stopping PostgreSQL under a reindex). Then the pool connects again."""
    import anyio

    from dicomweb_server.errors import ServiceUnavailableError

    index = await Index.open(clean_db, max_size=1, timeout_s=10)
    other = await asyncpg.connect(clean_db)
    try:
        for delay in _AFTER_BACKEND_ENDED_S * 6:
            row = await index._fetchrow("SELECT pg_backend_pid()")
            assert row is not None
            assert await other.fetchval("SELECT pg_terminate_backend($1)", row[0])
            await anyio.sleep(delay)
            with contextlib.suppress(ServiceUnavailableError):
                await index._fetch("SELECT 1")
        await anyio.sleep(0.1)
        assert await index._fetch("SELECT 1") == [(1,)]
    finally:
        await other.close()
        await index.close()


async def test_the_first_instances_of_a_series_by_key_are_read_from_an_index(
    app_client: httpx.AsyncClient, pg_dsn: str
) -> None:
    """Metadata reads a series' first instances by primary key (_ORDERED_INSTANCES). An index
    on (series_fk, pk) gives them in that order; without one, `ORDER BY i.pk LIMIT` walked the
    primary key of every instance of the archive, filtering on series_fk (a series stored
    after 150,000 instances of another: 13-26 ms a statement instead of 1-2 ms). Tiny tables
    make any plan cheap: forbid sorts and sequential scans and see what is left."""
    series = generate_uid()
    parts = [to_bytes(make_instance(series=series)) for _ in range(3)]
    await app_client.post(f"{ROOT}/studies", content=multipart_body(parts), headers=stow_headers())
    conn = await asyncpg.connect(pg_dsn)
    try:
        pk, count = await conn.fetchrow(
            "SELECT pk, num_instances FROM series WHERE series_instance_uid = $1", series
        )
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_sort = off")
        for text, args in (
            (_METADATA_FIRST, ([pk], [count], 201)),
            (_METADATA_KEYS, ([pk], [count])),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {text}", *args))
            assert "Filter: (series_fk = s.pk)" not in plan, plan
            assert "instance_series_pk" in plan, plan
            assert len(await conn.fetch(text, *args)) >= 1
    finally:
        await conn.close()
