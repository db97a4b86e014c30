"""Empty Value Matching: QIDO-RS `emptyvaluematching=true` (PS3.18 8.3.4.5) and the value `""`
(PS3.4 C.2.2.2.7; QUOTATION MARK is one of the matching characters of C.2.2.2). For each kind
of key the index holds (a string column, PatientID, a PN, a date, a time, a datetime, a
number, the computed ModalitiesInStudy, a key inside a sequence), one resource with the
attribute of zero length, one without it, one with a value and one with another (or one the
column cannot hold), on the real database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from dicomweb_server.attributes import BY_KEYWORD, LEVEL_TAGS, MATCHING_PATHS, Level
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import EmptyValueMatch, SingleValueMatch, UniversalMatch
from dicomweb_server.query import parse
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes, values

EMPTY = ("emptyvaluematching", "true")
_RESOURCE = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}


def _item(**keys: str) -> Dataset:
    item = Dataset()
    for k, v in keys.items():
        setattr(item, k, v)
    return item


def _requested(*items: Dataset) -> Dataset:
    ds = make_instance()
    ds.RequestAttributesSequence = list(items)
    return ds


# keyword -> (value stored by "value", value stored by "other", the query finding "value"):
# "other" is another value, or one the index column cannot hold (not a valid date or time,
# a number out of the column's range), indexed as NULL like no value, and still a value.
_CASES: dict[str, tuple[Any, Any, str]] = {
    "AccessionNumber": ("ACC1", "ACC2", "ACC1"),
    "StudyDescription": ("Head", "Chest", "Head"),
    "PatientID": ("PID-1", "PID-2", "PID-1"),
    "PatientSex": ("F", "M", "F"),
    "PatientName": ("Doe^Jane", "^^^Dr", "doe^jane"),
    "ReferringPhysicianName": ("Ref^Ann", "Ref^Bob", "Ref^Ann"),
    "StudyDate": ("20240115", "2024", "20240115"),
    "StudyTime": ("101500", "256000", "101500"),
    "PatientBirthDate": ("19700101", "1970", "19700101"),
    "Modality": ("CT", "MR", "CT"),
    "SeriesDescription": ("Axial", "Coronal", "Axial"),
    "BodyPartExamined": ("HEAD", "CHEST", "HEAD"),
    "SeriesNumber": (7, 2**40, "7"),
    "PerformedProcedureStepStartDate": ("20240115", "20241399", "20240115"),
    "PerformedProcedureStepStartTime": ("0815", "2561", "0815"),
    "AcquisitionDateTime": ("20240115101500", "2024011599", "20240115101500"),
    "InstanceNumber": (3, -(2**40), "3"),
}


def _instances(keyword: str) -> dict[str, Dataset]:
    """The four resources for `keyword`, each in its own study (its Study Instance UID names
    it in the results, whatever the level searched)."""
    value, other, _ = _CASES[keyword]
    made: dict[str, Dataset] = {}
    for name, stored in (("empty", ""), ("absent", None), ("value", value), ("other", other)):
        ds = make_instance()
        if stored is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, stored)
        made[name] = ds
    return made


async def _store(client: httpx.AsyncClient, made: Sequence[Dataset]) -> None:
    body = multipart_body([to_bytes(ds) for ds in made])
    r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


def _finder(client: httpx.AsyncClient, made: dict[str, Dataset], level: Level) -> Any:
    by_uid = {str(ds.StudyInstanceUID): name for name, ds in made.items()}

    async def found(*params: tuple[str, str]) -> list[str] | int:
        r = await client.get(f"{ROOT}/{_RESOURCE[level]}", params=list(params))
        if r.status_code == 400:
            return 400
        assert r.status_code in (200, 204), r.text
        assert "warning" not in r.headers, r.headers["warning"]
        results = r.json() if r.content else []
        return sorted(by_uid[str(values(s, "0020000D")[0])] for s in results)

    return found


@pytest.mark.db
@pytest.mark.parametrize("keyword", sorted(_CASES))
async def test_empty_value_matching_finds_zero_length_and_absent(
    app_client: httpx.AsyncClient, keyword: str
) -> None:
    """`""` with emptyvaluematching=true finds the resources whose attribute is of zero length
    or absent, and none with a value, even one the index column cannot hold. Without the flag
    `""` is the two characters (no stored string is; not a date, time or number: 400), and
    a value finds the same resources with the flag as without it: the flag adds no resource
    without a value to a value's matches."""
    made = _instances(keyword)
    await _store(app_client, list(made.values()))
    attr = BY_KEYWORD[keyword]
    found = _finder(app_client, made, attr.level)
    assert await found((keyword, '""'), EMPTY) == ["absent", "empty"]
    assert await found((keyword, ' "" '), EMPTY) == ["absent", "empty"]
    literal: list[str] | int = 400 if attr.vr in ("DA", "TM", "DT", "IS") else []
    assert await found((keyword, '""')) == literal
    query = _CASES[keyword][2]
    assert await found((keyword, query)) == ["value"]
    assert await found((keyword, query), EMPTY) == ["value"]
    # universal matching is unchanged: everything
    assert await found((keyword, ""), EMPTY) == ["absent", "empty", "other", "value"]


