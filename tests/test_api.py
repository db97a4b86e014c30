"""STOW, QIDO and WADO through the ASGI app in-process, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import struct
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server import ingest
from dicomweb_server.blobstore.files import _FileWriter
from dicomweb_server.config import Settings
from dicomweb_server.dicomfile import ParsedFile, parse_file
from tests.helpers import (
    ROOT,
    TEST_HOSTS,
    element_bytes,
    make_instance,
    multipart_body,
    pending_reservations,
    split_multipart,
    stow_headers,
    studies_named,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db


async def stow(
    client: httpx.AsyncClient, *files: bytes, study: str | None = None
) -> httpx.Response:
    url = f"{ROOT}/studies" + (f"/{study}" if study else "")
    return await client.post(url, content=multipart_body(files), headers=stow_headers())


async def test_store_search_retrieve_round_trip(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(frames=3)
    raw = to_bytes(ds)
    r = await stow(app_client, raw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    ref = values(r.json(), "00081199")[0]
    assert isinstance(ref, dict)
    url = values(ref, "00081190")[0]
    assert url == (
        f"http://testserver{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )

    r = await app_client.get(f"{ROOT}/studies", params={"PatientID": "PAT-1"})
    assert r.status_code == 200
    (study,) = r.json()
    assert values(study, "0020000D") == [ds.StudyInstanceUID]
    assert values(study, "00201208") == [1]
    assert values(study, "00201206") == [1]
    assert values(study, "00080061") == ["CT"]
    assert values(study, "00100010") == [{"Alphabetic": "Doe^John"}]

    r = await app_client.get(
        str(url),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == raw
    assert "transfer-syntax=1.2.840.10008.1.2.1" in headers["content-type"]

    r = await app_client.get(f"{url}/frames/2,3")
    assert r.status_code == 200
    parts = split_multipart(r.content, r.headers["content-type"])
    expected = ds.pixel_array
    assert [p[1] for p in parts] == [expected[1].tobytes(), expected[2].tobytes()]

    r = await app_client.get(f"{url}/metadata")
    (meta,) = r.json()
    assert values(meta, "00080018") == [ds.SOPInstanceUID]
    bulk = meta["7FE00010"]["BulkDataURI"]
    assert bulk.startswith("http://testserver/dicom-web/studies/")
    r = await app_client.get(bulk)
    assert r.status_code == 200
    ((_, pixel_bytes),) = split_multipart(r.content, r.headers["content-type"])
    assert pixel_bytes == ds.PixelData


async def test_qido_matching(app_client: httpx.AsyncClient) -> None:
    study_a = make_instance(patient_name="Müller^Anna", patient_id="MRN1", study_date="20200101")
    study_b = make_instance(
        patient_name="O'Brien^Mary^Ann", patient_id="MRN2", study_date="20221231", modality="MR"
    )
    assert (await stow(app_client, to_bytes(study_a), to_bytes(study_b))).status_code == 200

    async def uids(**params: str | list[str]) -> list[str]:
        r = await app_client.get(f"{ROOT}/studies", params=params)
        assert r.status_code in (200, 204), r.text
        found = r.json() if r.status_code == 200 else []
        return sorted(str(values(s, "0020000D")[0]) for s in found)

    a, b = study_a.StudyInstanceUID, study_b.StudyInstanceUID
    assert await uids(PatientName="müller*") == [a]  # PN is case-insensitive
    assert await uids(PatientName="o'brien^mary^ann") == [b]
    assert await uids(PatientName="*Mary*") == [b]
    assert await uids(PatientName="m?ller^anna") == [a]
    assert await uids(PatientName="ann", fuzzymatching="true") == sorted([a, b])
    assert await uids(PatientID="MRN1") == [a]
    assert await uids(PatientID="MRN%") == []  # % is a literal, not a LIKE wildcard
    assert await uids(PatientID="MRN_") == []
    assert await uids(PatientID="MRN?") == sorted([a, b])
    assert await uids(StudyDate="20200101-20211231") == [a]
    assert await uids(StudyDate="20210101-") == [b]
    assert await uids(StudyDate="-20200101") == [a]
    assert await uids(ModalitiesInStudy="MR") == [b]
    assert await uids(ModalitiesInStudy="CT,MR") == sorted([a, b])
    assert await uids(ModalitiesInStudy=["CT", "MR"]) == sorted([a, b])  # the key repeated
    # an empty item in the list is no single value (PS3.4 C.2.2.2.2): a 400, never dropped
    r = await app_client.get(f"{ROOT}/studies", params={"ModalitiesInStudy": ["MR", ""]})
    assert r.status_code == 400 and "empty item" in r.text
    assert await uids(StudyInstanceUID=f"{a},{b}") == sorted([a, b])
    assert await uids(**{"00100020": "MRN2"}) == [b]
    assert await uids(StudyTime="1000-1100") == sorted([a, b])
    # A range's upper end is all of the span it names (found against Orthanc): both studies
    # are at 10:15:00, within the hour 10 and the minute 10:15 but after their first moment.
    assert await uids(StudyTime="10-10") == sorted([a, b])
    assert await uids(StudyTime="-1015") == sorted([a, b])
    assert await uids(StudyTime="-1014") == []


_ODD_NAMES = {
    "cq": "CQ500-CT-310",
    "carter": "Carter^John^T^Dr.^",
    "smith": "Smith^John^^^",
    "johnny": "Smith^Johnny",
    "yamada": "Yamada^Tarou^^^=山田^太郎",
}


async def _patients_found_by(client: httpx.AsyncClient, names: dict[str, str] = _ODD_NAMES) -> Any:
    """Stores one study per name of `names`; returns a search giving the names' keys."""
    return await studies_named(client, names)


