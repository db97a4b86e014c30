"""The two-phase store, and the process lock that makes it safe.

Two-phase store (STYLE.md rule 11): `reserve_key` hands out a blob key whose reservation row is
committed before the blob is placed (keys are reserved RESERVE_BATCH at a time),
`commit_instance` inserts the patient/study/series/instance rows and drops the reservation in
one transaction, `releasing` drops a reservation while its discarded blob is deleted. A
process holds a session advisory lock on its owner id for its whole life, so reservations of a
dead process are recognised and rolled back at the next start (`reservations`, `dead_owners`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio

from dicomweb_server.errors import ServiceUnavailableError
from dicomweb_server.index.pool import (
    ACQUIRE_TIMEOUT_S,
    DATABASE_ERROR,
    REFUSED_VALUE,
    ROLLED_BACK,
    UNAVAILABLE,
    Connection,
    Pool,
    Pooled,
    connect,
    unavailable,
)
from dicomweb_server.index.rows import CommitResult
from dicomweb_server.record import InstanceRecord

__all__ = [
    "ADVISORY_LOCK_CLASS",
    "OWNER_PROBE_INTERVAL_S",
    "OWNER_PROBE_TIMEOUT_S",
    "RECOVERY_GRACE_S",
    "Store",
]

log = logging.getLogger(__name__)

# First key of the two-int advisory lock space used for process liveness ('DCMW').
ADVISORY_LOCK_CLASS = 0x44434D57
# Seconds between liveness probes of the connection that holds the process lock.
OWNER_PROBE_INTERVAL_S = 1.0
# Seconds a probe (SELECT 1) may take before its connection is taken for dead and replaced:
# one gone silent (a database failover, a network cut) did not answer for the whole query
# timeout, 30 s, which the lock stayed lost for. With this, a live process takes its lock
# again within about two seconds of its connection's end, inside RECOVERY_GRACE_S.
OWNER_PROBE_TIMEOUT_S = OWNER_PROBE_INTERVAL_S
# Seconds a process whose lock is free is given to take it again before it is taken for dead
# (`dead_owners`): a live one whose lock connection dropped (a database restart, an
# idle-session timeout) takes it again within a probe interval (`keeping_owner`), and one
# taken for dead meanwhile lost its in-flight stores and spool files to the recovery.
RECOVERY_GRACE_S = 3 * OWNER_PROBE_INTERVAL_S
# Blob keys reserved in one statement (one round trip, one WAL flush) by `reserve_key`; the
# unused ones are released at close, or rolled back with the process's other reservations.
RESERVE_BATCH = 32


class Store(Pooled):
    """The two-phase store: the process's owner lock, blob key reservations, and the instance
    rows committed (and rewritten by `reindex`)."""

    def __init__(self, pool: Pool, timeout_s: float) -> None:
        super().__init__(pool, timeout_s)
        self._owner_conn: Connection | None = None
        self._owner_guard = asyncio.Lock()
        self._owner_checked = 0.0
        self._dsn = ""
        self._spare: list[str] = []  # reserved keys not handed out yet
        self._spare_guard = asyncio.Lock()
        self.owner = 0

    async def claim_owner(self, dsn: str) -> int:
        """Take a fresh owner id, held by a session advisory lock until this process ends."""
        self._dsn = dsn
        self._owner_conn = await connect(dsn)
        while True:
            owner = secrets.randbelow(2**31 - 1) + 1
            got = await self._owner_conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, owner
            )
            if got:
                self.owner = owner
                return owner

    async def owner_is_dead(self, owner: int) -> bool:
        async with self._owner_guard:  # the lock connection serves one operation at a time
            # On the lock connection as it is now: one that dropped (or that the keeper
            # replaced) is taken again first, our own lock with it (found by review: start-up
            # recovery asked on a closed connection and failed with InterfaceError).
            await self._ensure_owner_locked()
            conn = self._owner_conn
            assert conn is not None
            try:
                got = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, owner
                )
                if got:
                    await conn.execute(
                        "SELECT pg_advisory_unlock($1, $2)", ADVISORY_LOCK_CLASS, owner
                    )
            except UNAVAILABLE as exc:
                raise unavailable(exc) from exc
            return bool(got)

    async def reservations(self) -> list[tuple[str, int]]:
        """Every blob reservation: (blob key, owner)."""
        rows = await self._fetch("SELECT blob_key, owner FROM blob_reservation")
        return [(row["blob_key"], row["owner"]) for row in rows]

    async def dead_owners(self, owners: Iterable[int]) -> set[int]:
        """Of `owners`, those other than us whose process lock is free now and still free
        RECOVERY_GRACE_S later. Free once is not dead: within about a second of the database
        coming back, a live process has not taken its lock again yet, and a process starting
        then took it for dead and rolled back its stores in flight. The wait is only paid when
        some owner looks dead (after a crash)."""
        looks_dead = [o for o in set(owners) if o != self.owner and await self.owner_is_dead(o)]
        if not looks_dead:
            return set()
        log.info(
            "%d other processes look dead (their lock is free): asking again in %s s before"
            " rolling back what they left",
            len(looks_dead),
            RECOVERY_GRACE_S,
        )
        await asyncio.sleep(RECOVERY_GRACE_S)
        return {o for o in looks_dead if await self.owner_is_dead(o)}

    @contextlib.asynccontextmanager
    async def keeping_owner(self) -> AsyncIterator[None]:
        """Our process lock probed every OWNER_PROBE_INTERVAL_S while the block runs, and
        taken again as soon as it was lost, whether anything is stored or not. Taken again
        only by the next store, an idle process whose lock connection had dropped (a
        database restart, an idle-session timeout) looked dead to every process starting
        meanwhile, which rolled back its reservations and removed its spool files
        (app.recover). The probe also keeps that connection from being idle."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(OWNER_PROBE_INTERVAL_S)
                try:
                    await self._ensure_owner()
                except ServiceUnavailableError:
                    # The database is away, or another process asking whether we are alive
                    # holds our lock at this moment: the next probe tries again.
                    pass
                except Exception:  # the keeper goes on, whatever one probe met
                    log.exception("probing the process lock failed")

        task = asyncio.create_task(keep(), name="process-lock-keeper")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _ensure_owner(self) -> None:
        """Re-take our advisory lock if its connection was lost (the database restarted):
        without it, another process starting now would roll back our reservations.

        One connection serves the lock, so concurrent stores take turns here, and the
        liveness probe (a dead socket is only noticed when used) runs at most once a second.
        """
        async with self._owner_guard:
            await self._ensure_owner_locked()

    async def _ensure_owner_locked(self) -> None:
        if await self._owner_alive():
            return
        conn = await self._lock_connection()
        self._owner_conn = conn
        self._owner_checked = time.monotonic()
        # While the lock was not held, another process may have rolled back our reservations:
        # the spare keys are dropped (their rows too, if still there) and reserved afresh.
        spare, self._spare = self._spare, []
        if spare:
            with contextlib.suppress(ServiceUnavailableError):  # else at our next start
                await self._execute(
                    "DELETE FROM blob_reservation WHERE blob_key = ANY($1::text[])", spare
                )

    async def _owner_alive(self) -> bool:
        """Whether the lock connection is open and answered within OWNER_PROBE_INTERVAL_S
        (asked now if not). One that does not answer is terminated: its lock is taken again."""
        now = time.monotonic()
        if self._owner_conn is None or self._owner_conn.is_closed():
            return False
        if now - self._owner_checked < OWNER_PROBE_INTERVAL_S:
            return True
        try:
            await self._owner_conn.fetchval("SELECT 1", timeout=OWNER_PROBE_TIMEOUT_S)
            self._owner_checked = now
            return True
        except Exception:
            # Not only UNAVAILABLE: a probe meeting the connection's end can also get
            # asyncpg's InternalClientError ("cannot switch to state ..."). A connection
            # that cannot answer SELECT 1 is not trusted with the lock: taken again.
            self._owner_conn.terminate()
        return False

    async def _lock_connection(self) -> Connection:
        """A new connection holding our process lock (_ensure_owner_locked), or 503."""
        conn = None
        try:
            conn = await connect(self._dsn)
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, self.owner
            )
        except BaseException as exc:
            # Connected, then the query failed or was cancelled (the keeper at shutdown, a
            # STOW whose client left): the connection is not kept open, whatever ended it.
            if conn is not None:
                conn.terminate()
            if isinstance(exc, (*UNAVAILABLE, DATABASE_ERROR)):
                raise unavailable(exc) from exc
            raise
        if not got:
            # Held elsewhere for the moment: by our old connection's backend, not yet ended,
            # or by a process starting that asks whether we live (owner_is_dead lets go at
            # once). The next store, or the keeper within a second, tries again.
            await conn.close()
            raise ServiceUnavailableError(
                "the process lock is held elsewhere for the moment; try again",
                headers={"Retry-After": "1"},
            )
        return conn

    async def reserve(self, blob_key: str) -> None:
        await self._ensure_owner()
        await self._execute(
            "INSERT INTO blob_reservation (blob_key, owner) VALUES ($1, $2)", blob_key, self.owner
        )

    @property
    def spare_keys(self) -> tuple[str, ...]:
        """Keys reserved and not handed out yet: rows of blob_reservation with no blob."""
        return tuple(self._spare)

    async def reserve_key(self, new_key: Callable[[], str]) -> str:
        """A blob key whose reservation row is committed: a blob may be placed under it.

        Keys are reserved RESERVE_BATCH at a time and handed out one by one, so a store costs
        a fraction of a round trip here. Nothing is awaited after a key is taken from the
        spares: a cancelled caller has either no key or one it will release.
        """
        await self._ensure_owner()
        async with self._spare_guard:
            if not self._spare:
                keys = [new_key() for _ in range(RESERVE_BATCH)]
                # Shielded: the rows and the spare list stay in step if the caller is cancelled.
                with anyio.CancelScope(shield=True):
                    await self._execute(
                        "INSERT INTO blob_reservation (blob_key, owner)"
                        " SELECT k, $2 FROM unnest($1::text[]) AS k",
                        keys,
                        self.owner,
                    )
                self._spare = keys
            return self._spare.pop()

    @contextlib.asynccontextmanager
    async def releasing(self, blob_key: str) -> AsyncIterator[bool]:
        """Drop a reservation in a transaction held open through the block, which is told
        whether it existed (then the blob is the block's to delete). A commit of an instance
        with this blob waits meanwhile, then finds the reservation gone and stores nothing;
        if the block raises, the reservation stays, so the blob is never left unreferenced
        and unreserved (a blob deleted first, then released, was stored by a commit in
        between: app.recover)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(
                    self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S)
                )
            except UNAVAILABLE as exc:
                raise unavailable(exc) from exc
            tx = conn.transaction()
            try:
                try:
                    await tx.start()
                    gone = await conn.fetchval(
                        "DELETE FROM blob_reservation WHERE blob_key = $1 RETURNING true",
                        blob_key,
                        timeout=self._timeout,
                    )
                except UNAVAILABLE as exc:
                    raise unavailable(exc) from exc
                yield bool(gone)
            except BaseException:
                # Shielded (a cancellation reaches the rollback too), within the query timeout.
                deadline = anyio.current_time() + self._timeout
                with anyio.CancelScope(deadline=deadline, shield=True):
                    with contextlib.suppress(*UNAVAILABLE, DATABASE_ERROR):
                        await tx.rollback()
                raise
            try:  # the block's own errors (a blob delete's OSError) are not the database's
                await tx.commit()
            except UNAVAILABLE as exc:
                raise unavailable(exc) from exc

    async def commit_instance(self, rec: InstanceRecord) -> CommitResult:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return await _commit(conn, rec, self.owner)
        except REFUSED_VALUE as exc:
            # S3: a value PostgreSQL refuses (a NUL in text, NaN in JSON, an out-of-range
            # number): a failure of this instance, not of the request.
            return CommitResult(False, failed=f"the index refused a value: {exc}", invalid=True)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def replace_blob(self, old_key: str, rec: InstanceRecord) -> str:
        """Make `rec`'s blob (placed and reserved, as for commit_instance) the blob of the
        stored instance whose blob is `old_key`, lost or damaged: the instance row takes the
        new key and the new file's layout (size, hash, frame and bulk data offsets: its File
        Meta Information may differ), the new key's reservation is dropped and `old_key` is
        reserved in its place, all in one transaction, so that a crash before the caller
        deletes what is left under `old_key` leaves it to `recover`. The study row is locked
        first, as a commit does. 'replaced'; 'moved' when the row no longer holds `old_key`
        (another store repaired it first: the new blob is the caller's to delete);
        'reservation-lost' as in commit_instance."""
        sop = rec.instance["sop_instance_uid"]
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                return await _replace(conn, old_key, rec, self.owner, sop)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def reindex_instance(self, rec: InstanceRecord) -> str:
        """Rewrite an instance's rows from its file parsed again (schema.sql's
        dicomweb_reindex_instance): 'updated', 'unchanged', 'missing', or why the index
        refused a value or failed. A deadlock (with a process starting, a commit, another
        reindex) is tried again, up to REINDEX_ATTEMPTS times; any other error of the
        database is this instance's failure, not the end of the run (found by a load run: one
        deadlock ended a `reindex` with a traceback). A database gone is UNAVAILABLE (503)."""
        for attempt in range(1, REINDEX_ATTEMPTS + 1):
            try:
                row = await self._fetchrow(_REINDEX, *_record_args(rec))
                break
            except REFUSED_VALUE as exc:  # as in commit_instance
                return f"the index refused a value: {exc}"
            except ROLLED_BACK as exc:
                if attempt == REINDEX_ATTEMPTS:
                    return f"the database rolled it back {attempt} times: {exc}"
            except DATABASE_ERROR as exc:
                return f"the database failed on it: {type(exc).__name__}: {exc}"
        assert row is not None
        outcome: str = row[0]
        return outcome


# Times an instance's rewrite is run when PostgreSQL rolls it back (ROLLED_BACK).
REINDEX_ATTEMPTS = 3

_COMMIT = "SELECT * FROM dicomweb_commit_instance(" + ", ".join(f"${n}" for n in range(1, 40)) + ")"
_REINDEX = "SELECT dicomweb_reindex_instance(" + ", ".join(f"${n}" for n in range(1, 39)) + ")"


def _record_args(rec: InstanceRecord) -> tuple[Any, ...]:
    """The 38 row values of an instance, in the parameter order of schema.sql's
    dicomweb_commit_instance and dicomweb_reindex_instance."""
    p, st, se, i = rec.patient, rec.study, rec.series, rec.instance
    return (
        p["patient_id"], p["issuer_of_patient_id"], p["patient_name"], p["patient_birth_date"],
        p["patient_sex"],
        st["study_instance_uid"], st["study_date"], st["study_time"], st["accession_number"],
        st["study_id"], st["study_description"], st["referring_physician_name"],
        st["patient_name"], st["attrs"], st["referring_physician_name_text"],
        st["patient_name_text"],
        se["series_instance_uid"], se["modality"], se["series_number"],
        se["series_description"], se["body_part_examined"], se["pps_start_date"],
        se["pps_start_time"], se["attrs"],
        i["sop_instance_uid"], i["sop_class_uid"], i["instance_number"],
        i["acquisition_datetime"], i["blob_key"], i["transfer_syntax_uid"], i["size_bytes"],
        i["sha256"], i["number_of_frames"], i["frame_offsets"], i["frame_lengths"],
        i["encapsulated"], i["metadata"], i["bulk_ranges"],
    )  # fmt: skip


async def _commit(conn: Connection, rec: InstanceRecord, owner: int) -> CommitResult:
    """One round trip: schema.sql's dicomweb_commit_instance does every step."""
    row = await conn.fetchrow(_COMMIT, *_record_args(rec), owner)
    if row["outcome"] == "stored":
        return CommitResult(True)
    if row["outcome"] == "reservation-lost":
        return CommitResult(
            False,
            failed="the blob reservation was rolled back by another process",
            reservation_lost=True,
        )
    if row["outcome"] == "series-conflict":
        return CommitResult(False, conflict="the series belongs to another study in the archive")
    return CommitResult(
        False,
        existing_sha256=bytes(row["existing_sha256"]),
        existing_series_uid=row["existing_series"],
        existing_study_uid=row["existing_study"],
    )


