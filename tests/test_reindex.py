"""`reindex`: index rows rebuilt from the stored files, as STOW derives them."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID
from starlette.applications import Starlette

from dicomweb_server.blobstore.hashing import DATA_SET_HASH_VERSION
from dicomweb_server.config import Settings
from dicomweb_server.dicomfile import MAX_SEQUENCE_DEPTH
from dicomweb_server.reindex import REINDEX_PAGE_ROWS, reindex
from tests.helpers import (
    ROOT,
    app_process,
    inst_url,
    make_instance,
    multipart_body,
    run_cli,
    split_multipart,
    stow_headers,
    to_bytes,
)
from tests.test_audit import empty_audit  # noqa: F401  (a fixture)
from tests.test_deep_sequences import deep_part10

pytestmark = pytest.mark.db

STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.7001", "1.2.826.0.1.3680043.8.498.7002"
SERIES_A, SERIES_B = f"{STUDY_A}.1", f"{STUDY_B}.1"
ELE_UID = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian

# Every column that reindex derives (not keys, timestamps or counters).
_INSTANCE_COLS = (
    "sop_instance_uid, sop_class_uid, instance_number, acquisition_datetime, blob_key,"
    " transfer_syntax_uid, size_bytes, sha256, number_of_frames, frame_offsets, frame_lengths,"
    " encapsulated, metadata, bulk_ranges"
)
_SERIES_COLS = (
    "series_instance_uid, modality, series_number, series_description, body_part_examined,"
    " pps_start_date, pps_start_time, num_instances, attrs"
)
_STUDY_COLS = (
    "study_instance_uid, patient_fk, study_date, study_time, accession_number, study_id,"
    " study_description, referring_physician_name, patient_name, patient_id,"
    " patient_birth_date, patient_sex, attrs, referring_physician_name_text, patient_name_text,"
    " modalities_in_study, sop_classes_in_study, num_series, num_instances"
)


def _instances() -> list[Dataset]:
    out = []
    for study, series, n in ((STUDY_A, SERIES_A, 3), (STUDY_B, SERIES_B, 2)):
        for i in range(n):
            out.append(
                make_instance(
                    study=study,
                    series=series,
                    sop=f"{series}.{i + 1}",
                    InstanceNumber=i + 1,
                    StudyDescription="Chest",
                    SpecificCharacterSet="ISO_IR 192",
                    PatientName="Doe^John=ドウ^ジョン",
                    AcquisitionDateTime="20240115101500+0200",
                )
            )
    return out


async def _store(client: httpx.AsyncClient, datasets: list[Dataset], batch: int = 1) -> None:
    """Stored `batch` to a request: one by one, the row keys follow the list."""
    for start in range(0, len(datasets), batch):
        body = multipart_body([to_bytes(ds) for ds in datasets[start : start + batch]])
        r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
        assert r.status_code == 200, r.text


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[Any]]:
    return {
        table: [tuple(r) for r in await conn.fetch(f"SELECT {cols} FROM {table} ORDER BY pk")]
        for table, cols in (
            ("instance", _INSTANCE_COLS),
            ("series", _SERIES_COLS),
            ("study", _STUDY_COLS),
        )
    }


async def _age(conn: asyncpg.Connection, app: Starlette) -> None:
    """Rows as an older release would have left them: values read differently, a group
    length in the JSON, a whole-file hash."""
    await conn.execute(
        "UPDATE instance SET acquisition_datetime = '2024-01-15 10:15:00',"
        ' metadata = metadata || \'{"00080000": {"vr": "UL", "Value": [0]}}\''
        " WHERE sop_instance_uid = $1",
        f"{SERIES_A}.2",
    )
    key = await conn.fetchval(
        "SELECT blob_key FROM instance WHERE sop_instance_uid = $1", f"{SERIES_B}.1"
    )
    whole = hashlib.sha256(_blob(app, key).read_bytes()).digest()
    await conn.execute("UPDATE instance SET sha256 = $1 WHERE blob_key = $2", whole, key)
    await conn.execute(
        "UPDATE study SET patient_name = '{doe^john}', patient_name_text = 'doe^john',"
        " study_description = NULL, modalities_in_study = '{}' WHERE study_instance_uid = $1",
        STUDY_A,
    )
    await conn.execute("UPDATE series SET modality = 'OT' WHERE series_instance_uid = $1", SERIES_B)
    other = await conn.fetchval(
        "INSERT INTO patient (patient_id, patient_name) VALUES ('OLD', 'x') RETURNING pk"
    )
    await conn.execute(
        "UPDATE study SET patient_fk = $1, patient_id = 'OLD' WHERE study_instance_uid = $2",
        other,
        STUDY_B,
    )


def _blob(app: Starlette, key: str) -> Path:
    path: Path = app.state.services.blobs.local_path(key)
    return path


async def test_reindex_rewrites_what_an_older_release_derived(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    await _store(app_client, _instances())
    svc = app.state.services
    conn = await asyncpg.connect(clean_db)
    try:
        fresh = await _snapshot(conn)
        await _age(conn, app)
        aged = await _snapshot(conn)
        assert aged != fresh
        seen: list[int] = []
        report = await reindex(svc, progress=seen.append)
        # Instances A.2 and B.1 themselves, and A.1 and B.1 as the first of their study or
        # series (the study and series rows are theirs).
        assert (report.updated, report.unchanged, report.failed) == (3, 2, [])
        assert seen == [5]
        again = await _snapshot(conn)
        sha = {r[0]: r[7] for r in again["instance"]}
        assert sha[f"{SERIES_B}.1"][:1] == DATA_SET_HASH_VERSION
        fresh_sha = {r[0]: r[7] for r in fresh["instance"]}
        assert sha[f"{SERIES_B}.1"] == fresh_sha[f"{SERIES_B}.1"]  # what STOW computed
        assert again == fresh
        # Study B's old patient row is left, unreferenced: not counted.
        assert (await svc.index.counts())["patients"] == 1
        report = await reindex(svc)
        assert (report.updated, report.unchanged, report.failed) == (0, 5, [])
        revisions = await conn.fetch("SELECT revision FROM series ORDER BY pk")
        assert [r[0] for r in revisions] == [2, 1]  # one per instance rewritten
    finally:
        await conn.close()


async def test_reindex_gives_the_sop_classes_of_a_study_as_a_store_does(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    """SOPClassesInStudy is sorted by a commit and by reindex alike: a reindexed study lists
    them as a fresh archive's does, whatever order the instances arrived in (found by
    comparing an upgraded archive with a fresh one, when commits appended them in order of
    arrival and reindex sorted them)."""
    mr = make_instance(study=STUDY_A, series=SERIES_A, sop=f"{SERIES_A}.1", modality="MR")
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")
    ct = make_instance(study=STUDY_A, series=f"{STUDY_A}.2", sop=f"{STUDY_A}.2.1")
    await _store(app_client, [mr, ct])  # MR Image Storage first: after CT's in sort order
    conn = await asyncpg.connect(clean_db)
    try:
        fresh = await _snapshot(conn)
        await conn.execute(
            'UPDATE instance SET metadata = metadata || \'{"00080000": {"vr": "UL"}}\''
        )
        report = await reindex(app.state.services)
        assert (report.updated, report.failed) == (2, [])
        assert await _snapshot(conn) == fresh
    finally:
        await conn.close()
    r = await app_client.get(f"{ROOT}/studies", params={"includefield": "00080062"})
    assert r.json()[0]["00080062"]["Value"] == sorted([mr.SOPClassUID, ct.SOPClassUID])


async def test_reindexed_metadata_is_served_by_a_process_that_cached_it(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    """A series' metadata cached before reindex is not served after it: the series' version
    changed (its revision), as another process running reindex would leave it."""
    await _store(app_client, _instances())
    conn = await asyncpg.connect(clean_db)
    try:
        await _age(conn, app)
    finally:
        await conn.close()
    url = f"{ROOT}/studies/{STUDY_A}/series/{SERIES_A}/metadata"
    for path in (url, f"{ROOT}/studies/{STUDY_A}/metadata"):
        before = (await app_client.get(path)).json()
        assert any("00080000" in doc for doc in before)  # the aged row, now cached
    await reindex(app.state.services)
    for path in (url, f"{ROOT}/studies/{STUDY_A}/metadata"):
        after = (await app_client.get(path)).json()
        assert len(after) == 3 and not any("00080000" in doc for doc in after)
    r = await app_client.get(f"{ROOT}/studies", params={"StudyDescription": "Chest"})
    assert sorted(d["0020000D"]["Value"][0] for d in r.json()) == [STUDY_A, STUDY_B]


async def test_reindex_leaves_and_reports_what_it_cannot_rebuild(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    """A missing file, and rows whose study is not the one the file names: reported, and
    their rows left as they were (reindex neither moves nor removes an instance)."""
    await _store(app_client, _instances())
    conn = await asyncpg.connect(clean_db)
    try:
        key = await conn.fetchval(
            "SELECT blob_key FROM instance WHERE sop_instance_uid = $1", f"{SERIES_A}.3"
        )
        _blob(app, key).unlink()
        await conn.execute(
            "UPDATE study SET study_instance_uid = '1.2.3.4' WHERE study_instance_uid = $1",
            STUDY_B,
        )
        await conn.execute(
            "UPDATE instance SET instance_number = 99 WHERE sop_instance_uid = $1",
            f"{SERIES_B}.2",
        )
        before = await _snapshot(conn)
        report = await reindex(app.state.services)
        assert report.updated == 0 and report.unchanged == 2
        failed = sorted(report.failed)
        assert len(failed) == 3
        assert failed[0].startswith(f"{SERIES_A}.3: its file cannot be read")
        assert f"names SOP Instance {SERIES_B}.1, study {STUDY_B}" in failed[1]
        assert "reindex does not move instances" in failed[2]
        assert await _snapshot(conn) == before
    finally:
        await conn.close()


async def test_reindex_of_some_studies_only(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    await _store(app_client, _instances())
    conn = await asyncpg.connect(clean_db)
    try:
        await _age(conn, app)
        report = await reindex(app.state.services, [STUDY_B])
        assert (report.updated, report.unchanged) == (1, 1)
        description = await conn.fetchval(
            "SELECT study_description FROM study WHERE study_instance_uid = $1", STUDY_A
        )
        assert description is None  # study A was not reindexed
    finally:
        await conn.close()


async def test_reindex_walks_page_after_page(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    n = REINDEX_PAGE_ROWS + 1
    datasets = [
        make_instance(study=STUDY_A, series=SERIES_A, sop=f"{SERIES_A}.{i + 1}", rows=1, cols=1)
        for i in range(n)
    ]
    await _store(app_client, datasets, batch=100)
    seen: list[int] = []
    report = await reindex(app.state.services, progress=seen.append)
    assert seen == [REINDEX_PAGE_ROWS, 1]
    assert report.unchanged == n and report.updated == 0


async def test_reindex_beside_concurrent_stores(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    """Reindex of a study while instances are stored into it (the same study and series row
    locks): every store succeeds, nothing fails, and the counts are exact."""
    await _store(app_client, _instances())
    more = [
        make_instance(study=STUDY_A, series=SERIES_A, sop=f"{SERIES_A}.{100 + i}", rows=1, cols=1)
        for i in range(40)
    ]
    conn = await asyncpg.connect(clean_db)
    try:
        await _age(conn, app)
        reports = []

        async def store(chunk: list[Dataset]) -> None:
            await _store(app_client, chunk)

        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(store, more[k::4])
            for _ in range(3):
                reports.append(await reindex(app.state.services))
        assert all(not r.failed for r in reports)
        counts = await conn.fetchrow(
            "SELECT num_instances, num_series FROM study WHERE study_instance_uid = $1", STUDY_A
        )
        assert tuple(counts) == (43, 1)
        final = await reindex(app.state.services)
        assert (final.updated, final.unchanged, final.failed) == (0, 45, [])
    finally:
        await conn.close()


def test_reindex_command(tmp_path: Path, clean_db: str, samples: Path) -> None:
    """The command reindexes what `load` stored, says so, and audits it; exit status 1 when
    an instance could not be reindexed."""
    common = ["--data-dir", str(tmp_path / "data"), "--database-url", clean_db]
    src = samples / "generated/coverage"
    assert run_cli("load", *common, str(src)).returncode == 0
    r = run_cli("reindex", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "updated 0, unchanged 19, failed 0" in r.stdout
    blob = next(p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(b"not DICOM any more")
    r = run_cli("reindex", *common)
    assert r.returncode == 1
    assert "updated 0, unchanged 18, failed 1" in r.stdout
    assert "its file is refused now (not a DICOM Part 10 file" in r.stdout
    export = run_cli("audit", "export", *common)
    actions = [json.loads(line)["action"] for line in export.stdout.splitlines()]
    assert actions.count("reindex") == 2


async def test_reindexed_frames_and_thumbnails_are_not_served_from_a_cache(
    settings: Settings, clean_db: str, samples: Path
) -> None:
    """What a process cached of an instance (decoded frames, renderings) before `reindex`,
    run by another process, rewrote the instance's rows is not served after it: frames are
    decoded by the pixel description of the row, and whether there is an image to render by
    its number of frames. They were cached by blob key alone, which reindex keeps."""
    raw = (samples / "real" / "pydicom" / "SC_rgb_rle_2frame.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    url = inst_url(ds)
    decoded = f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE_UID}'
    async with app_process(settings) as (_, serving), app_process(settings) as (other_app, other):

        async def frame(client: httpx.AsyncClient) -> bytes:
            r = await client.get(f"{url}/frames/1", headers={"Accept": decoded})
            assert r.status_code == 200, r.text
            ((_, body),) = split_multipart(r.content, r.headers["content-type"])
            return body

        async def thumbnail(client: httpx.AsyncClient) -> bytes:
            r = await client.get(f"{url}/thumbnail", headers={"Accept": "image/png"})
            assert r.status_code == 200, r.text
            return r.content

        r = await serving.post(f"{ROOT}/studies", content=multipart_body([raw]),
                               headers=stow_headers())  # fmt: skip
        assert r.status_code == 200, r.text
        conn = await asyncpg.connect(clean_db)
        try:
            # As an older release derived them: Planar Configuration 1 (colour by plane),
            # then no frames at all.
            sop = ds.SOPInstanceUID
            await conn.execute(
                "UPDATE instance SET metadata = jsonb_set(metadata, '{00280006,Value}', '[1]')"
                " WHERE sop_instance_uid = $1",
                sop,
            )
            aged_frame = await frame(serving)
            await conn.execute(
                "UPDATE instance SET number_of_frames = 0 WHERE sop_instance_uid = $1", sop
            )
            icon = await thumbnail(serving)
        finally:
            await conn.close()
        report = await reindex(other_app.state.services)  # as `reindex` in a process of its own
        assert (report.updated, report.failed) == (1, [])
        expected = pixel_array(ds, index=0).tobytes()
        assert aged_frame != expected
        assert await frame(other) == expected
        assert await frame(serving) == expected
        fresh = await thumbnail(other)
        assert fresh != icon
        assert await thumbnail(serving) == fresh


async def test_reindex_reports_an_instance_nested_deeper_than_the_limit_now(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    """A stored file whose sequences nest deeper than dicomfile.MAX_SEQUENCE_DEPTH (one stored
    before the limit): reported, its rows left as they were."""
    ds = make_instance(study=STUDY_A, series=SERIES_A, sop=f"{SERIES_A}.1")
    await _store(app_client, [ds])
    conn = await asyncpg.connect(clean_db)
    try:
        key = await conn.fetchval("SELECT blob_key FROM instance")
        _blob(app, key).write_bytes(deep_part10(ds, MAX_SEQUENCE_DEPTH + 1, undefined=True))
        before = await _snapshot(conn)
        report = await reindex(app.state.services)
        assert report.updated == 0 and report.unchanged == 0
        (failed,) = report.failed
        assert f"refused now (sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels" in failed
        assert "rows left as they were" in failed
        assert await _snapshot(conn) == before
    finally:
        await conn.close()


async def test_reindex_tries_a_deadlock_again_and_goes_on_past_a_failing_instance(
    app: Starlette, app_client: httpx.AsyncClient, clean_db: str
) -> None:
    """One instance's database error ended the whole run with a traceback (found by a load
    run: a deadlock with a process starting beside it). An instance rolled back (SQLSTATE
    40P01, raised here by a trigger twice) is tried again; one PostgreSQL fails on
    otherwise is reported, and the others are rewritten."""
    await _store(app_client, _instances())
    rolled, broken = f"{SERIES_A}.1", f"{SERIES_A}.2"
    conn = await asyncpg.connect(clean_db)
    try:
        await conn.execute(
            'UPDATE instance SET metadata = metadata || \'{"00080000": {"vr": "UL"}}\''
        )
        await conn.execute(f"""
            CREATE SEQUENCE test_rollbacks;
            CREATE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.sop_instance_uid = '{rolled}' AND nextval('test_rollbacks') <= 2 THEN
                    RAISE EXCEPTION 'deadlock detected (a test)' USING ERRCODE = '40P01';
                END IF;
                IF NEW.sop_instance_uid = '{broken}' THEN
                    RAISE EXCEPTION 'no room (a test)' USING ERRCODE = '53100';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_fault BEFORE UPDATE ON instance
                FOR EACH ROW EXECUTE FUNCTION test_fault();
        """)  # fmt: skip
        report = await reindex(app.state.services)
        assert report.updated == 4
        assert report.failed == [
            f"{broken}: the database failed on it: DiskFullError: no room (a test)"
        ]
        assert await conn.fetchval("SELECT last_value FROM test_rollbacks") == 3
    finally:
        await conn.execute(
            "DROP TRIGGER IF EXISTS test_fault ON instance;"
            " DROP FUNCTION IF EXISTS test_fault(); DROP SEQUENCE IF EXISTS test_rollbacks"
        )
        await conn.close()


async def test_a_reindex_the_database_left_says_so_in_a_line(
    tmp_path: Path,
    empty_audit: str,  # noqa: F811  (the fixture imported above; its rows go after)
    samples: Path,
) -> None:
    """The database gone mid-run (its backends ended, here by a trigger on the rewrite) stops
    the run at once, not instance after instance: the command said so with the traceback of
    an ExceptionGroup, and audited "stopped: unhandled errors in a TaskGroup (1
    sub-exception)" (found by review). Now one line, exit status 1, and the reason audited."""
    common = ["--data-dir", str(tmp_path / "data"), "--database-url", empty_audit]
    assert run_cli("load", *common, str(samples / "generated/coverage")).returncode == 0
    conn = await asyncpg.connect(empty_audit)
    try:
        await conn.execute(
            'UPDATE instance SET metadata = metadata || \'{"00080000": {"vr": "UL"}}\''
        )
        await conn.execute("""
            CREATE FUNCTION test_gone() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_terminate_backend(pg_backend_pid());
                PERFORM pg_sleep(5);
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_gone BEFORE UPDATE ON instance
                FOR EACH ROW EXECUTE FUNCTION test_gone();
        """)  # fmt: skip
        r = run_cli("reindex", *common)
        assert r.returncode == 1
        assert "dicomweb-server: reindex stopped: database unavailable" in r.stderr
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        row = await conn.fetchrow(
            "SELECT outcome, detail FROM audit_log WHERE action = 'reindex' ORDER BY seq DESC"
        )
        assert row is not None
        assert (row["outcome"], row["detail"]) == (
            500,
            "stopped: database unavailable; try again later",
        )
    finally:
        await conn.execute(
            "DROP TRIGGER IF EXISTS test_gone ON instance; DROP FUNCTION IF EXISTS test_gone()"
        )
        await conn.close()
