"""How QIDO-RS latency grows with the archive: 10,000, 100,000 and 1,000,000 instances.

A seed study (4 series x 25 instances, stored through STOW) is cloned in SQL into the index
(new patients, names, dates and UIDs, the DICOM JSON patched to match) until the archive holds
each size; the blob store is not involved, since QIDO reads only the index. At each size the
same queries are timed over HTTP against a real server (p50/p95), and EXPLAIN shows which
indexes the plans use.

    .venv/bin/python benchmarks/qido_scale.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fresh_database
from benchmarks.vs_orthanc import pct
from dicomweb_server.attributes import Level
from dicomweb_server.query import parse
from dicomweb_server.sql import compile_search
from tests.helpers import make_instance, multipart_body, stow_headers, to_bytes
from tests.liveserver import running

BENCH_DB = "dicomweb_bench_scale"
SERIES_PER_STUDY, INSTANCES_PER_SERIES = 4, 25
INSTANCES_PER_STUDY = SERIES_PER_STUDY * INSTANCES_PER_SERIES
# Studies cloned per SQL statement batch.
BATCH_STUDIES = 500
# Timed repetitions of each query at each size.
REPEATS = 60
SEED_UID = "2.25.77"

# A lower-case name of patient k (letters a-p from its md5): prefix queries are selective.
_NAME = "translate(substr(md5('p' || {k}), 1, 7), '0123456789', 'ghijklmnop')"

_PATIENTS = f"""
INSERT INTO patient (patient_id, patient_name, patient_sex)
SELECT 'SC' || k, upper({_NAME.format(k="k")}) || '^GIVEN', 'O'
FROM generate_series($1::int, $2::int - 1) k
"""

_STUDIES = """
INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time, accession_number,
    study_id, study_description, referring_physician_name, patient_name,
    referring_physician_name_text, patient_name_text, patient_id, patient_birth_date,
    patient_sex, modalities_in_study, sop_classes_in_study, num_series, num_instances, attrs)
SELECT p.pk, '2.25.9' || s, d.day, t.study_time, 'A' || s, t.study_id, t.study_description,
    t.referring_physician_name, ARRAY[lower(p.patient_name)], t.referring_physician_name_text,
    lower(p.patient_name), p.patient_id, t.patient_birth_date, t.patient_sex,
    t.modalities_in_study, t.sop_classes_in_study, t.num_series, t.num_instances,
    t.attrs || jsonb_build_object(
        '0020000D', jsonb_build_object('vr', 'UI', 'Value', jsonb_build_array('2.25.9' || s)),
        '00100020', jsonb_build_object('vr', 'LO', 'Value', jsonb_build_array(p.patient_id)),
        '00100010', jsonb_build_object('vr', 'PN', 'Value',
            jsonb_build_array(jsonb_build_object('Alphabetic', p.patient_name))),
        '00080020', jsonb_build_object('vr', 'DA', 'Value',
            jsonb_build_array(to_char(d.day, 'YYYYMMDD'))),
        '00080050', jsonb_build_object('vr', 'SH', 'Value', jsonb_build_array('A' || s)))
FROM generate_series($1::int, $2::int - 1) s
JOIN patient p ON p.patient_id = 'SC' || (s / 2)
CROSS JOIN LATERAL (SELECT date '2000-01-01' + (abs(hashint4(s)) % 9000) AS day) d
CROSS JOIN (SELECT * FROM study WHERE study_instance_uid = $3) t
RETURNING pk
"""

_SERIES = """
INSERT INTO series (study_fk, series_instance_uid, modality, series_number,
    series_description, body_part_examined, pps_start_date, pps_start_time, num_instances,
    attrs)
SELECT st.pk, st.study_instance_uid || '.' || ts.series_number, ts.modality,
    ts.series_number, ts.series_description, ts.body_part_examined, ts.pps_start_date,
    ts.pps_start_time, ts.num_instances,
    ts.attrs || jsonb_build_object('0020000E', jsonb_build_object('vr', 'UI', 'Value',
        jsonb_build_array(st.study_instance_uid || '.' || ts.series_number)))
FROM study st
CROSS JOIN (SELECT se.* FROM series se JOIN study s0 ON s0.pk = se.study_fk
            WHERE s0.study_instance_uid = $3) ts
WHERE st.pk BETWEEN $1 AND $2
"""

_INSTANCES = """
INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number,
    acquisition_datetime, blob_key, transfer_syntax_uid, size_bytes, sha256,
    number_of_frames, frame_offsets, frame_lengths, encapsulated, metadata, bulk_ranges)
SELECT se.pk, se.series_instance_uid || '.' || ti.instance_number, ti.sop_class_uid,
    ti.instance_number, ti.acquisition_datetime,
    'scale/' || se.pk || '/' || ti.instance_number, ti.transfer_syntax_uid, ti.size_bytes,
    ti.sha256, ti.number_of_frames, ti.frame_offsets, ti.frame_lengths, ti.encapsulated,
    ti.metadata || jsonb_build_object(
        '00080018', jsonb_build_object('vr', 'UI', 'Value',
            jsonb_build_array(se.series_instance_uid || '.' || ti.instance_number)),
        '0020000E', jsonb_build_object('vr', 'UI', 'Value',
            jsonb_build_array(se.series_instance_uid)),
        '0020000D', jsonb_build_object('vr', 'UI', 'Value',
            jsonb_build_array(st.study_instance_uid))),
    ti.bulk_ranges
