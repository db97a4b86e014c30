"""`serve` as an operator meets it: start, stop, kill, restart, and the one-line refusals.

Tests that start processes bound each wait and end what they started by its PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psutil
import pytest

from dicomweb_server.config import ConfigError, Settings
from dicomweb_server.embedded_db import EmbeddedPostgres
from tests.helpers import make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import free_port, start

# Seconds a process is given to end, or a refused command to answer.
END_TIMEOUT_S = 30.0


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _gone(pid: int, timeout_s: float = END_TIMEOUT_S) -> bool:
    """Whether `pid` ends (or is a zombie) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _ending(*pids: int) -> Iterator[list[int]]:
    """PIDs (more may be appended) sent SIGKILL on the way out if still running."""
    mine = list(pids)
    try:
        yield mine
    finally:
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stop_cluster(pgdata: Path) -> None:
    """End the postmaster under `pgdata` if one was left (a failing test's leftover)."""
    with contextlib.suppress(OSError, ValueError, ProcessLookupError):
        os.kill(_postmaster_pid(pgdata), signal.SIGTERM)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "dicomweb_server", *args],
        capture_output=True,
        text=True,
        timeout=END_TIMEOUT_S,
        check=False,
        env=env,
    )


def _one_line_refusal(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dicomweb-server: "), r.stderr[-2000:]
    for word in words:
        assert word in lines[0]
    return lines[0]


def test_killed_server_leaves_no_postgres_after_next_stop(tmp_path: Path) -> None:
    """A SIGKILLed `serve` leaves its embedded PostgreSQL running; the next `serve` takes it
    over and stops it when it stops (the dead PID no longer counts as a user)."""
    data = tmp_path / "data"
    pgdata = data / "postgres"
    try:
        first = start(data, None)
        with _ending(first.proc.pid):
            postmaster = _postmaster_pid(pgdata)
            first.kill()
        assert not _gone(postmaster, 0.5)  # nobody left to stop it
        second = start(data, None)
        with _ending(second.proc.pid):
            assert _postmaster_pid(pgdata) == postmaster  # taken over, not started again
            second.proc.send_signal(signal.SIGTERM)
            assert second.proc.wait(timeout=END_TIMEOUT_S) == 0
        assert _gone(postmaster), "the embedded PostgreSQL outlived the server"
    finally:
        _stop_cluster(pgdata)


def test_stale_postmaster_pid_naming_another_process(tmp_path: Path) -> None:
    """postmaster.pid names a PID that another process now has (the server was killed, the
    PID reused): the cluster starts, and that process is left alone (it was sent SIGTERM and
    SIGKILL before)."""
    pgdata = tmp_path / "pg"
    server = EmbeddedPostgres(pgdata)
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    server.stop()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (pgdata / "postmaster.pid").write_text("\n".join([str(other.pid), *lines[1:]]) + "\n")
        server = EmbeddedPostgres(pgdata)
        try:
            assert _postmaster_pid(pgdata) != other.pid
            assert _answers(server.dsn)
        finally:
            server.stop()
        assert other.poll() is None, "an unrelated process was killed"
    finally:
        other.kill()
        other.wait(timeout=END_TIMEOUT_S)


def _answers(dsn: str) -> bool:
    async def one() -> int:
        conn = await asyncpg.connect(dsn, timeout=END_TIMEOUT_S)
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    import asyncio

    return asyncio.run(one()) == 1


def test_data_dir_with_spaces(tmp_path: Path) -> None:
    """The package passes the socket directory to postgres unquoted; a path with spaces
    stopped it from starting ("invalid argument")."""
    pgdata = tmp_path / "PACS data" / "my archive" / "postgres"
    server = EmbeddedPostgres(pgdata)
    try:
        assert _answers(server.dsn)
    finally:
        server.stop()


def test_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = _cli("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"))
    _one_line_refusal(r, f"port {port}", "already in use", "--port")
    assert not (tmp_path / "data" / "postgres").exists()  # refused before starting PostgreSQL


