"""A whole-instance conversion for WADO-RS holds one of the shared worker threads (the app's
CapacityLimiter, which STOW parsing and frame decoding share) only while it decodes a frame,
not for the whole conversion: two conversions of minutes held every shared thread."""

from __future__ import annotations

import contextlib
import faulthandler
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server.retrieve import instances
from dicomweb_server.transcode import convert
from tests.helpers import ROOT, inst_url, multipart_body, split_multipart, stow_headers

pytestmark = pytest.mark.db

_EXPLICIT = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'


async def test_a_conversion_holds_a_shared_thread_only_while_it_decodes(
    app: Starlette,
    app_client: httpx.AsyncClient,
    samples: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = samples / "real/pydicom-data/emri_small_RLE.dcm"
    ds = pydicom.dcmread(path)
    r = await app_client.post(
        f"{ROOT}/studies",
        content=multipart_body([path.read_bytes()]),
        headers=stow_headers(),
    )
    assert r.status_code == 200, r.text
    limiter = app.state.services.limiter
    borrowed: list[tuple[str, float]] = []
    real = convert.to_transfer_syntax

    def held() -> float:
        return float(anyio.from_thread.run_sync(lambda: limiter.borrowed_tokens))

    def watched(src: Path, dst: Path, target: str, **kwargs: Any) -> None:
        step: Callable[[], contextlib.AbstractContextManager[object]] = kwargs.get(
            "step", contextlib.nullcontext
        )
        borrowed.append(("between frames", held()))
        with step():
            borrowed.append(("decoding", held()))
        real(src, dst, target, **kwargs)

    monkeypatch.setattr(instances, "to_transfer_syntax", watched)
    r = await app_client.get(inst_url(ds), headers={"Accept": _EXPLICIT})
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))
    assert (got.pixel_array == ds.pixel_array).all()
    assert borrowed == [("between frames", 0.0), ("decoding", 1.0)]
    assert app.state.services.converting.total_tokens == instances.WADO_CONVERSIONS_AT_ONCE


async def test_a_cancelled_conversion_stops_at_its_next_frame(
    app: Starlette,
    app_client: httpx.AsyncClient,
    samples: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled (a client leaving a study retrieve cancels its stream), a conversion stops
    before its next frame, its tokens given back and its scratch file removed. It hung: the
    thread's wait for a shared thread (anyio.from_thread.run in the awaiting task's cancelled
    scope) never returned, its turns held, and the event loop spun at full CPU."""
    path = samples / "real/pydicom-data/emri_small_RLE.dcm"  # 10 frames
    ds = pydicom.dcmread(path)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    svc = app.state.services
    turns: list[int] = []
    real = convert.to_transfer_syntax

    def cancelling(src: Path, dst: Path, target: str, **kwargs: Any) -> None:
        step: Callable[[], contextlib.AbstractContextManager[object]] = kwargs.pop("step")

        @contextlib.contextmanager
        def counted() -> Iterator[None]:
            with step():
                yield
            turns.append(1)
            if len(turns) == 3:  # the header, two frames
                anyio.from_thread.run_sync(request.cancel)

        real(src, dst, target, step=counted, **kwargs)

    monkeypatch.setattr(instances, "to_transfer_syntax", cancelling)
    faulthandler.dump_traceback_later(60, exit=True)  # without the fix: hung for ever
    try:
        with anyio.CancelScope() as request:
            await app_client.get(inst_url(ds), headers={"Accept": _EXPLICIT})
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert request.cancelled_caught
    assert len(turns) == 3  # stopped before the next frame, not converted to its end
    assert (svc.limiter.borrowed_tokens, svc.converting.borrowed_tokens) == (0, 0)
    assert not any(svc.scratch_dir.iterdir())
    monkeypatch.setattr(instances, "to_transfer_syntax", real)
    r = await app_client.get(inst_url(ds), headers={"Accept": _EXPLICIT})
    assert r.status_code == 200, r.text
