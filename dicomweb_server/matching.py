"""One QIDO-RS / C-FIND matching key's value -> its Match: the matching types of PS3.4
C.2.2.2, one frozen dataclass each, and the value parsing that picks one. Pure; query.parse
assembles a Query from these."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VM

from dicomweb_server.attributes import Attribute
from dicomweb_server.errors import BadRequestError
from dicomweb_server.vr import dt_as_utc, parse_da, parse_dt, parse_tm

__all__ = [
    "EMPTY_VALUE",
    "FUZZY_WORD_SEPARATORS",
    "MAX_MATCH_LIST_ITEMS",
    "MAX_MATCH_VALUE_CHARS",
    "ComponentGroupMatch",
    "EmptyValueMatch",
    "FuzzyMatch",
    "ItemMatch",
    "Match",
    "MultipleValueMatch",
    "PnLiteralMatch",
    "RangeMatch",
    "SequenceMatch",
    "SingleValueMatch",
    "UidListMatch",
    "UniversalMatch",
    "WildcardMatch",
    "int_param",
    "is_empty_name",
    "is_listed",
    "is_universal",
    "item_match",
    "multi_valued",
    "value_match",
]

# Longest matching value accepted, in characters (longer cannot match any VR we index); in
# a list (UIDs, ModalitiesInStudy) the longest item: PS3.4 C.2.2.2 lets a list key exceed
# the VR's length.
MAX_MATCH_VALUE_CHARS = 1024
# Most items in a list (List of UID matching, PS3.4 C.2.2.2.2, and ModalitiesInStudy).
MAX_MATCH_LIST_ITEMS = 1000
# Digits an integer parameter is read to; a longer one is beyond every bound checked.
_MAX_INT_DIGITS = 18

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
# PS3.5 6.2.1: a person name has at most three component groups.
_PN_GROUPS = 3
_PARSERS: dict[str, Callable[[str], dt.date | dt.time | None]] = {
    "DA": parse_da, "TM": parse_tm, "DT": parse_dt,
}  # fmt: skip
# Where a person name splits into words for fuzzy matching, in the value and in the stored
# name alike (sql._fuzzy_condition splits the stored components at the same characters): a
# value word keeping a `.` or `-` ("Dr.", "CQ500-CT-310") could never be the start of a
# stored word, and fuzzymatching=true lost the names literal matching finds. A regex
# bracket expression's body, read alike by Python's re and PostgreSQL's AREs: the characters
# named one by one, never `\s`, which Python takes as any Unicode white space (U+00A0 NO-BREAK
# SPACE, U+3000) and PostgreSQL as its locale's [[:space:]], so a value split where the stored
# name was not lost the name (tests/test_matching_sql.py checks both split alike).
FUZZY_WORD_SEPARATORS = r" \t\n\r\f^=,.-"


@dataclass(frozen=True)
class SingleValueMatch:
    """PS3.4 C.2.2.2.1."""

    attr: Attribute
    value: str | int | dt.date | dt.time | dt.datetime


@dataclass(frozen=True)
class UidListMatch:
    """PS3.4 C.2.2.2.2 (also used for multi-valued ModalitiesInStudy)."""

    attr: Attribute
    values: tuple[str, ...]


@dataclass(frozen=True)
class UniversalMatch:
    """PS3.4 C.2.2.2.3: an empty value (or a lone `*`) matches everything."""

    attr: Attribute


@dataclass(frozen=True)
class EmptyValueMatch:
    """PS3.4 C.2.2.2.7, asked for by `emptyvaluematching=true` (PS3.18 8.3.4.5): the value
    `""` (two QUOTATION MARKs, one of the matching characters of C.2.2.2) matches the
    entities whose attribute has no value: zero length, or absent, which the index cannot
    tell apart (both are stored as no value, sql._empty_condition)."""

    attr: Attribute


@dataclass(frozen=True)
class WildcardMatch:
    """PS3.4 C.2.2.2.4: `*` any run of characters, `?` one character."""

    attr: Attribute
    pattern: str


@dataclass(frozen=True)
class RangeMatch:
    """PS3.4 C.2.2.2.5: `a-b`, `a-` or `-b` on DA, TM and DT."""

    attr: Attribute
    lower: dt.date | dt.time | dt.datetime | None
    upper: dt.date | dt.time | dt.datetime | None


@dataclass(frozen=True)
class FuzzyMatch:
    """PN with `fuzzymatching=true` (PS3.18 8.3.4.2): every word of the value must match the
    beginning of some word of the name, in any component group, case-insensitively; or the
    value matches as without fuzzy matching (`literal`). Fuzzy matching finds more names,
    never fewer: `*oe*`, which OHIF sends for "oe" with fuzzymatching=true, has the word
    `oe` and found no `Doe^John`, which the same value without the flag finds."""

    attr: Attribute
    words: tuple[str, ...]
    literal: PnLiteralMatch


@dataclass(frozen=True)
class ComponentGroupMatch:
    """A PN value with component groups (`Yamada^Tarou=山田^太郎=やまだ^たろう`, PS3.5 6.2.1):
    each non-empty group of the value must match the stored name's group at the same
    position (PS3.4 C.2.2.2.1, or C.2.2.2.4 when the group has `*` or `?`), case-insensitively
    and with trailing `^` ignored like other PN matching; an empty group matches any. `groups`
    holds the value's groups so prepared, "" for an empty one."""

    attr: Attribute
    groups: tuple[str, ...]


