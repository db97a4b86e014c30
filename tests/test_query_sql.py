"""QIDO parameter parsing and SQL compilation, golden (text, args) per matching type."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable

import pytest

from dicomweb_server.attributes import ATTRIBUTES, DEFAULT_RETURN, LEVEL_TAGS, Level, tag_hex
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import (
    MAX_MATCH_LIST_ITEMS,
    MAX_MATCH_VALUE_CHARS,
    ComponentGroupMatch,
    FuzzyMatch,
    MultipleValueMatch,
    RangeMatch,
    SequenceMatch,
    SingleValueMatch,
    UidListMatch,
    UniversalMatch,
    WildcardMatch,
    multi_valued,
)
from dicomweb_server.query import (
    QIDO_DEFAULT_LIMIT,
    QIDO_MAX_LIMIT,
    QIDO_MAX_OFFSET,
    Query,
    parse,
)
from dicomweb_server.record import pn_groups
from dicomweb_server.sql import (
    _Args,
    _computed,
    _condition,
    compile_search,
    like_pattern,
    render_rows,
    returned_levels,
)


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


MULTIPLE = ("multiplevaluematching", "true")


def test_multiple_value_matching_matches_every_value() -> None:
    """PS3.18 8.3.4.6 / PS3.4 C.2.2.2.8: with multiplevaluematching=true, `CT\\PT` matches a
    study only if it holds both (array containment, answered by the GIN index), and no
    "not performed" Warning is given any more."""
    query = parse(Level.STUDY, [("ModalitiesInStudy", "CT\\PT"), MULTIPLE], {})
    (m,) = query.matches
    assert isinstance(m, MultipleValueMatch) and m.values == ("CT", "PT")
    assert query.warnings == ()
    text, args = compile_search(query)
    assert "WHERE st.num_instances > 0 AND st.modalities_in_study @> $1::text[] ORDER BY" in text
    assert args[0] == ["CT", "PT"]
    # the order of the values does not matter; repeated ones count once
    (m,) = parse(Level.STUDY, [("ModalitiesInStudy", " PT\\CT\\PT"), MULTIPLE], {}).matches
    assert isinstance(m, MultipleValueMatch) and m.values == ("PT", "CT")
    (m,) = parse(Level.STUDY, [("ModalitiesInStudy", "CT\\CT"), MULTIPLE], {}).matches
    assert isinstance(m, SingleValueMatch) and m.value == "CT"
    # an empty value among them is no value to hold (tests/test_matching_sql.py)
    for value in ("CT\\", "\\", "CT\\\\PT"):
        with pytest.raises(BadRequestError, match="empty item"):
            parse(Level.STUDY, [("ModalitiesInStudy", value), MULTIPLE], {})
    # study-level key on a series search: the same condition on the series' study
    (m,) = parse(Level.SERIES, [("ModalitiesInStudy", "CT\\MR"), MULTIPLE], {}).matches
    assert isinstance(m, MultipleValueMatch)


@pytest.mark.parametrize("flag", [[], [("multiplevaluematching", "false")]])
def test_without_multiple_value_matching_a_list_is_any_value(flag: list[tuple[str, str]]) -> None:
    """Absent or false (PS3.18 8.3.4.6: "the search shall be performed without Multiple Value
    Matching"): `CT\\PT` and `CT,PT` stay a list, any value matching, as before."""
    for value in ("CT\\PT", "CT,PT"):
        query = parse(Level.STUDY, [("ModalitiesInStudy", value), *flag], {})
        (m,) = query.matches
        assert isinstance(m, UidListMatch) and m.values == ("CT", "PT")
        assert query.warnings == ()
        args = _Args()
        assert _condition(m, args) == "st.modalities_in_study && $1::text[]"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("CT\\P*", "shall not include wild cards"),
        ("C?\\PT", "shall not include wild cards"),
        ("CT\\*", "shall not include wild cards"),
        ("CT\\PT,MR", "with `,`"),
    ],
)
def test_multiple_value_matching_refuses_wildcards_and_mixed_lists(value: str, reason: str) -> None:
    """PS3.4 C.2.2.2.8: "Key Attribute Values shall not include wild cards" (a 400 with the
    reason); `,` (any value) inside an all-values key cannot be told apart: a 400 too."""
    with pytest.raises(BadRequestError, match=reason):
        parse(Level.STUDY, [("ModalitiesInStudy", value), MULTIPLE], {})


