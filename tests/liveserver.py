"""A real server (hypercorn) in a subprocess, for streaming, memory and crash tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

# Seconds to wait for a started server to answer.
START_TIMEOUT_S = 60.0
# glibc's HEAP_MAX_SIZE on 64-bit machines: each arena but the main one lives in heaps of this
# size, mapped at addresses aligned to it. A heap starts with its heap_info, whose first field
# points to its arena; the arena's first heap holds the arena just past that header.
HEAP_BYTES = 64 * 1024 * 1024
HEAP_HEADER_BYTES = 4096


def free_port() -> int:
    """A port free on 127.0.0.1: one the system picks, or, when DICOMWEB_TEST_PORTS names a
    range (`18200-18249`: a machine shared by several test runs), the next free one of it."""
    lo, _, hi = os.environ.get("DICOMWEB_TEST_PORTS", "").partition("-")
    candidates = [0] if not lo else [*range(int(lo), int(hi or lo) + 1)]
    global _next_in_range
    for k in range(len(candidates)):
        port = candidates[(_next_in_range + k) % len(candidates)]
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            if port:
                _next_in_range = (_next_in_range + k + 1) % len(candidates)
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in DICOMWEB_TEST_PORTS={lo}-{hi}")


# Where free_port looks first in DICOMWEB_TEST_PORTS: not a port it gave out a moment ago
# (a server given it may not be listening yet).
_next_in_range = 0


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str  # the DICOMweb root
    log: Path

    def peak_rss_kib(self) -> int:
        """Peak resident memory of the server process (VmHWM), KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def start(
    data_dir: Path,
    database_url: str | None,
    extra_env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    scheme: str = "http",
    cwd: Path | None = None,
) -> ServerProcess:
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    env.pop("DATABASE_URL", None)
    args = [sys.executable, "-m", "dicomweb_server", "serve", "--port", str(port)]
    args += ["--data-dir", str(data_dir)]
    if database_url:
        args += ["--database-url", database_url]
    args += list(extra_args)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"server-{port}.log"
    with log.open("ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    server = ServerProcess(proc, f"{scheme}://127.0.0.1:{port}/dicom-web", log)
    health = server.url.removesuffix("/dicom-web") + "/health"  # open whatever the --auth
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health, timeout=2, verify=False).status_code == 200:
                return server
            # An older server (benchmarks/stow.py's baseline) has no /health.
            r = httpx.get(server.url + "/studies?limit=1", timeout=2, verify=False)
            if r.status_code in (200, 204):
                return server
        time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"server did not answer in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running(data_dir: Path, database_url: str | None) -> Iterator[ServerProcess]:
    server = start(data_dir, database_url)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def malloc_arenas(pid: int) -> int:
    """glibc malloc arenas of process `pid` besides the main one (which grows with brk, not in
    heaps), counted in /proc/PID/maps and /proc/PID/mem (a child of this process, or ptrace
    allowed)."""
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        regions.append((start, end, fields[1], len(fields) > 5))  # len > 5: a named mapping
    count = 0
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for start, _end, perms, named in regions:
            if named or start % HEAP_BYTES or not perms.startswith("rw"):
                continue
            mem.seek(start)
            (arena,) = struct.unpack("<Q", mem.read(8))
            count += start < arena < start + HEAP_HEADER_BYTES  # an arena's first heap
    return count
