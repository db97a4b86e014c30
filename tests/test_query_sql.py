"""QIDO parameter parsing and SQL compilation, golden (text, args) per matching type.
Multiple Value Matching and the matching flags: test_query_sql_multiple.py; sequence
attribute paths and includefield: test_query_sql_attributes.py."""

from __future__ import annotations

import datetime as dt

import pytest

from dicomweb_server.attributes import Level
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import (
    MAX_MATCH_LIST_ITEMS,
    MAX_MATCH_VALUE_CHARS,
    ComponentGroupMatch,
    FuzzyMatch,
    RangeMatch,
    SingleValueMatch,
    UidListMatch,
    UniversalMatch,
    WildcardMatch,
)
from dicomweb_server.query import QIDO_DEFAULT_LIMIT, QIDO_MAX_LIMIT, QIDO_MAX_OFFSET, parse
from dicomweb_server.record import pn_groups
from dicomweb_server.sql import (
    _Args,
    _computed,
    _condition,
    compile_search,
    like_pattern,
    returned_levels,
)
from tests.query_support import q


def test_defaults() -> None:
    query = q()
    assert query.limit == QIDO_DEFAULT_LIMIT and query.offset == 0 and not query.include.all


def test_matching_types() -> None:
    (m,) = q(PatientID="ABC").matches
    assert isinstance(m, SingleValueMatch) and m.value == "ABC"
    (m,) = q(PatientName="DOE*").matches
    assert isinstance(m, WildcardMatch)
    # A PN wildcard's trailing `^` and padding are ignored, as a single value's are.
    (m,) = q(PatientName="C?rter^John^ ").matches
    assert isinstance(m, WildcardMatch) and m.pattern == "C?rter^John"
    (m,) = q(PatientName="*^^").matches
    assert isinstance(m, UniversalMatch)
    (m,) = q(AccessionNumber="A?^").matches  # not a PN: kept whole
    assert isinstance(m, WildcardMatch) and m.pattern == "A?^"
    (m,) = q(PatientName="").matches
    assert isinstance(m, UniversalMatch)
    # found by tests/test_fuzz.py: was an IndexError; an empty item in a list is a 400
    with pytest.raises(BadRequestError, match="empty item"):
        parse(Level.STUDY, [("StudyInstanceUID", ""), ("StudyInstanceUID", "")], {})
    (m,) = q(StudyInstanceUID="1.2,1.3").matches
    assert isinstance(m, UidListMatch) and m.values == ("1.2", "1.3")
    (m,) = q(StudyDate="20200101-").matches
    assert isinstance(m, RangeMatch) and m.lower == dt.date(2020, 1, 1) and m.upper is None
    (m,) = q(StudyTime="-1030").matches  # the minute 10:30 ends the range, all of it
    assert isinstance(m, RangeMatch) and m.upper == dt.time(10, 30, 59, 999999)
    (m,) = q(StudyTime="07-07").matches  # found against Orthanc: 07:30 was outside
    assert isinstance(m, RangeMatch)
    assert (m.lower, m.upper) == (dt.time(7), dt.time(7, 59, 59, 999999))
    (m,) = q(StudyTime="070000.5-070000.25").matches  # as precise as the fraction is
    assert isinstance(m, RangeMatch) and m.upper == dt.time(7, 0, 0, 259999)
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20200101120000-20200102").matches
    assert isinstance(m, RangeMatch) and m.lower == dt.datetime(2020, 1, 1, 12)
    (m,) = parse(Level.STUDY, [("PatientName", "doe jo"), ("fuzzymatching", "true")], {}).matches
    assert isinstance(m, FuzzyMatch) and m.words == ("doe", "jo")
    # Split where the stored names are (sql._fuzzy_condition): found against Orthanc.
    fuzzy = [("PatientName", "CQ500-CT-310^Dr.*"), ("fuzzymatching", "true")]
    (m,) = parse(Level.STUDY, fuzzy, {}).matches
    assert isinstance(m, FuzzyMatch) and m.words == ("CQ500", "CT", "310", "Dr")
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


