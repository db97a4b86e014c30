"""Index: the one object callers hold, made of the concerns of the other submodules, and
the pool's life: opened, schema applied, pinged, closed."""

from __future__ import annotations

import contextlib

import asyncpg

from dicomweb_server.errors import ServiceUnavailableError
from dicomweb_server.index.reads import Reads
from dicomweb_server.index.security import Security
from dicomweb_server.index.store import ADVISORY_LOCK_CLASS, Store

__all__ = ["Index", "not_up_yet"]


class Index(Reads, Store, Security):
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

    async def ping(self) -> None:
        await self._fetch("SELECT 1")


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