def test_data_dir_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    data = tmp_path / "file" / "data"
    r = _cli("serve", "--port", str(free_port()), "--data-dir", str(data))
    _one_line_refusal(r, str(data), "--data-dir")


def test_database_down() -> None:
    url = f"postgresql://someone:secret@127.0.0.1:{free_port()}/archive"
    r = _cli("serve", "--port", str(free_port()), "--database-url", url)
    line = _one_line_refusal(r, "cannot connect to the database", "DATABASE_URL")
    assert "secret" not in line and "someone:***@127.0.0.1" in line


@pytest.mark.db
def test_database_missing(pg_dsn: str) -> None:
    parts = urlsplit(pg_dsn)
    url = urlunsplit(parts._replace(path="/no_such_database_here"))
    for command in ("serve", "initdb"):
        args = ["--port", str(free_port())] if command == "serve" else []
        r = _cli(command, *args, "--database-url", url)
        _one_line_refusal(r, 'database "no_such_database_here" does not exist')


@contextlib.contextmanager
def _listening_later(target_dsn: str, delay_s: float) -> Iterator[int]:
    """A TCP port on which nothing listens for `delay_s`, then a relay to the PostgreSQL of
    `target_dsn` (TCP, or the Unix socket of an embedded one): a database server that comes
    up after the archive was started."""
    parts = urlsplit(target_dsn)
    query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
    port = free_port()
    loop = asyncio.new_event_loop()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if parts.hostname:
            up = await asyncio.open_connection(parts.hostname, parts.port or 5432)
        else:
            sock = f"{query['host']}/.s.PGSQL.{query.get('port', '5432')}"
            up = await asyncio.open_unix_connection(sock)
        writers.extend((writer, up[1]))
        await asyncio.gather(pipe(reader, up[1]), pipe(up[0], writer))

    async def serve() -> None:
        await asyncio.sleep(delay_s)
        server = await asyncio.start_server(relay, "127.0.0.1", port)
        async with server:
            await asyncio.Event().wait()

    async def shut() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    task = loop.create_task(serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.db
def test_database_coming_up_after_the_server_is_waited_for(pg_dsn: str, tmp_path: Path) -> None:
    """DATABASE_URL names a server that starts listening 2 s after `serve` (compose, systemd
    units started together): `serve` asks again until DB_CONNECT_TIMEOUT_S, then serves."""
    parts = urlsplit(pg_dsn)
    user = parts.username or "postgres"
    with _listening_later(pg_dsn, 2.0) as port:
        url = f"postgresql://{user}@127.0.0.1:{port}{parts.path or '/postgres'}"
        began = time.monotonic()
        server = start(tmp_path / "data", url)
        with _ending(server.proc.pid):
            assert time.monotonic() - began >= 2.0
            r = httpx.get(f"{server.url}/studies?limit=1", timeout=10)
            assert r.status_code in (200, 204), r.text  # a query answered by the database
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=END_TIMEOUT_S) == 0


def test_port_and_workers_ranges() -> None:
    assert Settings(port=65535).checked().port == 65535
    assert Settings(port=1, workers=1).checked().workers == 1
    for bad in (Settings(port=0), Settings(port=65536), Settings(workers=0)):
        with pytest.raises(ConfigError):
            bad.checked()


def test_workers_end_with_a_killed_server(tmp_path: Path) -> None:
    """`serve --workers 2` SIGKILLed: its workers stop (they served on, holding the port),
    and the next start takes the PostgreSQL over and stops it."""
    data = tmp_path / "data"
    pgdata = data / "postgres"
    try:
        server = start(data, None, extra_args=("--workers", "2"))
        children = [p.pid for p in psutil.Process(server.proc.pid).children()]
        with _ending(server.proc.pid, *children):
            postmaster = _postmaster_pid(pgdata)
            server.kill()
            for pid in children:
                assert _gone(pid), f"process {pid} outlived the killed server"
        again = start(data, None, extra_args=("--workers", "2"))
        with _ending(again.proc.pid):
            again.proc.send_signal(signal.SIGTERM)
            assert again.proc.wait(timeout=END_TIMEOUT_S) == 0
        assert _gone(postmaster)
    finally:
        _stop_cluster(pgdata)


