"""The malloc arena limit (config.MALLOC_ARENA_MAX) against glibc's default, on a real server.

Runs alternate (A B, B A, ...) between a server started with MALLOC_ARENA_MAX=0 (glibc's
default: up to 8 arenas per core) and one with the server's own limit, each on a fresh
database and data directory. Each run stores a 42 MB instance (80 frames of 512 x 512
16-bit) and ten JPEG 2000 Lossless copies of the 24-frame CT, then measures: the server's
peak memory (VmHWM) and its arenas after DOWNLOADS parallel downloads of the 42 MB one as
stored; the STOW rate of single-instance requests from 8 clients; the rate of frames decoded
from JPEG 2000 by 4 clients (every one a frame-cache miss: 240 frames, 126 MB decoded).

    .venv/bin/python benchmarks/arenas.py --archive DIR [--rounds 3]

DIR holds small Part-10 files (at least STOW_INSTANCES), e.g. ../shared/samples/generate.py
DIR --no-coverage --patients 3 --studies 1 --series 4 --instances 25 --size 16. The index
is a fresh database `dicomweb_bench_arenas` on the machine's PostgreSQL per run.
"""

from __future__ import annotations

import argparse
import os
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
import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import fresh_database, raw_get, write_results
from benchmarks.stow import CTYPE, body, stow_rate
from tests.liveserver import ServerProcess, malloc_arenas, start

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"
LARGE = SAMPLES / "generated/large/ect_24frames_512_explicit_le.dcm"
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DOWNLOADS = 100
BIG_FRAMES = 80
J2K_COPIES = 10
STOW_INSTANCES = 300
FRAME_PASSES = 2
MODES = {"glibc": {"MALLOC_ARENA_MAX": "0"}, "limit": {}}
FIGURES = ("arenas", "hwm_idle_mb", "hwm_mb", "downloads_s", "stow_per_s", "frames_per_s")


def inputs(work: Path) -> tuple[Path, list[Path]]:
    """The 42 MB instance and the JPEG 2000 copies (new SOP Instance UIDs)."""
    ds = pydicom.dcmread(LARGE)
    pixels = ds.pixel_array
    ds.PixelData = np.concatenate([pixels] * (BIG_FRAMES // len(pixels) + 1))[:BIG_FRAMES].tobytes()
    ds.NumberOfFrames = BIG_FRAMES
    groups = ds.PerFrameFunctionalGroupsSequence
    ds.PerFrameFunctionalGroupsSequence = [groups[i % len(groups)] for i in range(BIG_FRAMES)]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    big = work / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    ds = pydicom.dcmread(LARGE)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    copies = []
    for i in range(J2K_COPIES):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(work / f"j2k{i}.dcm")
        ds.save_as(copies[-1], enforce_file_format=True)
    return big, copies


def instance_url(url: str, path: Path) -> str:
    d = pydicom.dcmread(path, stop_before_pixels=True)
    return (f"{url}/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}"
            f"/instances/{d.SOPInstanceUID}")  # fmt: skip


def peak_mb(server: ServerProcess) -> float:
    return server.peak_rss_kib() / 1024


def one_run(
    work: Path, env: dict[str, str], big: Path, copies: list[Path], small: list[bytes]
) -> dict[str, float]:
    db = fresh_database("dicomweb_bench_arenas")
    server = start(work / f"data-{time.monotonic_ns()}", db, extra_env=env)
    try:
        with httpx.Client(timeout=600) as client:
            for path in [big, *copies]:
                r = client.post(f"{server.url}/studies", content=body([path.read_bytes()]),
                                headers={"Content-Type": CTYPE})  # fmt: skip
                r.raise_for_status()
        res = {"hwm_idle_mb": peak_mb(server)}
        url = instance_url(server.url, big)
        raw_get(url, ACCEPT_STORED)  # into the page cache
        t = time.perf_counter()
        with ThreadPoolExecutor(DOWNLOADS) as pool:
            got = list(pool.map(lambda _: raw_get(url, ACCEPT_STORED), range(DOWNLOADS)))
        res["downloads_s"] = time.perf_counter() - t
        assert all(status == 200 and n > big.stat().st_size for status, n, _ in got)
        res["hwm_mb"] = peak_mb(server)
        res["arenas"] = malloc_arenas(server.proc.pid)
        res["stow_per_s"] = stow_rate(server.url, small, 1, 8)
        res["frames_per_s"] = frame_rate(server.url, copies)
        return res
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def frame_rate(url: str, copies: list[Path]) -> float:
    """Frames decoded from JPEG 2000 per second, 4 clients, each frame asked for once per
    pass (more frames than the frame cache holds: every request decodes)."""
    urls = [f"{instance_url(url, p)}/frames/{k}" for p in copies for k in range(1, 25)]
    urls *= FRAME_PASSES
    limits = httpx.Limits(max_connections=4)
    with httpx.Client(timeout=600, limits=limits) as client, ThreadPoolExecutor(4) as pool:

        def get(u: str) -> None:
            r = client.get(u, headers={"Accept": "application/octet-stream"})
            assert r.status_code == 200, r.status_code

        t = time.perf_counter()
        list(pool.map(get, urls))
        return len(urls) / (time.perf_counter() - t)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    small = [p.read_bytes() for p in sorted(args.archive.rglob("*.dcm"))[:STOW_INSTANCES]]
    if len(small) < STOW_INSTANCES:
        parser.error(f"{STOW_INSTANCES} instances needed, {len(small)} found")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        big, copies = inputs(work)
        for r in range(args.rounds):
            for mode in list(MODES)[:: 1 if r % 2 == 0 else -1]:
                env = {**MODES[mode], "TMPDIR": tmp}
                runs[mode].append(one_run(work, env, big, copies, small))
                print(mode, {k: round(v, 1) for k, v in runs[mode][-1].items()},
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    write_results(args.out, "arenas", {"runs": runs}, markdown(runs))
    return 0


def markdown(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        f"Malloc arenas, medians of {len(runs['limit'])} runs each (range)",
        "",
        "| figure | glibc's default | limit | limit / default |",
        "|---|---|---|---|",
    ]
    for name in FIGURES:
        a, b = ([run[name] for run in runs[m]] for m in MODES)
        ma, mb = statistics.median(a), statistics.median(b)
        lines.append(f"| {name} | {ma:.1f} ({min(a):.1f}-{max(a):.1f}) "
                     f"| {mb:.1f} ({min(b):.1f}-{max(b):.1f}) | {mb / ma:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
