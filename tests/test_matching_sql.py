"""Matching done twice, in Python (matching.py, on the query value) and in PostgreSQL (sql.py,
on the stored values), must agree: the same value split into the same words on both sides,
checked on the real database, and names found through the API as the two sides read them."""

from __future__ import annotations

import re
from collections.abc import Sequence

import asyncpg
import httpx
import pytest

from dicomweb_server.attributes import Level
from dicomweb_server.errors import BadRequestError
from dicomweb_server.matching import (
    FUZZY_WORD_SEPARATORS,
    FuzzyMatch,
    MultipleValueMatch,
    UidListMatch,
    UniversalMatch,
)
from dicomweb_server.query import parse
from tests.helpers import (
    ROOT,
    make_instance,
    multipart_body,
    stow_headers,
    studies_named,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db

# Characters a name might hold between words: ASCII, and the white space and digits of other
# scripts that Python's `\s`/`\d` and PostgreSQL's classes may read differently.
_CANDIDATES = [chr(c) for c in range(0x20, 0x7F)] + list(
    "\t\n\r\f\x85\xa0\u1680\u2000\u2002\u2009\u200a\u200b\u2028\u2029\u202f\u205f"
    "\u3000\ufeff\u0661\uff11\u3001\u30fb"
)


def _python_words(value: str) -> list[str]:
    (m,) = parse(Level.STUDY, [("PatientName", value), ("fuzzymatching", "true")], {}).matches
    return list(m.words) if isinstance(m, FuzzyMatch) else []


async def test_fuzzy_words_are_split_alike_in_python_and_postgresql(pg_dsn: str) -> None:
    """Found by review: Python's `\\s` split a value at U+00A0 where PostgreSQL's regexp did
    not split the stored name, so the name given whole was not found with fuzzy matching."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        for c in _CANDIDATES:
            if c in "*\\":  # a wild card, and the VM delimiter: no name characters here
                continue
            # at most three component groups (PS3.5 6.2.1), with fuzzy matching too
            name = "ann=lee=mary" if c == "=" else f"ann{c}lee{c}{c}mary"
            stored = await conn.fetchval(
                "SELECT array(SELECT w FROM regexp_split_to_table($1,"
                f" '[{FUZZY_WORD_SEPARATORS}]+') AS w WHERE w <> '')",
                name,
            )
            assert _python_words(name) == list(stored), repr(c)
    finally:
        await conn.close()


def test_fuzzy_word_separators_are_named_one_by_one() -> None:
    """No class escape (`\\s`, `\\w`, `\\d`): each engine reads those its own way."""
    assert not re.search(r"\\[sSwWdD]", FUZZY_WORD_SEPARATORS)
    assert re.split(f"[{FUZZY_WORD_SEPARATORS}]+", "a\xa0b\u3000c d") == ["a\xa0b\u3000c", "d"]


_NAMES = {
    "nbsp": "Ann\xa0Lee^Mary",
    "space": "Ann Lee^Mary",
    "ideographic": "山田\u3000太郎^花子",
}


async def test_fuzzy_name_given_whole_is_found(app_client: httpx.AsyncClient) -> None:
    """A name given whole is found with fuzzy matching as without it, whatever its spaces."""
    found = await studies_named(app_client, _NAMES)
    for key, name in _NAMES.items():
        assert await found(PatientName=name) == [key]
        assert await found(PatientName=name, fuzzymatching="true") == [key], key
    # an ASCII space separates words on both sides; U+00A0 and U+3000 on neither
    assert await found(PatientName="lee", fuzzymatching="true") == ["space"]
    assert await found(PatientName="ann", fuzzymatching="true") == ["nbsp", "space"]
    assert await found(PatientName="太郎", fuzzymatching="true") == []


_SEPARATOR_NAMES = {"doe": "Doe^John", "dash": "-", "dots": "A.^B."}


@pytest.mark.parametrize("value", ["-", ".", ", ", "-.", "*-*", "^-"])
async def test_fuzzy_value_without_words_matches_as_without_fuzzy(
    app_client: httpx.AsyncClient, value: str
) -> None:
    """Found by review: a fuzzy value made only of separators has no word, and was taken as
    universal matching (`-` found every name). It is matched as without fuzzymatching."""
    found = await studies_named(app_client, _SEPARATOR_NAMES)
    literal = await found(PatientName=value)
    assert await found(PatientName=value, fuzzymatching="true") == literal
    assert literal != sorted(_SEPARATOR_NAMES)


MULTIPLE = ("multiplevaluematching", "true")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ([("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "")], "empty item"),
        ([("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", ""), MULTIPLE], "empty item"),
        ([("ModalitiesInStudy", "CT,")], "empty item"),
        ([("StudyInstanceUID", "1.2\\")], "empty item"),
        ([("StudyInstanceUID", "1.2"), ("StudyInstanceUID", " ")], "empty item"),
        ([("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "*")], "wild card"),
        ([("ModalitiesInStudy", "CT\\M?")], "wild card"),
        ([("StudyInstanceUID", "1.2"), ("StudyInstanceUID", "*")], "wild card"),
        ([("PatientID", "A"), ("PatientID", "B")], "given 2 times"),
        ([("PatientID", "A"), ("PatientID", "B"), MULTIPLE], "given 2 times"),
    ],
)
def test_list_items_are_single_values(params: list[tuple[str, str]], reason: str) -> None:
    """Found by review: in a list (the key repeated, or `,`/`\\` in one value) an empty item
    was dropped and a `*` taken literally, so `ModalitiesInStudy=CT&ModalitiesInStudy=` asked
    for CT alone. PS3.18 8.3.4.1 and PS3.4 C.2.2.2.2: a list of single values; a 400."""
    with pytest.raises(BadRequestError, match=reason) as exc:
        parse(Level.STUDY, params, {})
    assert exc.value.status == 400


def test_a_repeated_key_mixed_with_a_comma_list_names_the_repeated_key() -> None:
    """Found by review: the 400 named only `\\`, which the client never sent: the key
    given again is joined with it (query._joined), and the reason now says so."""
    params = [("ModalitiesInStudy", "CT,MR"), ("ModalitiesInStudy", "PT"), MULTIPLE]
    with pytest.raises(BadRequestError, match=r"or the key given again .* with `,`"):
        parse(Level.STUDY, params, {})


def test_a_repeated_key_with_multiple_value_matching_is_all_values() -> None:
    """Found by review: the key repeated was an any-value list even with
    multiplevaluematching=true, which `CT\\PT` in one value answered with all-values."""
    repeated = [("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "PT")]
    (m,) = parse(Level.STUDY, [*repeated, MULTIPLE], {}).matches
    assert isinstance(m, MultipleValueMatch) and m.values == ("CT", "PT")
    (m,) = parse(Level.STUDY, repeated, {}).matches
    assert isinstance(m, UidListMatch) and m.values == ("CT", "PT")
    # UIDs: List of UID Matching, any of them, whatever the flag (C.2.2.2.8 is not for UI)
    uids = [("StudyInstanceUID", "1.2"), ("StudyInstanceUID", "1.3"), MULTIPLE]
    (m,) = parse(Level.STUDY, uids, {}).matches
    assert isinstance(m, UidListMatch) and m.values == ("1.2", "1.3")


async def test_repeated_modalities_found_as_asked(app_client: httpx.AsyncClient) -> None:
    study_ct, study_both = "1.2.826.0.1.3680043.9.7.1", "1.2.826.0.1.3680043.9.7.2"
    made = [
        make_instance(study=study_ct, modality="CT"),
        make_instance(study=study_both, modality="CT"),
        make_instance(study=study_both, modality="PT"),
    ]
    r = await app_client.post(
        f"{ROOT}/studies",
        content=multipart_body([to_bytes(ds) for ds in made]),
        headers=stow_headers(),
    )
    assert r.status_code == 200, r.text

    async def studies(params: Sequence[tuple[str, str]]) -> list[str]:
        r = await app_client.get(f"{ROOT}/studies", params=[(k, v) for k, v in params])
        assert r.status_code in (200, 204), r.text
        return sorted(str(values(s, "0020000D")[0]) for s in (r.json() if r.content else []))

    both = [("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "PT")]
    assert await studies([*both, MULTIPLE]) == [study_both]
    assert await studies(both) == [study_ct, study_both]
    r = await app_client.get(
        f"{ROOT}/studies", params=[("ModalitiesInStudy", "PT"), ("ModalitiesInStudy", "")]
    )
    assert r.status_code == 400 and "empty item" in r.text


_DELIMITER_NAMES = {"delimiters": "^^^^", "doe": "Doe^John", "ideographic": "=山田^太郎"}


@pytest.mark.parametrize("value", ["^^^^", "^", " ^ ^", "^^^^=^^^^", "^=^=^"])
@pytest.mark.parametrize("fuzzy", ["false", "true"])
async def test_a_name_of_delimiters_is_the_empty_value(
    app_client: httpx.AsyncClient, value: str, fuzzy: str
) -> None:
    """Found by review: `PatientName=^^^^` did not find a name stored as `^^^^` (indexed as
    no name), and found `=山田^太郎` (an empty alphabetic group). Only delimiters is every
    component null, the zero-length value (PS3.5 6.2.1): universal matching (PS3.4
    C.2.2.2.3), as an empty PatientName is."""
    found = await studies_named(app_client, _DELIMITER_NAMES)
    everything = sorted(_DELIMITER_NAMES)
    assert await found(PatientName="") == everything
    assert await found(PatientName=value, fuzzymatching=fuzzy) == everything
    (m,) = parse(Level.STUDY, [("PatientName", value), ("fuzzymatching", fuzzy)], {}).matches
    assert isinstance(m, UniversalMatch)


_SUBSTRING_NAMES = {"doe": "Doe^John", "mcdoe": "McDoe^Ann", "oeste": "Oeste^Ana", "dash": "-"}


@pytest.mark.parametrize("value", ["*oe*", "*Doe*", "Do*hn", "*e^J*", "?", "*st*=", "mcdoe^ann"])
async def test_fuzzy_matching_finds_every_name_literal_matching_finds(
    app_client: httpx.AsyncClient, value: str
) -> None:
    """Found by review: the value's `*` were dropped and each word had to start a word of the
    name, so `*oe*`, which OHIF sends for "oe" with fuzzymatching=true (supportsWildcard and
    supportsFuzzyMatching), found only `Oeste^Ana` and lost `Doe^John` and `McDoe^Ann`,
    which the same value finds without fuzzy matching. Fuzzy matching adds names."""
    found = await studies_named(app_client, _SUBSTRING_NAMES)
    literal = await found(PatientName=value)
    fuzzy = await found(PatientName=value, fuzzymatching="true")
    assert literal and set(literal) <= set(fuzzy), (literal, fuzzy)
    if value == "*oe*":
        assert fuzzy == ["doe", "mcdoe", "oeste"]


def test_fuzzy_matching_refuses_what_literal_matching_refuses() -> None:
    """More than three component groups is a 400 with fuzzymatching=true too: the value is
    read as without it first (it was matched as the words `x`, `y`)."""
    for fuzzy in ("false", "true"):
        with pytest.raises(BadRequestError, match="more than 3 component groups"):
            parse(Level.STUDY, [("PatientName", "x=y=*=?"), ("fuzzymatching", fuzzy)], {})


@pytest.mark.parametrize("value", ["====", "^=^=^=^", "*=*=*=*"])
def test_more_than_three_groups_of_delimiters_is_refused(value: str) -> None:
    """Found by review: only delimiters was universal matching before the count of component
    groups was checked, so `====` found every name where `*=*=*=*` was a 400 (PS3.5 6.2.1:
    three component groups at most; conformance/STATEMENT.md: more is a 400)."""
    with pytest.raises(BadRequestError, match="more than 3 component groups"):
        parse(Level.STUDY, [("PatientName", value)], {})