@dataclass(frozen=True)
class MultipleValueMatch:
    """PS3.4 C.2.2.2.8, asked for by `multiplevaluematching=true` (PS3.18 8.3.4.6): a key with
    several values matches "only if each and every value in the Key Attribute matches a value
    in the corresponding Attribute in the entity", in any order (a logical AND)."""

    attr: Attribute
    values: tuple[str, ...]


# A PN value matched as without fuzzy matching (_pn_literal).
PnLiteralMatch = SingleValueMatch | WildcardMatch | ComponentGroupMatch | UniversalMatch
# What a key inside a sequence item can be: the keys there are SH (attributes.py).
ItemMatch = SingleValueMatch | WildcardMatch | UniversalMatch | EmptyValueMatch


@dataclass(frozen=True)
class SequenceMatch:
    """PS3.4 C.2.2.2.6: keys inside a sequence, given as attribute paths `Sequence.Key`
    (PS3.18 8.3.4.1), all taken as keys of one item: a resource matches when some item of its
    sequence matches every one of them. `attr` is the sequence; each item match's `attr` is
    the key inside it."""

    attr: Attribute
    items: tuple[ItemMatch, ...]


Match = (
    SingleValueMatch
    | UidListMatch
    | UniversalMatch
    | WildcardMatch
    | RangeMatch
    | FuzzyMatch
    | ComponentGroupMatch
    | SequenceMatch
    | MultipleValueMatch
    | EmptyValueMatch
)

# The value that asks for Empty Value Matching (PS3.4 C.2.2.2.7): two QUOTATION MARKs.
EMPTY_VALUE = '""'


