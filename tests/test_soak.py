"""A short soak in every `make test` (issue 6): mixed load on a real server, memory sampled;
`benchmarks/soak.py --minutes 10` is the long run (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import SOAK_CI_SECONDS, SOAK_GROWTH_BOUND_MB, SOAK_RSS_BOUND_MB, soak
from tests.liveserver import running

pytestmark = pytest.mark.db


def test_soak_mixed_load(tmp_path: Path, clean_db: str) -> None:
    with running(tmp_path / "data", clean_db) as server:
        report = soak(server, SOAK_CI_SECONDS)
    summary = report.summary()
    assert summary["server_errors"] == []
    # Every kind of request was exercised, many times.
    assert set(report.requests) >= {"stow", "qido", "metadata", "instance", "frames_jls",
                                    "rendered", "thumbnail"}  # fmt: skip
    assert summary["requests_total"] > 200
    assert summary["rss_peak_mb"] < SOAK_RSS_BOUND_MB
    assert summary["growth_q2_to_q4_mb"] < SOAK_GROWTH_BOUND_MB, summary
