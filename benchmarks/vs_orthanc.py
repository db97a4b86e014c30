"""Side by side with Orthanc (DICOMweb plugin, PostgreSQL index), same machine, same run.

Both servers run on loopback with their index in the machine's PostgreSQL; every figure is
measured for both, interleaved, and reported as a ratio ours / Orthanc (issue 6). Absolute
times on these 2-core machines are noisy; the ratio is the figure.

    .venv/bin/python benchmarks/vs_orthanc.py --archive DIR [--out benchmarks/results]

DIR is an archive made by ../shared/samples/generate.py (e.g. 10,000 instances:
--no-coverage --patients 50 --studies 2 --series 4 --instances 25 --size 16).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.uid import JPEGLSLossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PEERS, fresh_database, query_url, start_orthanc, write_results
from tests.liveserver import start

LARGE = (
    Path(__file__).resolve().parents[2]
    / "shared/samples/generated/large/ect_24frames_512_explicit_le.dcm"
)
BENCH_DB = "dicomweb_bench"
BOUNDARY = "bench-boundary"
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON = "application/dicom+json"
# Frames as uncompressed bytes (both servers' default for frames).
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"'
# Repetitions of each QIDO query per server.
QIDO_REPEATS = 40


def stow(client: httpx.Client, url: str, files: list[Path]) -> None:
    body = (
        b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + f.read_bytes()
            + b"\r\n"
            for f in files
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    r = client.post(
        f"{url}/studies",
        content=body,
        headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
    )
    assert r.status_code == 200, (url, r.status_code, r.text[:300])


def stow_rate(url: str, files: list[Path], batch: int, concurrency: int) -> float:
    """Instances per second."""
    batches = [files[i : i + batch] for i in range(0, len(files), batch)]
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        t = time.perf_counter()
        list(pool.map(lambda b: stow(client, url, b), batches))
        return len(files) / (time.perf_counter() - t)


def timed_get(client: httpx.Client, url: str, **kwargs: Any) -> float:
    """Milliseconds for one GET, body read."""
    t = time.perf_counter()
    client.get(url, **kwargs).raise_for_status()
    return (time.perf_counter() - t) * 1000


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {s: {"p50_ms": pct(t, 50), "p95_ms": pct(t, 95)} for s, t in times.items()}


def _series(d: pydicom.Dataset) -> str:
    return f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}"


def _date_range(d: pydicom.Dataset) -> dict[str, str]:
    return {"StudyDate": f"{d.StudyDate[:4]}0101-{d.StudyDate[:4]}0630"}


QUERIES: dict[str, Callable[[pydicom.Dataset], tuple[str, dict[str, str]]]] = {
    "qido_patient_id": lambda d: ("/studies", {"PatientID": str(d.PatientID)}),
    "qido_name_wildcard": lambda d: ("/studies", {"PatientName": str(d.PatientName)[:3] + "*"}),
    "qido_date_range": lambda d: ("/studies", _date_range(d)),
    "qido_series_of_study": lambda d: (f"/studies/{d.StudyInstanceUID}/series", {}),
    "qido_instances_of_series": lambda d: (f"{_series(d)}/instances", {}),
}
# Each is requested once per sampled instance (distinct series, mostly), then, for the
# `_warm` figure, the same requests again: a viewer opening a study the first and the next time.
RETRIEVES: dict[str, tuple[Callable[[pydicom.Dataset], str], str]] = {
    "study_metadata": (lambda d: f"/studies/{d.StudyInstanceUID}/metadata", JSON),
    "series_metadata": (lambda d: f"{_series(d)}/metadata", JSON),
    "instance_retrieve": (lambda d: f"{_series(d)}/instances/{d.SOPInstanceUID}", ACCEPT_STORED),
    "series_retrieve": (_series, ACCEPT_STORED),
}
# Copies of the large instance (new UIDs) stored one request each, for STOW MB/s.
LARGE_STOW_COPIES = 6
# Timed reads of the large instance per server, warm and cold.
LARGE_REPEATS = 8


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    files = sorted(args.archive.rglob("*.dcm"))
    random.Random(1).shuffle(files)
    results: dict[str, Any] = {"instances": len(files)}
    with tempfile.TemporaryDirectory() as tmp:
        ours = start(Path(tmp) / "data", fresh_database(BENCH_DB))
        orthanc_url, orthanc_env = start_orthanc(Path(tmp) / "orthanc", "orthanc_bench_vs")
        servers = {"ours": ours.url, "orthanc": orthanc_url}
        try:
            results.update(run_all(servers, files, Path(tmp) / "data", Path(tmp) / "orthanc"))
            results["ours_peak_rss_mb"] = ours.peak_rss_kib() / 1024
        finally:
            ours.kill()
            subprocess.run(
                ["bash", str(PEERS / "stop.sh")], env=orthanc_env, check=False, capture_output=True
            )
    write_results(args.out, "vs_orthanc", results, markdown(results))
    return 0


def run_all(
    servers: dict[str, str], files: list[Path], data_dir: Path, orthanc_dir: Path
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # STOW: the first files measured in four shapes, the rest loaded (not measured).
    shapes = [("stow_batch1_conc1", 1, 1, 150), ("stow_batch1_conc8", 1, 8, 300),
              ("stow_batch50_conc1", 50, 1, 1000), ("stow_batch50_conc8", 50, 8, 2000)]  # fmt: skip
    pos = 0
    for name, batch, conc, count in shapes:
        chunk = files[pos : pos + count]
        pos += count
        res[name] = {s: stow_rate(u, chunk, batch, conc) for s, u in servers.items()}
        print(name, res[name], flush=True)
    for u in servers.values():
        stow_rate(u, files[pos:], 50, 8)
    sample = [pydicom.dcmread(f, stop_before_pixels=True) for f in files[:40]]
    with httpx.Client(timeout=120) as client:
        for name, make in QUERIES.items():
            times: dict[str, list[float]] = {s: [] for s in servers}
            for i in range(QIDO_REPEATS):
                path, params = make(sample[i % len(sample)])
                for s, u in servers.items():
                    times[s].append(timed_get(client, query_url(u, path, params)))
            res[name] = summary(times)
            print(name, res[name], flush=True)
        for name, (suffix, accept) in RETRIEVES.items():
            for figure in (name, f"{name}_warm"):
                times = {s: [] for s in servers}
                for d in sample:
                    for s, u in servers.items():
                        url = f"{u}{suffix(d)}"
                        times[s].append(timed_get(client, url, headers={"Accept": accept}))
                res[figure] = summary(times)
                print(figure, res[figure], flush=True)
        res.update(large_stow(client, servers))
        print("large_stow", res["large_stow_mb_s"], flush=True)
        res.update(frames_and_rendered(client, servers))
        for cold in (False, True):
            key = "large_retrieve_cold_mb_s" if cold else "large_retrieve_mb_s"
            res[key] = large_retrieve(client, servers, data_dir, orthanc_dir, cold)
            print(key, res[key], flush=True)
    return res


def large_retrieve(
    client: httpx.Client, servers: dict[str, str], data_dir: Path, orthanc_dir: Path, cold: bool
) -> dict[str, float]:
    """A 12.6 MB instance retrieved as stored (MB/s) and the same bytes read from disk.

    Cold: each file is dropped from the page cache (posix_fadvise DONTNEED, no privilege
    needed) before every read, ours, Orthanc's and the plain read alike, so the disk is read.
    """
    ds = pydicom.dcmread(LARGE, stop_before_pixels=True)
    url = f"{_series(ds)}/instances/{ds.SOPInstanceUID}"
    size = LARGE.stat().st_size / 1e6
    if not cold:
        for u in servers.values():
            stow(client, u, [LARGE])
    files = {"ours": _largest(data_dir / "blobs"), "orthanc": _largest(orthanc_dir)}
    out: dict[str, list[float]] = {s: [] for s in [*servers, "disk"]}
    for _ in range(LARGE_REPEATS):
        for s, u in servers.items():
            if cold:
                _evict(files[s])
            t = time.perf_counter()
            with client.stream("GET", u + url, headers={"Accept": ACCEPT_STORED}) as r:
                for _chunk in r.iter_raw():
                    pass
            out[s].append(size / (time.perf_counter() - t))
        if cold:
            _evict(files["ours"])
        t = time.perf_counter()
        with files["ours"].open("rb") as fh:
            while fh.read(1 << 20):
                pass
        out["disk"].append(size / (time.perf_counter() - t))
    return {s: statistics.median(v) for s, v in out.items()}


def _copies(ts: str | None, n: int) -> list[bytes]:
    """n copies of the large 24-frame CT, each with new UIDs, compressed to `ts` if given."""
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(LARGE)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if ts is not None:
            ds.compress(ts, generate_instance_uid=False)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _stow_bytes(client: httpx.Client, url: str, data: bytes) -> None:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    r = client.post(f"{url}/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, (url, r.status_code, r.text[:300])


def large_stow(client: httpx.Client, servers: dict[str, str]) -> dict[str, Any]:
    """STOW of 12.6 MB multi-frame instances, one per request, alternately: MB/s."""
    copies = _copies(None, LARGE_STOW_COPIES)
    rates: dict[str, list[float]] = {s: [] for s in servers}
    for data in copies:
        for s, u in servers.items():
            t = time.perf_counter()
            _stow_bytes(client, u, data)
            rates[s].append(len(data) / 1e6 / (time.perf_counter() - t))
    return {"large_stow_mb_s": {s: statistics.median(v) for s, v in rates.items()}}


def frames_and_rendered(client: httpx.Client, servers: dict[str, str]) -> dict[str, Any]:
    """Each of the 24 frames of the large CT once per server (no server has it cached): as
    stored (Explicit VR Little Endian), decoded from a JPEG-LS Lossless copy, and rendered
    as JPEG from that copy."""
    native, jls = _copies(None, 1)[0], _copies(JPEGLSLossless, 1)[0]
    res: dict[str, Any] = {}
    for name, data, suffix, accept in (
        ("frame_stored", native, "", ACCEPT_FRAME),
        ("frame_transcoded", jls, "", ACCEPT_FRAME),
        ("frame_rendered", jls, "/rendered", "image/jpeg"),
    ):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for u in servers.values():
            _stow_bytes(client, u, data)
        inst = f"{_series(ds)}/instances/{ds.SOPInstanceUID}"
        times: dict[str, list[float]] = {s: [] for s in servers}
        for k in range(1, int(ds.NumberOfFrames) + 1):
            for s, u in servers.items():
                url = f"{u}{inst}/frames/{k}{suffix}"
                times[s].append(timed_get(client, url, headers={"Accept": accept}))
        res[name] = summary(times)
        print(name, res[name], flush=True)
    return res


def _largest(root: Path) -> Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _row(figure: str, ours: float, orthanc: float, fmt: str = ".1f") -> str:
    return f"| {figure} | {ours:{fmt}} | {orthanc:{fmt}} | {ours / orthanc:.2f} |"


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Archive: {r['instances']} instances.",
        "",
        "| figure | ours | Orthanc | ours / Orthanc |",
        "|---|---|---|---|",
    ]
    for key, v in r.items():
        if key.startswith("stow_"):
            lines.append(
                _row(f"{key} (instances/s, higher is better)", v["ours"], v["orthanc"], ".0f")
            )
        elif isinstance(v, dict) and isinstance(v.get("ours"), dict):
            for p in ("p50_ms", "p95_ms"):
                lines.append(_row(f"{key} {p} (lower is better)", v["ours"][p], v["orthanc"][p]))
    ls = r.get("large_stow_mb_s")
    if ls:
        lines.append(
            _row("12.6 MB STOW, MB/s (higher is better)", ls["ours"], ls["orthanc"], ".0f")
        )
    for key, label in (("large_retrieve_mb_s", "page cache"), ("large_retrieve_cold_mb_s", "cold")):
        lr = r.get(key)
        if lr:
            lines.append(
                _row(
                    f"12.6 MB retrieve, {label}, MB/s (higher is better)",
                    lr["ours"],
                    lr["orthanc"],
                    ".0f",
                )
            )
            lines.append(
                f"| same bytes read from disk, {label}, MB/s | {lr['disk']:.0f} | |"
                f" ours / disk {lr['ours'] / lr['disk']:.2f} |"
            )
    lines.append(f"\nServer peak memory (ours): {r.get('ours_peak_rss_mb', 0):.0f} MB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