def test_a_negative_limit_names_its_bound() -> None:
    """A limit has no upper bound to name (it is lowered to the maximum): the 400 read
    "limit must be between 0, got -1" (found by differential testing against Orthanc)."""
    with pytest.raises(BadRequestError) as info:
        q(limit="-1")
    assert info.value.message == "limit must be at least 0, got -1"
    with pytest.raises(BadRequestError) as info:
        q(offset="-1")
    assert info.value.message == f"offset must be between 0 and {QIDO_MAX_OFFSET}, got -1"


@pytest.mark.parametrize("limit", ["2147483648", "9999999999", "9" * 40, "+0001000000000000"])
def test_a_huge_limit_is_lowered(limit: str) -> None:
    """PS3.18 8.3.4.4 and the statement: a limit above the maximum is lowered to it with a
    Warning, however large (found by review: above 2**31-1 it was a 400)."""
    query = q(limit=limit)
    assert query.limit == QIDO_MAX_LIMIT
    assert query.warnings == (f"limit lowered to the maximum of {QIDO_MAX_LIMIT}",)


@pytest.mark.parametrize("offset", ["9999999999", "9" * 40, "-1", "1e3"])
def test_an_absurd_offset_is_refused(offset: str) -> None:
    with pytest.raises(BadRequestError, match="offset must be"):
        q(offset=offset)


def _uids(n: int) -> list[str]:
    """n UIDs of 57 characters each."""
    return [f"1.2.826.0.1.3680043.8.498.{10**15 + i}.{10**13 + i}" for i in range(n)]


@pytest.mark.parametrize("sep", [",", "\\", None])
def test_uid_list_is_capped_per_item_and_in_items(sep: str | None) -> None:
    """PS3.4 C.2.2.2.2: a list of UIDs may exceed the length of one value (found by review:
    about 18 UIDs were a 400 "longer than 1024"); the number of items is capped instead."""

    def uid_params(uids: list[str]) -> list[tuple[str, str]]:
        if sep is None:  # repeated parameter
            return [("StudyInstanceUID", u) for u in uids]
        return [("StudyInstanceUID", sep.join(uids))]

    uids = _uids(MAX_MATCH_LIST_ITEMS)
    assert len(",".join(uids[:20])) > MAX_MATCH_VALUE_CHARS
    (m,) = parse(Level.STUDY, uid_params(uids), {}).matches
    assert isinstance(m, UidListMatch) and m.values == tuple(uids)
    with pytest.raises(BadRequestError, match=f"more than {MAX_MATCH_LIST_ITEMS}"):
        parse(Level.STUDY, uid_params(_uids(MAX_MATCH_LIST_ITEMS + 1)), {})


def test_list_items_longer_than_the_cap_are_refused() -> None:
    edge = "C" * MAX_MATCH_VALUE_CHARS
    (m,) = q(ModalitiesInStudy=f"CT,{edge}").matches
    assert isinstance(m, UidListMatch) and m.values == ("CT", edge)
    with pytest.raises(BadRequestError, match="longer than"):
        q(ModalitiesInStudy=f"CT,{edge}C")
    with pytest.raises(BadRequestError, match="longer than"):
        q(PatientID="P" * (MAX_MATCH_VALUE_CHARS + 1))
    (m,) = q(PatientID="P" * MAX_MATCH_VALUE_CHARS).matches
    assert isinstance(m, SingleValueMatch)


@pytest.mark.parametrize("key", ["limit", "offset"])
def test_paging_given_twice_must_agree(key: str) -> None:
    """`offset=0&offset=100`: taking either drops the other silently, and the client gets a
    page it did not ask for (a page skipped or repeated while paging). 400; the same value
    twice is taken."""
    with pytest.raises(BadRequestError, match=f"{key} is given twice with different values"):
        parse(Level.STUDY, [(key, "10"), (key, "20")], {})
    query = parse(Level.STUDY, [(key, "10"), (key, "10")], {})
    assert getattr(query, key) == 10


