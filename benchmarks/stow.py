"""STOW throughput side by side with Orthanc (issue 6): batch 1 and 50, concurrency 1 and 8.

Our server (a real hypercorn subprocess, index in the machine's PostgreSQL 15) and Orthanc 1.10
(DICOMweb plugin, PostgreSQL index, ../shared/peers/orthanc/start.sh PG=1) are measured in the
same run, interleaved round by round, each round on instances neither server has seen. With
--baseline SRC (a source tree of an earlier commit, e.g. made with `git archive REV | tar -x`)
that version of our server is measured in the same rounds too, for a before/after figure.

    .venv/bin/python benchmarks/stow.py --archive DIR [--baseline SRC] [--rounds 3]

DIR holds small Part-10 files, e.g. ../shared/samples/generate.py DIR --no-coverage
--patients 40 --studies 2 --series 4 --instances 25 --size 16 (8,000 instances of 16 x 16).
Request bodies are built before the clock starts; the figure is instances stored per second,
the ratio ours / Orthanc is what to compare across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PEERS, fresh_database, start_orthanc, write_results
from tests.liveserver import ServerProcess, start

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "bench-boundary"
CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
# (name, instances per request, concurrent clients, instances per round)
SHAPES = [
    ("batch1_conc1", 1, 1, 150),
    ("batch1_conc8", 1, 8, 300),
    ("batch50_conc1", 50, 1, 500),
    ("batch50_conc8", 50, 8, 800),
]


def body(files: list[bytes]) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + f + b"\r\n" for f in files) + f"--{BOUNDARY}--\r\n".encode()


def stow_rate(url: str, files: list[bytes], batch: int, concurrency: int) -> float:
    """Instances per second for `files` sent in requests of `batch` by `concurrency` clients."""
    bodies = [body(files[i : i + batch]) for i in range(0, len(files), batch)]
    headers = {"Content-Type": CTYPE, "Accept": "application/dicom+json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    with httpx.Client(timeout=600, limits=limits) as client, ThreadPoolExecutor(concurrency) as ex:

        def send(b: bytes) -> None:
            r = client.post(f"{url}/studies", content=b, headers=headers)
            assert r.status_code == 200, (url, r.status_code, r.text[:300])

        client.get(f"{url}/studies", params={"limit": "1"})  # connection warmed up
        t = time.perf_counter()
        list(ex.map(send, bodies))
        return len(files) / (time.perf_counter() - t)


def start_ours(data: Path, db: str, src: Path | None, workers: int = 1) -> ServerProcess:
    """Our server from this tree, or from the source tree `src` (baseline)."""
    env = {"PYTHONPATH": str(src)} if src else {}
    args = ("--workers", str(workers)) if workers > 1 else ()
    return start(data, fresh_database(db), extra_env=env, extra_args=args, cwd=src or ROOT)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, help="source tree of the version to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="also measure `serve --workers N`")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    paths = sorted(args.archive.rglob("*.dcm"))
    random.Random(1).shuffle(paths)
    need = args.rounds * sum(s[3] for s in SHAPES)
    if len(paths) < need:
        parser.error(f"{need} instances needed, {len(paths)} found")
    files = [p.read_bytes() for p in paths[:need]]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers: dict[str, str] = {}
        ours = start_ours(Path(tmp) / "ours", "dicomweb_bench_stow", None)
        stack.callback(_stop, ours)
        servers["ours"] = ours.url
        if args.workers > 1:
            w = start_ours(Path(tmp) / "w", "dicomweb_bench_stow_w", None, args.workers)
            stack.callback(_stop, w)
            servers[f"ours_w{args.workers}"] = w.url
        if args.baseline:
            base = start_ours(Path(tmp) / "base", "dicomweb_bench_stow_base", args.baseline)
            stack.callback(_stop, base)
            servers["before"] = base.url
        if not args.no_orthanc:
            url, env = start_orthanc(Path(tmp) / "orthanc", "orthanc_bench_stow")
            stack.callback(
                subprocess.run, ["bash", str(PEERS / "stop.sh")], env=env, capture_output=True
            )
            servers["orthanc"] = url
        results = run(servers, files, args.rounds)
    write_results(args.out, "stow", results, markdown(results))
    return 0


def _stop(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def run(servers: dict[str, str], files: list[bytes], rounds: int) -> dict[str, Any]:
    """Per shape and server: the instances/s of each round (servers rotate their order)."""
    res: dict[str, Any] = {"rounds": rounds, "servers": list(servers)}
    pos = 0
    names = list(servers)
    for r in range(rounds):
        for name, batch, conc, count in SHAPES:
            chunk = files[pos : pos + count]
            pos += count
            order = names[r % len(names) :] + names[: r % len(names)]
            for s in order:
                rate = stow_rate(servers[s], chunk, batch, conc)
                res.setdefault(name, {}).setdefault(s, []).append(rate)
            print(name, {s: round(v[-1]) for s, v in res[name].items()}, flush=True)
    return res


def markdown(r: dict[str, Any]) -> str:
    servers = r["servers"]
    cols = [*servers]
    if "orthanc" in servers:
        cols += [f"{s} / orthanc" for s in servers if s != "orthanc"]
    if "before" in servers:
        cols.append("ours / before")
    lines = [
        f"STOW, instances/s (median of {r['rounds']} rounds; higher is better)",
        "",
        "| shape | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, *_ in SHAPES:
        med = {s: statistics.median(r[name][s]) for s in servers}
        cells = [f"{med[s]:.0f}" for s in servers]
        if "orthanc" in servers:
            cells += [f"{med[s] / med['orthanc']:.2f}" for s in servers if s != "orthanc"]
        if "before" in servers:
            cells.append(f"{med['ours'] / med['before']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
