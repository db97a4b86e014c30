"""A whole-instance conversion for WADO-RS holds one of the shared worker threads (the app's
CapacityLimiter, which STOW parsing and frame decoding share) only while it decodes a frame,
not for the whole conversion: two conversions of minutes held every shared thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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
