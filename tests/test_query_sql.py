"""QIDO parameter parsing and SQL compilation, golden (text, args) per matching type."""

from __future__ import annotations

import datetime as dt

import pytest

from dicomweb_server.attributes import Level
from dicomweb_server.errors import BadRequestError
from dicomweb_server.query import (
    QIDO_DEFAULT_LIMIT,
    QIDO_MAX_LIMIT,
    QIDO_MAX_OFFSET,
    FuzzyMatch,
    Query,
    RangeMatch,
    SingleValueMatch,
    UidListMatch,
    UniversalMatch,
    WildcardMatch,
    parse,
)
from dicomweb_server.sql import _Args, _condition, compile_search, like_pattern, returned_levels


def q(level: Level = Level.STUDY, **params: str) -> Query:
    return parse(level, list(params.items()), {})


def test_defaults() -> None:
    query = q()
    assert query.limit == QIDO_DEFAULT_LIMIT and query.offset == 0 and not query.include.all


def test_matching_types() -> None:
    (m,) = q(PatientID="ABC").matches
    assert isinstance(m, SingleValueMatch) and m.value == "ABC"
    (m,) = q(PatientName="DOE*").matches
    assert isinstance(m, WildcardMatch)
    (m,) = q(PatientName="").matches
    assert isinstance(m, UniversalMatch)
    (m,) = parse(Level.STUDY, [("StudyInstanceUID", ""), ("StudyInstanceUID", "")], {}).matches
    assert isinstance(m, UniversalMatch)  # found by tests/test_fuzz.py: was an IndexError
    (m,) = q(StudyInstanceUID="1.2,1.3").matches
    assert isinstance(m, UidListMatch) and m.values == ("1.2", "1.3")
    (m,) = q(StudyDate="20200101-").matches
    assert isinstance(m, RangeMatch) and m.lower == dt.date(2020, 1, 1) and m.upper is None
    (m,) = q(StudyTime="-1030").matches
    assert isinstance(m, RangeMatch) and m.upper == dt.time(10, 30)
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20200101120000-20200102").matches
    assert isinstance(m, RangeMatch) and m.lower == dt.datetime(2020, 1, 1, 12)
    (m,) = parse(Level.STUDY, [("PatientName", "doe jo"), ("fuzzymatching", "true")], {}).matches
    assert isinstance(m, FuzzyMatch) and m.words == ("doe", "jo")
    (m,) = parse(Level.STUDY, [("00100020", "X")], {}).matches
    assert m.attr.keyword == "PatientID"


def test_limits_at_the_edge() -> None:
    assert q(limit=str(QIDO_MAX_LIMIT)).limit == QIDO_MAX_LIMIT
    over = q(limit=str(QIDO_MAX_LIMIT + 1))
    assert over.limit == QIDO_MAX_LIMIT and over.warnings
    assert q(offset=str(QIDO_MAX_OFFSET)).offset == QIDO_MAX_OFFSET
    with pytest.raises(BadRequestError):
        q(offset=str(QIDO_MAX_OFFSET + 1))
    with pytest.raises(BadRequestError):
        q(limit="-1")


def test_like_escaping() -> None:
    assert like_pattern("a%b_c\\d*e?") == "a\\%b\\_c\\\\d%e_"


def test_compile_golden() -> None:
    query = parse(
        Level.SERIES,
        [("Modality", "CT"), ("PatientName", "Do*"), ("StudyDate", "20200101-20201231")],
        {Level.STUDY: "1.2.3"},
    )
    text, args = compile_search(query)
    assert text.startswith("SELECT st.study_instance_uid, st.attrs::text AS study_attrs")
    assert "FROM series se JOIN study st ON st.pk = se.study_fk" in text
    assert (
        "WHERE se.num_instances > 0 AND st.study_instance_uid = $1 AND se.modality = $2"
        " AND st.patient_name_text LIKE $3 ESCAPE '\\' AND"
        " EXISTS (SELECT 1 FROM unnest(st.patient_name) AS g WHERE g LIKE $4 ESCAPE '\\')"
        " AND st.study_date >= $5 AND st.study_date <= $6 ORDER BY se.pk LIMIT $7 OFFSET $8"
    ) in text
    assert args == [
        "1.2.3", "CT", "%do%%", "do%", dt.date(2020, 1, 1), dt.date(2020, 12, 31), 101, 0,
    ]  # fmt: skip


def test_condition_values_are_parameters() -> None:
    evil = "x' OR '1'='1"
    (m,) = q(PatientID=evil).matches
    args = _Args()
    assert _condition(m, args) == "st.patient_id = $1"
    assert args.values == [evil]


def test_returned_levels() -> None:
    assert returned_levels(parse(Level.SERIES, [], {})) == (Level.STUDY, Level.SERIES)
    assert returned_levels(parse(Level.SERIES, [], {Level.STUDY: "1"})) == (Level.SERIES,)
    assert returned_levels(parse(Level.INSTANCE, [], {Level.STUDY: "1"})) == (
        Level.SERIES,
        Level.INSTANCE,
    )


def test_dt_with_negative_utc_offset() -> None:
    """A negative UTC offset is not a range separator (found by review)."""
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20240101120000-0500").matches
    assert isinstance(m, SingleValueMatch) and m.value == dt.datetime(2024, 1, 1, 12)
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20240101120000-0500-20240102120000-0500").matches
    assert isinstance(m, RangeMatch) and m.upper == dt.datetime(2024, 1, 2, 12)
