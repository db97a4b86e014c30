"""What the benchmarks share: scratch databases on the machine's PostgreSQL, and Orthanc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.liveserver import free_port

__all__ = ["PEERS", "PG", "fresh_database", "start_orthanc"]

PG = "postgresql://postgres@127.0.0.1:5432"
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "orthanc"


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
