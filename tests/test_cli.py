"""The command line: `load` imports through the STOW ingest path and summarises."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.db


def test_load_twice_then_summary(tmp_path: Path, clean_db: str, samples: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(samples / "generated/coverage", src)
    (src / "notes.txt").write_text("not a DICOM file")
    common = ["--data-dir", str(tmp_path / "data"), "--database-url", clean_db]
    first = run_cli("load", *common, str(src))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stored 19, already present 0, failed 1 (of 20 files)" in first.stdout
    assert "notes.txt: not a DICOM Part 10 file" in first.stdout
    second = run_cli("load", *common, str(src))
    assert "stored 0, already present 19, failed 1" in second.stdout


def test_initdb(tmp_path: Path, clean_db: str) -> None:
    r = run_cli("initdb", "--data-dir", str(tmp_path / "d"), "--database-url", clean_db)
    assert r.returncode == 0 and "schema applied" in r.stdout


def test_serving_runs_on_uvloop() -> None:
    """`serve` runs its event loop with uvloop (a dependency on Linux)."""
    import asyncio

    import uvloop

    from dicomweb_server import cli

    loops: list[asyncio.AbstractEventLoop] = []

    async def record() -> None:
        loops.append(asyncio.get_running_loop())

    cli._run_loop(record())
    assert isinstance(loops[0], uvloop.Loop)
    assert cli.uvloop is uvloop


def test_access_line_is_hypercorns_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The access line computed directly equals the one hypercorn builds from all its atoms."""
    import time

    from hypercorn.config import Config
    from hypercorn.logging import AccessLogAtoms

    from dicomweb_server import httpd

    monkeypatch.setattr(time, "strftime", lambda fmt: "[03/Dec/2026:15:00:00 +0000]")
    fmt = Config.access_log_format
    request: dict[str, Any] = {
        "type": "http", "method": "GET", "path": "/dicom-web/studies", "http_version": "1.1",
        "query_string": b"PatientID=X", "scheme": "http", "client": ("127.0.0.1", 51234),
        "headers": [(b"Host", b"h"), (b"User-Agent", b"curl/8"), (b"Referer", b"http://v/")],
    }  # fmt: skip
    for response in (
        {"status": 200, "headers": [(b"content-length", b"42")]},
        {"status": 204, "headers": []},
        None,
    ):
        for client in (("127.0.0.1", 51234), ("/run/sock",), None):
            no_headers: list[tuple[bytes, bytes]] = []
            for headers in (request["headers"], no_headers):
                r = {**request, "client": client, "headers": headers}
                ours = fmt % httpd.AccessLog(Config()).atoms(r, response, 0.01)  # type: ignore[arg-type]
                theirs = fmt % AccessLogAtoms(r, response, 0.01)  # type: ignore[arg-type]
                assert ours == theirs.replace("None", "-")


@pytest.mark.parametrize(("seconds", "millis"), [(60.0, 60_000), (2.5, 2500), (0.0001, 1)])
def test_listening_sockets_carry_the_send_stall_timeout(seconds: float, millis: int) -> None:
    """SEND_STALL_TIMEOUT_S becomes TCP_USER_TIMEOUT (milliseconds, at least 1: 0 would turn
    it off) on the listening sockets `serve` creates; accepted connections inherit it."""
    import socket

    from dicomweb_server import httpd
    from dicomweb_server.config import SEND_STALL_TIMEOUT_S, Settings
    from tests.liveserver import free_port

    assert SEND_STALL_TIMEOUT_S == 60.0
    settings = Settings(port=free_port(), send_stall_timeout_s=seconds)
    config = httpd.hypercorn_config(settings)
    assert config.keep_alive_timeout == httpd.KEEP_ALIVE_TIMEOUT_S == 5.0
    assert config.h2_max_concurrent_streams == httpd.H2_MAX_CONCURRENT_STREAMS == 100
    (listener,) = config.create_sockets().insecure_sockets
    with listener:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == millis
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            listener.setblocking(True)
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == millis


def test_a_dropped_connection_is_logged_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """The ETIMEDOUT hypercorn lets out of closing a connection the kernel dropped is one
    INFO line, not an asyncio ERROR with a traceback; other asyncio errors are untouched."""
    import logging

    from dicomweb_server import httpd

    httpd.quiet_dropped_connections()
    httpd.quiet_dropped_connections()  # once is enough: not two filters
    logger = logging.getLogger("asyncio")
    assert sum(isinstance(f, httpd.DroppedConnections) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="asyncio"):
        for exc in (TimeoutError(110, "Connection timed out"), RuntimeError("a bug")):
            try:
                raise exc
            except Exception:
                logger.error("Unhandled exception in client_connected_cb", exc_info=True)
    dropped, bug = caplog.records
    assert (dropped.levelname, dropped.exc_info) == ("INFO", None)
    assert dropped.getMessage() == "connection dropped: [Errno 110] Connection timed out"
    assert bug.levelname == "ERROR" and bug.exc_info is not None
