"""What every part of the index shares, and the package's one door to asyncpg (STYLE: asyncpg
is imported here and nowhere else): the pool and the per-query timeout (`Pooled`), the three
ways a statement runs through them, opening pools and lone connections, the errors the other
modules tell apart, and the 503 a lost or overloaded database becomes."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from asyncpg import Connection, Pool, Record  # for annotations elsewhere in the package

from dicomweb_server.errors import ServiceUnavailableError

__all__ = [
    "DATABASE_ERROR",
    "REFUSED_VALUE",
    "ROLLED_BACK",
    "UNAVAILABLE",
    "Connection",
    "Pool",
    "Pooled",
    "Record",
    "connect",
    "create_pool",
    "not_up_yet",
    "unavailable",
]

# Any error PostgreSQL reports for a statement (a lost connection is UNAVAILABLE below).
DATABASE_ERROR = asyncpg.PostgresError
# A value PostgreSQL refuses (a NUL in text, NaN in JSON, an out-of-range number): a failure
# of the value, not worth a retry.
REFUSED_VALUE = asyncpg.DataError
# A transaction PostgreSQL rolled back for another's sake (a deadlock, a serialization failure:
# SQLSTATE class 40): the same statement may succeed when run again.
ROLLED_BACK = asyncpg.TransactionRollbackError

# Seconds to wait for a pooled connection before answering 503.
ACQUIRE_TIMEOUT_S = 10.0
# Retry-After of a 503 answered while the database is unavailable, seconds.
RETRY_AFTER_S = 5


class Pooled:
    """The pool and the timeout each concern of Index queries through."""

    def __init__(self, pool: Pool, timeout_s: float) -> None:
        self._pool = pool
        self._timeout = timeout_s

    async def _fetch(self, sql_text: str, *args: Any) -> list[Record]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return list(await conn.fetch(sql_text, *args, timeout=self._timeout))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def _fetchrow(self, sql_text: str, *args: Any) -> Record | None:
        rows = await self._fetch(sql_text, *args)
        return rows[0] if rows else None

    async def _execute(self, sql_text: str, *args: Any) -> None:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await conn.execute(sql_text, *args, timeout=self._timeout)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc


log = logging.getLogger(__name__)

# What a lost or overloaded database raises (the pool replaces broken connections by itself).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    # A pooled connection whose backend ended while it was idle (a database restart, an idle
    # session timeout, an administrator), when asyncpg read the backend's FATAL message
    # before the end of the connection: the next query on it is refused with "cannot switch
    # to state 12; another operation (2) is in progress" (found by review: a 500, and a
    # `reindex` stopped by PostgreSQL shutting down ended in its traceback).
    asyncpg.InternalClientError,
)


def unavailable(exc: BaseException) -> ServiceUnavailableError:
    """503 with Retry-After (RFC 9110 10.2.3): the request may succeed when repeated. What
    failed (the database's address, the network's error) is logged, not told to the client."""
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return ServiceUnavailableError(
        "database unavailable; try again later", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


async def create_pool(dsn: str, *, max_size: int, read_only: bool = False) -> Pool:
    # default_transaction_read_only: a session setting given at connect, so it holds for
    # every connection the pool opens, the ones that replace broken ones too.
    settings = {"default_transaction_read_only": "on"} if read_only else None
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, reset=_keep_session, server_settings=settings
    )


async def _keep_session(conn: Connection) -> None:
    """Pool release without asyncpg's reset query (one round trip per use): pooled connections
    never carry session state (no SET, LISTEN, cursors or session advisory locks: the process
    lock has its own connection). asyncpg still rolls back a transaction left open."""


async def connect(dsn: str) -> Connection:
    """A connection of its own, outside the pool (the process lock's)."""
    return await asyncpg.connect(dsn)


def not_up_yet(exc: BaseException) -> bool:
    """Whether opening the index failed for a database that may answer in a moment: nothing
    listens at its address yet (a service started beside ours; on a Unix socket, the socket
    file is not there yet), or PostgreSQL is starting up or recovering."""
    return isinstance(
        exc, ConnectionRefusedError | FileNotFoundError | asyncpg.CannotConnectNowError
    )