def int_param(name: str, value: str, lo: int, hi: int | None) -> int:
    """An integer parameter within lo..hi (no upper bound when hi is None), else 400."""
    s = value.strip()
    # ASCII digits only: \d and int() also take other scripts' digits (U+0663 is 3).
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise BadRequestError(f"{name} must be an integer, got {value!r}")
    digits = s.lstrip("+-").lstrip("0") or "0"
    n = int(s) if len(digits) <= _MAX_INT_DIGITS else int(s[0] + "1" + "0" * _MAX_INT_DIGITS)
    if n < lo or (hi is not None and n > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise BadRequestError(f"{name} must be {bounds}, got {s}")
    return n


def item_match(attr: Attribute, value: str, empty: bool = False) -> ItemMatch:
    m = value_match(attr, value, fuzzy=False, multiple=False, empty=empty)
    if not isinstance(m, SingleValueMatch | WildcardMatch | UniversalMatch | EmptyValueMatch):
        raise AssertionError(f"{attr.keyword}: no item matching for {type(m).__name__}")
    return m


def is_listed(attr: Attribute) -> bool:
    """A key whose value may be a list of values, any of which matches: a UID (PS3.4
    C.2.2.2.2) and ModalitiesInStudy (this server's any-value list, PS3.18 8.3.4.1)."""
    return attr.vr == "UI" or attr.keyword == "ModalitiesInStudy"


def is_universal(value: str) -> bool:
    """Whether a value matches every entity: empty or a lone `*` (universal matching, PS3.4
    C.2.2.2.3), or only `*`s, which as a wildcard match "any sequence of characters
    (including a zero length value)" (C.2.2.2.4), so an entity without a value too (found
    by differential testing against dcmtk's dcmqrscp: `**` left out every study without an
    Accession Number, which `*` returns)."""
    return value.strip("*") == ""


def is_empty_name(value: str) -> bool:
    """Whether a PN value is only delimiters (`^^^^`, `^=^`): every component null. PS3.5
    6.2.1 lets trailing null components and their delimiters go, so it is the zero-length
    value, universal matching (PS3.4 C.2.2.2.3). Not with more than three component groups,
    which is no name (a 400, _pn_match)."""
    return not value.strip("^= ") and value.count("=") < _PN_GROUPS


def value_match(
    attr: Attribute, value: str, fuzzy: bool, multiple: bool, empty: bool = False
) -> Match:
    """The Match of one key's value. With `empty` (emptyvaluematching=true), the value `""`
    is Empty Value Matching (PS3.4 C.2.2.2.7), whatever the key's VR and the other flags;
    without it, `""` is the two characters, as before (a 400 where they are no valid value:
    a UID, a date, a time, a number)."""
    if empty and value.strip(" ") == EMPTY_VALUE:
        return EmptyValueMatch(attr)
    listed = is_listed(attr)
    if len(value) > MAX_MATCH_VALUE_CHARS and not listed:
        raise BadRequestError(f"value of {attr.keyword} is longer than {MAX_MATCH_VALUE_CHARS}")
    if _CONTROL.search(value):
        # PS3.5 6.1.2: no control characters but ESC, LF, FF, CR and TAB in any value
        # (PostgreSQL would also refuse a NUL in text).
        raise BadRequestError(f"value of {attr.keyword} has a control character: {value!r}")
    if is_universal(value):
        return UniversalMatch(attr)
    if empty and listed:
        _no_empty_item(attr, value)
    if multiple and "\\" in value and multi_valued(attr):
        return _multiple_value_match(attr, value)
    if listed:
        return _list_match(attr, value)
    if attr.vr in _PARSERS:
        return _range_or_single(attr, value)
    if attr.vr == "IS":
        return SingleValueMatch(attr, int_param(attr.keyword, value, -(2**31), 2**31 - 1))
    if attr.vr == "PN":
        return _pn_match(attr, value, fuzzy)
    if "*" in value or "?" in value:
        return WildcardMatch(attr, value)
    return SingleValueMatch(attr, value)


def _pn_match(attr: Attribute, value: str, fuzzy: bool) -> Match:
    if value.count("=") >= _PN_GROUPS:  # PS3.5 6.2.1: at most three component groups
        raise BadRequestError(
            f"{attr.keyword}: {value!r} has more than {_PN_GROUPS} component groups"
        )
    if is_empty_name(value):
        # As `*^^` and an empty value with `=` are. As a single value it asked for an empty
        # component group and found only names like `=山田^太郎`, never one stored as `^^^^`
        # (indexed as no name).
        return UniversalMatch(attr)
    literal = _pn_literal(attr, value)
    if fuzzy:
        split = f"[{FUZZY_WORD_SEPARATORS}]+"
        words = tuple(w for w in re.split(split, value.replace("*", "")) if w)
        if words:
            return FuzzyMatch(attr, words, literal)
        # No word (`.`, `-`, `, `): fuzzy matching, implementation-defined (PS3.4
        # C.2.2.2.1), has nothing to match on, and the value is matched as without it, as a
        # name given whole is; taken as universal matching, `-` found every name.
    return literal


def _pn_literal(attr: Attribute, value: str) -> PnLiteralMatch:
    """A PN value without fuzzy matching: by component group, wildcard or single value."""
    if "=" in value:
        return _groups_match(attr, value)
    if "*" in value or "?" in value:
        return _pn_wildcard(attr, value)
    return SingleValueMatch(attr, value)


def _list_items(attr: Attribute, value: str, separators: str) -> tuple[str, ...]:
    """The items of a list value, each stripped. PS3.18 8.3.4.1 makes a UID list "a
    comma-separated list of UIDs" and PS3.4 C.2.2.2.2 a list of single values: an empty item
    (`1.2,`, `CT\\`, the key given again empty) or one with a wild card (`CT,*`) is no such
    value, and a 400 with the reason. Dropped or taken literally, it changed the question
    (`ModalitiesInStudy=CT&ModalitiesInStudy=` asked for CT alone, `CT,*` for CT or `*`)."""
    items = tuple(v.strip() for v in re.split(f"[{separators}]", value))
    if len(items) == 1:
        return items
    if not all(items):
        raise BadRequestError(
            f"{attr.keyword}: {value!r} has an empty item in its list of values (the key"
            " given again empty, or a `,` or `\\` with nothing after it); give each value once"
        )
    if any("*" in v or "?" in v for v in items):
        raise BadRequestError(
            f"{attr.keyword}: {value!r} lists several values, one with a wild card: a list"
            " holds single values (PS3.4 C.2.2.2.2); give the wild card alone"
        )
    return items


def _no_empty_item(attr: Attribute, value: str) -> None:
    """With emptyvaluematching=true, `""` is a matching type of its own (PS3.4 C.2.2.2.7),
    not one of the single values a list holds (C.2.2.2.2, C.2.2.2.8): `CT,""` (or the key
    given again as `""`) is a 400 with the reason rather than a literal `""` that no entity
    holds, or an "any of" or "all of" the standard does not define for it."""
    if any(v.strip(" ") == EMPTY_VALUE for v in re.split("[,\\\\]", value)):
        raise BadRequestError(
            f'{attr.keyword}: {value!r} lists `""` (Empty Value Matching) with other values;'
            ' give `""` alone'
        )


def _list_match(attr: Attribute, value: str) -> Match:
    """A key whose value is a list (a UID, Modalities in Study): values separated by `,` or `\\`."""
    values = _list_items(attr, value, ",\\\\")
    if not values[0]:  # only white space: as empty, universal matching
        return UniversalMatch(attr)
    _check_list(attr, values)
    if attr.vr == "UI":
        bad = [v for v in values if not _UID.match(v) or len(v) > 64]
        if bad:
            raise BadRequestError(f"{attr.keyword}: {bad[0]!r} is not a valid UID")
    elif any("*" in v or "?" in v for v in values):  # one value: _list_items
        return WildcardMatch(attr, values[0])
    return UidListMatch(attr, values) if len(values) > 1 else SingleValueMatch(attr, values[0])


def _check_list(attr: Attribute, values: tuple[str, ...]) -> None:
    if len(values) > MAX_MATCH_LIST_ITEMS:
        raise BadRequestError(
            f"{attr.keyword} lists {len(values)} values, more than {MAX_MATCH_LIST_ITEMS}"
        )
    if any(len(v) > MAX_MATCH_VALUE_CHARS for v in values):
        raise BadRequestError(f"a value of {attr.keyword} is longer than {MAX_MATCH_VALUE_CHARS}")


# PS3.4 C.2.2.2.8: Multiple Value Matching is "for Attributes with VR of AE, AS, AT, CS, LO, PN,
# SH, or UC and a defined VM greater than 1" (the VM from pydicom's copy of PS3.6). Of the
# matching keys in attributes.py only ModalitiesInStudy (CS, 1-n) is one (a test checks).
_MULTIPLE_VALUE_VRS = frozenset({"AE", "AS", "AT", "CS", "LO", "PN", "SH", "UC"})


def multi_valued(attr: Attribute) -> bool:
    return attr.vr in _MULTIPLE_VALUE_VRS and dictionary_VM(attr.tag) not in ("", "1")


def _multiple_value_match(attr: Attribute, value: str) -> Match:
    """`multiplevaluematching=true` and values separated by `\\` (the VM delimiter, PS3.5 6.4):
    every value must be held (PS3.4 C.2.2.2.8). "Key Attribute Values shall not include wild
    cards": a `*` or `?` is a 400, and so is a `,` (this server's any-value list, which cannot
    be told apart from an all-values one in the same key)."""
    if "," in value:
        raise BadRequestError(
            f"{attr.keyword}: {value!r} mixes values separated by `\\` or the key given again"
            " (all must match, as multiplevaluematching=true asks) with `,` (any may match);"
            " use one of the two"
        )
    if "*" in value or "?" in value:
        raise BadRequestError(
            f"{attr.keyword}: {value!r} has a wildcard; with multiplevaluematching=true the"
            " values shall not include wild cards (PS3.4 C.2.2.2.8)"
        )
    values = tuple(dict.fromkeys(_list_items(attr, value, "\\\\")))
    _check_list(attr, values)
    if len(values) == 1:
        return SingleValueMatch(attr, values[0])
    return MultipleValueMatch(attr, values)


def _groups_match(attr: Attribute, value: str) -> ComponentGroupMatch | UniversalMatch:
    """A PN value with component groups (`=`), each matched at its position."""
    groups = tuple(g.rstrip("^ ").lower() for g in value.split("="))  # 3 at most: _pn_match
    if all(is_universal(g) for g in groups):
        return UniversalMatch(attr)
    return ComponentGroupMatch(attr, groups)


def _pn_wildcard(attr: Attribute, value: str) -> WildcardMatch | UniversalMatch:
    """A PN wildcard without `=`, its trailing `^` (and padding) ignored like those of a
    single value and of each group of a value with `=` (_groups_match): `C?rter^John^`
    found nothing stored as `Carter^John^`, which `Carter^John^` and `C?rter^John^=` find."""
    pattern = value.rstrip("^ ")
    return UniversalMatch(attr) if is_universal(pattern) else WildcardMatch(attr, pattern)


def _range_or_single(attr: Attribute, value: str) -> Match:
    if attr.vr == "DT":
        return _dt_match(attr, value)
    parse_one = _PARSERS[attr.vr]
    if "-" in value:
        lo_s, _, hi_s = value.partition("-")
        lo = parse_one(lo_s) if lo_s else None
        hi = _upper(attr.vr, hi_s) if hi_s else None
        if (lo_s and lo is None) or (hi_s and hi is None) or (lo is None and hi is None):
            raise BadRequestError(f"{attr.keyword}: {value!r} is not a valid {attr.vr} range")
        return RangeMatch(attr, lo, hi)
    one = parse_one(value)
    if one is None:
        raise BadRequestError(f"{attr.keyword}: {value!r} is not a valid {attr.vr} value")
    return SingleValueMatch(attr, one)


_DT_PLUS_READ_AS_SPACE = re.compile(r"(?<=[0-9]) (?=[0-9]{4}(?:-|$))")


def _upper(vr: str, value: str) -> dt.date | dt.time | None:
    """The upper end of a DA or TM range. A TM not precise to the microsecond names a span
    of time (PS3.5 6.2, trailing null components), and as the end of a range it stands for
    all of it: `StudyTime=07-07` is the hour from 07:00 to 07:59:59.999999, as dcm4che and
    dicom-rs read range ends; it was the first moment, so a study at 07:30 was outside."""
    return parse_tm(value, latest=True) if vr == "TM" else parse_da(value)


def _dt(value: str, *, latest: bool = False) -> dt.datetime | None:
    """A DT query value as the naive UTC datetime the index holds (vr.dt_as_utc); with
    `latest`, the last moment a value not precise to the microsecond names, as the upper end
    of a range (`2025` is all of 2025, as in _upper), where a conversion past the last
    datetime is that datetime. Only past it: an upper end before the first datetime (year 1
    at a positive offset, `-000101010000+1400`) is no datetime, as a lower end or a single
    value converted out of range is; made the last one, it matched every stored value."""
    parsed = parse_dt(value, latest=latest)
    if parsed is None:
        return None
    utc = dt_as_utc(parsed)
    # UTC is the local time less the offset: only a negative offset moves a value later.
    later = (parsed.utcoffset() or dt.timedelta()) < dt.timedelta()
    return dt.datetime.max if utc is None and latest and later else utc


def _dt_match(attr: Attribute, value: str) -> Match:
    """A DT value or range. `-` both separates a range and signs a UTC offset, so a value can
    read either way: `20240105-20240106`, `2023-1000` (the year 2023 at UTC-10:00, or the
    years 2023 to 1000). A range whose ends parse and are in order wins (PS3.4 C.2.2.2.5:
    "<datetime1> is less or equal to <datetime2>"); else a single value with an offset
    (within -1200..+1400, PS3.5 6.2, so `2023-2025` is a range); else a range in reverse
    order, which matches nothing. A space before an offset's four digits was its `+`,
    written into the URL (a literal in an RFC 3986 query, PS3.18 8.3) and read as a
    space by form decoding: a DT holds no space (PS3.5 6.2)."""
    value = _DT_PLUS_READ_AS_SPACE.sub("+", value)
    ranges = []
    for i, ch in enumerate(value):
        if ch != "-":
            continue
        lo_s, hi_s = value[:i], value[i + 1 :]
        lo = _dt(lo_s) if lo_s else None
        hi = _dt(hi_s, latest=True) if hi_s else None
        if (lo or not lo_s) and (hi or not hi_s) and (lo or hi):
            if lo is None or hi is None or lo <= hi:
                return RangeMatch(attr, lo, hi)
            ranges.append(RangeMatch(attr, lo, hi))
    single = _dt(value)
    if single is not None:
        return SingleValueMatch(attr, single)
    if ranges:
        return ranges[0]
    what = "range" if "-" in value else "value"
    raise BadRequestError(f"{attr.keyword}: {value!r} is not a valid DT {what}")
