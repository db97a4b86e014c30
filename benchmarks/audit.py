"""What authentication and the audit trail cost a request (issue 7), measured in one run.

Three servers share one database and one blob store: `--auth none` with the audit trail off
(the reference), `--auth apikey` with the audit trail on, and `--auth apikey` with it off (to
tell the two costs apart). The same requests go to all, interleaved; the figures are ratios
of their latencies to the reference's. Also: how many events per second the
audit writer appends (its capacity, far above any request rate it has to follow).

    .venv/bin/python benchmarks/audit.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fresh_database, write_results
from benchmarks.vs_orthanc import pct, stow, timed_get
from dicomweb_server.audit import AuditEvent
from dicomweb_server.index.database import Index
from tests.liveserver import ServerProcess, start

BENCH_DB = "dicomweb_bench_audit"
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
# Rounds of each request per server.
ROUNDS = 300
# Events appended when measuring the writer's capacity, and per batch.
WRITER_EVENTS = 20_000
WRITER_BATCH = 500


def small_files(n: int) -> list[Path]:
    files = []
    for path in sorted(SAMPLES.rglob("*.dcm")):
        if path.stat().st_size < 600_000:
            files.append(path)
        if len(files) == n:
            break
    return files


def api_key(dsn: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dicomweb_server", "apikey", "create", "--role", "admin",
         "--database-url", dsn],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return out.stdout.split()[-1]


def measure(servers: dict[str, tuple[str, dict[str, str]]], files: list[Path]) -> dict[str, Any]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = f"/studies/{ds.StudyInstanceUID}"
    requests = {
        "qido_studies": "/studies?limit=10",
        "qido_patient_id": f"/studies?PatientID={ds.PatientID}",
        "study_metadata": f"{study}/metadata",
        "instance_metadata": f"{study}/series/{ds.SeriesInstanceUID}/instances/"
        f"{ds.SOPInstanceUID}/metadata",
    }
    times: dict[str, dict[str, list[float]]] = {r: {s: [] for s in servers} for r in requests}
    with httpx.Client(timeout=60) as client:
        for n in range(ROUNDS):
            order = list(servers)[n % 3 :] + list(servers)[: n % 3]  # rotate who goes first
            for req, path in requests.items():
                for name in order:
                    url, headers = servers[name]
                    times[req][name].append(timed_get(client, url + path, headers=headers))
    out: dict[str, Any] = {}
    for req, by_server in times.items():
        stats: dict[str, Any] = {
            s: {"p50_ms": pct(t, 50), "p95_ms": pct(t, 95)} for s, t in by_server.items()
        }
        stats["ratio_p50"] = stats["audited"]["p50_ms"] / stats["reference"]["p50_ms"]
        stats["ratio_p95"] = stats["audited"]["p95_ms"] / stats["reference"]["p95_ms"]
        stats["auth_only_ratio_p50"] = stats["auth_only"]["p50_ms"] / stats["reference"]["p50_ms"]
        out[req] = stats
    return out


async def writer_capacity(dsn: str) -> float:
    """Events per second appended to the chain, in batches as the writer task does."""
    index = await Index.open(dsn, max_size=2, timeout_s=60)
    try:
        event = AuditEvent(datetime.now(UTC), "apikey:bench", "127.0.0.1", "search_for_studies",
                           ("1.2.3/4.5.6",), 200, 1234, "PatientID=X")  # fmt: skip
        t = time.perf_counter()
        for _ in range(WRITER_EVENTS // WRITER_BATCH):
            await index.append_audit([event] * WRITER_BATCH)
        return WRITER_EVENTS / (time.perf_counter() - t)
    finally:
        await index.close()


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "| request | p50 ms reference | p50 ms auth + audit | ratio p50 | ratio p95 |"
        " ratio p50, auth only |",
        "|---|---|---|---|---|---|",
    ]
    for req, s in r["requests"].items():
        lines.append(f"| {req} | {s['reference']['p50_ms']:.2f} | {s['audited']['p50_ms']:.2f} |"
                     f" {s['ratio_p50']:.2f} | {s['ratio_p95']:.2f} |"
                     f" {s['auth_only_ratio_p50']:.2f} |")  # fmt: skip
    lines.append(f"\nAudit writer capacity: {r['writer_events_per_s']:.0f} events/s"
                 f" (batches of {WRITER_BATCH}); audit rows written by the run:"
                 f" {r['audit_rows']}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    dsn = fresh_database(BENCH_DB)
    files = small_files(40)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        procs: list[ServerProcess] = []
        try:
            procs.append(start(data, dsn, extra_env={"DICOMWEB_AUDIT": "0"}))
            token = api_key(dsn)
            procs.append(start(data, dsn, extra_args=("--auth", "apikey")))
            procs.append(start(data, dsn, {"DICOMWEB_AUDIT": "0"}, ("--auth", "apikey")))
            with httpx.Client(timeout=120) as client:
                for f in files:
                    stow(client, procs[0].url, [f])
            servers = {
                "reference": (procs[0].url, {}),
                "audited": (procs[1].url, {"Authorization": f"Bearer {token}"}),
                "auth_only": (procs[2].url, {"Authorization": f"Bearer {token}"}),
            }
            result: dict[str, Any] = {"rounds": ROUNDS, "requests": measure(servers, files)}
        finally:
            for p in procs:  # a clean stop: queued audit events are written
                p.proc.send_signal(signal.SIGTERM)
                p.proc.wait(timeout=60)
    result["writer_events_per_s"] = asyncio.run(writer_capacity(dsn))
    rows = subprocess.run(["psql", dsn, "-tAc", "SELECT count(*) FROM audit_log"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    result["audit_rows"] = int(rows.stdout.strip())
    write_results(args.out, "audit", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
