"""Multipart responses: built whole up to INLINE_RESPONSE_BYTES, streamed past it, the same
bytes either way; a stored blob found short or missing is an error before anything is sent,
built whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse

from dicomweb_server.multipart import encode_parts, encoded_length
from dicomweb_server.retrieve.instances import Part
from dicomweb_server.routes import responses
from dicomweb_server.routes.responses import INLINE_RESPONSE_BYTES, multipart_response
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

BOUNDARY = "b" * 32
HEADERS = {"Content-Type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}


async def _parts(bodies: list[bytes]) -> AsyncIterator[Part]:
    for body in bodies:
        yield dict(HEADERS), _chunks(body)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    half = len(body) // 2
    yield body[:half]
    yield body[half:]


async def _streamed(response: StreamingResponse) -> bytes:
    return b"".join([bytes(c) async for c in response.body_iterator])  # type: ignore[arg-type]


@pytest.mark.parametrize("over", [0, 1])
async def test_inline_up_to_the_limit_streamed_past_it(
    monkeypatch: pytest.MonkeyPatch, over: int
) -> None:
    monkeypatch.setattr(responses, "new_boundary", lambda: BOUNDARY)
    framing = encoded_length([(HEADERS, 0), (HEADERS, 0)], BOUNDARY)
    n = INLINE_RESPONSE_BYTES - framing + over  # two bodies of n // 2 and n - n // 2
    bodies = [b"\x01" * (n // 2), b"\x02" * (n - n // 2)]
    lengths = [(HEADERS, len(b)) for b in bodies]
    response = await multipart_response(_parts(bodies), "application/dicom", lengths)
    expected = await _streamed(StreamingResponse(encode_parts(_parts(bodies), BOUNDARY)))
    assert len(expected) == INLINE_RESPONSE_BYTES + over
    if over:
        assert isinstance(response, StreamingResponse)
        assert await _streamed(response) == expected
    else:
        assert not isinstance(response, StreamingResponse) and response.body == expected
    assert response.headers["content-length"] == str(len(expected))
    assert (
        response.media_type == f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    )


async def test_unknown_lengths_stream() -> None:
    response = await multipart_response(_parts([b"x"]), "application/octet-stream")
    assert isinstance(response, StreamingResponse)
    assert "content-length" not in response.headers


async def test_a_stream_that_fails_at_once_fails_before_the_response() -> None:
    """Past INLINE_RESPONSE_BYTES the first piece is still made before the response exists:
    a blob that cannot be read is an error status, not a 200 that breaks off."""

    async def unreadable() -> AsyncIterator[bytes]:
        raise OSError("blob shorter than the recorded range")
        yield b""  # pragma: no cover - an async generator

    async def parts() -> AsyncIterator[Part]:
        yield dict(HEADERS), unreadable()

    lengths = [(HEADERS, 2 * INLINE_RESPONSE_BYTES)]
    with pytest.raises(OSError, match="shorter"):
        await multipart_response(parts(), "application/dicom", lengths)
    with pytest.raises(OSError, match="shorter"):
        await multipart_response(parts(), "application/dicom")  # chunked alike


@pytest.mark.db
@pytest.mark.parametrize(
    ("side", "damage"),
    [(4, "short"), (1024, "short"), (1024, "missing")],  # inline; streamed (2 MiB of pixels)
)
async def test_short_blob_is_an_error_before_the_response(
    app: Starlette, app_client: httpx.AsyncClient, side: int, damage: str
) -> None:
    """A stored file shorter than its recorded size (damaged storage), or gone, fails the
    request with a 500 before any byte is sent, rather than a 200 whose body breaks off,
    whether the response is built whole or streamed."""
    ds = make_instance(rows=side, cols=side)
    data = to_bytes(ds)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    accept = {"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"}
    r = await app_client.get(inst_url(ds), headers=accept)
    assert r.status_code == 200 and r.headers["content-length"] == str(len(r.content))
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == data
    svc = app.state.services
    (found,) = await svc.index.locate(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path = svc.blobs.local_path(found.blob_key)
    if damage == "short":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.unlink()
    r = await app_client.get(inst_url(ds), headers=accept)
    assert r.status_code == 500 and r.json()["status"] == 500


@pytest.mark.db
async def test_head_of_a_study_converts_and_reads_nothing_more(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HEAD gets the headers a GET would, its body closed unread: Starlette's streaming
    response iterated the whole body for a HEAD, converting every instance that needed it.
    Only the first piece is made (before any response starts), and its scratch file goes."""
    import io

    import pydicom

    from dicomweb_server.retrieve import instances

    study = make_instance().StudyInstanceUID
    raws = []
    for k in range(3):
        ds = make_instance(study=study, rows=64, cols=64, InstanceNumber=k + 1)
        ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        raws.append(buf.getvalue())
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body(raws), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    calls: list[str] = []
    real = instances.to_transfer_syntax  # type: ignore[attr-defined]

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(str(args[2]))
        real(*args, **kwargs)

    monkeypatch.setattr(instances, "to_transfer_syntax", counted)
    url = f"{ROOT}/studies/{study}"
    r = await app_client.head(url)  # Explicit VR Little Endian: each instance decoded
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert len(calls) == 1
    assert list(app.state.services.scratch_dir.iterdir()) == []
    r = await app_client.get(url)
    assert r.status_code == 200 and len(calls) == 4
