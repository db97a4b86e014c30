"""QIDO-RS side by side with Orthanc on one archive of 100,000 instances (issue 6).

The same files are stored through STOW-RS into our server and into Orthanc 1.10 (DICOMweb
plugin, PostgreSQL index, ../shared/peers/orthanc/start.sh PG=1), both with their index in
the machine's PostgreSQL 15. Then the five queries of vs_orthanc.py are asked of both, first
once on every sample study to check that both servers return the same number of matches,
then timed alternately (the server asked first alternates too) for p50 and p95. The figure is
the ratio ours / Orthanc of the p95 (issue 6 target: at most 0.5).

    .venv/bin/python benchmarks/qido_vs_orthanc.py --archive DIR [--state DIR] [--instances N]

DIR is an archive made by ../shared/samples/generate.py, e.g. 100,000 instances:
--no-coverage --large-mb 0 --patients 500 --studies 2 --series 4 --instances 25 --size 16.
Loading Orthanc takes a quarter of an hour or more on the 2-core machine, so with --state the
servers' data (our blob store and database, Orthanc's state directory and database) is kept
there, loading resumes where it stopped, and a second run measures without loading again. The
two databases have fixed names (OURS_DB, ORTHANC_DB): one state directory at a time.
--instances N loads (and measures on) only the first N files of DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (
    PG,
    fresh_database,
    query_url,
    resume_orthanc,
    start_orthanc,
    stop_orthanc,
    write_results,
)
from benchmarks.vs_orthanc import QUERIES, stow_rate, summary, timed_get
from tests.liveserver import running

OURS_DB = "dicomweb_bench_qido_vs"
ORTHANC_DB = "orthanc_bench_qido_vs"
# Loading: instances per STOW request, concurrent clients per server, and files per step
# (progress is saved after each step, and both servers load the same step at the same time).
LOAD_BATCH = 50
LOAD_CLIENTS = 3
LOAD_STEP = 2500
PROGRESS = "progress.json"
# Sample studies (one instance of each is the query's template) and timed repetitions of
# each query per server.
SAMPLES = 40
REPEATS = 80
SEED = 6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--state", type=Path, help="keep the loaded servers' data here")
    parser.add_argument("--instances", type=int, help="load only the first N files")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    files = sorted(args.archive.rglob("*.dcm"))[: args.instances]
    with contextlib.ExitStack() as stack:
        state = args.state or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        servers = stack.enter_context(_servers(state))
        results: dict[str, Any] = {"load": load(servers, files, state)}
        loaded = files[: min(results["load"]["loaded"].values())]
        results["instances"] = len(loaded)
        for db in (OURS_DB, ORTHANC_DB):  # fresh statistics for both planners
            subprocess.run(["psql", f"{PG}/{db}", "-qc", "ANALYZE"], check=True)
        picked = random.Random(SEED).sample(loaded, SAMPLES)
        sample: list[pydicom.Dataset] = [
            pydicom.dcmread(f, stop_before_pixels=True) for f in picked
        ]
        results["counts"] = check_counts(servers, sample)
        results["latency"] = time_queries(servers, sample, results["counts"], args.repeats)
    write_results(args.out, "qido_vs_orthanc", results, markdown(results))
    return 0


@contextlib.contextmanager
def _servers(state: Path) -> Iterator[dict[str, str]]:
    """Both servers on the data in `state`: fresh ones unless a previous run left some."""
    fresh = not (state / PROGRESS).exists()
    if fresh:
        shutil.rmtree(state / "data", ignore_errors=True)
        orthanc_url, orthanc_env = start_orthanc(state / "orthanc", ORTHANC_DB)
        (state / PROGRESS).write_text(json.dumps({"ours": 0, "orthanc": 0}))
    else:
        orthanc_url, orthanc_env = resume_orthanc(state / "orthanc")
    try:
        db = fresh_database(OURS_DB) if fresh else f"{PG}/{OURS_DB}"
        with running(state / "data", db) as ours:
            yield {"ours": ours.url, "orthanc": orthanc_url}
    finally:
        stop_orthanc(orthanc_env)


def load(servers: dict[str, str], files: list[Path], state: Path) -> dict[str, Any]:
    """Store `files` into every server, step by step from where the last run stopped; the
    instances each server holds and its load rate (instances/s, both loading at once)."""
    done: dict[str, int] = json.loads((state / PROGRESS).read_text())
    seconds = dict.fromkeys(servers, 0.0)
    stored = dict.fromkeys(servers, 0)

    def step(name: str, chunk: list[Path]) -> None:
        t = time.perf_counter()
        stow_rate(servers[name], chunk, LOAD_BATCH, LOAD_CLIENTS)
        seconds[name] += time.perf_counter() - t
        stored[name] += len(chunk)

    with ThreadPoolExecutor(len(servers)) as pool:
        for pos in range(min(done.values()), len(files), LOAD_STEP):
            chunk = files[pos : pos + LOAD_STEP]
            todo = [name for name in servers if done[name] <= pos]
            list(pool.map(step, todo, [chunk] * len(todo)))
            done.update(dict.fromkeys(todo, pos + len(chunk)))
            (state / PROGRESS).write_text(json.dumps(done))
            rates = {n: round(stored[n] / seconds[n]) for n in todo}
            print(f"loaded {pos + len(chunk)} of {len(files)}; instances/s {rates}", flush=True)
    return {"loaded": done, "rate_per_s": {n: stored[n] / seconds[n] for n in servers if stored[n]}}


def _count(client: httpx.Client, url: str) -> tuple[int, int]:
    """Matches and response bytes of one query."""
    r = client.get(url)
    r.raise_for_status()
    return (len(r.json()) if r.status_code == 200 else 0), len(r.content)


def check_counts(servers: dict[str, str], sample: list[pydicom.Dataset]) -> dict[str, Any]:
    """Each query on every sample study, on both servers: do they match the same number?
    Per query, the indexes of the sample studies on which they do (`agree`)."""
    out: dict[str, Any] = {}
    with httpx.Client(timeout=120) as client:
        for name, make in QUERIES.items():
            got = [{s: _count(client, query_url(u, *make(d))) for s, u in servers.items()}
                   for d in sample]  # fmt: skip
            agree = [i for i, g in enumerate(got) if len({n for n, _ in g.values()}) == 1]
            out[name] = {
                "agree": agree,
                "differ": [{"query": query_url("", *make(sample[i])),
                            **{s: n for s, (n, _) in g.items()}}
                           for i, g in enumerate(got) if i not in agree],
                "max_matches": {s: max(g[s][0] for g in got) for s in servers},
                "mean_matches": {s: sum(g[s][0] for g in got) / len(got) for s in servers},
                "mean_bytes": {s: sum(g[s][1] for g in got) / len(got) for s in servers},
            }  # fmt: skip
            print(name, {k: v for k, v in out[name].items() if k != "agree"}, flush=True)
    return out


def time_queries(
    servers: dict[str, str], sample: list[pydicom.Dataset], counts: dict[str, Any], repeats: int
) -> dict[str, Any]:
    """p50/p95 (ms) of each query per server, on the sample studies where both servers match
    the same number; the servers alternate, and so does the one asked first."""
    out: dict[str, Any] = {}
    order = list(servers)
    with httpx.Client(timeout=120) as client:
        for name, make in QUERIES.items():
            paths = [make(sample[i]) for i in counts[name]["agree"]]
            if not paths:
                continue
            times: dict[str, list[float]] = {s: [] for s in servers}
            for u in servers.values():  # connections and caches warmed, not timed
                timed_get(client, query_url(u, *paths[0]))
            for i in range(repeats):
                for s in order if i % 2 == 0 else order[::-1]:
                    url = query_url(servers[s], *paths[i % len(paths)])
                    times[s].append(timed_get(client, url))
            out[name] = summary(times)
            print(name, out[name], flush=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Archive: {r['instances']} instances in each server.",
        "",
        "| query | ours p50 / p95 ms | Orthanc p50 / p95 ms | p95 ours / Orthanc | same matches |",
        "|---|---|---|---|---|",
    ]
    for name, v in r["latency"].items():
        ours, orthanc = v["ours"], v["orthanc"]
        counts = r["counts"][name]
        lines.append(
            f"| {name} | {ours['p50_ms']:.1f} / {ours['p95_ms']:.1f}"
            f" | {orthanc['p50_ms']:.1f} / {orthanc['p95_ms']:.1f}"
            f" | {ours['p95_ms'] / orthanc['p95_ms']:.2f}"
            f" | {len(counts['agree'])} of {len(counts['agree']) + len(counts['differ'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