async def test_qido_pn_wildcard_over_trailing_delimiters(app_client: httpx.AsyncClient) -> None:
    """Found by comparing QIDO results with Orthanc's: a PN wildcard naming trailing `^`
    matched nothing, not even the name as stored (the index drops empty trailing components)."""
    found = await _patients_found_by(app_client)
    assert await found(PatientName="Smith^John^^^*") == ["smith"]
    assert await found(PatientName="smith^john^^^") == ["smith"]  # single value, as before
    assert await found(PatientName="*.^") == ["carter"]
    assert await found(PatientName="C?rter^John^T^Dr.^") == ["carter"]
    assert await found(PatientName="Smith^John*") == ["johnny", "smith"]
    assert await found(PatientName="Yamada^Tarou^^^*=山田*") == ["yamada"]


_EMPTY_GROUP_NAMES = {
    "carter": "Carter^John^",
    "no_family": "^John",
    "no_ideographic": "Yamada^Tarou==やまだ^たろう",
    "only_ideographic": "=山田^太郎",
    "six": "A^B^C^D^E^F",
}


async def test_qido_pn_wildcard_trailing_delimiters_ignored(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by review: a wildcard's trailing `^` are ignored as a single value's and a
    group's are; `C?rter^John^` found nothing while `Carter^John^` and `C?rter^John^=` found
    the name (only five components were written out, so only `^^^^` could end a match)."""
    found = await _patients_found_by(app_client, _EMPTY_GROUP_NAMES)
    assert await found(PatientName="Carter^John^") == ["carter"]
    assert await found(PatientName="C?rter^John^=") == ["carter"]
    assert await found(PatientName="C?rter^John^") == ["carter"]
    assert await found(PatientName="Carter*^ ") == ["carter"]
    assert await found(PatientName="*^^") == sorted(_EMPTY_GROUP_NAMES)  # `*`: universal


async def test_qido_pn_wildcard_empty_group_is_no_name(app_client: httpx.AsyncClient) -> None:
    """Found by review: an empty component group is no name, not five empty components;
    written out as `^^^^` it matched `^*` (family name empty), so `^*` found every name
    without an ideographic group (`Yamada^Tarou==やまだ^たろう`) or an alphabetic one."""
    found = await _patients_found_by(app_client, _EMPTY_GROUP_NAMES)
    assert await found(PatientName="^*") == ["no_family"]
    assert await found(PatientName="^*=") == ["no_family"]
    assert await found(PatientName="=^*") == []
    assert await found(PatientName="?^*") == ["six"]
    assert await found(PatientName="*^*=*^*=*^*") == []
    assert await found(PatientName="*^Tarou^^^*") == ["no_ideographic"]


async def test_qido_fuzzy_words_split_as_stored_names(app_client: httpx.AsyncClient) -> None:
    """Found against Orthanc: fuzzymatching=true lost names literal matching finds, as the
    value's words kept the `.` and `-` at which the stored names are split into words."""
    found = await _patients_found_by(app_client)
    assert await found(PatientName="CQ500-CT-310") == ["cq"]
    assert await found(PatientName="CQ500-CT-310", fuzzymatching="true") == ["cq"]
    assert await found(PatientName="cq500-ct", fuzzymatching="true") == ["cq"]
    assert await found(PatientName="Carter^John^T^Dr.^", fuzzymatching="true") == ["carter"]
    assert await found(PatientName="Smith^Jo", fuzzymatching="true") == ["johnny", "smith"]


async def test_qido_levels_and_includefield(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(SeriesDescription="AXIAL", StudyDescription="HEAD")
    await stow(app_client, to_bytes(ds))
    st, se = ds.StudyInstanceUID, ds.SeriesInstanceUID

    r = await app_client.get(f"{ROOT}/studies/{st}/series")
    (series,) = r.json()
    assert values(series, "0008103E") == ["AXIAL"]
    assert values(series, "00201209") == [1]
    assert "00100010" not in series  # study attributes are not repeated under /studies/{s}
    # ... unless asked for (PS3.18 10.6.3.3.2), computed ones included.
    r = await app_client.get(
        f"{ROOT}/studies/{st}/series",
        params={"includefield": "PatientName,StudyDescription,NumberOfStudyRelatedInstances"},
    )
    (series,) = r.json()
    assert values(series, "00100010") == [{"Alphabetic": "Doe^John"}]
    assert values(series, "00081030") == ["HEAD"]
    assert values(series, "00201208") == [1]
    assert "warning" not in r.headers
    r = await app_client.get(f"{ROOT}/series", params={"Modality": "CT"})
    (series,) = r.json()
    assert values(series, "00100010") == [{"Alphabetic": "Doe^John"}]

    r = await app_client.get(f"{ROOT}/studies/{st}/series/{se}/instances")
    (inst,) = r.json()
    assert values(inst, "00080018") == [ds.SOPInstanceUID]
    assert values(inst, "00280010") == [4]
    r = await app_client.get(f"{ROOT}/instances", params={"includefield": "all"})
    (inst,) = r.json()
    assert values(inst, "00081030") == ["HEAD"]
    assert "7FE00010" in inst

    r = await app_client.get(
        f"{ROOT}/studies", params={"includefield": "00081030,NotAKeyword,SeriesDescription"}
    )
    assert r.status_code == 200
    assert "NotAKeyword" in r.headers["warning"]
    # A series attribute has no place in study results: named too (field notes 10).
    assert "'SeriesDescription' is not returned" in r.headers["warning"]
    assert values(r.json()[0], "00081030") == ["HEAD"] and "0008103E" not in r.json()[0]


async def test_qido_scoped_search_returns_the_parent_keys_it_matched(
    app_client: httpx.AsyncClient,
) -> None:
    """A search under /studies/{study}[/series/{series}] leaves the parent's attributes out,
    but not those it matched on (PS3.18 10.6.3.3: every matched attribute is returned)."""
    ds = make_instance(SeriesDescription="AXIAL", StudyDescription="HEAD")
    await stow(app_client, to_bytes(ds))
    st, se = ds.StudyInstanceUID, ds.SeriesInstanceUID

    r = await app_client.get(f"{ROOT}/studies/{st}/series", params={"PatientID": "PAT-1"})
    (series,) = r.json()
    assert values(series, "00100020") == ["PAT-1"]
    assert "00100010" not in series and "00081030" not in series  # not matched: left out
    assert values(series, "0008103E") == ["AXIAL"]

    url = f"{ROOT}/studies/{st}/series/{se}/instances"
    r = await app_client.get(url, params={"Modality": "CT", "PatientName": "Doe*"})
    (inst,) = r.json()
    assert values(inst, "00080060") == ["CT"]
    assert values(inst, "00100010") == [{"Alphabetic": "Doe^John"}]
    assert "0008103E" not in inst and "00081030" not in inst and "00100020" not in inst
    assert str(values(inst, "00081190")[0]).endswith(f"/instances/{ds.SOPInstanceUID}")

    r = await app_client.get(f"{ROOT}/studies/{st}/instances", params={"StudyDate": "20240115"})
    (inst,) = r.json()
    assert values(inst, "00080020") == ["20240115"]
    assert "00100010" not in inst
    assert values(inst, "0008103E") == ["AXIAL"]  # the series level is returned here anyway

    r = await app_client.get(url, params={"Modality": "MR"})
    assert r.status_code == 204


@pytest.mark.parametrize(
    "params",
    [
        # unknown names and unsupported keys are ignored (PS3.18 8.3.1): test_ps318_rules
        {"limit": "-1"},
        {"limit": "1e9"},
        {"offset": "99999999999999999999"},
        {"offset": "x"},
        {"StudyDate": "2020-01-01"},
        {"StudyDate": "20201301"},
        {"StudyInstanceUID": "1.2.3'; DROP TABLE study; --"},
        {"fuzzymatching": "yes"},
        {"SOPInstanceUID": "1.2.3"},  # instance-level key at study level
        {"PatientName": "\x00"},  # found by tests/test_fuzz.py: PostgreSQL refuses NUL
    ],
)
async def test_qido_bad_parameters(app_client: httpx.AsyncClient, params: dict[str, str]) -> None:
    r = await app_client.get(f"{ROOT}/studies", params=params)
    assert r.status_code == 400
    assert r.json()["message"]


async def test_qido_limit_offset_paging(app_client: httpx.AsyncClient) -> None:
    files = [to_bytes(make_instance(patient_id=f"P{i}")) for i in range(5)]
    await stow(app_client, *files)
    seen: list[object] = []
    for offset in range(0, 6, 2):
        r = await app_client.get(f"{ROOT}/studies", params={"limit": "2", "offset": str(offset)})
        page = [values(s, "0020000D")[0] for s in r.json()]
        seen += page
        assert ("warning" in r.headers) == (offset + 2 < 5)
    assert len(seen) == len(set(seen)) == 5
    r = await app_client.get(f"{ROOT}/studies", params={"limit": "100000"})
    assert r.status_code == 200 and "maximum" in r.headers["warning"]


async def test_qido_matching_found_by_review(app_client: httpx.AsyncClient, samples: Path) -> None:
    """DT values compared in UTC (PS3.4 C.2.2.2.5), PN component groups matched group by
    group (PS3.4 C.2.2.2.1), a UID list longer than one value's cap (C.2.2.2.2), a huge
    limit lowered (PS3.18 8.3.4.4), no empty "Value" (F.2.5)."""
    offset = make_instance(AcquisitionDateTime="20240105120000+0500")
    local = make_instance(AcquisitionDateTime="20240105120000", TimezoneOffsetFromUTC="-0300")
    naive = make_instance(AcquisitionDateTime="20240105120000")
    no_modality = make_instance()
    del no_modality.Modality
    chr_h31 = (samples / "real/pydicom/charset_files/chrH31.dcm").read_bytes()
    files = [to_bytes(d) for d in (offset, local, naive, no_modality)] + [chr_h31]
    assert (await stow(app_client, *files)).status_code == 200

    async def found(level: str, **params: str) -> list[dict[str, Any]]:
        r = await app_client.get(f"{ROOT}/{level}", params=params)
        assert r.status_code in (200, 204), r.text
        return r.json() if r.status_code == 200 else []

    async def sops(value: str) -> list[str]:
        found_ = await found("instances", AcquisitionDateTime=value)
        return sorted(str(values(i, "00080018")[0]) for i in found_)

    a, b, c = (str(d.SOPInstanceUID) for d in (offset, local, naive))
    assert await sops("2023-2025") == sorted([a, b, c])
    assert await sops("20230101-20251231") == sorted([a, b, c])
    assert await sops("20240105070000+0000") == [a]  # 12:00 at UTC+05:00
    assert await sops("20240105020000-0500") == [a]
    assert await sops("20240105060000+0000-20240105080000+0000") == [a]
    assert await sops("20240105120000+0500") == [a]
    assert await sops("20240105150000+0000") == [b]  # 12:00 at its TimezoneOffsetFromUTC
    assert await sops("20240105120000") == [c]  # no offset anywhere: taken as UTC
    assert await sops("20240105120000+0000") == [c]
    # the stored value as it reads, in the instance's JSON
    (inst,) = await found("instances", SOPInstanceUID=a, includefield="AcquisitionDateTime")
    assert values(inst, "0008002A") == ["20240105120000+0500"]

    async def names(value: str) -> int:
        return len(await found("studies", PatientName=value))

    assert await names("Yamada^Tarou=山田^太郎=やまだ^たろう") == 1
    assert await names("yamada^tarou=山田^太郎=やまだ^たろう") == 1
    assert await names("Yamada^Tarou=山田^太郎") == 1
    assert await names("=山田^太郎") == 1
    assert await names("==やまだ^*") == 1
    assert await names("Yamada^*=山田^太郎=") == 1
    assert await names("Yamada^Tarou") == 1 and await names("山田^太郎") == 1
    assert await names("山田^太郎=Yamada^Tarou") == 0  # groups in the wrong places
    assert await names("Yamada^Tarou=山田^花子") == 0
    assert await names("Doe^John=山田^太郎") == 0

    uid = str(no_modality.StudyInstanceUID)
    (study,) = await found("studies", StudyInstanceUID=uid, includefield="SOPClassesInStudy")
    assert study["00080061"] == {"vr": "CS"}
    assert study["00080062"]["Value"] == [str(no_modality.SOPClassUID)]

    stored = [str(d.StudyInstanceUID) for d in (offset, local, naive, no_modality)]
    many = stored + [f"1.2.826.0.1.3680043.8.498.{10**15 + i}.{10**13 + i}" for i in range(20)]
    assert len(",".join(many)) > 1024
    for params in (
        {"StudyInstanceUID": ",".join(many)},
        {"StudyInstanceUID": "\\".join(many)},
    ):
        assert len(await found("studies", **params)) == len(stored)
    repeated = httpx.QueryParams([("StudyInstanceUID", u) for u in many])
    r = await app_client.get(f"{ROOT}/studies", params=repeated)
    assert r.status_code == 200 and len(r.json()) == len(stored)

    r = await app_client.get(f"{ROOT}/studies", params={"limit": "9999999999"})
    assert r.status_code == 200 and len(r.json()) == 5
    assert "limit lowered to the maximum" in r.headers["warning"]


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


async def test_stow_same_bytes_twice_and_conflicting_copy(
    app: Starlette, app_client: httpx.AsyncClient, settings: Settings, pg_dsn: str
) -> None:
    ds = make_instance()
    raw = to_bytes(ds)
    assert (await stow(app_client, raw)).status_code == 200
    assert (await stow(app_client, raw)).status_code == 200
    ds.PatientName = "Changed^Name"
    r = await stow(app_client, to_bytes(ds))
    assert r.status_code == 409
    (f,) = values(r.json(), "00081198")
    assert isinstance(f, dict) and values(f, "00081197") == [0x0111]
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM instance") == 1
        assert await pending_reservations(conn, app.state.services.index) == 0
        key = await conn.fetchval("SELECT blob_key FROM instance")
    finally:
        await conn.close()
    root = settings.blob_dir
    blobs = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]
    assert [p.name for p in blobs] == [key]
    assert blobs[0].read_bytes() == raw


async def test_same_data_set_under_other_file_meta_is_the_same_instance(
    app_client: httpx.AsyncClient, settings: Settings, pg_dsn: str
) -> None:
    """The File Meta Information describes the file, not the instance (PS3.10 7.1): the same
    data set again under other meta information (as DIMSE, whose pynetdicom writes its own,
    and another tool send it) is a success with one copy, not 0x0111; a different data set
    is still 0x0111. An instance stored before the hash left the meta information out (its
    row holds the whole file's hash) is compared by its file."""
    import hashlib

    ds = make_instance()
    raw = to_bytes(ds)
    assert (await stow(app_client, raw)).status_code == 200
    ds.file_meta.ImplementationClassUID = pydicom.uid.UID("1.2.826.0.1.3680043.9.3811.2.1.0")
    ds.file_meta.ImplementationVersionName = "PYNETDICOM_210"
    other_meta = to_bytes(ds)
    assert other_meta != raw
    r = await stow(app_client, other_meta)
    assert r.status_code == 200, r.text
    assert _blob_contents(settings) == [raw]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE instance SET sha256 = $1", hashlib.sha256(raw).digest())
    finally:
        await conn.close()
    assert (await stow(app_client, other_meta)).status_code == 200
    ds.PatientName = "Changed^Name"
    r = await stow(app_client, to_bytes(ds))
    assert r.status_code == 409
    (f,) = values(r.json(), "00081198")
    assert isinstance(f, dict) and values(f, "00081197") == [0x0111]


@pytest.mark.parametrize("piece", [1, 7, 131, 133, 4096])
def test_data_set_hash_leaves_the_file_meta_out_however_the_file_comes(piece: int) -> None:
    from dicomweb_server.blobstore.hashing import DataSetHash

    ds = make_instance()
    raw = to_bytes(ds)
    ds.file_meta.ImplementationVersionName = "OTHER_TOOL"
    other = to_bytes(ds)

    def digest(data: bytes) -> bytes:
        h = DataSetHash()
        for i in range(0, len(data), piece):
            h.update(data[i : i + piece])
        return h.digest()

    assert digest(raw) == digest(other)
    import hashlib

    from dicomweb_server.blobstore.hashing import WHOLE_FILE_HASH_VERSION as W

    body_at = len(raw) - len(ds.PixelData) - 200
    assert digest(raw) != digest(raw[:body_at] + b"x" + raw[body_at + 1 :])
    assert digest(b"not DICOM" * 100) == W + hashlib.sha256(b"not DICOM" * 100).digest()
    assert digest(raw[:140]) == W + hashlib.sha256(raw[:140]).digest()  # ends in the meta
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    relabelled = bytearray(other)  # the same bytes after the meta, another syntax named
    at = relabelled.index(b"1.2.840.10008.1.2.1\0")
    relabelled[at : at + 20] = b"1.2.840.10008.1.2\0\0\0"
    assert digest(bytes(relabelled)) != digest(raw)


def test_a_file_hashed_whole_never_passes_for_a_data_set() -> None:
    """Found by review: file A, whose meta information is too long to walk, is hashed whole;
    file B's data set is A's bytes after the 20 that a data set hash starts with (B's syntax
    and a NUL), so both came to the same SHA-256, and B was dropped as A's duplicate. The
    two kinds of hash now differ in their first byte."""
    from dicomweb_server.blobstore.hashing import DataSetHash

    def digest(data: bytes) -> bytes:
        h = DataSetHash()
        h.update(data)
        return h.digest()

    syntax = b"1.2.840.10008.1.2.1"
    ds = make_instance()
    raw = to_bytes(ds)
    data_set = raw[raw.index(b"\x08\x00") :]
    elements = [
        element_bytes(0x00020001, b"OB", b"\0\1"),
        element_bytes(0x00020010, b"UI", syntax + b"\0"),
        element_bytes(0x00020102, b"OB", b"p" * 70_000),
    ]
    rest = b"".join(elements)
    a_meta = element_bytes(0x00020000, b"UL", struct.pack("<I", len(rest))) + rest
    head = syntax + b"\0"
    header = struct.pack("<HH2sHI", 8, 1, b"UN", 0, 128 - len(head) - 12 + 4 + len(a_meta))
    a = head + header + b"\0" * (128 - len(head) - len(header)) + b"DICM" + a_meta + data_set
    b_rest = element_bytes(0x00020010, b"UI", syntax + b"\0")
    b_meta = element_bytes(0x00020000, b"UL", struct.pack("<I", len(b_rest))) + b_rest
    b = b"\0" * 128 + b"DICM" + b_meta + a[len(head) :]
    assert digest(a)[1:] == digest(b)[1:]  # the same SHA-256 ...
    assert digest(a) != digest(b)  # ... of two kinds


def test_data_set_hash_reads_the_meta_as_pydicom_does(tmp_path: Path) -> None:
    """Found by review: the walk of the File Meta Information took a UV element (4-byte
    length after 2 reserved bytes, PS3.5 7.1.2) for a 2-byte length, so it skipped part of
    the data set that pydicom then read: two instances differing only there hashed alike,
    and the second was dropped as a duplicate."""
    from dicomweb_server.blobstore.hashing import data_set_sha256

    def part10(name: str) -> bytes:
        ds = make_instance(sop="1.2.3.4.5.6.7", patient_name=name)
        body = to_bytes(ds)
        body = body[body.index(b"\x08\x00") :]  # the data set (its first group is 0008)
        rest = b"".join(
            [
                element_bytes(0x00020001, b"OB", b"\0\1"),
                element_bytes(0x00020002, b"UI", str(ds.SOPClassUID).encode() + b"\0"),
                element_bytes(0x00020003, b"UI", b"1.2.3.4.5.6.7\0"),
                element_bytes(0x00020010, b"UI", b"1.2.840.10008.1.2.1\0"),
                element_bytes(0x00020012, b"UI", b"1.2.3.4\0"),
                element_bytes(0x00020100, b"UV", b"", reserved=200),
            ]
        )
        meta = element_bytes(0x00020000, b"UL", struct.pack("<I", len(rest))) + rest
        return b"\0" * 128 + b"DICM" + meta + body

    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.write_bytes(part10("Alice^A"))
    b.write_bytes(part10("Mallory^M"))
    assert parse_file(a).data_set_at == parse_file(b).data_set_at
    assert data_set_sha256(a) != data_set_sha256(b)


def test_data_set_hash_in_small_pieces_is_linear() -> None:
    """Found by review: until the meta's end was known, every piece walked the whole head
    again; 64 KiB of meta elements in 16-byte pieces took 8 s of the event loop."""
    from dicomweb_server.blobstore.hashing import DataSetHash

    head = b"\0" * 128 + b"DICM"
    head += b"".join(
        element_bytes(0x00020000 | (0x100 + i % 0xFF00), b"UI", b"") for i in range(8200)
    )
    h = DataSetHash()
    started = time.perf_counter()
    for i in range(0, len(head), 16):
        h.update(head[i : i + 16])
    h.digest()
    assert time.perf_counter() - started < 2  # 0.03 s here; 8 s before the fix


def _blob_contents(settings: Settings) -> list[bytes]:
    root = settings.blob_dir
    return [
        p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "tmp"
    ]


@pytest.mark.parametrize("garbage_first", [False, True])
async def test_stow_same_sop_twice_in_one_request_first_part_wins(
    app_client: httpx.AsyncClient,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    garbage_first: bool,
) -> None:
    """Two parts of one request with the same SOP Instance UID and different bytes: the first
    in request order is stored, the later one fails with 0x0111, even when the first is parsed
    last (parts are stored concurrently). A part that fails before its UID is known (not
    DICOM) holds nothing up."""
    ds = make_instance(rows=32, cols=32)
    first = to_bytes(ds)
    ds.PatientName = "Other^Copy"
    second = to_bytes(ds)
    real_parse = parse_file

    def first_parsed_last(path: Path) -> ParsedFile:
        parsed = real_parse(path)
        if path.read_bytes() == first:
            time.sleep(0.3)  # in a worker thread: the second part's parse finishes meanwhile
        return parsed

    monkeypatch.setattr(ingest, "parse_file", first_parsed_last)
    parts = [b"not dicom"] * garbage_first + [first, second]
    r = await stow(app_client, *parts)
    assert r.status_code == 202, r.text
    (stored,) = values(r.json(), "00081199")
    assert isinstance(stored, dict) and values(stored, "00081155") == [ds.SOPInstanceUID]
    failures = values(r.json(), "00081198")
    codes = [values(f, "00081197")[0] for f in failures if isinstance(f, dict)]
    assert codes == [0xC000] * garbage_first + [0x0111]
    assert _blob_contents(settings) == [first]


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


async def test_stow_same_bytes_twice_in_one_request(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    raw = to_bytes(make_instance())
    r = await stow(app_client, raw, raw)
    assert r.status_code == 200, r.text
    assert len(values(r.json(), "00081199")) == 2
    assert _blob_contents(settings) == [raw]


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


async def test_uris_keep_the_port_when_host_has_none(app: object) -> None:
    """dicomweb-client sends `Host: 127.0.0.1` without the port; our URIs must still work."""
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        ds = make_instance()
        r = await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
            headers={**stow_headers(), "Host": "127.0.0.1"},
        )  # fmt: skip
        ref = values(r.json(), "00081199")[0]
        assert isinstance(ref, dict)
        assert str(values(ref, "00081190")[0]).startswith("http://127.0.0.1:8080/dicom-web/")


async def test_bad_input_battery_keeps_what_was_stored(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    raw = to_bytes(ds)
    assert (await stow(app_client, raw)).status_code == 200
    truncated = multipart_body([raw])[:-40]
    headers = stow_headers()
    bad = [
        app_client.post(f"{ROOT}/studies", content=truncated, headers=headers),
        app_client.post(f"{ROOT}/studies", content=b"\x00" * 5000, headers=headers),
        app_client.post(f"{ROOT}/studies", content=multipart_body([raw[:200]]), headers=headers),
        app_client.post(
            f"{ROOT}/studies/..%2F..%2Fetc", content=multipart_body([raw]), headers=headers
        ),
        app_client.get(f"{ROOT}/studies", params={"StudyInstanceUID": "1'; DELETE FROM instance;"}),
        app_client.get(f"{ROOT}/studies", params={"limit": "-5"}),
        app_client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}/series/1.2/instances/1.3/frames/1"),
    ]
    for request in bad:
        r = await request
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
    # Quotes are legal in a PatientID (and in names: O'Brien): a plain, empty result.
    r = await app_client.get(f"{ROOT}/studies", params={"PatientID": "'; DELETE FROM instance; --"})
    assert r.status_code == 204 and r.content == b""
    url = (
        f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    r = await app_client.get(url, headers={"Accept": "multipart/related; transfer-syntax=*"})
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == raw
    r = await app_client.get(f"{ROOT}/instances")
    assert len(r.json()) == 1


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


async def test_requests_ohif_makes(app_client: httpx.AsyncClient, samples: Path) -> None:
    """The exact request shapes OHIF v3 sends (issue 5), quoted and unquoted Accept alike."""
    path = samples / "generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert (await stow(app_client, path.read_bytes())).status_code == 200
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    fields = "00081030%2C00080060%2C00080020"
    for extra in ("", f"&StudyInstanceUID={st}", f"&00100020={ds.PatientID}"):
        r = await app_client.get(
            f"{ROOT}/studies?limit=101&offset=0&fuzzymatching=false&includefield={fields}{extra}"
        )
        assert r.status_code == 200 and st in r.text, extra
    r = await app_client.get(
        f"{ROOT}/studies/{st}/series?includefield=00080021%2C00080031%2C0008103E%2C00200011"
    )
    assert r.status_code == 200 and se in r.text
    r = await app_client.get(f"{ROOT}/studies/{st}/series/{se}/metadata")
    assert r.status_code == 200 and r.json()[0]["00080018"]["Value"] == [sop]
    frames = f"{ROOT}/studies/{st}/series/{se}/instances/{sop}/frames/1"
    for accept in (
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
    ):
        r = await app_client.get(frames, headers={"Accept": accept})
        assert r.status_code == 200
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
        assert body[:2] == b"\xff\xd8"
    for resource in ("rendered", "thumbnail"):
        r = await app_client.get(
            f"{ROOT}/studies/{st}/series/{se}/instances/{sop}/{resource}?accept=image/jpeg"
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        r = await app_client.get(f"{ROOT}/studies/{st}/series/{se}/{resource}?accept=image%2Fjpeg")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


async def test_warning_header_survives_any_reason_text(app_client: httpx.AsyncClient) -> None:
    """Reasons with line breaks or non-Latin-1 text (found by tests/test_fuzz.py) are escaped."""
    r = await app_client.get(f"{ROOT}/studies", params={"includefield": "Ā\r\nX-Injected: 1"})
    assert r.status_code == 204  # an empty archive; the Warning header is still sent
    assert "x-injected" not in r.headers
    assert "\\u0100" in r.headers["warning"]


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


async def test_qido_includefield_all_bulk_uris_are_absolute(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    await stow(app_client, to_bytes(ds))
    r = await app_client.get(f"{ROOT}/instances", params={"includefield": "all"})
    (inst,) = r.json()
    uri = inst["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://testserver/dicom-web/studies/")
    assert (await app_client.get(uri)).status_code == 200


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


async def test_qido_retrieve_url_is_the_searched_level(app_client: httpx.AsyncClient) -> None:
    """RetrieveURL (0008,1190) names what was searched for, whatever levels the fields add."""
    ds = make_instance()
    await stow(app_client, to_bytes(ds))
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    for path, params, expected in (
        ("/studies", {"includefield": "all"}, f"/studies/{st}"),
        ("/series", {"includefield": "all"}, f"/studies/{st}/series/{se}"),
        (f"/studies/{st}/series", {"includefield": "00081190"}, f"/studies/{st}/series/{se}"),
        ("/instances", {"includefield": "all"}, f"/studies/{st}/series/{se}/instances/{sop}"),
        (f"/studies/{st}/instances", {}, f"/studies/{st}/series/{se}/instances/{sop}"),
    ):
        r = await app_client.get(f"{ROOT}{path}", params={**params, "StudyInstanceUID": st})
        (found,) = r.json()
        assert str(values(found, "00081190")[0]).endswith(f"/dicom-web{expected}"), path
        assert list(found) == sorted(found)


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


def _padded(raw: bytes, value_bytes: int) -> bytes:
    """A Part-10 file with Data Set Trailing Padding (FFFC,FFFC) of `value_bytes` at its end."""
    return raw + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, value_bytes) + b"\0" * value_bytes


@pytest.mark.parametrize("padded_first", [True, False])
async def test_trailing_padding_is_not_part_of_the_instance(
    app_client: httpx.AsyncClient, settings: Settings, padded_first: bool
) -> None:
    """Found by review: dcmtk's storescu sends a file without its Data Set Trailing Padding,
    which has no meaning (PS3.10 7.2), so STOW-RS then storescu of the same file was 0x0111.
    With the padding or without, it is one instance; the first copy is kept."""
    ds = make_instance()
    raw = to_bytes(ds)
    first, second = (_padded(raw, 100), raw) if padded_first else (raw, _padded(raw, 100))
    assert (await stow(app_client, first)).status_code == 200
    r = await stow(app_client, second)
    assert r.status_code == 200, r.text
    assert _blob_contents(settings) == [first]
    ds.PatientName = "Changed^Name"
    r = await stow(app_client, _padded(to_bytes(ds), 100))
    assert r.status_code == 409


def test_padding_hash_window_at_its_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    """PADDING_HASH_WINDOW_BYTES: padding (its 12-byte header and value) that fits in the
    window is left out of the hash; a longer one is hashed."""
    from dicomweb_server.blobstore import hashing

    monkeypatch.setattr(hashing, "PADDING_HASH_WINDOW_BYTES", 64)
    raw = to_bytes(make_instance(rows=16, cols=16))

    def digest(data: bytes) -> bytes:
        h = hashing.DataSetHash()
        h.update(data)
        return h.digest(len(raw) if len(data) > len(raw) else None)

    assert digest(_padded(raw, 64 - 12)) == digest(raw)
    assert digest(_padded(raw, 64 - 10)) != digest(raw)
