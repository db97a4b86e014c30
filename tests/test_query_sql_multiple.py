"""QIDO Multiple Value Matching (PS3.18 8.3.4.6, PS3.4 C.2.2.2.8) parsed and compiled: all
values held with multiplevaluematching=true, any value without it; the matching flags
(multiplevaluematching, fuzzymatching, emptyvaluematching) as booleans given once."""

from __future__ import annotations

import pytest

from dicomweb_server.attributes import ATTRIBUTES, Level
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import (
    MAX_MATCH_LIST_ITEMS,
    MAX_MATCH_VALUE_CHARS,
    MultipleValueMatch,
    SingleValueMatch,
    UidListMatch,
    WildcardMatch,
    multi_valued,
)
from dicomweb_server.query import parse
from dicomweb_server.sql import _Args, _condition, compile_search

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
