"""STOW-RS through the ASGI app in-process, against a real PostgreSQL: statuses and failure
reasons per instance, bad requests, limits, bodies that break off or stall, and failures
around the index's commit. An instance stored again: test_api_duplicates.py."""

from __future__ import annotations

import errno
import io
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pydicom
import pytest

from dicomweb_server.blobstore.files import _FileWriter
from dicomweb_server.config import Settings
from tests.api_support import _blob_contents, stow
from tests.helpers import (
    ROOT,
    TEST_HOSTS,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db


async def test_stow_failures_and_statuses(app_client: httpx.AsyncClient) -> None:
    good = make_instance()
    no_sop = make_instance()
    del no_sop.SOPInstanceUID
    r = await stow(app_client, to_bytes(good), b"this is not DICOM", to_bytes(no_sop))
    assert r.status_code == 202
    doc = r.json()
    failed = values(doc, "00081198")
    reasons = sorted(int(str(values(f, "00081197")[0])) for f in failed if isinstance(f, dict))
    assert reasons == [0xA900, 0xC000]
    assert len(values(doc, "00081199")) == 1

    r = await stow(app_client, b"garbage")
    assert r.status_code == 409

    other = make_instance()
    r = await stow(app_client, to_bytes(other), study="1.2.3.4")
    assert r.status_code == 409
    (f,) = values(r.json(), "00081198")
    assert isinstance(f, dict) and values(f, "00081197") == [0xA901]


async def test_stow_part_failing_to_spool_holds_no_later_part_up(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that fails while it is spooled (never parsed: its UID is never known) must not
    keep the later parts waiting for their commit turn."""
    bad = to_bytes(make_instance(rows=512, cols=512))  # past SPOOL_BUFFER_BYTES: written early
    good = make_instance()
    real_write_out = _FileWriter._write_out

    def full_disk(writer: _FileWriter, chunk: bytes, last: bool) -> None:
        if not last:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_out(writer, chunk, last)

    monkeypatch.setattr(_FileWriter, "_write_out", full_disk)
    with anyio.fail_after(30):
        r = await stow(app_client, bad, to_bytes(good))
    assert r.status_code == 202, r.text
    (failed,) = values(r.json(), "00081198")
    assert isinstance(failed, dict) and values(failed, "00081197") == [0xA700]
    (stored,) = values(r.json(), "00081199")
    assert isinstance(stored, dict) and values(stored, "00081155") == [good.SOPInstanceUID]


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/dicom", b"x", 415),
        ('multipart/related; type="application/pdf"; boundary=b', b"x", 415),
        ('multipart/related; type="application/dicom"', b"x", 400),  # no boundary
        ('multipart/related; type="application/dicom"; boundary=b', b"--b\r\n\r\nabc", 400),
        ('multipart/related; type="application/dicom"; boundary=b', b"", 400),
    ],
)
async def test_stow_bad_requests(
    app_client: httpx.AsyncClient, content_type: str, body: bytes, status: int
) -> None:
    r = await app_client.post(
        f"{ROOT}/studies", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == status
    assert r.json()["message"]


async def test_request_bodies_with_a_content_coding_are_415(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    """Found by review: request bodies are not decoded, and a STOW said to be gzip was parsed
    as its compressed bytes (a 400 "no boundary delimiter"), one said to be deflate but sent
    plain was stored. A content coding other than identity is now a 415 naming
    `Accept-Encoding: identity` (RFC 9110 15.5.16), before the body is read."""
    body = multipart_body([to_bytes(make_instance())])
    for coding in ("gzip", "deflate", "br", "identity, gzip", "GZIP"):
        headers = {**stow_headers(), "Content-Encoding": coding}
        r = await app_client.post(f"{ROOT}/studies", content=body, headers=headers)
        assert r.status_code == 415, (coding, r.text)
        assert r.headers["accept-encoding"] == "identity"
        assert "content coding" in r.json()["message"]
    # two field lines make one list (RFC 9110 5.3): the first alone let gzip through
    lines = [
        *stow_headers().items(),
        ("Content-Encoding", "identity"),
        ("Content-Encoding", "gzip"),
    ]
    r = await app_client.post(f"{ROOT}/studies", content=body, headers=lines)
    assert r.status_code == 415, r.text
    headers = {"Content-Type": "application/json", "Content-Encoding": "deflate"}
    r = await app_client.post("/admin/apikeys", content=b'{"role": "read"}', headers=headers)
    assert r.status_code == 415 and r.headers["accept-encoding"] == "identity"
    assert _blob_contents(settings) == []
    for coding in ("identity", ""):
        headers = {**stow_headers(), "Content-Encoding": coding}
        r = await app_client.post(f"{ROOT}/studies", content=body, headers=headers)
        assert r.status_code == 200, (coding, r.text)


async def test_stow_part_too_large(tmp_path: Path, clean_db: str) -> None:
    from dicomweb_server.app import create_app

    raw = to_bytes(make_instance())
    settings = Settings(
        data_dir=tmp_path / "d",
        database_url=clean_db,
        max_part_bytes=len(raw),
        allowed_hosts=TEST_HOSTS,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await stow(client, raw)).status_code == 200  # exactly at the limit
            bigger = to_bytes(make_instance(rows=8))
            r = await stow(client, bigger)
            assert r.status_code == 413
            assert str(len(raw)) in r.json()["message"]
            leftovers = [p for p in (settings.blob_dir / "tmp").rglob("*") if p.is_file()]
            assert leftovers == []
            # Parts stored before the one too large are reported: still the 413, with the
            # Store Instances Response of what was stored and the reason in the Warning.
            first = pydicom.dcmread(io.BytesIO(raw))  # at the limit (stored again: the same)
            r = await stow(client, raw, bigger)
            assert r.status_code == 413
            assert str(len(raw)) in r.headers["warning"]
            (stored,) = r.json()["00081199"]["Value"]
            assert stored["00081155"]["Value"] == [first.SOPInstanceUID]
            url = f"{ROOT}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
            assert (await client.get(f"{url}/instances/{first.SOPInstanceUID}")).status_code == 200


async def test_values_the_index_cannot_hold_are_stored(app_client: httpx.AsyncClient) -> None:
    """32-bit overflows are stored, just not indexed (found by review); a NUL inside a text
    value, which PostgreSQL cannot hold, is stored too (it failed the instance with 0xA900),
    given as U+FFFD in the index (test_malformed)."""
    big_number = make_instance(InstanceNumber=99999999999, SeriesNumber=3000000000)
    nul = make_instance(PatientName="Doe\x00John")
    r = await stow(app_client, to_bytes(big_number), to_bytes(nul))
    assert r.status_code == 200, r.text
    for ds in (big_number, nul):
        r = await app_client.get(f"{ROOT}/instances", params={"SOPInstanceUID": ds.SOPInstanceUID})
        assert r.status_code == 200


async def test_failure_after_commit_keeps_the_blob(
    app: object, app_client: httpx.AsyncClient
) -> None:
    """An error after the database committed (lost connection, cancellation) must not delete
    the blob of the stored instance (found by review)."""
    from starlette.applications import Starlette

    from dicomweb_server.errors import ServiceUnavailableError

    assert isinstance(app, Starlette)
    index = app.state.services.index
    real = index.commit_instance

    async def commit_then_lose_the_reply(rec: object) -> object:
        await real(rec)
        raise ServiceUnavailableError("connection lost after COMMIT")

    index.commit_instance = commit_then_lose_the_reply
    ds = make_instance()
    raw = to_bytes(ds)
    r = await stow(app_client, raw)
    assert r.status_code == 503
    index.commit_instance = real
    r = await app_client.get(
        f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
        headers={"Accept": "multipart/related; transfer-syntax=*"},
    )
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == raw


async def test_lost_reservation_is_not_committed(
    app: object, app_client: httpx.AsyncClient, pg_dsn: str
) -> None:
    """If another process rolled our reservation back (taking us for dead), the instance must
    not be committed over a deleted blob (found by review)."""
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    index = app.state.services.index
    real = index.commit_instance

    async def lose_reservation_then_commit(rec: Any) -> Any:
        # The blob is placed by now: the reservation goes before the commit can take it.
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                "DELETE FROM blob_reservation WHERE blob_key = $1", rec.instance["blob_key"]
            )
        finally:
            await conn.close()
        return await real(rec)

    index.commit_instance = lose_reservation_then_commit
    r = await stow(app_client, to_bytes(make_instance()))
    index.commit_instance = real
    assert r.status_code == 409
    (failed,) = values(r.json(), "00081198")
    assert isinstance(failed, dict) and values(failed, "00081197") == [0x0110]
    assert (await app_client.get(f"{ROOT}/instances")).status_code == 204
    root = app.state.settings.blob_dir
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]
    assert files == [], "the uncommitted blob was left behind"


async def test_a_server_error_of_a_part_outranks_a_body_that_breaks_off(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that met a server error (503: retry) and a body that then broke off (400): the
    503 is answered, as before the report of stored parts; that report left the part out of
    both its sequences and turned a retryable error into the client's."""
    from dicomweb_server import ingest
    from dicomweb_server.errors import ServiceUnavailableError

    real = ingest._finish_part
    calls: list[int] = []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise ServiceUnavailableError("database away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(ingest, "_finish_part", flaky)
    one, two = to_bytes(make_instance()), to_bytes(make_instance())
    body = multipart_body([one, two])[: -len("--test-boundary-1234--\r\n")]
    body += b"--test-boundary-1234\r\nContent-Type: application/dicom\r\n\r\npartial"
    r = await app_client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 503, r.text


async def test_stow_body_that_stops_coming_is_a_408(tmp_path: Path, clean_db: str) -> None:
    """BODY_IDLE_TIMEOUT_S: a body that pauses shorter than it is read on; one that pauses
    longer gets a 408 naming what was stored before it stopped, and the connection closed
    (a stalled body was waited for forever). The answer does not wait for the stalled body
    again (the drain after it took what came next, waiting for the client)."""
    from collections.abc import AsyncIterator

    from dicomweb_server.app import create_app

    settings = Settings(
        data_dir=tmp_path / "d",
        database_url=clean_db,
        allowed_hosts=TEST_HOSTS,
        body_idle_timeout_s=0.5,
    )

    def paused(body: bytes, split: int, pause_s: float) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            yield body[:split]
            await anyio.sleep(pause_s)
            yield body[split:]

        return chunks()

    application = create_app(settings)
    transport = httpx.ASGITransport(app=application)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        first, second = make_instance(), make_instance()
        body = multipart_body([to_bytes(first), to_bytes(second)])
        split = body.index(to_bytes(second)) + 100  # inside the second part
        content = paused(body, split, 0.1)
        r = await client.post(f"{ROOT}/studies", content=content, headers=stow_headers())
        assert r.status_code == 200, r.text
        first, second = make_instance(), make_instance()
        body = multipart_body([to_bytes(first), to_bytes(second)])
        split = body.index(to_bytes(second)) + 100
        started = time.monotonic()
        content = paused(body, split, 3.0)
        r = await client.post(f"{ROOT}/studies", content=content, headers=stow_headers())
        assert time.monotonic() - started < 2.5  # not the 3 s pause (idle 0.5 s; a loaded box)
        assert r.status_code == 408, r.text
        assert r.headers["Connection"] == "close"
        assert "nothing came for 0.5 seconds" in r.headers["Warning"]
        (stored,) = r.json()["00081199"]["Value"]
        assert stored["00081155"]["Value"] == [first.SOPInstanceUID]
        params = {"SOPInstanceUID": second.SOPInstanceUID}
        r = await client.get(f"{ROOT}/instances", params=params)
        assert r.status_code == 204
        assert [p for p in (settings.blob_dir / "tmp").rglob("*") if p.is_file()] == []