@pytest.mark.db
async def test_empty_value_matching_with_the_other_matching_types(
    app_client: httpx.AsyncClient,
) -> None:
    """A range, a wild card, a name with fuzzy matching, a list: each finds what it finds
    without the flag (Empty Value Matching is the value `""`, PS3.4 C.2.2.2.7, not a widening
    of the others); `""` with fuzzymatching=true is still Empty Value Matching."""
    made = {
        "empty": make_instance(StudyDate="", PatientName="", AccessionNumber=""),
        "absent": make_instance(),
        "value": make_instance(study_date="20240115", patient_name="Doe^John"),
    }
    for keyword in ("StudyDate", "PatientName", "AccessionNumber"):
        delattr(made["absent"], keyword)
    await _store(app_client, list(made.values()))
    found = _finder(app_client, made, Level.STUDY)
    for params in (
        [("StudyDate", "20240101-")],
        [("StudyDate", "-20241231")],
        [("PatientName", "Do*")],
        [("PatientName", "doe"), ("fuzzymatching", "true")],
        [("AccessionNumber", "ACC?")],
        [("StudyInstanceUID", f"{made['value'].StudyInstanceUID},1.2.3")],
        [("ModalitiesInStudy", "CT,MR")],
        [("ModalitiesInStudy", "CT\\MR"), ("multiplevaluematching", "true")],
    ):
        without = await found(*params)
        assert without == ["value"] or params[0][0] == "ModalitiesInStudy", params
        assert await found(*params, EMPTY) == without, params
    assert await found(("PatientName", '""'), ("fuzzymatching", "true"), EMPTY) == [
        "absent",
        "empty",
    ]
    # `*` is still universal matching, with or without values
    assert await found(("AccessionNumber", "*"), EMPTY) == ["absent", "empty", "value"]
    # a Unique Key always has a value: `""` finds nothing, and is no 400
    assert await found(("StudyInstanceUID", '""'), EMPTY) == []
    assert await found(("StudyInstanceUID", '""')) == 400


@pytest.mark.db
async def test_empty_value_matching_of_modalities_in_study(app_client: httpx.AsyncClient) -> None:
    """ModalitiesInStudy is computed from the series: a study none of whose series has a
    Modality (zero length or absent) has no value of it."""
    made = {
        "empty": make_instance(modality=""),
        "absent": make_instance(),
        "value": make_instance(),
    }
    del made["absent"].Modality
    await _store(app_client, list(made.values()))
    found = _finder(app_client, made, Level.STUDY)
    assert await found(("ModalitiesInStudy", '""'), EMPTY) == ["absent", "empty"]
    assert await found(("ModalitiesInStudy", "CT"), EMPTY) == ["value"]
    for listed in ('CT,""', 'CT\\""'):
        assert await found(("ModalitiesInStudy", listed), EMPTY) == 400
        assert (
            await found(("ModalitiesInStudy", listed), ("multiplevaluematching", "true"), EMPTY)
            == 400
        )
    assert await found(("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", '""'), EMPTY) == 400
    # without the flag, `""` in a list is a value no study holds, as before
    assert await found(("ModalitiesInStudy", 'CT,""')) == ["value"]


