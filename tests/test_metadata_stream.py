"""Study and series metadata (routes.metadata_body): the entity tag is known before the body
is read, from what makes the body, so a 304 reads no instance and a large body is sent as it
is read. A study's metadata was built whole, hashed and compressed: 55 MB per request for
5,000 instances (13 MB of JSON), about 4 times the body."""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from pydicom.uid import generate_uid
from starlette.applications import Starlette

from dicomweb_server import metadata
from dicomweb_server.reindex import reindex
from dicomweb_server.routes import metadata_body
from tests.helpers import (
    ROOT,
    asgi_get,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db

_N = 60  # instances of the study: three series
_COMMENT = "x" * 20_000  # ImageComments (LT): each instance's metadata about 21 KB
_XML = 'multipart/related; type="application/dicom+xml"'


async def _stow(client: httpx.AsyncClient, *files: bytes) -> None:
    r = await client.post(f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers())
    assert r.status_code == 200, r.text


@pytest.fixture
async def study(app_client: httpx.AsyncClient) -> AsyncIterator[tuple[str, list[str]]]:
    """A study of three series of _N / 3 instances each, stored out of order."""
    uid, series = str(generate_uid()), [str(generate_uid()) for _ in range(3)]
    parts = [
        to_bytes(make_instance(study=uid, series=series[n % 3], SeriesNumber=3 - n % 3,
                               InstanceNumber=_N - n, ImageComments=_COMMENT))
        for n in range(_N)
    ]  # fmt: skip
    await _stow(app_client, *parts)
    yield uid, series


def _small_batches(monkeypatch: pytest.MonkeyPatch, rows: int = 7) -> None:
    """Batches of `rows` instances, a body streamed past 10 KB, nothing kept between requests."""
    monkeypatch.setattr(metadata, "METADATA_FETCH_ROWS", rows)
    monkeypatch.setattr(metadata, "METADATA_PART_CACHE_MAX_BYTES", 0)
    monkeypatch.setattr(metadata_body, "METADATA_INLINE_BYTES", 10_000)
    monkeypatch.setattr(metadata_body, "METADATA_GZIP_CACHE_MAX_BYTES", 0)


async def _both(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    r = await client.get(url, headers=headers)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("accept", ["application/dicom+json", _XML])
async def test_a_streamed_body_is_the_body_built_whole(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    accept: str,
) -> None:
    """Read in batches and streamed, or read at once and built whole, cached or not: the same
    bytes under the same entity tag, identity and gzip alike (the gzip bytes too: a strong
    tag names one sequence of bytes, RFC 9110 8.8.3), series then instance number order."""
    uid, series = study
    urls = [f"{ROOT}/studies/{uid}/metadata", f"{ROOT}/studies/{uid}/series/{series[1]}/metadata"]
    seen: dict[tuple[str, str], tuple[str, bytes, str]] = {}
    monkeypatch.setattr(metadata_body, "METADATA_INLINE_BYTES", 10 * 1024 * 1024)
    for mode in ("whole", "cached", "batches", "batches"):
        if mode == "batches":
            _small_batches(monkeypatch)
            monkeypatch.setattr(app.state.services.metadata, "get", lambda key: None)
        for url in urls:
            for coding in ("identity", "gzip"):
                headers = {"Accept": accept, "Accept-Encoding": coding}
                async with app_client.stream("GET", url, headers=headers) as r:
                    raw = b"".join([chunk async for chunk in r.aiter_raw()])
                assert r.status_code == 200
                assert ("content-length" in r.headers) == (mode != "batches")
                got = (r.headers["etag"], raw, r.headers["content-type"])
                assert seen.setdefault((url, coding), got) == got, (mode, url, coding)
    study_json = (await app_client.get(urls[0])).json()
    assert len(study_json) == _N
    order = [(values(d, "00200011")[0], values(d, "00200013")[0]) for d in study_json]
    assert order == sorted(order)
    assert gzip.decompress(seen[(urls[0], "gzip")][1]) == seen[(urls[0], "identity")][1]


async def test_the_entity_tag_follows_what_makes_the_body(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    clean_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stable from one request to the next; changed by an instance stored (in the series, or
    in another series of the study for the study's), a reindex that rewrote a row, another
    server version or metadata format, other codecs, another base URL, another media type."""
    uid, series = study
    study_url = f"{ROOT}/studies/{uid}/metadata"
    series_url = f"{ROOT}/studies/{uid}/series/{series[0]}/metadata"

    async def tags(**headers: str) -> tuple[str, str]:
        a = (await _both(app_client, study_url, headers)).headers["etag"]
        b = (await _both(app_client, series_url, headers)).headers["etag"]
        return a, b

    first = await tags()
    assert await tags() == first
    assert len(set(first)) == 2
    assert await tags(Host="archive.internal:8080") != first
    assert await tags(Accept="application/json") != first
    assert await tags(Accept=_XML) != first
    monkeypatch.setattr(metadata, "VERSION", "99.0")
    assert set(await tags()).isdisjoint(first)
    monkeypatch.undo()
    monkeypatch.setattr(metadata, "METADATA_FORMAT", metadata.METADATA_FORMAT + 1)
    assert set(await tags()).isdisjoint(first)
    monkeypatch.undo()
    monkeypatch.setattr(metadata, "_codecs", lambda: "encode none; decode none")
    assert set(await tags()).isdisjoint(first)
    monkeypatch.undo()
    assert await tags() == first

    await _stow(app_client, to_bytes(make_instance(study=uid, series=series[1], SeriesNumber=2)))
    second = await tags()
    assert second[0] != first[0] and second[1] == first[1]  # not in series[0]
    await _stow(app_client, to_bytes(make_instance(study=uid, series=series[0], SeriesNumber=3)))
    third = await tags()
    assert third[0] != second[0] and third[1] != second[1]

    conn = await asyncpg.connect(clean_db)
    try:  # a row as an older release wrote it, which reindex rewrites
        await conn.execute(
            'UPDATE instance SET metadata = metadata || \'{"00080000": {"vr": "UL"}}\''
            " WHERE pk = (SELECT min(i.pk) FROM instance i JOIN series se ON se.pk = i.series_fk"
            " WHERE se.series_instance_uid = $1)",
            series[0],
        )
    finally:
        await conn.close()
    await reindex(app.state.services)
    fourth = await tags()
    assert fourth[0] != third[0] and fourth[1] != third[1]
    assert await tags() == fourth


async def test_not_modified_reads_no_instance(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If-None-Match naming the current body: 304 from one statement on the series table,
    nothing of the body made (not from the cache either); a HEAD gives a GET's headers."""
    uid, series = study
    urls = [f"{ROOT}/studies/{uid}/metadata", f"{ROOT}/studies/{uid}/series/{series[2]}/metadata"]
    for url in urls:
        for coding in ("identity", "gzip"):
            r = await _both(app_client, url, {"Accept-Encoding": coding})
            etag = r.headers["etag"]
            head = await app_client.head(url, headers={"Accept-Encoding": coding})
            assert head.status_code == 200 and head.content == b""
            # (Content-Length: a streamed gzip body kept whole is sent whole the next time)
            names = ("etag", "content-type", "content-encoding", "vary")
            assert [head.headers.get(k) for k in names] == [r.headers.get(k) for k in names]
            index = app.state.services.index
            statements: list[str] = []
            fetch = index._fetch

            async def counting_fetch(
                sql: str, *args: object, fetch: Any = fetch, statements: list[str] = statements
            ) -> object:
                # Not the audit trail's writer (auditlog.py), which looks up the patients of
                # a batch of events by itself, whenever its batch comes (it made this test
                # fail now and then with two statements).
                task = asyncio.current_task()
                if task is None or task.get_name() != "audit-writer":
                    statements.append(sql)
                return await fetch(sql, *args)

            def no_body(*args: object) -> object:
                raise AssertionError("a body was made for a 304")

            with monkeypatch.context() as m:
                m.setattr(index, "_fetch", counting_fetch)
                m.setattr(index, "_fetchrow", no_body)
                m.setattr(metadata_body, "metadata_runs", no_body)
                m.setattr(app.state.services.metadata, "get", no_body)
                headers = {"If-None-Match": f'"other", {etag}', "Accept-Encoding": coding}
                r = await app_client.get(url, headers=headers)
            assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
            (sql,) = statements
            assert "FROM series" in sql and " instance " not in sql


@pytest.mark.parametrize("coding", [b"identity", b"gzip"])
async def test_a_large_body_takes_the_memory_of_a_batch(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    coding: bytes,
) -> None:
    """The peak of a study's metadata is a few batches' worth, not the body's: the rows of a
    batch, their JSON, what is being sent. Built whole, it took about 4 times the body."""
    uid, _ = study
    url = f"{ROOT}/studies/{uid}/metadata"
    _small_batches(monkeypatch, rows=5)
    headers = [(b"accept-encoding", coding)]
    await asgi_get(app, url, headers)  # code paths warm
    tracemalloc.start()
    try:
        status, length, ended = await asgi_get(app, url, headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200 and ended
    body = _N * len(_COMMENT)
    assert coding == b"gzip" or length > body
    row_bytes = body // _N
    # The constant: asyncio's 256 KiB socket reads (asyncpg), zlib's 256 KiB of state for
    # gzip, and the first 10 KB of the body.
    bound = 8 * metadata.METADATA_FETCH_ROWS * row_bytes + 800_000
    assert peak < bound < 2 * body, (peak, length)


async def test_an_instance_stored_before_the_rows_are_read_is_not_in_the_body(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance stored between the versions read and the rows read: the body is the state
    its entity tag names, without it (the rows are the series' first instances by key, as
    many as the state counts), not begun again: under a steady STOW into the study, reading
    it again and again (METADATA_ATTEMPTS) ended in a 503 for 1 read in 5 (found by review).
    The next request has the instance, under another entity tag."""
    uid, series = study
    url = f"{ROOT}/studies/{uid}/metadata"
    index = app.state.services.index
    first = index.metadata_first
    later = make_instance(study=uid, series=series[0], SeriesNumber=3)
    states = index.series_states
    reads = 0

    async def counted_states(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return await states(*args)

    async def storing_first(*args: Any) -> Any:
        monkeypatch.setattr(index, "metadata_first", first)
        await _stow(app_client, to_bytes(later))
        return await first(*args)

    monkeypatch.setattr(index, "series_states", counted_states)
    monkeypatch.setattr(index, "metadata_first", storing_first)
    r = await app_client.get(url)
    assert r.status_code == 200 and reads == 1  # not begun again
    got = [values(doc, "00080018")[0] for doc in r.json()]
    assert len(got) == _N and later.SOPInstanceUID not in got
    again = await app_client.get(url)
    assert len(again.json()) == _N + 1 and again.headers["etag"] != r.headers["etag"]
    assert again.headers["etag"] == (await app_client.get(url)).headers["etag"]


async def test_rows_rewritten_before_the_response_starts_are_read_again(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    clean_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`reindex` rewriting a series' rows (its revision bumped) between the versions read and
    the rows read: the body is begun again from the new state (nothing was sent), and its
    entity tag is the new state's."""
    uid, _ = study
    url = f"{ROOT}/studies/{uid}/metadata"
    index = app.state.services.index
    first = index.metadata_first

    async def rewriting_first(*args: Any) -> Any:
        monkeypatch.setattr(index, "metadata_first", first)
        await _bump_revisions(clean_db, uid)
        return await first(*args)

    monkeypatch.setattr(index, "metadata_first", rewriting_first)
    r = await app_client.get(url)
    assert r.status_code == 200 and len(r.json()) == _N
    assert r.headers["etag"] == (await app_client.get(url)).headers["etag"]


async def _bump_revisions(dsn: str, study: str) -> None:
    """What `reindex` does to the series of a study whose rows it rewrites."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE series SET revision = revision + 1 WHERE study_fk ="
            " (SELECT pk FROM study WHERE study_instance_uid = $1)",
            study,
        )
    finally:
        await conn.close()


async def test_an_instance_stored_while_streaming_leaves_the_body_whole(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance stored in a series of the study while its body is read by key: the rows
    whose keys were read are those of the state the entity tag names (a stored row does not
    change), so the body is finished, of that state, without the new instance (a viewer
    reading a study still arriving gets it whole); the next request has it."""
    uid, series = study
    url = f"{ROOT}/studies/{uid}/metadata"
    _small_batches(monkeypatch)
    index = app.state.services.index
    rows = index.metadata_rows
    later = make_instance(study=uid, series=series[0], SeriesNumber=3)

    async def storing_rows(*args: Any) -> Any:
        monkeypatch.setattr(index, "metadata_rows", rows)
        await _stow(app_client, to_bytes(later))
        return await rows(*args)

    monkeypatch.setattr(index, "metadata_rows", storing_rows)
    r = await app_client.get(url)
    assert r.status_code == 200
    got = [values(doc, "00080018")[0] for doc in r.json()]
    assert len(got) == _N and later.SOPInstanceUID not in got
    again = await app_client.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 200 and len(again.json()) == _N + 1


async def test_rows_rewritten_while_streaming_end_the_body_unfinished(
    app: Starlette,
    study: tuple[str, list[str]],
    clean_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`reindex` rewriting the study's rows (its series' revision bumped) while the body is
    sent: the rows read after it are not of the state the entity tag names, so the body is
    not finished (the client sees a transfer cut short, never a complete body mixing two
    states); the next request gets the new state whole."""
    uid, _ = study
    url = f"{ROOT}/studies/{uid}/metadata"
    _small_batches(monkeypatch)
    index = app.state.services.index
    rows = index.metadata_rows
    calls = 0

    async def rewriting_rows(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == (_N - 7 + 6) // 7:  # the last batch: the response is under way
            await _bump_revisions(clean_db, uid)
        return await rows(*args)

    monkeypatch.setattr(index, "metadata_rows", rewriting_rows)
    got: tuple[int, int, bool] | None = None
    with pytest.raises(Exception) as caught:
        got = await asgi_get(app, url)
    assert got is None  # raised: the server ends the connection, the body unfinished
    assert isinstance(caught.value.__cause__, metadata.MetadataChangedError)
    monkeypatch.setattr(index, "metadata_rows", rows)
    status, length, ended = await asgi_get(app, url)
    assert status == 200 and ended and length > _N * len(_COMMENT)


@pytest.mark.parametrize("read", ["metadata_first", "metadata_keys"])
async def test_an_instance_stored_after_the_response_started_leaves_it_whole(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    read: str,
) -> None:
    """An instance stored in a series whose rows are read after the response started: the
    first series' cached part (metadata_first) or the first batch (metadata_keys) is past
    METADATA_INLINE_BYTES. Every version is checked before the first byte, so the body is
    begun again from the new state, whole; it was cut (a viewer reading a study still
    arriving: 40 of 60 study metadata reads cut short while a series was stored)."""
    uid, series = study
    url = f"{ROOT}/studies/{uid}/metadata"
    monkeypatch.setattr(metadata, "METADATA_FETCH_ROWS", 7)
    monkeypatch.setattr(metadata_body, "METADATA_INLINE_BYTES", 10_000)
    monkeypatch.setattr(metadata_body, "METADATA_GZIP_CACHE_MAX_BYTES", 0)
    if read == "metadata_first":  # the first series listed (Series Number 1) cached
        await _both(app_client, f"{ROOT}/studies/{uid}/series/{series[2]}/metadata", {})
    else:
        monkeypatch.setattr(metadata, "METADATA_PART_CACHE_MAX_BYTES", 0)
    index = app.state.services.index
    original = getattr(index, read)
    later = make_instance(study=uid, series=series[0], SeriesNumber=3, ImageComments=_COMMENT)

    async def storing(*args: Any) -> Any:
        monkeypatch.setattr(index, read, original)
        await _stow(app_client, to_bytes(later))
        return await original(*args)

    monkeypatch.setattr(index, read, storing)
    status, length, ended = await asgi_get(app, url)
    assert status == 200 and ended and length > (_N + 1) * len(_COMMENT)
    r = await _both(app_client, url, {})
    assert len(r.json()) == _N + 1


@pytest.mark.parametrize("coding", ["gzip", "identity"])
async def test_a_head_of_a_streamed_body_closes_its_read(
    app: Starlette,
    app_client: httpx.AsyncClient,
    study: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    coding: str,
) -> None:
    """A HEAD of metadata streamed past METADATA_INLINE_BYTES closes its read of the rows
    before it ends, gzip or not: gzipped, the body was a gzip stream never started, whose
    closing closed nothing beneath it (the read was left to the garbage collector). The
    reads are held here, so only the response can have closed them."""
    _small_batches(monkeypatch)
    monkeypatch.setattr(app.state.services.metadata, "get", lambda key: None)
    made: list[Any] = []
    real = metadata.metadata_runs

    def watched(*args: Any) -> Any:
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(metadata_body, "metadata_runs", watched)
    headers = {"Accept-Encoding": coding}
    r = await app_client.head(f"{ROOT}/studies/{study[0]}/metadata", headers=headers)
    assert r.status_code == 200 and "content-length" not in r.headers
    assert (r.headers.get("content-encoding") == "gzip") == (coding == "gzip")
    assert len(made) == 1 and made[0].ag_frame is None  # closed
