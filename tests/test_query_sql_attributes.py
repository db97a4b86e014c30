"""The attributes a QIDO query names, parsed and compiled: sequence attribute paths (PS3.18
8.3.4.1, one item's keys, PS3.4 C.2.2.2.6) and their SQL, unsupported keys ignored with a
Warning (PS3.18 8.3.1), and includefield warned about exactly when its attribute is not
returned (sql.render_rows)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from dicomweb_server.attributes import ATTRIBUTES, DEFAULT_RETURN, LEVEL_TAGS, Level, tag_hex
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import SequenceMatch, SingleValueMatch, UniversalMatch, WildcardMatch
from dicomweb_server.query import Query, parse
from dicomweb_server.sql import _Args, _condition, render_rows
from tests.query_support import q

SPS = "RequestAttributesSequence.ScheduledProcedureStepID"
RP = "RequestAttributesSequence.RequestedProcedureID"


def test_sequence_paths_parse_to_one_sequence_match() -> None:
    """PS3.18 8.3.4.1 attribute paths, keywords and tags mixed; PS3.4 C.2.2.2.6: the keys
    given are keys of one item."""
    forms = [
        (SPS, RP),
        ("00400275.00400009", "00400275.00401001"),
        ("RequestAttributesSequence.00400009", "00400275.RequestedProcedureID"),
    ]
    for sps, rp in forms:
        (m,) = parse(Level.SERIES, [(sps, "SPS1"), ("Modality", "CT"), (rp, "RP*")], {}).matches[1:]
        assert isinstance(m, SequenceMatch) and m.attr.keyword == "RequestAttributesSequence"
        first, second = m.items
        assert isinstance(first, SingleValueMatch) and first.value == "SPS1"
        assert first.attr.keyword == "ScheduledProcedureStepID" and first.attr.vr == "SH"
        assert isinstance(second, WildcardMatch) and second.pattern == "RP*"
        assert second.attr.keyword == "RequestedProcedureID"
    (m,) = q(Level.INSTANCE, **{SPS: ""}).matches
    assert isinstance(m, SequenceMatch) and isinstance(m.items[0], UniversalMatch)


@pytest.mark.parametrize(
    ("level", "params", "reason"),
    [
        (Level.SERIES, [("RequestAttributesSequence..x", "x")], "malformed attribute path"),
        (Level.SERIES, [("RequestAttributesSequence", "")], "is a sequence"),
        (Level.SERIES, [(SPS, "a"), ("00400275.00400009", "b")], "given twice"),
        (Level.STUDY, [(SPS, "a")], "series-level"),
        (Level.PATIENT, [(SPS, "a")], "patient-level"),
        (Level.SERIES, [(RP, "\x01")], "control character"),
    ],
)
def test_sequence_paths_refused(level: Level, params: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(BadRequestError, match=reason):
        parse(level, params, {})


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("RequestAttributesSequence.PatientName", "not a matching key inside"),
        (f"{SPS}.CodeValue", "one sequence deep"),
        ("StudyDate.x", "not a sequence with matching keys"),
        ("NoSuchKeyword", "not a DICOM attribute"),
        ("Rows", "not a supported matching key"),
    ],
)
def test_unsupported_parameters_ignored_with_a_warning(key: str, reason: str) -> None:
    """PS3.18 8.3.1: unsupported query parameters are ignored; a warning names each."""
    query = parse(Level.SERIES, [(key, "x"), ("Modality", "CT")], {})
    assert [m.attr.keyword for m in query.matches if isinstance(m, SingleValueMatch)] == [
        "Modality"
    ]
    (warning,) = query.warnings
    assert key in warning and reason in warning and "ignored" in warning


def _sequence_sql(params: list[tuple[str, str]]) -> tuple[str | None, list[object]]:
    (m,) = parse(Level.SERIES, params, {}).matches
    args = _Args()
    return _condition(m, args), args.values


def test_sequence_compile_golden() -> None:
    assert _sequence_sql([(SPS, ""), (RP, "*")]) == (None, [])
    text, args = _sequence_sql([(SPS, "S'1"), (RP, "R1")])
    assert text == "se.attrs -> '00400275' @> $1::jsonb"
    assert [json.loads(str(a)) for a in args] == [
        {"Value": [{"00400009": {"Value": ["S'1"]}, "00401001": {"Value": ["R1"]}}]}
    ]
    text, args = _sequence_sql([(SPS, "S1"), (RP, "R_%\\?*")])
    assert text == (
        "se.attrs -> '00400275' @> $1::jsonb AND EXISTS (SELECT 1 FROM"
        " jsonb_path_query(se.attrs -> '00400275', '$.Value[*]') AS item WHERE item @> $2::jsonb"
        " AND EXISTS (SELECT 1 FROM jsonb_path_query(item, '$.\"00401001\".Value[*]') AS v"
        " WHERE v #>> '{}' LIKE $3 ESCAPE '\\'))"
    )
    assert args[1:] == [json.dumps({"00400009": {"Value": ["S1"]}}), "R\\_\\%\\\\_%"]
    text, args = _sequence_sql([(SPS, "S*")])
    assert text is not None and "@>" not in text and args == ["S%"]


def _warned(query: Query, key: str) -> bool:
    return any(f"includefield {key!r}" in w for w in query.warnings)


def test_includefield_not_returned_at_the_level_warns() -> None:
    """Field notes 10: every includefield value that will not be returned is named in a
    warning, valid keywords included (SeriesDescription has no place in study results, and
    PixelData none above the instance level), and nothing fails."""
    study = q(includefield="SeriesDescription,PixelData,StudyDescription")
    assert study.include.tags == {0x0008103E, 0x7FE00010, 0x00081030}
    assert _warned(study, "SeriesDescription") and _warned(study, "PixelData")
    assert not _warned(study, "StudyDescription") and len(study.warnings) == 2
    assert "not returned by study searches" in study.warnings[0]
    (tag_form,) = q(includefield="0008103E").warnings
    assert "'0008103E' (SeriesDescription)" in tag_form
    instance = q(Level.INSTANCE, includefield="PixelData,SeriesDescription,00091001")
    assert instance.warnings == ()  # anything stored with the instance can come back
    computed = "NumberOfStudyRelatedSeries,SOPClassesInStudy,ModalitiesInStudy,RetrieveURL"
    assert q(includefield=computed).warnings == ()
    assert q(Level.SERIES, includefield="PatientAge,NumberOfSeriesRelatedInstances").warnings == ()
    scoped = parse(
        Level.SERIES,
        [("includefield", "PatientName,StudyDate,SOPInstanceUID"), ("StudyDate", "20200101")],
        {Level.STUDY: "1.2"},
    )
    # Study attributes asked for come back in a study's series too (PS3.18 10.6.3.3.2).
    assert not _warned(scoped, "PatientName") and not _warned(scoped, "StudyDate")
    assert _warned(scoped, "SOPInstanceUID") and "within a study" in scoped.warnings[0]
    assert q(includefield="all,PixelData").warnings == ()


def test_includefield_warnings_are_given_once() -> None:
    query = parse(
        Level.STUDY,
        [("includefield", "Modality,00080060,Nope"), ("includefield", "Modality,Nope")],
        {},
    )
    assert len(query.warnings) == 2
    assert _warned(query, "Modality") and _warned(query, "Nope")


# Every attribute the tables know, and a few no level stores: a private tag, Pixel Data.
_CANDIDATE_TAGS = sorted(
    {a.tag for a in ATTRIBUTES}
    | {t for tags in LEVEL_TAGS.values() for t in tags}
    | {t for tags in DEFAULT_RETURN.values() for t in tags}
    | {0x00091001, 0x7FE00010, 0x00181030, 0x00101010}
)


def _full_row() -> dict[str, object]:
    """A row as compile_search selects it, each level's attrs holding what ingest stores
    there (attributes.LEVEL_TAGS) and the instance every candidate attribute."""

    def doc(tags: Iterable[int]) -> str:
        return json.dumps({tag_hex(t): {"vr": "LO", "Value": ["x"]} for t in tags})

    return {
        "study_instance_uid": "1.2",
        "series_instance_uid": "1.3",
        "sop_instance_uid": "1.4",
        "patient_attrs": doc(LEVEL_TAGS[Level.STUDY]),
        "study_attrs": doc(LEVEL_TAGS[Level.STUDY]),
        "series_attrs": doc(LEVEL_TAGS[Level.SERIES]),
        "instance_attrs": doc(_CANDIDATE_TAGS),
        "modalities_in_study": ["CT"],
        "sop_classes_in_study": ["1.2.3"],
        "num_series": 1,
        "num_studies": 1,
        "num_instances": 1,
        "study_num_instances": 1,
        "series_num_instances": 1,
    }


@pytest.mark.parametrize(
    ("level", "path_uids", "params"),
    [
        (Level.PATIENT, {}, []),
        (Level.STUDY, {}, []),
        (Level.STUDY, {}, [("StudyDate", "20200101")]),
        (Level.SERIES, {}, []),
        (Level.SERIES, {Level.STUDY: "1.2"}, []),
        (Level.SERIES, {Level.STUDY: "1.2"}, [("StudyDate", "20200101"), ("PatientID", "P")]),
        (Level.SERIES, {Level.STUDY: "1.2"}, [("ModalitiesInStudy", "CT")]),
        (Level.INSTANCE, {}, []),
        (Level.INSTANCE, {Level.STUDY: "1.2"}, []),
        (Level.INSTANCE, {Level.STUDY: "1.2", Level.SERIES: "1.3"}, [("Modality", "CT")]),
    ],
)
def test_includefield_warned_exactly_when_not_returned(
    level: Level, path_uids: dict[Level, str], params: list[tuple[str, str]]
) -> None:
    """The warnings agree with what sql.render_rows really returns, for every attribute the
    tables know, at every level and scope: an attribute is warned about if and only if it
    is missing from a result whose stored attributes hold everything."""
    for tag in _CANDIDATE_TAGS:
        key = tag_hex(tag)
        query = parse(level, [*params, ("includefield", key)], path_uids)
        (result,) = render_rows(query, [_full_row()], "http://h")
        assert (key in result) is not _warned(query, key), (level, path_uids, params, key)