@pytest.mark.db
async def test_empty_value_matching_inside_a_sequence(app_client: httpx.AsyncClient) -> None:
    """PS3.4 C.2.2.2.6 with C.2.2.2.7: a series matches when some item of its Request
    Attributes Sequence has the key of zero length or absent, and the item's other keys
    match too. A series without the sequence has no item, so it does not match."""
    seq = "RequestAttributesSequence"
    made = {
        "empty": _requested(_item(ScheduledProcedureStepID="", RequestedProcedureID="R1")),
        "absent": _requested(_item(RequestedProcedureID="R1")),
        "value": _requested(_item(ScheduledProcedureStepID="S1", RequestedProcedureID="R1")),
        "other": _requested(_item(ScheduledProcedureStepID="", RequestedProcedureID="R2")),
        "none": make_instance(),
        "mixed": _requested(
            _item(ScheduledProcedureStepID="S2", RequestedProcedureID="R1"),
            _item(RequestedProcedureID="R3"),
        ),
    }
    await _store(app_client, list(made.values()))
    found = _finder(app_client, made, Level.SERIES)
    sps, rp = f"{seq}.ScheduledProcedureStepID", f"{seq}.RequestedProcedureID"
    assert await found((sps, '""'), EMPTY) == ["absent", "empty", "mixed", "other"]
    assert await found((sps, '""'), (rp, "R1"), EMPTY) == ["absent", "empty"]
    assert await found((sps, '""'), (rp, "R*"), EMPTY) == ["absent", "empty", "mixed", "other"]
    assert await found((sps, '""'), (rp, "R3"), EMPTY) == ["mixed"]
    assert await found((sps, '""'), (rp, "R2"), EMPTY) == ["other"]
    assert await found((sps, "S1"), EMPTY) == ["value"]
    assert await found((sps, '""')) == []


def test_empty_value_matching_is_the_value_of_two_quotation_marks() -> None:
    """Only `""` (padded with spaces or not) is Empty Value Matching, and only with the flag;
    an empty value stays universal matching, and `""` in a list is a 400 with the reason."""
    for keyword in (
        "AccessionNumber",
        "StudyDate",
        "PatientName",
        "SeriesNumber",
        "StudyInstanceUID",
    ):
        (m,) = parse(Level.INSTANCE, [(keyword, '""'), EMPTY], {}).matches
        assert isinstance(m, EmptyValueMatch) and m.attr.keyword == keyword
    (m,) = parse(Level.STUDY, [("AccessionNumber", '""')], {}).matches
    assert isinstance(m, SingleValueMatch) and m.value == '""'
    for value in ("", "*", '"'):
        (m,) = parse(Level.STUDY, [("AccessionNumber", value), EMPTY], {}).matches
        assert not isinstance(m, EmptyValueMatch), value
    (m,) = parse(Level.STUDY, [("AccessionNumber", ""), EMPTY], {}).matches
    assert isinstance(m, UniversalMatch)
    with pytest.raises(BadRequestError, match='give `""` alone'):
        parse(Level.STUDY, [("StudyInstanceUID", '1.2,""'), EMPTY], {})


def test_every_matching_key_is_in_its_levels_document() -> None:
    """sql._empty_condition tells a value the column cannot hold from no value by the level's
    DICOM JSON (study.attrs, series.attrs: attributes.LEVEL_TAGS): every top-level matching
    key of those levels must be kept there, or such a value would read as none."""
    for path in MATCHING_PATHS:
        attr = path[0]
        if attr.level in (Level.STUDY, Level.SERIES) and attr.keyword != "ModalitiesInStudy":
            assert attr.tag in LEVEL_TAGS[attr.level], attr.keyword


@pytest.mark.db
async def test_empty_value_matching_of_a_name_the_column_does_not_hold(
    app_client: httpx.AsyncClient,
) -> None:
    """A PN column holds the component groups of the first name only: a Patient Name of two
    values whose first is empty or only delimiters (`\\Doe^Jane`, `^^^^\\Doe^Jane`) is indexed
    as no name, but it is a value, returned in the results, and does not match `""`, as a
    string whose first value is empty does not. `^^^^` alone is still no name."""
    made = {
        "empty": make_instance(patient_name=""),
        "delimiters": make_instance(patient_name="^^^^"),
        "first empty": make_instance(),
        "first delimiters": make_instance(),
        "value": make_instance(),
    }
    made["first empty"].PatientName = ["", "Doe^Jane"]
    made["first delimiters"].PatientName = ["^^^^", "Doe^Jane"]
    await _store(app_client, list(made.values()))
    found = _finder(app_client, made, Level.STUDY)
    assert await found(("PatientName", '""'), EMPTY) == ["delimiters", "empty"]
    assert await found(("PatientName", '""'), ("fuzzymatching", "true"), EMPTY) == [
        "delimiters",
        "empty",
    ]
