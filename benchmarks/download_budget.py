"""Memory held by downloads whose clients stalled, and the speed of fast ones, for two
source trees (blobstore.budget.DOWNLOAD_BUFFER_BUDGET_BYTES against the tree before it).

Memory: per run a fresh database and data directory, one server of one tree, a 64 MiB
instance stored (128 frames of 512 x 512 16-bit, Explicit VR Little Endian) and read once
(page cache); then STALLED clients each open an HTTP/1.1 connection, ask for it as stored,
read READ_BYTES of the answer and stop reading for HOLD_S (then close). The server's
VmHWM is read then and 2 s after they closed (the streams then end); one fast download of
the instance is timed as soon as they are all stalled, and one 4 s later. The same over
HTTP/2 on a server of its own: 2 connections of 100 streams each (the server's
H2_MAX_CONCURRENT_STREAMS), each stream read to 8 MiB with its window wide open, then
nothing read. Runs alternate between the trees (A B, B A, ...).

Speed: both trees' servers up at once over one database and data directory, the same two
instances (the 64 MiB one and the 12.6 MB 24-frame CT of the sample corpus) served by
both; per round and server, 1 download and 4 parallel downloads of each, page cache, the
servers' order alternating, and in the first MANY_ROUNDS rounds 100 parallel downloads of
the 12.6 MB one. Figures: median seconds, and the median of the per-round ratios after /
before.

    .venv/bin/python benchmarks/download_budget.py --before TREE [--after TREE]
        [--database hlp_budget] [--rounds 3] [--speed-rounds 15] [--stalled 200]

TREE is a source tree (a checkout of the commit to compare: `git archive C | tar -x -C DIR`).
The database is dropped and made again on the machine's PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PG, fresh_database, raw_get, write_results
from tests.helpers import make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import ServerProcess, start

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "samples" / "generated/large/ect_24frames_512_explicit_le.dcm"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAMES = 128
STALLED = 200
READ_BYTES = 64 * 1024
HOLD_S = 8.0
# HTTP/2: connections of H2_STREAMS streams each (H2_MAX_CONCURRENT_STREAMS), each stream
# read to H2_READ_BYTES (past the 1 + 2 + 4 MiB of its first chunks), then not read.
H2_CONNECTIONS = 2
H2_STREAMS = 100
H2_READ_BYTES = 8 * 1024 * 1024
# Parallel downloads of the 12.6 MB instance in the first MANY_ROUNDS speed rounds: more than
# the budget gives 4 MiB chunks to (64), so their chunks are smaller.
MANY = 100
MANY_ROUNDS = 6


def instances(work: Path) -> list[Path]:
    """The 64 MiB instance (written once) and the 12.6 MB CT."""
    big = work / "big.dcm"
    if not big.exists():
        big.write_bytes(to_bytes(make_instance(frames=FRAMES, rows=512, cols=512)))
    return [big, CT]


def url_of(root: str, path: Path) -> str:
    d = pydicom.dcmread(path, stop_before_pixels=True)
    return (f"{root}/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}"
            f"/instances/{d.SOPInstanceUID}")  # fmt: skip


def serve(tree: Path, data: Path, db: str) -> ServerProcess:
    return start(data, db, extra_env={"PYTHONPATH": str(tree)}, cwd=tree)


def stop(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def store(server: ServerProcess, paths: list[Path]) -> None:
    for path in paths:
        r = httpx.post(f"{server.url}/studies", content=multipart_body([path.read_bytes()]),
                       headers=stow_headers(), timeout=600)  # fmt: skip
        r.raise_for_status()


def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields


def stalled_clients(url: str, count: int) -> list[socket.socket]:
    """`count` connections, each asking for `url` and reading READ_BYTES of the answer."""
    parts = urlsplit(url)
    request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: {ACCEPT}\r\n"
               "\r\n").encode()  # fmt: skip
    socks = []
    for _ in range(count):
        sock = socket.create_connection((parts.hostname, parts.port or 80), 60)
        sock.sendall(request)
        socks.append(sock)
    for sock in socks:
        got = 0
        while got < READ_BYTES:
            chunk = sock.recv(min(65536, READ_BYTES - got))
            if not chunk:
                raise AssertionError("the server closed a connection")
            got += len(chunk)
    return socks


def memory_run(tree: Path, work: Path, db_name: str, stalled: int) -> dict[str, float]:
    db = fresh_database(db_name)
    server = serve(tree, work / f"data-{time.monotonic_ns()}", db)
    try:
        big, _ = instances(work)
        store(server, [big])
        url = url_of(server.url, big)
        raw_get(url, ACCEPT)  # into the page cache
        pid = server.proc.pid
        res: dict[str, float] = {"hwm_idle_mb": status_kib(pid)["VmHWM"] / 1024}
        began = time.monotonic()
        socks = stalled_clients(url, stalled)
        res["stall_setup_s"] = time.monotonic() - began
        stalled_at = time.monotonic()
        fast: dict[str, float] = {}
        while time.monotonic() - stalled_at < HOLD_S:
            for name, at in (("fast_at_0s", 0.0), ("fast_at_4s", 4.0)):
                if name not in fast and time.monotonic() - stalled_at >= at:
                    status, n, fast[name] = raw_get(url, ACCEPT)
                    assert status == 200 and n > big.stat().st_size, (status, n)
            time.sleep(0.2)
        res["hwm_stalled_mb"] = status_kib(pid)["VmHWM"] / 1024
        res.update(fast)
        for sock in socks:
            sock.close()
        time.sleep(2)
        res["hwm_end_mb"] = status_kib(pid)["VmHWM"] / 1024
        res["rss_end_mb"] = status_kib(pid)["VmRSS"] / 1024
        return res
    finally:
        stop(server)


def h2_stalled(url: str, connections: int, streams: int) -> tuple[list[socket.socket], list[int]]:
    """`connections` HTTP/2 connections (clear text, prior knowledge), each asking for `url`
    on `streams` streams with windows wide open, reading until every stream has had
    H2_READ_BYTES (its chunks grown to their largest), then reading nothing more; the least
    any stream of each connection had read (60 s at most)."""
    parts = urlsplit(url)
    socks, reads = [], []
    for _ in range(connections):
        sock = socket.create_connection((parts.hostname, parts.port or 80), 60)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.increment_flow_control_window(2**31 - 1 - 65535)
        head = [(":method", "GET"), (":path", parts.path), (":scheme", "http"),
                (":authority", parts.netloc), ("accept", ACCEPT)]  # fmt: skip
        got: dict[int, int] = {}
        for _ in range(streams):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, head, end_stream=True)
            got[stream_id] = 0
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 60
        while min(got.values()) < H2_READ_BYTES and time.monotonic() < deadline:
            for event in conn.receive_data(sock.recv(1 << 20)):
                if isinstance(event, h2.events.DataReceived):
                    got[event.stream_id] += event.flow_controlled_length
            if data := conn.data_to_send():
                sock.sendall(data)
        socks.append(sock)
        reads.append(min(got.values()))
    return socks, reads


def h2_memory_run(tree: Path, work: Path, db_name: str) -> dict[str, float]:
    db = fresh_database(db_name)
    server = serve(tree, work / f"data-{time.monotonic_ns()}", db)
    try:
        big, _ = instances(work)
        store(server, [big])
        url = url_of(server.url, big)
        raw_get(url, ACCEPT)  # into the page cache
        pid = server.proc.pid
        socks, reads = h2_stalled(url, H2_CONNECTIONS, H2_STREAMS)
        time.sleep(2)
        res = {"h2_hwm_stalled_mb": status_kib(pid)["VmHWM"] / 1024}
        res["h2_least_read_mb"] = min(reads) / 2**20
        for sock in socks:
            sock.close()
        time.sleep(2)
        res["h2_hwm_end_mb"] = status_kib(pid)["VmHWM"] / 1024
        return res
    finally:
        stop(server)


def speed_rounds(trees: dict[str, Path], work: Path, db_name: str, rounds: int) -> dict[str, Any]:
    db = fresh_database(db_name)
    data = work / f"shared-{time.monotonic_ns()}"
    servers = {name: serve(tree, data, db) for name, tree in trees.items()}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    try:
        paths = instances(work)
        store(servers["before"], paths)
        for r in range(rounds):
            order = list(trees)[:: 1 if r % 2 == 0 else -1]
            for name in order:
                for path in paths:
                    url = url_of(servers[name].url, path)
                    size = "64MiB" if path.name == "big.dcm" else "12.6MB"
                    raw_get(url, ACCEPT)  # warm, and the server's first request of the round
                    _, _, one = raw_get(url, ACCEPT)
                    t = time.perf_counter()
                    with ThreadPoolExecutor(4) as pool:
                        got = list(pool.map(lambda _: raw_get(url, ACCEPT), range(4)))  # noqa: B023
                    four = time.perf_counter() - t
                    assert all(status == 200 for status, _, _ in got)
                    times[name].setdefault(f"{size} x1", []).append(one)
                    times[name].setdefault(f"{size} x4", []).append(four)
                    if path.name != "big.dcm" and r < MANY_ROUNDS:
                        t = time.perf_counter()
                        with ThreadPoolExecutor(MANY) as pool:
                            got = list(pool.map(lambda _: raw_get(url, ACCEPT), range(MANY)))  # noqa: B023
                        times[name].setdefault(f"{size} x{MANY}", []).append(
                            time.perf_counter() - t
                        )
                        assert all(status == 200 for status, _, _ in got)
            print("speed round", r, f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for server in servers.values():
            stop(server)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--database", default="hlp_budget")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed-rounds", type=int, default=15)
    parser.add_argument("--stalled", type=int, default=STALLED)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    memory: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(0 if args.skip_memory else args.rounds):
            for name in list(trees)[:: 1 if r % 2 == 0 else -1]:
                res = memory_run(trees[name], work, args.database, args.stalled)
                res.update(h2_memory_run(trees[name], work, args.database))
                memory[name].append(res)
                print(name, {k: round(v, 2) for k, v in memory[name][-1].items()},
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        speed = speed_rounds(trees, work, args.database, args.speed_rounds)
    drop = f"DROP DATABASE IF EXISTS {args.database} WITH (FORCE)"
    subprocess.run(["psql", f"{PG}/postgres", "-qc", drop], check=False)
    results = {"memory": memory, "speed": speed, "stalled": args.stalled}
    write_results(args.out, "download_budget", results, markdown(memory, speed, args.stalled))
    return 0


def markdown(
    memory: dict[str, list[dict[str, float]]], speed: dict[str, dict[str, list[float]]], n: int
) -> str:
    lines = [f"{n} stalled downloads: medians (range) of {len(memory['before'])} runs each", "",
             "| figure | before | after |", "|---|---|---|"]  # fmt: skip
    for figure in memory["before"][0] if memory["before"] else []:
        cells = []
        for name in ("before", "after"):
            v = [run[figure] for run in memory[name]]
            cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        lines.append(f"| {figure} | {' | '.join(cells)} |")
    lines += ["", "Fast downloads, page cache, seconds: median before / after, median of the "
              "paired ratios after / before", "", "| downloads | before | after | ratio |",
              "|---|---|---|---|"]  # fmt: skip
    for figure, before in speed["before"].items():
        after = speed["after"][figure]
        ratio = statistics.median([a / b for a, b in zip(after, before, strict=True)])
        b, a = statistics.median(before), statistics.median(after)
        lines.append(f"| {figure} | {b:.4f} | {a:.4f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
