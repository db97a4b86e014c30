"""Index: the one object callers hold, made of the concerns of the other submodules, and
the pool's life: opened, schema applied, pinged, closed."""

from __future__ import annotations

import contextlib

from dicomweb_server.errors import ServiceUnavailableError
from dicomweb_server.index.pool import create_pool
from dicomweb_server.index.reads import Reads
from dicomweb_server.index.security import Security
from dicomweb_server.index.store import ADVISORY_LOCK_CLASS, Store
from dicomweb_server.index.walk import Walk

__all__ = ["Index"]


class Index(Reads, Store, Security, Walk):
    @classmethod
    async def open(
        cls, dsn: str, *, max_size: int, timeout_s: float, read_only: bool = False
    ) -> Index:
        """`read_only`: every transaction of the pool's sessions is read-only (PostgreSQL
        refuses any write): for a command that must change nothing (`check`)."""
        pool = await create_pool(dsn, max_size=max_size, read_only=read_only)
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
