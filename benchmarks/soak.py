"""A soak (issue 6): mixed load on a real server for a while, its memory sampled throughout.

Clients store small instances, search, retrieve metadata, instances and frames (as stored and
transcoded), rendered images and thumbnails, all at once. The server must answer no 5xx and
its resident memory must stay under SOAK_RSS_BOUND_MB, with no growth between the second and
the last quarter of the run beyond SOAK_GROWTH_BOUND_MB (caches fill early; a leak keeps
growing).

    .venv/bin/python benchmarks/soak.py --minutes 10 [--out benchmarks/results]

`tests/test_soak.py` runs the same load for SOAK_CI_SECONDS in every `make test`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import ServerProcess, running

# Resident memory the server must stay under, MB (the bound issue 6 sets for STOW; caches:
# 64 MiB of frames, 64 MiB of images).
SOAK_RSS_BOUND_MB = 300
# Growth allowed from the second quarter's peak to the last quarter's, MB.
SOAK_GROWTH_BOUND_MB = 30
# Concurrent clients.
SOAK_CLIENTS = 4
# Seconds between memory samples.
SAMPLE_EVERY_S = 1.0
# Length of the soak that `make test` runs, seconds.
SOAK_CI_SECONDS = 40

ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JLS = 'multipart/related; type="image/jls"'


@dataclass
class Report:
    seconds: float
    requests: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def quarters(self) -> list[float]:
        n = len(self.rss_mb)
        return [max(self.rss_mb[i * n // 4 : max((i + 1) * n // 4, i * n // 4 + 1)])
                for i in range(4)]  # fmt: skip

    def summary(self) -> dict[str, Any]:
        q = self.quarters()
        return {
            "seconds": round(self.seconds, 1),
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "server_errors": self.server_errors[:20],
            "rss_peak_mb": round(max(self.rss_mb), 1),
            "rss_quarter_peaks_mb": [round(x, 1) for x in q],
            "growth_q2_to_q4_mb": round(q[3] - q[1], 1),
            "rss_bound_mb": SOAK_RSS_BOUND_MB,
            "growth_bound_mb": SOAK_GROWTH_BOUND_MB,
        }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class _Load:
    def __init__(self, url: str, report: Report, seed: int) -> None:
        self.url, self.report, self.rng = url, report, random.Random(seed)
        self.stored: list[tuple[str, str, str, int]] = []  # study, series, sop, frames
        self.lock = threading.Lock()

    def _get(self, client: httpx.Client, kind: str, path: str, **kw: Any) -> None:
        r = client.get(self.url + path, **kw)
        self._count(kind, r)

    def _count(self, kind: str, r: httpx.Response) -> None:
        with self.lock:
            self.report.requests[kind] += 1
            if r.status_code >= 500:
                self.report.server_errors.append(f"{kind} {r.status_code} {r.text[:200]}")

    def stow(self, client: httpx.Client) -> None:
        frames = self.rng.choice((1, 1, 4))
        ds = make_instance(rows=64, cols=64, frames=frames,
                           patient_id=f"SOAK-{self.rng.randrange(20)}")  # fmt: skip
        body = multipart_body([to_bytes(ds)])
        r = client.post(self.url + "/studies", content=body, headers=stow_headers())
        self._count("stow", r)
        if r.status_code == 200:
            with self.lock:
                self.stored.append((ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                    ds.SOPInstanceUID, frames))  # fmt: skip

    def read(self, client: httpx.Client) -> None:
        with self.lock:
            if not self.stored:
                return
            study, series, sop, frames = self.rng.choice(self.stored)
        inst = f"/studies/{study}/series/{series}/instances/{sop}"
        n = self.rng.randrange(frames) + 1
        choices: list[Callable[[], None]] = [
            lambda: self._get(client, "qido", f"/studies?PatientID=SOAK-{self.rng.randrange(20)}"),
            lambda: self._get(client, "qido_instances", f"/studies/{study}/instances"),
            lambda: self._get(client, "metadata", f"/studies/{study}/metadata"),
            lambda: self._get(client, "instance", inst, headers={"Accept": ACCEPT_STORED}),
            lambda: self._get(client, "frames", f"{inst}/frames/{n}"),
            lambda: self._get(client, "frames_jls", f"{inst}/frames/{n}",
                              headers={"Accept": ACCEPT_JLS}),
            lambda: self._get(client, "rendered", f"{inst}/rendered?quality=80"),
            lambda: self._get(client, "thumbnail", f"/studies/{study}/thumbnail"),
        ]  # fmt: skip
        self.rng.choice(choices)()

    def client_loop(self, deadline: float) -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < deadline:
                if self.rng.random() < 0.25:
                    self.stow(client)
                else:
                    self.read(client)


def soak(server: ServerProcess, seconds: float, seed: int = 7) -> Report:
    report = Report(seconds)
    load = _Load(server.url, report, seed)
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        for _ in range(5):
            load.stow(client)
    threads = [threading.Thread(target=load.client_loop, args=(deadline,), daemon=True)
               for _ in range(SOAK_CLIENTS)]  # fmt: skip
    for t in threads:
        t.start()
    while time.monotonic() < deadline:
        report.rss_mb.append(_rss_mb(server.proc.pid))
        time.sleep(SAMPLE_EVERY_S)
    for t in threads:
        t.join(timeout=120)
    report.rss_mb.append(_rss_mb(server.proc.pid))
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--database-url", default=None, help="none: the embedded PostgreSQL")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running(Path(tmp) / "data",
                                                       args.database_url) as server:  # fmt: skip
        summary = soak(server, args.minutes * 60).summary()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = (not summary["server_errors"] and summary["rss_peak_mb"] < SOAK_RSS_BOUND_MB
          and summary["growth_q2_to_q4_mb"] < SOAK_GROWTH_BOUND_MB)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
