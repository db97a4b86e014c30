"""What every part of the index shares: the asyncpg pool and the per-query timeout
(`Pooled`), the three ways a statement runs through them, and the 503 a lost or overloaded
database becomes."""

from __future__ import annotations

from typing import Any

import asyncpg

from dicomweb_server.errors import ServiceUnavailableError

__all__ = ["UNAVAILABLE", "Pooled", "unavailable"]

# Seconds to wait for a pooled connection before answering 503.
ACQUIRE_TIMEOUT_S = 10.0
# Retry-After of a 503 answered while the database is unavailable, seconds.
RETRY_AFTER_S = 5


class Pooled:
    """The pool and the timeout each concern of Index queries through."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float) -> None:
        self._pool = pool
        self._timeout = timeout_s

    async def _fetch(self, sql_text: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return list(await conn.fetch(sql_text, *args, timeout=self._timeout))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def _fetchrow(self, sql_text: str, *args: Any) -> asyncpg.Record | None:
        rows = await self._fetch(sql_text, *args)
        return rows[0] if rows else None

    async def _execute(self, sql_text: str, *args: Any) -> None:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await conn.execute(sql_text, *args, timeout=self._timeout)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc


# What a lost or overloaded database raises (the pool replaces broken connections by itself).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)


def unavailable(exc: BaseException) -> ServiceUnavailableError:
    """503 with Retry-After (RFC 9110 10.2.3): the request may succeed when repeated."""
    return ServiceUnavailableError(
        f"database unavailable: {exc}", headers={"Retry-After": str(RETRY_AFTER_S)}
    )
