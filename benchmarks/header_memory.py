"""Peak server memory for a STOW of one instance whose header (its data set but Pixel Data)
holds a large value or structure: (a) a private OB element, (b) a sequence of many small
items, (c) an Encapsulated PDF, each of --mb MB (300 by default), one fresh server each.
Prints and writes each server's growth of peak resident memory (VmHWM) over its start, the
status and the failure reason. The files are written to disk a MB at a time and sent in
chunks, so that the client holds none of them. With --concurrent N, N clients each send an
instance of their own at once (parses of large headers take turns: HEADER_PARSES_MEMORY_BYTES).

    .venv/bin/python benchmarks/header_memory.py [--mb 300] [--cases a,b,c] [--concurrent 1]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import BOUNDARY, make_instance, stow_headers, to_bytes
from tests.liveserver import running

MB = 1024 * 1024
_LONG = (b"OB", b"OW", b"SQ", b"UN", b"UT")
# (b): items of (0040,A010) CS, (0040,A040) CS and (0040,A160) UT of 64 characters: an SR's
# TEXT content items, 112 bytes each.
_ITEM_BODY = (
    struct.pack("<HH2sH", 0x0040, 0xA010, b"CS", 8) + b"CONTAINS"
    + struct.pack("<HH2sH", 0x0040, 0xA040, b"CS", 4) + b"TEXT"
    + struct.pack("<HH2sHI", 0x0040, 0xA160, b"UT", 0, 64) + b"t" * 64
)  # fmt: skip
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, len(_ITEM_BODY)) + _ITEM_BODY


def _header(tag: int, vr: bytes, length: int) -> bytes:
    if vr in _LONG:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length)


def _filler(n: int, byte: bytes = b"\x5a") -> Iterator[bytes]:
    block = byte * MB
    while n:
        yield block[: min(n, MB)]
        n -= min(n, MB)


def _case(name: str, size: int) -> Iterator[bytes]:
    """The elements after the instance's own (all of whose tags are lower): the large one."""
    if name == "a":  # a private OB
        yield _header(0x00290010, b"LO", 4) + b"ACME" + _header(0x00291010, b"OB", size)
        yield from _filler(size)
    elif name == "b":  # a sequence of small items, undefined length
        count = size // len(_ITEM)
        yield _header(0x0040A730, b"SQ", 0xFFFFFFFF)
        for done in range(0, count, 10_000):
            yield _ITEM * min(10_000, count - done)
        yield struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    else:  # an Encapsulated Document
        yield _header(0x00420011, b"OB", size) + b"%PDF-1.4\n"
        yield from _filler(size - 9)


def write_case(name: str, size: int, path: Path) -> None:
    ds = make_instance()
    del ds.PixelData
    with path.open("wb") as out:
        out.write(to_bytes(ds))
        for chunk in _case(name, size):
            out.write(chunk)


def body(path: Path) -> Iterator[bytes]:
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with path.open("rb") as fh:
        while chunk := fh.read(MB):
            yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _post(url: str, path: Path) -> httpx.Response:
    with httpx.Client(timeout=3600) as client:
        return client.post(f"{url}/studies", content=body(path), headers=stow_headers())


def run_case(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    paths = [tmp / f"{name}-{k}.dcm" for k in range(args.concurrent)]
    for path in paths:
        write_case(name, args.mb * MB, path)
    with running(tmp / f"data-{name}", args.database_url) as server:
        baseline = server.peak_rss_kib() / 1024
        t = time.perf_counter()
        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(lambda p: _post(server.url, p), paths))
        seconds = time.perf_counter() - t
        peak = server.peak_rss_kib() / 1024
    for path in paths:
        path.unlink()
    failed = [f for r in answers if r.content
              for f in r.json().get("00081198", {}).get("Value", [])]  # fmt: skip
    return {
        "status": sorted({r.status_code for r in answers}), "seconds": round(seconds, 1),
        "server_rss_at_start_mb": round(baseline, 1),
        "server_peak_rss_mb": round(peak, 1), "growth_mb": round(peak - baseline, 1),
        "failure": [f["00081197"]["Value"][0] for f in failed],
        "warning": answers[0].headers.get("Warning", "")[:160],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--cases", default="a,b,c")
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="none: the embedded PostgreSQL")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            results[name] = run_case(name, args, Path(tmp))
            print(name, json.dumps(results[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "header_memory.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
