"""What the benchmarks share: scratch databases on the machine's PostgreSQL, and Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from tests.liveserver import free_port

__all__ = [
    "PEERS",
    "PG",
    "fresh_database",
    "query_url",
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