def test_embedded_postgres_killed_under_the_server_is_started_again(tmp_path: Path) -> None:
    """The embedded PostgreSQL killed while `serve` runs (the OOM killer's choice, say): it is
    started again within a few EMBEDDED_WATCH_S, the server answers again without a restart,
    and what was stored before is there."""
    data = tmp_path / "data"
    pgdata = data / "postgres"
    ds = make_instance()
    try:
        server = start(data, None)
        with _ending(server.proc.pid):
            r = httpx.post(
                f"{server.url}/studies",
                content=multipart_body([to_bytes(ds)]),
                headers=stow_headers(),
                timeout=30,
            )
            assert r.status_code == 200, r.text
            postmaster = _postmaster_pid(pgdata)
            os.kill(postmaster, signal.SIGKILL)
            assert _gone(postmaster)
            health = server.url.removesuffix("/dicom-web") + "/health"
            deadline = time.monotonic() + END_TIMEOUT_S
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(health, timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            else:
                raise AssertionError(
                    "the server did not answer again:\n" + server.log.read_text()[-3000:]
                )
            assert _postmaster_pid(pgdata) != postmaster
            r = httpx.get(f"{server.url}/studies/{ds.StudyInstanceUID}/instances", timeout=30)
            assert r.status_code == 200 and len(r.json()) == 1
            # Logged once the watchdog's start returns: the pool may reconnect a moment before.
            deadline = time.monotonic() + END_TIMEOUT_S
            while "started again" not in server.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "started again" in server.log.read_text()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=END_TIMEOUT_S) == 0
        assert not (pgdata / "postmaster.pid").exists() or _gone(_postmaster_pid(pgdata))
    finally:
        _stop_cluster(pgdata)


async def test_a_pool_that_cannot_open_stops_the_cluster_it_started(tmp_path: Path) -> None:
    """open_services (initdb, load, reindex) stops the embedded PostgreSQL it started when the
    connection pool then fails to open, instead of leaving it to the process's exit."""
    from dicomweb_server.app import open_services

    settings = Settings(data_dir=tmp_path / "data", pool_size=0)  # asyncpg refuses a size 0
    try:
        with pytest.raises(ValueError):
            async with open_services(settings):
                raise AssertionError("opened")
        assert (settings.pg_dir / "PG_VERSION").exists()  # it was started
        assert not (settings.pg_dir / "postmaster.pid").exists()  # and stopped again
    finally:
        _stop_cluster(settings.pg_dir)


def test_each_server_log_line_is_written_once(tmp_path: Path) -> None:
    """hypercorn's start-up lines went both to its own handler and to the root logger's, so
    each was printed twice; access lines once."""
    data = tmp_path / "data"
    try:
        server = start(data, None)
        with _ending(server.proc.pid):
            marker = f"/dicom-web/no-such-resource-{os.getpid()}"
            assert httpx.get(server.url.removesuffix("/dicom-web") + marker).status_code == 404
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=END_TIMEOUT_S) == 0
        log = server.log.read_text()
        assert log.count("Running on http://127.0.0.1") == 1, log[-2000:]
        assert log.count(marker) == 1, log[-2000:]
    finally:
        _stop_cluster(data / "postgres")


def test_what_counts_as_a_database_not_up_yet() -> None:
    """Asked again until DB_CONNECT_TIMEOUT_S: nothing listening (TCP), no socket file yet
    (a Unix socket), PostgreSQL starting up. Said at once: anything else."""
    from dicomweb_server.index.pool import not_up_yet

    assert not_up_yet(ConnectionRefusedError(111, "refused"))
    assert not_up_yet(FileNotFoundError(2, "no such file", "/run/postgresql/.s.PGSQL.5432"))
    assert not_up_yet(asyncpg.CannotConnectNowError("the database system is starting up"))
    assert not not_up_yet(asyncpg.InvalidCatalogNameError('database "x" does not exist'))
    assert not not_up_yet(asyncpg.InvalidAuthorizationSpecificationError("no such role"))
    assert not not_up_yet(OSError(113, "no route to host"))
