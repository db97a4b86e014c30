"""The embedded PostgreSQL's watchdog (EmbeddedPostgres.revive) and another process joining
the cluster while its postmaster is down: the handle list and the postmaster recorded must
follow, or the cluster is stopped under `serve`, or outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dicomweb_server.embedded_db import EmbeddedPostgres

# Seconds a process is given to end or start.
WAIT_S = 60.0


def _postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(what)


def _killed(pgdata: Path) -> int:
    """The postmaster SIGKILLed, and reaped (its socket lock names it while it is a zombie)."""
    pid = _postmaster(pgdata)
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not psutil.pid_exists(pid), "the killed postmaster was not reaped")
    return pid


def _joining(pgdata: Path) -> subprocess.Popen[bytes]:
    """Another process using the cluster (as `reindex` does) until its stdin closes."""
    code = (
        "import sys; from pathlib import Path;"
        " from dicomweb_server.embedded_db import EmbeddedPostgres;"
        f" EmbeddedPostgres(Path({str(pgdata)!r})); print('up', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    return proc


@pytest.mark.parametrize("revived", ["after it left", "while it runs"])
def test_a_process_joining_while_the_cluster_is_down(tmp_path: Path, revived: str) -> None:
    """The postmaster killed under `serve`; `reindex` starts it again before the watchdog
    does, and drops `serve` from the cluster's users (their server was gone). Before:
    `reindex` leaving stopped the cluster under `serve`, and the one the watchdog started
    then outlived `serve`'s stop (nobody left in the list to stop it)."""
    pgdata = tmp_path / "pg"
    server = EmbeddedPostgres(pgdata)
    other: subprocess.Popen[bytes] | None = None
    try:
        dead = _killed(pgdata)
        other = _joining(pgdata)
        if revived == "after it left":
            other.communicate(timeout=WAIT_S)
            assert server.revive() is True
        else:
            assert server.revive() is False  # running: started by the other process
            other.communicate(timeout=WAIT_S)
            assert _running(_postmaster(pgdata)), "stopped under the server by another's exit"
        postmaster = _postmaster(pgdata)
        assert postmaster != dead
        server.stop()
        _wait(lambda: not _running(postmaster), "the cluster outlived the server's stop")
    finally:
        if other is not None and other.poll() is None:
            other.kill()
            other.wait(timeout=WAIT_S)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(_postmaster(pgdata), signal.SIGTERM)
