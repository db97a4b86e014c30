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
import functools
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
from benchmarks.common import (
    PEERS,
    fresh_database,
    query_url,
    raw_get,
    start_orthanc,
    write_results,
)
from benchmarks.sendfile_server import sendfile_server
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
# The 201 MB instance (the large CT's frames 16 times over) for retrieve throughput.
HUGE_FRAME_FACTOR = 16
HUGE_REPEATS = 4


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
) -> dict[str, dict[str, float]]:
    """Retrieve as stored (MB/s) of the 12.6 MB instance and of a 201 MB one (its frames 16
    times over: a size where a request's fixed cost no longer hides the streaming rate), and
    the same bytes read from disk, and sent by a bare sendfile server (no user-space copy:
    `sendfile_server.py`).

    The client is common.raw_get (a socket read per MiB, nothing parsed past the status line):
    httpx tops out near 450 MB/s here and curl near 1.6 GB/s, below what the servers send, which
    made every fast server look alike. Cold: each file is dropped from the page cache
    (posix_fadvise DONTNEED, no privilege needed) before every read, ours, Orthanc's and the
    plain read alike, so the disk is read.
    """
    out: dict[str, dict[str, float]] = {}
    for label, data, repeats in (
        ("12.6 MB", LARGE.read_bytes(), LARGE_REPEATS),
        ("201 MB", _huge(), HUGE_REPEATS),
    ):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        url = f"{_series(ds)}/instances/{ds.SOPInstanceUID}"
        size = len(data) / 1e6
        for u in servers.values():
            _stow_bytes(client, u, data)
        files = {"ours": _stored_copy(data_dir / "blobs", data),
                 "orthanc": _stored_copy(orthanc_dir, data)}  # fmt: skip
        rates: dict[str, list[float]] = {s: [] for s in [*servers, "sendfile", "disk"]}
        with sendfile_server(files["ours"]) as bare:
            for _ in range(repeats):
                for s, u in [*servers.items(), ("sendfile", bare)]:
                    if cold:
                        _evict(files.get(s, files["ours"]))
                    rates[s].append(_get_mb_s(u if s == "sendfile" else u + url))
                if cold:
                    _evict(files["ours"])
                t = time.perf_counter()
                with files["ours"].open("rb") as fh:
                    while fh.read(1 << 20):
                        pass
                rates["disk"].append(size / (time.perf_counter() - t))
        out[label] = {s: statistics.median(v) for s, v in rates.items()}
        print("large retrieve", label, "cold" if cold else "warm", out[label], flush=True)
    return out


def _get_mb_s(url: str) -> float:
    """MB/s of one GET as stored: body bytes / time from connecting to the last byte."""
    status, nbytes, seconds = raw_get(url, ACCEPT_STORED)
    assert status == 200, (url, status)
    return nbytes / 1e6 / seconds


@functools.cache
def _huge() -> bytes:
    """The large 24-frame CT with its frames HUGE_FRAME_FACTOR times over and new UIDs, as a
    Part-10 file; the same bytes for the warm and the cold pass."""
    ds = pydicom.dcmread(LARGE)
    ds.PixelData = ds.PixelData * HUGE_FRAME_FACTOR
    ds.NumberOfFrames = int(ds.NumberOfFrames) * HUGE_FRAME_FACTOR
    return _as_new_instance(ds)


def _copies(ts: str | None, n: int) -> list[bytes]:
    """n copies of the large 24-frame CT, each with new UIDs, compressed to `ts` if given."""
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(LARGE)
        if ts is not None:
            ds.compress(ts, generate_instance_uid=False)
        out.append(_as_new_instance(ds))
    return out


def _as_new_instance(ds: pydicom.Dataset) -> bytes:
    """`ds` with new Study, Series and SOP Instance UIDs, as a Part-10 file."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


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


def _stored_copy(root: Path, data: bytes) -> Path:
    """The file under `root` holding exactly `data` (both servers keep what was sent as it
    came): the blob a retrieve of that instance reads, which the cold pass must evict. Not
    merely the largest file: copies of the large CT with other UIDs are of its size too."""
    for p in root.rglob("*"):
        if p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data:
            return p
    raise AssertionError(f"no stored copy of the {len(data)}-byte instance under {root}")


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
        for size, lr in r.get(key, {}).items():
            lines.append(
                _row(
                    f"{size} retrieve, {label}, MB/s (higher is better)",
                    lr["ours"],
                    lr["orthanc"],
                    ".0f",
                )
            )
            lines.append(
                f"| same bytes read from disk, {label}, MB/s | {lr['disk']:.0f} | |"
                f" ours / disk {lr['ours'] / lr['disk']:.2f} |"
            )
            if "sendfile" in lr:
                lines.append(
                    f"| same bytes from a bare sendfile server, {label}, MB/s |"
                    f" {lr['sendfile']:.0f} | | ours / sendfile {lr['ours'] / lr['sendfile']:.2f} |"
                )
    lines.append(f"\nServer peak memory (ours): {r.get('ours_peak_rss_mb', 0):.0f} MB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
