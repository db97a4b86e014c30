"""The malloc arena limit (config.MALLOC_ARENA_MAX) in effect in a real server process: the
arenas glibc made there are counted from outside (liveserver.malloc_arenas), after
parallel downloads have put many threads to work (each thread that allocates gets an arena of
its own while the limit allows)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest

from dicomweb_server.config import MALLOC_ARENA_MAX
from tests.helpers import multipart_body, stow_headers
from tests.liveserver import ServerProcess, malloc_arenas, start

pytestmark = [
    pytest.mark.db,
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
        reason="glibc on Linux only",
    ),
]

DOWNLOADS = 24


@contextlib.contextmanager
def serving(tmp_path: Path, database_url: str, *args: str) -> Iterator[ServerProcess]:
    server = start(tmp_path / "data", database_url, extra_args=args)
    try:
        yield server
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def download_in_parallel(server: ServerProcess, path: Path) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    r = httpx.post(f"{server.url}/studies", content=multipart_body([path.read_bytes()]),
                   headers=stow_headers(), timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    url = (f"{server.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")  # fmt: skip
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

    def get(_: int) -> int:
        return len(httpx.get(url, headers={"Accept": accept}, timeout=120).content)

    with ThreadPoolExecutor(DOWNLOADS) as pool:
        assert min(pool.map(get, range(DOWNLOADS))) > path.stat().st_size


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_server_keeps_to_the_malloc_arena_limit(
    tmp_path: Path, clean_db: str, samples: Path, workers: int
) -> None:
    """Unlimited, one server process had 9-10 arenas after 100 such downloads
    (docs/benchmarks.md). With `--workers 2`, each worker process keeps to it."""
    assert "MALLOC_ARENA_MAX" not in os.environ  # the server's own limit, not one inherited
    large = samples / "generated/large/ect_24frames_512_explicit_le.dcm"
    with serving(tmp_path, clean_db, "--workers", str(workers)) as server:
        download_in_parallel(server, large)
        serving_pids = [server.proc.pid] if workers == 1 else children(server.proc.pid)
        assert len(serving_pids) >= workers
        for pid in serving_pids:
            assert malloc_arenas(pid) <= MALLOC_ARENA_MAX - 1
