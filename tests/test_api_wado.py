"""WADO-RS through the ASGI app in-process, against a real PostgreSQL: 404 and 406, the
default transfer syntax, study and series metadata (gzip, ETag and 304, the cache, its
statements), frames of unaligned native data, small instances read in runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from tests.api_support import stow
from tests.helpers import ROOT, make_instance, split_multipart, to_bytes, values

pytestmark = pytest.mark.db


async def test_wado_not_found_and_not_acceptable(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    await stow(app_client, to_bytes(ds))
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert (await app_client.get(f"{ROOT}/studies/1.2.3")).status_code == 404
    assert (await app_client.get(f"{ROOT}/studies/1.2.3/metadata")).status_code == 404
    assert (await app_client.get(f"{ROOT}/studies/../../etc/passwd")).status_code in (400, 404)
    assert (await app_client.get(f"{ROOT}/studies/1.2.x")).status_code == 400
    inst = f"{ROOT}/studies/{st}/series/{se}/instances/{sop}"
    r = await app_client.get(
        inst,
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax='
            + "1.2.840.10008.1.2.4.50"
        },
    )
    assert r.status_code == 406
    assert "1.2.840.10008.1.2.1" in r.json()["message"]
    assert (await app_client.get(f"{inst}/frames/2")).status_code == 404
    assert (await app_client.get(f"{inst}/frames/0")).status_code == 400
    assert (await app_client.get(f"{inst}/frames/a")).status_code == 400
    assert (await app_client.get(f"{inst}/bulk/00100010x")).status_code == 404
    r = await app_client.get(f"{ROOT}/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


async def test_retrieve_study_default_is_explicit_le(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    raw = (samples / "real/pydicom/MR_small_RLE.dcm").read_bytes()
    ds = pydicom.dcmread(samples / "real/pydicom/MR_small_RLE.dcm")
    assert (await stow(app_client, raw)).status_code == 200
    r = await app_client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}")
    assert r.status_code == 200
    assert "content-length" not in r.headers  # converted: its length is unknown up front
    stored = await app_client.get(
        f"{ROOT}/studies/{ds.StudyInstanceUID}",
        headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"},
    )
    assert int(stored.headers["content-length"]) == len(stored.content)
    assert raw in stored.content
    parts = split_multipart(r.content, r.headers["content-type"])
    mine = [p for p in parts if ds.SOPInstanceUID.encode() in p[1]]
    (headers, body) = mine[0]
    assert "transfer-syntax=1.2.840.10008.1.2.1" in headers["content-type"]
    import io

    out = pydicom.dcmread(io.BytesIO(body))
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (out.pixel_array == ds.pixel_array).all()
    meta = json.loads((await app_client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata")).text)
    assert len(meta) == len(parts)


async def test_metadata_gzip_etag_and_304(app_client: httpx.AsyncClient) -> None:
    study = make_instance().StudyInstanceUID
    files = [to_bytes(make_instance(study=study, rows=64, cols=64)) for _ in range(5)]
    await stow(app_client, *files)
    url = f"{ROOT}/studies/{study}/metadata"
    r = await app_client.get(url, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert len(r.json()) == 5  # httpx decompressed it
    etag = r.headers["etag"]
    r = await app_client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    r = await app_client.get(
        url, headers={"If-None-Match": '"stale"', "Accept-Encoding": "identity"}
    )
    assert r.status_code == 200 and "content-encoding" not in r.headers
    # the identity body has an ETag of its own (RFC 9110 8.8.3.3), which the gzip one is not
    assert etag == r.headers["etag"][:-1] + '-gzip"'
    r = await app_client.get(url, headers={"If-None-Match": etag, "Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.content


async def test_cached_series_metadata_follows_new_instances(
    app_client: httpx.AsyncClient,
) -> None:
    """Series metadata is cached per series state: an instance stored after a cached answer
    is in the next one, at series and study level, in series then instance number order."""
    first = make_instance(SeriesNumber=2, InstanceNumber=2)
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    await stow(app_client, to_bytes(first))
    series_url = f"{ROOT}/studies/{study}/series/{series}/metadata"
    study_url = f"{ROOT}/studies/{study}/metadata"
    for _ in range(2):  # the second answer comes from the cache
        r = await app_client.get(series_url, headers={"Accept-Encoding": "gzip"})
        assert [values(d, "00080018") for d in r.json()] == [[first.SOPInstanceUID]]
    etag = r.headers["etag"]
    assert len((await app_client.get(study_url)).json()) == 1

    later = make_instance(study=study, series=series, SeriesNumber=2, InstanceNumber=1)
    other = make_instance(study=study, SeriesNumber=1)
    await stow(app_client, to_bytes(later), to_bytes(other))
    r = await app_client.get(series_url, headers={"Accept-Encoding": "gzip"})
    assert [values(d, "00080018")[0] for d in r.json()] == [
        later.SOPInstanceUID,
        first.SOPInstanceUID,
    ]
    assert r.headers["etag"] != etag
    r = await app_client.get(study_url)
    assert [values(d, "00080018")[0] for d in r.json()] == [
        other.SOPInstanceUID,
        later.SOPInstanceUID,
        first.SOPInstanceUID,
    ]
    assert r.json()[1]["7FE00010"]["BulkDataURI"].startswith("http")
    r = await app_client.get(f"{ROOT}/studies/{study}/series/1.2.3.999/metadata")
    assert r.status_code == 404 and "series" in r.json()["message"]


async def test_study_metadata_of_many_series_is_two_statements(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study of many one-image series (CR, DX, SEG-heavy studies): the first study
    metadata request reads every uncached series in one statement, not one per series, and
    the answer is in series number order; with every series cached, one statement."""
    study = make_instance().StudyInstanceUID
    insts = [make_instance(study=study, SeriesNumber=n) for n in (3, 1, 2, 5, 4)]
    await stow(app_client, *(to_bytes(d) for d in insts))
    index = app.state.services.index
    statements: list[str] = []
    fetch = index._fetch

    async def counting_fetch(sql: str, *args: object) -> object:
        task = asyncio.current_task()  # not the audit writer's own patient lookup
        if task is None or task.get_name() != "audit-writer":
            statements.append(sql)
        return await fetch(sql, *args)

    monkeypatch.setattr(index, "_fetch", counting_fetch)
    url = f"{ROOT}/studies/{study}/metadata"
    # One series cached first (series metadata), so the study request mixes both kinds.
    first_series = f"{ROOT}/studies/{study}/series/{insts[0].SeriesInstanceUID}/metadata"
    assert (await app_client.get(first_series)).status_code == 200
    statements.clear()
    order = [d.SOPInstanceUID for d in sorted(insts, key=lambda d: int(d.SeriesNumber))]
    for expected_statements in (2, 1):
        r = await app_client.get(url)
        assert [values(d, "00080018")[0] for d in r.json()] == order
        assert len(statements) == expected_statements, statements
        statements.clear()


