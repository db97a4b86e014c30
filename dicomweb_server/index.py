"""The index over PostgreSQL: the only asyncpg importer.

Two-phase store (STYLE.md rule 11): `reserve_key` hands out a blob key whose reservation row is
committed before the blob is placed (keys are reserved RESERVE_BATCH at a time),
`commit_instance` inserts the patient/study/series/instance rows and drops the reservation in
one transaction, `releasing` drops a reservation while its discarded blob is deleted. A
process holds a session advisory lock on its owner id for its whole life, so reservations of a
dead process are recognised and rolled back at the next start (`dead_reservations`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from dicomweb_server.audit import GENESIS, AuditEvent, AuditRow, chain
from dicomweb_server.errors import ServiceUnavailableError
from dicomweb_server.record import InstanceRecord

__all__ = [
    "ADVISORY_LOCK_CLASS",
    "OWNER_PROBE_INTERVAL_S",
    "ApiKey",
    "CommitResult",
    "Index",
    "MetadataRow",
    "StoredBlob",
    "StoredInstance",
    "not_up_yet",
]

log = logging.getLogger(__name__)

# First key of the two-int advisory lock space used for process liveness ('DCMW').
ADVISORY_LOCK_CLASS = 0x44434D57
# Second key of the advisory lock that serialises appends to the audit chain (owners are > 0
# and the schema lock is 0).
AUDIT_LOCK_KEY = -1
# Audit rows fetched per round trip while walking the chain.
AUDIT_FETCH_ROWS = 1000
# Seconds to wait for a pooled connection before answering 503.
ACQUIRE_TIMEOUT_S = 10.0
# Seconds between liveness probes of the connection that holds the process lock.
OWNER_PROBE_INTERVAL_S = 1.0
# Blob keys reserved in one statement (one round trip, one WAL flush) by `reserve_key`; the
# unused ones are released at close, or rolled back with the process's other reservations.
RESERVE_BATCH = 32
# Retry-After of a 503 answered while the database is unavailable, seconds.
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class CommitResult:
    stored: bool  # a new instance row was inserted
    existing_sha256: bytes | None = None  # set when the SOP Instance UID was already stored
    existing_study_uid: str | None = None
    existing_series_uid: str | None = None
    conflict: str | None = None  # the rows disagree with the index (e.g. series in another study)
    failed: str | None = None  # not stored for another reason (reservation lost, bad value)
    invalid: bool = False  # `failed` because the data set holds a value the index refuses
    reservation_lost: bool = False  # nothing references the blob and no reservation guards it


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret_sha256: bytes
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    blob_key: str
    transfer_syntax_uid: str
    size_bytes: int
    number_of_frames: int
    frame_offsets: list[int] | None
    frame_lengths: list[int] | None
    encapsulated: bool
    # Image Pixel module values (PS3.3 C.7.6.3), None when absent or not integers.
    bits_allocated: int | None = None
    bits_stored: int | None = None
    samples_per_pixel: int | None = None
    pixel_representation: int | None = None
    photometric: str | None = None
    rows: int | None = None
    columns: int | None = None
    is_float: bool = False
    planar_configuration: int | None = None
    # Its series' revision, which `reindex` bumps when it rewrites a row of the series: the
    # blob key names the file, the blob key and revision this row's values. What is made of
    # both (frames decoded by the Image Pixel values above, renderings) is cached under both,
    # so no process serves what it made before a reindex.
    revision: int = 0


@dataclass(frozen=True)
class StoredBlob:
    """An instance row as `reindex` walks them."""

    pk: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    blob_key: str
    sha256: bytes


_LOCATE = """
SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,
       i.blob_key, i.transfer_syntax_uid, i.size_bytes, i.number_of_frames, i.frame_offsets,
       i.frame_lengths, i.encapsulated,
       _us(i.metadata, '00280100'), _us(i.metadata, '00280101'), _us(i.metadata, '00280002'),
       _us(i.metadata, '00280103'), i.metadata #>> '{{00280004,Value,0}}',
       _us(i.metadata, '00280010'), _us(i.metadata, '00280011'),
       i.metadata ?| ARRAY['7FE00008', '7FE00009'], _us(i.metadata, '00280006'),
       se.revision{extra}
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
WHERE st.study_instance_uid = $1
  AND ($2::text IS NULL OR se.series_instance_uid = $2)
  AND ($3::text IS NULL OR i.sop_instance_uid = $3)
ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk
"""

# Stored instances in row-key order, from a key on (keyset pagination), optionally of some
# studies only.
_STORED_INSTANCES = """
SELECT i.pk, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.blob_key,
       i.sha256
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
WHERE i.pk > $1 AND ($3::text[] IS NULL OR st.study_instance_uid = ANY($3::text[]))
ORDER BY i.pk
LIMIT $2
"""

# The BulkDataURIs of an instance's metadata, at any depth (strict mode: lax `**` unwraps
# arrays and would give nested values twice), and its bulk byte ranges.
_BULK_LISTING = (
    ", ARRAY(SELECT jsonb_path_query(i.metadata, 'strict $.**.BulkDataURI') #>> '{}'),"
    " i.bulk_ranges::text"
)


def _tag_path_order(path: str) -> tuple[int, ...]:
    """`54000100/1/54001010` -> (0x54000100, 1, 0x54001010): tags and item numbers compared
    as numbers, so values come in the order of the data set."""
    return tuple(int(p, 16) if i % 2 == 0 else int(p) for i, p in enumerate(path.split("/")))


# A series' version: its instance count plus its revision (bumped by `reindex`). Both only
# grow, so a version names one state of a series' metadata.
_SERIES_VERSIONS = """
SELECT se.series_instance_uid, se.num_instances + se.revision
FROM series se
JOIN study st ON st.pk = se.study_fk
WHERE st.study_instance_uid = $1 AND se.num_instances > 0
ORDER BY se.series_number NULLS LAST, se.pk
"""

# Reads only plain columns and the metadata text: every `->` on a compressed jsonb value
# decompresses it, and the nine lookups of _LOCATE cost more than the rest of this statement.
_SERIES_METADATA = """
SELECT se.num_instances + se.revision, i.transfer_syntax_uid, i.number_of_frames,
       i.metadata::text
