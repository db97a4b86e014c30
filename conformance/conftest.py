"""The black-box suite: DICOMWEB_URL when set (e.g. `make serve`), else a server started here."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient

SAMPLES = Path(
    os.environ.get("DICOMWEB_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples")
)


@pytest.fixture(scope="session")
def dicomweb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("DICOMWEB_URL")
    if url:
        yield url.rstrip("/")
        return
    from tests.liveserver import start

    server = start(tmp_path_factory.mktemp("conformance") / "data", os.environ.get("DATABASE_URL"))
    try:
        yield server.url
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def client(dicomweb_url: str) -> DICOMwebClient:
    return DICOMwebClient(dicomweb_url)


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "MANIFEST.tsv").exists():
        pytest.fail(f"sample corpus not found at {SAMPLES} (set DICOMWEB_SAMPLES)")
    return SAMPLES