FROM series se
JOIN study st ON st.pk = se.study_fk
JOIN (SELECT i.*, s1.series_number AS template_series FROM instance i
      JOIN series s1 ON s1.pk = i.series_fk JOIN study s0 ON s0.pk = s1.study_fk
      WHERE s0.study_instance_uid = $3) ti ON ti.template_series = se.series_number
WHERE st.pk BETWEEN $1 AND $2
"""


def seed(url: str) -> None:
    """The template study, stored through STOW (its rows are what gets cloned)."""
    parts = []
    for n in range(1, SERIES_PER_STUDY + 1):
        for m in range(1, INSTANCES_PER_SERIES + 1):
            parts.append(to_bytes(make_instance(
                study=SEED_UID, series=f"{SEED_UID}.{n}", sop=f"{SEED_UID}.{n}.{m}",
                patient_id="SEED", SeriesNumber=n, InstanceNumber=m, rows=8, cols=8,
                modality=("CT", "MR", "SR", "CT")[n - 1])))  # fmt: skip
    r = httpx.post(f"{url}/studies", content=multipart_body(parts), headers=stow_headers(),
                   timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text


async def grow(dsn: str, studies_from: int, studies_to: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for lo in range(studies_from, studies_to, BATCH_STUDIES):
            hi = min(lo + BATCH_STUDIES, studies_to)
            async with conn.transaction():
                await conn.execute(_PATIENTS, (lo + 1) // 2, (hi + 1) // 2)
                pks = [r["pk"] for r in await conn.fetch(_STUDIES, lo, hi, SEED_UID)]
                await conn.execute(_SERIES, min(pks), max(pks), SEED_UID)
                await conn.execute(_INSTANCES, min(pks), max(pks), SEED_UID)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def queries(dsn: str, rng: random.Random) -> dict[str, tuple[str, Level, dict[str, str]]]:
    """One concrete query of each kind, on a random existing study (path, level, params)."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT st.study_instance_uid, st.patient_id, st.patient_name_text, st.study_date"
            " FROM study st WHERE st.patient_id LIKE 'SC%' ORDER BY st.pk OFFSET $1 LIMIT 1",
            rng.randrange(int(await conn.fetchval("SELECT count(*) - 1 FROM study"))),
        )
    finally:
        await conn.close()
    assert row is not None
    study, series = row["study_instance_uid"], row["study_instance_uid"] + ".2"
    year = row["study_date"].year
    return {
        "patient_id": ("/studies", Level.STUDY, {"PatientID": row["patient_id"]}),
        "name_wildcard": ("/studies", Level.STUDY,
                          {"PatientName": row["patient_name_text"][:3] + "*"}),
        "date_range": ("/studies", Level.STUDY, {"StudyDate": f"{year}0101-{year}0630"}),
        "series_of_study": (f"/studies/{study}/series", Level.SERIES, {}),
        "instances_of_series": (f"/studies/{study}/series/{series}/instances", Level.INSTANCE,
                                {}),
    }  # fmt: skip


async def plans(dsn: str, qs: dict[str, tuple[str, Level, dict[str, str]]]) -> dict[str, Any]:
    """The index scans each query's plan uses (EXPLAIN, not executed)."""
    conn = await asyncpg.connect(dsn)
    out: dict[str, Any] = {}
    try:
        for name, (path, level, params) in qs.items():
            parts = path.strip("/").split("/")
            uids = {Level.STUDY: parts[1]} if len(parts) > 2 else {}
            if len(parts) > 4:
                uids[Level.SERIES] = parts[3]
            sql_text, args = compile_search(parse(level, list(params.items()), uids))
            plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql_text}", *args))
            out[name] = sorted(set(_scans(plan[0]["Plan"])))
    finally:
        await conn.close()
    return out


def _scans(node: dict[str, Any]) -> list[str]:
    found = []
    if "Scan" in node["Node Type"]:
        found.append(f"{node['Node Type']} {node.get('Index Name') or node.get('Relation Name')}")
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


def time_queries(url: str, qs: dict[str, tuple[str, Level, dict[str, str]]]) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in qs}
    with httpx.Client(timeout=120) as client:
        for _ in range(REPEATS):
            for name, (path, _, params) in qs.items():
                t = time.perf_counter()
                r = client.get(url + path, params=params)
                assert r.status_code in (200, 204), r.text
                times[name].append((time.perf_counter() - t) * 1000)
    return {n: {"p50_ms": round(pct(t, 50), 2), "p95_ms": round(pct(t, 95), 2)}
            for n, t in times.items()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dsn = fresh_database(BENCH_DB)
    results: dict[str, Any] = {}
    rng = random.Random(5)
    with tempfile.TemporaryDirectory() as tmp, running(Path(tmp) / "data", dsn) as server:
        seed(server.url)
        studies = 0
        for size in sizes:
            target = size // INSTANCES_PER_STUDY - 1  # the seed study counts too
            t = time.perf_counter()
            asyncio.run(grow(dsn, studies, target))
            studies = target
            grown = round(time.perf_counter() - t, 1)
            qs = asyncio.run(queries(dsn, rng))
            results[str(size)] = {"load_s": grown, "latency": time_queries(server.url, qs),
                                  "plans": asyncio.run(plans(dsn, qs))}  # fmt: skip
            print(size, json.dumps(results[str(size)], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qido_scale.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