def test_a_key_given_by_keyword_and_by_tag_is_one_key() -> None:
    """Found by review: a key named once by keyword and once by tag made two matches, both
    to hold: a 400 was what the same keyword given twice got, and a list key's values were
    ANDed where repeating it ORs them. Now one key: a list key's values join its list, any
    other key given twice is a 400 whichever way it is named."""
    (m,) = parse(Level.STUDY, [("ModalitiesInStudy", "CT"), ("00080061", "MR")], {}).matches
    assert m == UidListMatch(m.attr, ("CT", "MR"))
    uids = [("StudyInstanceUID", "1.2"), ("0020000D", "1.3")]
    (m,) = parse(Level.STUDY, uids, {}).matches
    assert m == UidListMatch(m.attr, ("1.2", "1.3"))
    for params in ([("PatientID", "A"), ("00100020", "B")], [("00100020", "A"), ("00100020", "B")]):
        with pytest.raises(BadRequestError, match="PatientID is given 2 times; give it once"):
            parse(Level.STUDY, params, {})


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
    """A negative UTC offset is not a range separator (found by review), and is taken into
    account: values are compared in UTC (PS3.4 C.2.2.2.5)."""
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20240101120000-0500").matches
    assert isinstance(m, SingleValueMatch) and m.value == dt.datetime(2024, 1, 1, 17)
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20240101120000-0500-20240102120000-0500").matches
    assert isinstance(m, RangeMatch) and m.upper == dt.datetime(2024, 1, 2, 17, 0, 0, 999999)


UTC = dt.datetime


@pytest.mark.parametrize(
    ("value", "lower", "upper"),
    [
        # -1200..+1400 are the only offsets (PS3.5 6.2): -2025 is not one, so a range
        # an upper end not precise to the microsecond is the last moment it names
        ("2023-2025", UTC(2023, 1, 1), UTC(2025, 12, 31, 23, 59, 59, 999999)),
        ("20240105-20240106", UTC(2024, 1, 5), UTC(2024, 1, 6, 23, 59, 59, 999999)),
        ("2024-202402", UTC(2024, 1, 1), UTC(2024, 2, 29, 23, 59, 59, 999999)),
        ("-9999-1200", None, UTC.max),  # past the last datetime in UTC: the last one
        ("20240105120000+0000-", UTC(2024, 1, 5, 12), None),
        ("-20240105120000-0500", None, UTC(2024, 1, 5, 17, 0, 0, 999999)),
        ("20240105120000-0500-", UTC(2024, 1, 5, 17), None),
        ("20240105060000+0000-20240105080000.000000+0000", UTC(2024, 1, 5, 6), UTC(2024, 1, 5, 8)),
        ("20240105120000+0500-20240105120000.000000-0500", UTC(2024, 1, 5, 7), UTC(2024, 1, 5, 17)),
        ("20240105120000+1400-20240105120000.000000-1200", UTC(2024, 1, 4, 22), UTC(2024, 1, 6, 0)),
        # a range in order wins over a single value with an offset (2023 at UTC-10:00)
        ("1000-2023", UTC(1000, 1, 1), UTC(2023, 12, 31, 23, 59, 59, 999999)),
        # both ends parse but in reverse and no single value reads it: matches nothing
        ("20240106-20240105", UTC(2024, 1, 6), UTC(2024, 1, 5, 23, 59, 59, 999999)),
    ],
)
def test_dt_ranges(value: str, lower: dt.datetime | None, upper: dt.datetime | None) -> None:
    (m,) = q(Level.INSTANCE, AcquisitionDateTime=value).matches
    assert isinstance(m, RangeMatch) and (m.lower, m.upper) == (lower, upper)


@pytest.mark.parametrize(
    ("value", "single"),
    [
        ("20240105120000+0500", UTC(2024, 1, 5, 7)),
        ("20240105070000+0000", UTC(2024, 1, 5, 7)),
        ("20240105120000", UTC(2024, 1, 5, 12)),  # no offset: taken as UTC
        ("20240105120000+1400", UTC(2024, 1, 4, 22)),  # the offsets at the edge
        ("20240105120000-1200", UTC(2024, 1, 6, 0)),
        # read as a range it would be in reverse (2023 to 1000): the year 2023 at UTC-10:00
        ("2023-1000", UTC(2023, 1, 1, 10)),
    ],
)
def test_dt_single_values_in_utc(value: str, single: dt.datetime) -> None:
    (m,) = q(Level.INSTANCE, AcquisitionDateTime=value).matches
    assert isinstance(m, SingleValueMatch) and m.value == single


@pytest.mark.parametrize("value", ["20240105120000+1401", "20240105120000+0160", "2024+2025"])
def test_dt_offsets_beyond_the_standard_are_refused(value: str) -> None:
    with pytest.raises(BadRequestError, match="not a valid DT"):
        q(Level.INSTANCE, AcquisitionDateTime=value)


