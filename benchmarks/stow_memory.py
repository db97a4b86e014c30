"""Peak server memory while a 2 GB multipart STOW streams in (issue 6: under 300 MB).

One request of STOW_MEMORY_PARTS copies of a 12.6 MB 24-frame sample (each with its own SOP
Instance UID), sent with chunked transfer encoding, generated part by part on the client so
that neither side ever holds the body. Prints and writes the server's peak resident memory
(VmHWM) and the rate.

    .venv/bin/python benchmarks/stow_memory.py [--parts 160] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import BOUNDARY, stow_headers
from tests.liveserver import running

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
LARGE = SAMPLES / "generated/large/ect_24frames_512_explicit_le.dcm"
# 160 x 12.6 MB: just over 2 GB.
STOW_MEMORY_PARTS = 160
# The bound issue 6 sets, MB.
PEAK_RSS_BOUND_MB = 300
CHUNK_BYTES = 256 * 1024


def body(raw: bytes, sop: str, parts: int) -> Iterator[bytes]:
    stem = sop[: -len(str(parts)) - 1]
    for i in range(parts):
        new = f"{stem}{i:0{len(str(parts)) + 1}d}"
        copy = raw.replace(sop.encode(), new.encode())
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        for at in range(0, len(copy), CHUNK_BYTES):
            yield copy[at : at + CHUNK_BYTES]
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", type=int, default=STOW_MEMORY_PARTS)
    parser.add_argument("--database-url", default=None, help="none: the embedded PostgreSQL")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    raw = LARGE.read_bytes()
    sop = str(pydicom.dcmread(LARGE, stop_before_pixels=True).SOPInstanceUID)
    total = args.parts * len(raw)
    with (
        tempfile.TemporaryDirectory() as tmp,
        running(Path(tmp) / "data", args.database_url) as server,
        httpx.Client(timeout=3600) as client,
    ):
        baseline = server.peak_rss_kib() / 1024
        t = time.perf_counter()
        r = client.post(f"{server.url}/studies", content=body(raw, sop, args.parts),
                        headers=stow_headers())  # fmt: skip
        seconds = time.perf_counter() - t
        peak = server.peak_rss_kib() / 1024
    stored = len(r.json().get("00081199", {}).get("Value", [])) if r.status_code == 200 else 0
    result = {
        "parts": args.parts, "body_mb": round(total / 1e6), "status": r.status_code,
        "stored": stored, "seconds": round(seconds, 1), "mb_per_s": round(total / 1e6 / seconds, 1),
        "server_rss_at_start_mb": round(baseline, 1), "server_peak_rss_mb": round(peak, 1),
        "bound_mb": PEAK_RSS_BOUND_MB,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stow_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if stored == args.parts and peak < PEAK_RSS_BOUND_MB else 1


if __name__ == "__main__":
    sys.exit(main())