async def _replace(
    conn: Connection, old_key: str, rec: InstanceRecord, owner: int, sop: str
) -> str:
    study = await conn.fetchval(
        "SELECT se.study_fk FROM instance i JOIN series se ON se.pk = i.series_fk"
        " WHERE i.sop_instance_uid = $1",
        sop,
    )
    if study is None:
        return "moved"
    await conn.execute("SELECT 1 FROM study WHERE pk = $1 FOR UPDATE", study)
    held = await conn.fetchval(
        "SELECT blob_key FROM instance WHERE sop_instance_uid = $1 FOR UPDATE", sop
    )
    if held != old_key:
        return "moved"
    i = rec.instance
    if not await conn.fetchval(
        "DELETE FROM blob_reservation WHERE blob_key = $1 AND owner = $2 RETURNING true",
        i["blob_key"],
        owner,
    ):
        return "reservation-lost"
    await conn.execute(
        "UPDATE instance SET blob_key = $2, transfer_syntax_uid = $3, size_bytes = $4,"
        " sha256 = $5, frame_offsets = $6, frame_lengths = $7, encapsulated = $8,"
        " bulk_ranges = $9 WHERE sop_instance_uid = $1",
        sop, i["blob_key"], i["transfer_syntax_uid"], i["size_bytes"], i["sha256"],
        i["frame_offsets"], i["frame_lengths"], i["encapsulated"], i["bulk_ranges"],
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO blob_reservation (blob_key, owner) VALUES ($1, $2)"
        " ON CONFLICT (blob_key) DO NOTHING",
        old_key,
        owner,
    )
    return "replaced"
