"""QIDO-RS through the ASGI app in-process, against a real PostgreSQL: matching (PS3.4
C.2.2.2), levels and includefield, paging, bad parameters, the URLs and Warnings results carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_support import stow
from tests.helpers import ROOT, make_instance, studies_named, to_bytes, values

pytestmark = pytest.mark.db


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


async def test_warning_header_survives_any_reason_text(app_client: httpx.AsyncClient) -> None:
    """Reasons with line breaks or non-Latin-1 text (found by tests/test_fuzz.py) are escaped."""
    r = await app_client.get(f"{ROOT}/studies", params={"includefield": "Ā\r\nX-Injected: 1"})
    assert r.status_code == 204  # an empty archive; the Warning header is still sent
    assert "x-injected" not in r.headers
    assert "\\u0100" in r.headers["warning"]


async def test_qido_includefield_all_bulk_uris_are_absolute(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    await stow(app_client, to_bytes(ds))
    r = await app_client.get(f"{ROOT}/instances", params={"includefield": "all"})
    (inst,) = r.json()
    uri = inst["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://testserver/dicom-web/studies/")
    assert (await app_client.get(uri)).status_code == 200


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