@pytest.mark.parametrize("value", ["-000101010000+1400", "00010101-0001010100+0100"])
def test_dt_upper_end_before_the_first_datetime_is_refused(value: str) -> None:
    """An upper end that is before 0001-01-01 00:00 once in UTC is no datetime, as a lower
    end or a single value converted out of range is (400): only one past the last datetime
    is that datetime (found by review: it was made datetime.max, matching every value)."""
    with pytest.raises(BadRequestError, match="not a valid DT"):
        q(Level.INSTANCE, AcquisitionDateTime=value)


def test_dt_negative_offset_beyond_the_standard_is_a_range() -> None:
    """-1201 is no offset (PS3.5 6.2): the value reads as the years 2024.. to 1201, a range
    in reverse that matches nothing, never as 12:00 at UTC-12:01."""
    (m,) = q(Level.INSTANCE, AcquisitionDateTime="20240105120000-1201").matches
    assert isinstance(m, RangeMatch)
    assert (m.lower, m.upper) == (UTC(2024, 1, 5, 12), UTC(1201, 12, 31, 23, 59, 59, 999999))


def test_pn_with_component_groups_matches_group_by_group() -> None:
    """PS3.5 6.2.1 groups, each matched at its position (found by review: a value with `=`
    never matched, not even the stored name)."""
    (m,) = q(PatientName="Yamada^Tarou^=山田^太郎=やまだ^たろう").matches
    assert isinstance(m, ComponentGroupMatch)
    assert m.groups == ("yamada^tarou", "山田^太郎", "やまだ^たろう")
    args = _Args()
    assert _condition(m, args) == (
        "st.patient_name @> $1::text[] AND st.patient_name[1] = $2"
        " AND st.patient_name[2] = $3 AND st.patient_name[3] = $4"
    )
    assert args.values == [list(m.groups), *m.groups]
    (m,) = q(PatientName="=山田*=").matches
    assert isinstance(m, ComponentGroupMatch) and m.groups == ("", "山田*", "")
    args = _Args()
    assert _condition(m, args) == "st.patient_name[2] LIKE $1 ESCAPE '\\'"
    assert args.values == ["山田%"]
    (m,) = q(PatientName="*==").matches
    assert isinstance(m, UniversalMatch)
    with pytest.raises(BadRequestError, match="more than 3 component groups"):
        q(PatientName="a=b=c=d")


def test_pn_groups_are_stored_at_their_position() -> None:
    assert pn_groups("Yamada^Tarou=山田^太郎=やまだ^たろう") == [
        "yamada^tarou", "山田^太郎", "やまだ^たろう",
    ]  # fmt: skip
    assert pn_groups({"Alphabetic": "", "Ideographic": "山田^太郎"}) == ["", "山田^太郎"]
    assert pn_groups("=山田^太郎") == ["", "山田^太郎"]
    assert pn_groups("Doe^John^^=") == ["doe^john"]
    assert pn_groups("") == [] and pn_groups(None) == []


def test_computed_attributes_without_values_have_no_value_key() -> None:
    """PS3.18 F.2.5 (found by review: a study whose instances have no Modality returned
    `"ModalitiesInStudy": {"vr": "CS", "Value": []}`)."""
    row = {
        "study_instance_uid": "1.2",
        "modalities_in_study": [],
        "sop_classes_in_study": ["1.2.3"],
        "num_series": 1,
        "study_num_instances": 1,
    }
    computed = _computed(row, Level.STUDY, "http://x")
    assert computed["00080061"] == {"vr": "CS"}
    assert computed["00080062"] == {"vr": "UI", "Value": ["1.2.3"]}
    computed = _computed({**row, "sop_classes_in_study": [None]}, Level.STUDY, "http://x")
    assert computed["00080062"] == {"vr": "UI"}


@pytest.mark.parametrize("value", ["\u0663", "1\u0660", "\uff15"])
def test_limit_and_offset_take_ascii_digits_only(value: str) -> None:
    """Arabic-Indic and full-width digits are digits to Python's \\d and int(), not in a URL's
    number (found by interop review: limit=\u0663 was taken as 3)."""
    for key in ("limit", "offset"):
        with pytest.raises(BadRequestError, match="integer"):
            parse(Level.STUDY, [(key, value)], {})
