"""Frame retrieval through the HTTP API vs pydicom's in-process decode of the same frame.

Issue 4's figure: for multi-frame JPEG 2000 and JPEG-LS files, the time to GET one frame
uncompressed (the server decodes it) divided by the time pydicom takes to decode that frame in
this process, measured in the same run (target: at most 1.2). Also the server's peak memory
while it transcodes a 500-frame series (target: under 300 MB).

    .venv/bin/python benchmarks/frames.py [--out benchmarks/results/frames.json]

Uses DATABASE_URL when set, else the server starts its own embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
from pydicom.pixels.utils import pixel_array
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.liveserver import start

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
LARGE = SAMPLES / "generated/large/ect_24frames_512_explicit_le.dcm"
BOUNDARY = "bench-boundary"
# Frames of the series whose transcoding is watched for peak memory.
SERIES_FRAMES = 500


def compressed_copy(ts: str, out: Path) -> Path:
    ds = pydicom.dcmread(LARGE)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.compress(ts, generate_instance_uid=False)
    path = out / f"{ts}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def stow(client: httpx.Client, url: str, files: list[bytes]) -> None:
    body = (
        b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
            for f in files
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    r = client.post(f"{url}/studies", content=body, headers={"Content-Type": ctype})
    r.raise_for_status()


def frame_ratio(client: httpx.Client, url: str, path: Path) -> dict[str, float]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    inst = (
        f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    n = int(ds.NumberOfFrames)
    http, local = [], []
    for k in range(1, n + 1):  # each frame once: the server's frame cache stays cold
        t = time.perf_counter()
        pixel_array(str(path), index=k - 1)
        local.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = client.get(f"{inst}/frames/{k}")
        r.raise_for_status()
        http.append(time.perf_counter() - t)
    return {
        "frames": n,
        "http_median_ms": statistics.median(http) * 1000,
        "pydicom_median_ms": statistics.median(local) * 1000,
        "ratio": statistics.median(http) / statistics.median(local),
    }


def series_peak_rss(
    client: httpx.Client, url: str, server_rss: Callable[[], int], work: Path
) -> dict[str, float]:
    """STOW a series of SERIES_FRAMES single-frame JPEG 2000 instances, retrieve it as Explicit
    VR Little Endian (every instance transcoded), and read the server's peak memory."""
    src = pydicom.dcmread(LARGE)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(SERIES_FRAMES):
        ds = pydicom.dcmread(LARGE, stop_before_pixels=True)
        del ds.NumberOfFrames
        ds.PerFrameFunctionalGroupsSequence = []
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.PixelData = src.pixel_array[i % 24].tobytes()
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        buf = work / f"s{i}.dcm"
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.read_bytes())
    for i in range(0, len(files), 50):
        stow(client, url, files[i : i + 50])
    before = server_rss()
    t = time.perf_counter()
    received = 0
    with client.stream("GET", f"{url}/studies/{study}/series/{series}") as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            received += len(chunk)
    return {
        "instances": SERIES_FRAMES,
        "seconds": time.perf_counter() - t,
        "bytes": received,
        "peak_rss_mb_before": before / 1024,
        "peak_rss_mb": server_rss() / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/frames.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start(work / "data", os.environ.get("DATABASE_URL"))
        try:
            with httpx.Client(timeout=600) as client:
                results: dict[str, object] = {}
                for name, ts in (
                    ("jpeg2000_lossless", JPEG2000Lossless),
                    ("jpegls_lossless", JPEGLSLossless),
                ):
                    path = compressed_copy(ts, work)
                    stow(client, server.url, [path.read_bytes()])
                    results[name] = frame_ratio(client, server.url, path)
                    print(name, json.dumps(results[name]))
                results["series_500_j2k_to_explicit_le"] = series_peak_rss(
                    client, server.url, server.peak_rss_kib, work
                )
                print("series", json.dumps(results["series_500_j2k_to_explicit_le"]))
        finally:
            server.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