FROM series se
JOIN study st ON st.pk = se.study_fk
LEFT JOIN instance i ON i.series_fk = se.pk AND se.num_instances + se.revision <> $3
WHERE st.study_instance_uid = $1 AND se.series_instance_uid = $2 AND se.num_instances > 0
ORDER BY i.instance_number NULLS LAST, i.pk
"""

# Study metadata: the instances of the study's series that are not cached, in one statement.
_SERIES_METADATA_MANY = """
SELECT se.series_instance_uid, se.num_instances + se.revision, i.transfer_syntax_uid,
       i.number_of_frames, i.metadata::text
FROM series se
JOIN study st ON st.pk = se.study_fk
JOIN instance i ON i.series_fk = se.pk
WHERE st.study_instance_uid = $1 AND se.series_instance_uid = ANY($2::text[])
ORDER BY se.pk, i.instance_number NULLS LAST, i.pk
"""


@dataclass(frozen=True)
class MetadataRow:
    """What series metadata needs of an instance."""

    transfer_syntax_uid: str
    number_of_frames: int
    metadata: str  # DICOM JSON text, BulkDataURIs root-relative


class Index:
    def __init__(self, pool: asyncpg.Pool, timeout_s: float) -> None:
        self._pool = pool
        self._timeout = timeout_s
        self._owner_conn: asyncpg.Connection | None = None
        self._owner_guard = asyncio.Lock()
        self._owner_checked = 0.0
        self._dsn = ""
        self._spare: list[str] = []  # reserved keys not handed out yet
        self._spare_guard = asyncio.Lock()
        self.owner = 0

    @classmethod
    async def open(cls, dsn: str, *, max_size: int, timeout_s: float) -> Index:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, reset=_keep_session)
        return cls(pool, timeout_s)

    async def close(self) -> None:
        spare, self._spare = self._spare, []
        if spare:
            with contextlib.suppress(ServiceUnavailableError):  # else rolled back at next start
                await self._execute(
                    "DELETE FROM blob_reservation WHERE blob_key = ANY($1::text[])", spare
                )
        if self._owner_conn is not None:
            await self._owner_conn.close()
            self._owner_conn = None
        await self._pool.close()

    async def apply_schema(self, schema_sql: str) -> None:
        # Serialise concurrent starts (several workers) on the DDL.
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", ADVISORY_LOCK_CLASS)
            await conn.execute(schema_sql)

    async def claim_owner(self, dsn: str) -> int:
        """Take a fresh owner id, held by a session advisory lock until this process ends."""
        self._dsn = dsn
        self._owner_conn = await asyncpg.connect(dsn)
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
            assert self._owner_conn is not None
            got = await self._owner_conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, owner
            )
            if got:
                await self._owner_conn.execute(
                    "SELECT pg_advisory_unlock($1, $2)", ADVISORY_LOCK_CLASS, owner
                )
            return bool(got)

    async def dead_reservations(self) -> list[str]:
        """Blob keys reserved by processes that no longer run."""
        rows = await self._fetch("SELECT blob_key, owner FROM blob_reservation")
        dead: dict[int, bool] = {}
        keys = []
        for row in rows:
            owner = row["owner"]
            if owner != self.owner and owner not in dead:
                dead[owner] = await self.owner_is_dead(owner)
            if owner != self.owner and dead[owner]:
                keys.append(row["blob_key"])
        return keys

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
        now = time.monotonic()
        if self._owner_conn is not None and not self._owner_conn.is_closed():
            if now - self._owner_checked < OWNER_PROBE_INTERVAL_S:
                return
            try:
                await self._owner_conn.fetchval("SELECT 1", timeout=self._timeout)
                self._owner_checked = now
                return
            except _UNAVAILABLE:
                self._owner_conn.terminate()
        conn = None
        try:
            conn = await asyncpg.connect(self._dsn)
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_CLASS, self.owner
            )
        except _UNAVAILABLE as exc:
            if conn is not None:  # connected, then the query failed: not kept open
                conn.terminate()
            raise _unavailable(exc) from exc
        if not got:  # another process took our id for dead and holds it: stop storing
            await conn.close()
            raise ServiceUnavailableError("lost the process lock; restart this server")
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
            except _UNAVAILABLE as exc:
                raise _unavailable(exc) from exc
            tx = conn.transaction()
            try:
                try:
                    await tx.start()
                    gone = await conn.fetchval(
                        "DELETE FROM blob_reservation WHERE blob_key = $1 RETURNING true",
                        blob_key,
                        timeout=self._timeout,
                    )
                except _UNAVAILABLE as exc:
                    raise _unavailable(exc) from exc
                yield bool(gone)
            except BaseException:
                # Shielded (a cancellation reaches the rollback too), within the query timeout.
                deadline = anyio.current_time() + self._timeout
                with anyio.CancelScope(deadline=deadline, shield=True):
                    with contextlib.suppress(*_UNAVAILABLE, asyncpg.PostgresError):
                        await tx.rollback()
                raise
            try:  # the block's own errors (a blob delete's OSError) are not the database's
                await tx.commit()
            except _UNAVAILABLE as exc:
                raise _unavailable(exc) from exc

    async def commit_instance(self, rec: InstanceRecord) -> CommitResult:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return await _commit(conn, rec, self.owner)
        except asyncpg.DataError as exc:
            # S3: a value PostgreSQL refuses (a NUL in text, NaN in JSON, an out-of-range
            # number): a failure of this instance, not of the request.
            return CommitResult(False, failed=f"the index refused a value: {exc}", invalid=True)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def stored_instances(
        self, after_pk: int, limit: int, studies: Sequence[str] | None = None
    ) -> list[StoredBlob]:
        """Up to `limit` stored instances with a row key above `after_pk`, in key order (the
        walk of `reindex`), of the given studies only when `studies` is not None."""
        rows = await self._fetch(_STORED_INSTANCES, after_pk, limit, studies)
        return [StoredBlob(*row) for row in rows]

    async def reindex_instance(self, rec: InstanceRecord) -> str:
        """Rewrite an instance's rows from its file parsed again (schema.sql's
        dicomweb_reindex_instance): 'updated', 'unchanged', 'missing', or why the index
        refused a value."""
        try:
            row = await self._fetchrow(_REINDEX, *_record_args(rec))
        except asyncpg.DataError as exc:  # as in commit_instance
            return f"the index refused a value: {exc}"
        assert row is not None
        outcome: str = row[0]
        return outcome

    async def locate(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[StoredInstance]:
        rows = await self._fetch(_LOCATE.format(extra=""), study, series, sop)
        return [StoredInstance(*row) for row in rows]

    async def metadata_texts(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[tuple[StoredInstance, str]]:
        rows = await self._fetch(_LOCATE.format(extra=", i.metadata::text"), study, series, sop)
        return [(StoredInstance(*row[:-1]), row[-1]) for row in rows]

    async def series_versions(self, study: str) -> list[tuple[str, int]]:
        """(Series Instance UID, version) of a study's series that hold instances, in the order
        metadata lists them. A version (_SERIES_VERSIONS) names one state of a series."""
        rows = await self._fetch(_SERIES_VERSIONS, study)
        return [(row[0], row[1]) for row in rows]

    async def series_metadata(
        self, study: str, series: str, known_version: int
    ) -> tuple[int, list[MetadataRow]] | None:
        """(the series' version, and, unless that is `known_version`, each instance's transfer
        syntax, number of frames and DICOM JSON text in metadata order), from one statement,
        so the version and the rows are of one snapshot; None: no such series."""
        rows = await self._fetch(_SERIES_METADATA, study, series, known_version)
        if not rows:
            return None
        version = rows[0][0]
        if version == known_version:
            return version, []
        return version, [MetadataRow(row[1], row[2], row[3]) for row in rows]

    async def series_metadata_many(
        self, study: str, series: Sequence[str]
    ) -> dict[str, tuple[int, list[MetadataRow]]]:
        """series_metadata of several series of a study in one statement (a study of many
        series costs two statements on first access, not one per series): per Series
        Instance UID found, its version and rows, read in one snapshot."""
        rows = await self._fetch(_SERIES_METADATA_MANY, study, list(series))
        out: dict[str, tuple[int, list[MetadataRow]]] = {}
        for row in rows:
            out.setdefault(row[0], (row[1], []))[1].append(MetadataRow(row[2], row[3], row[4]))
        return out

    async def bulk_range(self, study: str, series: str, sop: str, path: str) -> list[Any] | None:
        rows = await self._fetch(_LOCATE.format(extra=", i.bulk_ranges -> $4"), study, series, sop,
                                 path)  # fmt: skip
        if not rows:
            return None
        value = rows[0][-1]
        return list(json.loads(value)) if value else []

    async def bulk_listing(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[tuple[StoredInstance, list[str], dict[str, list[Any]]]]:
        """Per instance, in retrieve order: the instance, the tag paths of every BulkDataURI its
        metadata holds (nested ones too, in DICOM order), and its recorded bulk byte ranges."""
        rows = await self._fetch(_LOCATE.format(extra=_BULK_LISTING), study, series, sop)
        out = []
        for row in rows:
            paths = [uri.rpartition("/bulk/")[2] for uri in row[-2]]
            paths.sort(key=_tag_path_order)
            out.append((StoredInstance(*row[:-2]), paths, json.loads(row[-1])))
        return out

    async def search(self, sql_text: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        return await self._fetch(sql_text, *args)

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def counts(self) -> dict[str, int]:
        row = await self._fetchrow(
            "SELECT (SELECT count(DISTINCT patient_fk) FROM study WHERE num_instances > 0)"
            " AS patients,"
            " (SELECT count(*) FROM study WHERE num_instances > 0) AS studies,"
            " (SELECT count(*) FROM series WHERE num_instances > 0) AS series,"
            " (SELECT count(*) FROM instance) AS instances"
        )
        assert row is not None
        return dict(row)

    # API keys

    async def add_api_key(self, key_id: str, secret_sha256: bytes, role: str, name: str) -> None:
        await self._execute(
            "INSERT INTO api_key (key_id, secret_sha256, role, name) VALUES ($1, $2, $3, $4)",
            key_id, secret_sha256, role, name,
        )  # fmt: skip

    async def api_key(self, key_id: str) -> ApiKey | None:
        row = await self._fetchrow("SELECT * FROM api_key WHERE key_id = $1", key_id)
        return None if row is None else ApiKey(**dict(row))

    async def api_keys(self) -> list[ApiKey]:
        return [
            ApiKey(**dict(r))
            for r in await self._fetch("SELECT * FROM api_key ORDER BY created_at")
        ]

    async def revoke_api_key(self, key_id: str) -> bool:
        rows = await self._fetch(
            "UPDATE api_key SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL"
            " RETURNING key_id",
            key_id,
        )
        return bool(rows)

    # The audit trail

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append events to the chain: under a transaction-scoped advisory lock, so that
        processes sharing the database take turns and each row links to the true last one."""
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)", ADVISORY_LOCK_CLASS, AUDIT_LOCK_KEY
                )
                last = await conn.fetchval("SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                links = chain(GENESIS if last is None else bytes(last), events)
                await conn.executemany(
                    "INSERT INTO audit_log (at, caller, client, action, uids, outcome, bytes,"
                    " detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    [(e.time, e.caller, e.client, e.action, list(e.uids), e.outcome, e.nbytes,
                      e.detail, prev, digest)
                     for e, (prev, digest) in zip(events, links, strict=True)],
                    timeout=self._timeout,
                )  # fmt: skip
        except asyncpg.DataError as exc:  # a value PostgreSQL refuses: not worth a retry
            raise ValueError(f"the audit trail refused a value: {exc}") from exc
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:  # away, restarting, full, ...
            raise _unavailable(exc) from exc

    async def audit_rows(self, after_seq: int = 0) -> AsyncIterator[AuditRow]:
        """Every audit row after `after_seq`, in chain order, a page at a time."""
        while True:
            rows = await self._fetch(
                "SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                after_seq, AUDIT_FETCH_ROWS,
            )  # fmt: skip
            for r in rows:
                event = AuditEvent(
                    r["at"], r["caller"], r["client"], r["action"], tuple(r["uids"]),
                    r["outcome"], r["bytes"], r["detail"],
                )  # fmt: skip
                yield AuditRow(r["seq"], event, bytes(r["prev_hash"]), bytes(r["hash"]))
            if len(rows) < AUDIT_FETCH_ROWS:
                return
            after_seq = rows[-1]["seq"]

    async def _fetch(self, sql_text: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return list(await conn.fetch(sql_text, *args, timeout=self._timeout))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def _fetchrow(self, sql_text: str, *args: Any) -> asyncpg.Record | None:
        rows = await self._fetch(sql_text, *args)
        return rows[0] if rows else None

    async def _execute(self, sql_text: str, *args: Any) -> None:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await conn.execute(sql_text, *args, timeout=self._timeout)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc


# What a lost or overloaded database raises (the pool replaces broken connections by itself).
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)


def not_up_yet(exc: BaseException) -> bool:
    """Whether opening the index failed for a database that may answer in a moment: nothing
    listens at its address yet (a service started beside ours; on a Unix socket, the socket
    file is not there yet), or PostgreSQL is starting up or recovering."""
    return isinstance(
        exc, ConnectionRefusedError | FileNotFoundError | asyncpg.CannotConnectNowError
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (one round trip per use): pooled connections
    never carry session state (no SET, LISTEN, cursors or session advisory locks: the process
    lock has its own connection). asyncpg still rolls back a transaction left open."""


def _unavailable(exc: BaseException) -> ServiceUnavailableError:
    """503 with Retry-After (RFC 9110 10.2.3): the request may succeed when repeated."""
    return ServiceUnavailableError(
        f"database unavailable: {exc}", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


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


async def _commit(conn: asyncpg.Connection, rec: InstanceRecord, owner: int) -> CommitResult:
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