def test_multiple_value_matching_applies_to_multi_valued_keys_only() -> None:
    """C.2.2.2.8 is for VR AE, AS, AT, CS, LO, PN, SH or UC with a defined VM greater than 1: of
    our matching keys only ModalitiesInStudy (a new one qualifying needs its SQL checked: sql
    compiles it as array containment). Other keys match as without the parameter; a comma
    list without `\\` stays any-value; a single wildcard stays wildcard matching."""
    assert [a.keyword for a in ATTRIBUTES if a.column and multi_valued(a)] == ["ModalitiesInStudy"]
    for key, value, kind in (
        ("PatientName", "Doe\\Roe", SingleValueMatch),
        ("AccessionNumber", "A\\B", SingleValueMatch),
        ("StudyInstanceUID", "1.2\\1.3", UidListMatch),
        ("ModalitiesInStudy", "CT,PT", UidListMatch),
        ("ModalitiesInStudy", "C*", WildcardMatch),
    ):
        (with_flag,) = parse(Level.STUDY, [(key, value), MULTIPLE], {}).matches
        (without,) = parse(Level.STUDY, [(key, value)], {}).matches
        assert isinstance(with_flag, kind) and with_flag == without, key


def test_multiple_value_matching_items_are_capped() -> None:
    edge = "C" * MAX_MATCH_VALUE_CHARS
    (m,) = parse(Level.STUDY, [("ModalitiesInStudy", f"CT\\{edge}"), MULTIPLE], {}).matches
    assert isinstance(m, MultipleValueMatch)
    with pytest.raises(BadRequestError, match="longer than"):
        parse(Level.STUDY, [("ModalitiesInStudy", f"CT\\{edge}C"), MULTIPLE], {})
    many = "\\".join(f"M{i}" for i in range(MAX_MATCH_LIST_ITEMS + 1))
    with pytest.raises(BadRequestError, match=f"more than {MAX_MATCH_LIST_ITEMS}"):
        parse(Level.STUDY, [("ModalitiesInStudy", many), MULTIPLE], {})


def test_matching_parameters_must_be_booleans_and_are_performed_without_warning() -> None:
    """PS3.18 8.3.4.5 and 8.3.4.6: emptyvaluematching and multiplevaluematching are both
    performed (PS3.4 C.2.2.2.7 and C.2.2.2.8), so neither gets the "not supported" Warning."""
    for key in ("multiplevaluematching", "emptyvaluematching"):
        with pytest.raises(BadRequestError, match=f"{key} must be true or false"):
            parse(Level.STUDY, [(key, "yes")], {})
    assert parse(Level.STUDY, [("emptyvaluematching", "true")], {}).warnings == ()
    assert parse(Level.STUDY, [MULTIPLE], {}).warnings == ()


@pytest.mark.parametrize("key", ["multiplevaluematching", "fuzzymatching", "emptyvaluematching"])
def test_a_matching_flag_given_both_true_and_false_is_refused(key: str) -> None:
    """`multiplevaluematching=true&multiplevaluematching=false`: whichever one is read, the
    other is dropped silently (STYLE rule 5), and reading the last one ran an any-value search
    for a client that asked for all values, with no Warning. 400; the same value twice is
    fine."""
    for values in (("true", "false"), ("false", "true")):
        with pytest.raises(BadRequestError, match=f"{key} is given both true and false"):
            parse(Level.STUDY, [("ModalitiesInStudy", "CT\\PT"), *((key, v) for v in values)], {})
    query = parse(Level.STUDY, [("ModalitiesInStudy", "CT\\PT"), (key, "true"), (key, "true")], {})
    (m,) = query.matches
    assert isinstance(m, MultipleValueMatch if key == "multiplevaluematching" else UidListMatch)
    assert query.warnings == ()


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


@pytest.mark.parametrize("value", ["\u0663", "1\u0660", "\uff15"])
def test_limit_and_offset_take_ascii_digits_only(value: str) -> None:
    """Arabic-Indic and full-width digits are digits to Python's \\d and int(), not in a URL's
    number (found by interop review: limit=\u0663 was taken as 3)."""
    for key in ("limit", "offset"):
        with pytest.raises(BadRequestError, match="integer"):
            parse(Level.STUDY, [(key, value)], {})