async def test_stored_frames_of_unaligned_native_data(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """1-bit frames not on byte boundaries have no recorded offsets: `transfer-syntax=*` must
    still answer (decoded and re-packed), not fail in the encoder registry."""
    path = samples / "real/pydicom-data/liver_nonbyte_aligned.dcm"
    ds = pydicom.dcmread(path)
    assert (await stow(app_client, path.read_bytes())).status_code == 200
    url = (
        f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1,2"
    )
    for accept in ("multipart/related; type=application/octet-stream; transfer-syntax=*", None):
        r = await app_client.get(url, headers={"Accept": accept} if accept else {})
        assert r.status_code == 200, r.text
        parts = split_multipart(r.content, r.headers["content-type"])
        assert len(parts) == 2
        assert parts[0][0]["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.1")


async def test_series_of_small_instances_is_read_in_runs(
    app: Any, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances sent as stored are read SMALL_RUN_BYTES at a time, one worker-thread call per
    run; an instance that has no run partner is streamed; every byte arrives in order."""
    from dicomweb_server.retrieve import instances

    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = [
        to_bytes(make_instance(study=study, series=series, InstanceNumber=n)) for n in range(5)
    ]
    for f in files:
        assert (await stow(app_client, f)).status_code == 200
    size = max(len(f) for f in files)
    monkeypatch.setattr(instances, "SMALL_RUN_BYTES", 2 * size)  # two per run at most
    blobs = app.state.services.blobs
    real = blobs.read_whole
    runs: list[int] = []

    async def counting(items: Any) -> Any:
        runs.append(len(items))
        return await real(items)

    monkeypatch.setattr(blobs, "read_whole", counting)
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    r = await app_client.get(f"{ROOT}/studies/{study}/series/{series}", headers=accept)
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    got = sorted(body for _, body in split_multipart(r.content, r.headers["content-type"]))
    assert got == sorted(files)
    assert runs == [2, 2]  # the fifth instance alone: streamed


async def test_one_frame_reads_the_small_run_limit_of_instances(
    app_client: httpx.AsyncClient, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored encapsulated frame asked for whole is read in one call when it is at most
    SMALL_RUN_BYTES: the limit has one binding (retrieve.instances), which frames reads."""
    from dicomweb_server.retrieve import frames, instances

    path = samples / "real/pydicom/MR_small_RLE.dcm"
    ds = pydicom.dcmread(path)
    assert (await stow(app_client, path.read_bytes())).status_code == 200
    real = frames._stored_codestream
    calls: list[int] = []

    async def counted(svc: Any, inst: Any, n: int) -> bytes:
        calls.append(n)
        return await real(svc, inst, n)

    monkeypatch.setattr(frames, "_stored_codestream", counted)
    url = f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    url += f"/instances/{ds.SOPInstanceUID}/frames/1"
    accept = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    whole = await app_client.get(url, headers=accept)
    assert whole.status_code == 200 and calls == [1]
    monkeypatch.setattr(instances, "SMALL_RUN_BYTES", 0)
    mapped = await app_client.get(url, headers=accept)
    assert mapped.status_code == 200 and calls == [1]  # item by item: not read whole
    assert mapped.content == whole.content
