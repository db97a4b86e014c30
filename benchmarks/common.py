"""What the benchmarks share: scratch databases on the machine's PostgreSQL, and Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from tests.liveserver import free_port

__all__ = [
    "PEERS",
    "PG",
    "fresh_database",
    "query_url",
    "raw_get",
    "resume_orthanc",
    "start_orthanc",
    "stop_orthanc",
    "write_results",
]

PG = "postgresql://postgres@127.0.0.1:5432"
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "orthanc"
# Characters left unescaped in QIDO query values: Orthanc 1.10 (DICOMweb plugin 1.7) does not
# percent-decode query arguments, so `PatientName=Smi%2A` (httpx's spelling of `Smi*`) matches
# nothing there while `PatientName=Smi*` matches; our server reads both alike.
QUERY_SAFE = "*?^'-.,"
# Seconds a resumed Orthanc gets to answer (start.sh's START_TIMEOUT).
ORTHANC_START_TIMEOUT_S = 120.0
# The receive buffer of raw_get: large reads, so that the client costs little per byte.
GET_BUFFER_BYTES = 1024 * 1024
GET_TIMEOUT_S = 120.0


def raw_get(url: str, accept: str) -> tuple[int, int, float]:
    """(status, body bytes, seconds) of one GET on a new connection, from connecting to the
    body's last byte (its Content-Length, else the server's close); the body is counted, not
    kept (chunked framing, if any, counts too).

    The client of the large retrieves: one socket read per MiB into one buffer, nothing parsed
    past the status line. curl, the client before, read 16 KiB at a time and took 7.8 ms to
    take a 12.6 MB file from the bare sendfile server where this takes 5.5 ms (docs/benchmarks.md,
    2026-12-03d): the client then set the pace of every fast server alike.
    """
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head = b""
    t = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port or 80), GET_TIMEOUT_S) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: {accept}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        buf = memoryview(bytearray(GET_BUFFER_BYTES))
        body, length = -1, -1  # body: -1 until the end of the head is seen
        while (body < 0 or body != length) and (n := sock.recv_into(buf)):
            if body >= 0:
                body += n
                continue
            head += bytes(buf[:n])
            if (end := head.find(b"\r\n\r\n")) >= 0:
                body, head = len(head) - end - 4, head[:end]
                length = _content_length(head)
    seconds = time.perf_counter() - t
    return int(head.split(b" ", 2)[1]), max(body, 0), seconds


def _content_length(head: bytes) -> int:
    """The Content-Length of a response head, -1 without one (the body ends at the close)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return -1


def fresh_database(name: str) -> str:
    """An empty database `name` (dropped first if it exists); its URL."""
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", f"{PG}/postgres", "-qc", sql], check=True, capture_output=True)
    return f"{PG}/{name}"


def start_orthanc(state: Path, pg_db: str) -> tuple[str, dict[str, str]]:
    """Orthanc with its DICOMweb plugin and a PostgreSQL index (../shared/peers/orthanc), on
    loopback; its DICOMweb root and the environment `stop.sh` needs."""
    port, dicom_port = free_port(), free_port()
    env = {**os.environ, "PORT": str(port), "DICOM_PORT": str(dicom_port), "PG": "1",
           "PG_DB": pg_db, "ORTHANC_STATE_DIR": str(state)}  # fmt: skip
    subprocess.run(
        ["bash", str(PEERS / "start.sh")], env=env, check=True, timeout=900, capture_output=True
    )
    return f"http://127.0.0.1:{port}/dicom-web", env


def resume_orthanc(state: Path) -> tuple[str, dict[str, str]]:
    """Orthanc again on the archive a stopped `start_orthanc` left in `state`, with the same
    configuration, port and PostgreSQL index (start.sh would wipe them); as start_orthanc."""
    config = json.loads((state / "orthanc.json").read_text())
    port = int(config["HttpPort"])
    env = {**os.environ, "PORT": str(port), "ORTHANC_STATE_DIR": str(state)}
    shim = state / "loopback_bind.so"  # start.sh's loopback-only bind, when it could build it
    run_env = {**env, "LD_PRELOAD": str(shim)} if shim.exists() else env
    binary = shutil.which("Orthanc")
    assert binary, "no Orthanc binary: run ../shared/peers/orthanc/start.sh once"
    with (state / "orthanc.log").open("ab") as log:
        proc = subprocess.Popen([binary, str(state / "orthanc.json")], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=run_env,
                                start_new_session=True)  # fmt: skip
    (state / "orthanc.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + ORTHANC_START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/system", timeout=2).status_code == 200:
                return f"http://127.0.0.1:{port}/dicom-web", env
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_orthanc(env)
    raise RuntimeError(f"Orthanc did not come back on {state}: see orthanc.log")


def stop_orthanc(env: dict[str, str]) -> None:
    """Stop the Orthanc of `env` (as returned by start_orthanc) by the PID it recorded."""
    subprocess.run(["bash", str(PEERS / "stop.sh")], env=env, check=False, capture_output=True)


def query_url(root: str, path: str, params: dict[str, str]) -> str:
    """`root + path` with `params` as a query string that both servers read alike: wildcards,
    `^` and other punctuation literal, only what must be (space, non-ASCII, `&`) escaped."""
    query = "&".join(f"{quote(k)}={quote(v, safe=QUERY_SAFE)}" for k, v in params.items())
    return f"{root}{path}?{query}" if query else f"{root}{path}"


def write_results(out: Path, name: str, results: dict[str, Any], table: str) -> None:
    """`out/name.json` (the figures) and `out/name.md` (their table), and the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)
