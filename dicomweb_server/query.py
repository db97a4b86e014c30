"""QIDO-RS request parameters -> a typed Query (PS3.18 8.3.4, PS3.4 C.2.2.2). Pure."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VM, keyword_for_tag, tag_for_keyword

from dicomweb_server.attributes import (
    BY_KEYWORD,
    BY_TAG,
    ITEM_KEYS,
    LEVEL_TAGS,
    PATIENT_MATCHING_TAGS,
    Attribute,
    Level,
)
from dicomweb_server.errors import BadRequestError
from dicomweb_server.vr import dt_as_utc, parse_da, parse_dt, parse_tm

__all__ = [
    "MAX_MATCH_LIST_ITEMS",
    "MAX_MATCH_VALUE_CHARS",
    "QIDO_DEFAULT_LIMIT",
    "QIDO_MAX_LIMIT",
    "QIDO_MAX_OFFSET",
    "ComponentGroupMatch",
    "FuzzyMatch",
    "Include",
    "ItemMatch",
    "Match",
    "MultipleValueMatch",
    "Query",
    "RangeMatch",
    "SequenceMatch",
    "SingleValueMatch",
    "UidListMatch",
    "UniversalMatch",
    "WildcardMatch",
    "parse",
]

# Results per page when the client sets no limit (PS3.18 8.3.4.4).
QIDO_DEFAULT_LIMIT = 100
# Largest page; a larger `limit` is lowered to it and a Warning header says so.
QIDO_MAX_LIMIT = 1000
# Largest `offset` accepted (a bigger one is a 400: it could only be a mistake or an attack).
QIDO_MAX_OFFSET = 10_000_000
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
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
# PS3.5 6.2.1: a person name has at most three component groups.
_PN_GROUPS = 3
_PARSERS = {"DA": parse_da, "TM": parse_tm, "DT": parse_dt}
_LEVEL_ORDER = {Level.PATIENT: -1, Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
# What a result carries besides the attributes stored for its level (attributes.LEVEL_TAGS):
# the values sql.render_rows computes from the index, per level (sql._computed). Instance
# results carry any attribute of the instance's own DICOM JSON. tests/test_query_sql.py
# checks the includefield warnings against what render_rows returns.
_COMPUTED_TAGS: dict[Level, frozenset[int]] = {
    Level.PATIENT: frozenset({0x00201200, 0x00201202, 0x00201204}),
    Level.STUDY: frozenset(
        {0x00080056, 0x00080061, 0x00080062, 0x00081190, 0x00201206, 0x00201208}
    ),
    Level.SERIES: frozenset({0x00081190, 0x00201209}),
}


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
    beginning of some component of the name, in any component group, case-insensitively."""

    attr: Attribute
    words: tuple[str, ...]


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


# What a key inside a sequence item can be: the keys there are SH (attributes.py).
ItemMatch = SingleValueMatch | WildcardMatch | UniversalMatch


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
)


@dataclass(frozen=True)
class Include:
    all: bool = False
    tags: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Query:
    level: Level
    path_uids: Mapping[Level, str]
    matches: tuple[Match, ...]
    include: Include
    limit: int
    offset: int
    fuzzy: bool = False
    warnings: tuple[str, ...] = field(default=())


def _int_param(name: str, value: str, lo: int, hi: int | None) -> int:
    """An integer parameter within lo..hi (no upper bound when hi is None), else 400."""
    s = value.strip()
    # ASCII digits only: \d and int() also take other scripts' digits (U+0663 is 3).
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise BadRequestError(f"{name} must be an integer, got {value!r}")
    digits = s.lstrip("+-").lstrip("0") or "0"
    n = int(s) if len(digits) <= _MAX_INT_DIGITS else int(s[0] + "1" + "0" * _MAX_INT_DIGITS)
    if n < lo or (hi is not None and n > hi):
        upper = "" if hi is None else f" and {hi}"
        raise BadRequestError(f"{name} must be between {lo}{upper}, got {s}")
    return n


def _resolve(key: str) -> int | None:
    if _TAG.match(key):
        return int(key, 16)
    tag = tag_for_keyword(key)
    return int(tag) if tag is not None else None


class _Unsupported(BadRequestError):
    """A query parameter this server does not support: ignored, with a Warning (PS3.18 8.3.1:
    "The origin server shall ignore any unsupported Query Parameters")."""


def _matching_attribute(key: str, level: Level) -> Attribute:
    tag = _resolve(key)
    attr = BY_KEYWORD.get(key) or (BY_TAG.get(tag) if tag is not None else None)
    if attr is None or attr.column is None:
        what = "not a DICOM attribute" if tag is None else "not a supported matching key"
        raise _Unsupported(f"unsupported query parameter {key!r} ignored: {what}")
    if level is Level.PATIENT:
        if attr.tag not in PATIENT_MATCHING_TAGS:
            raise BadRequestError(f"{attr.keyword} cannot be matched in a patient-level search")
    elif _LEVEL_ORDER[attr.level] > _LEVEL_ORDER[level]:
        raise BadRequestError(
            f"{attr.keyword} is a {attr.level.value}-level attribute and cannot be matched"
            f" when searching for {level.value} resources"
        )
    return attr


def _matching_path(key: str, level: Level) -> tuple[Attribute | None, Attribute]:
    """A parameter name -> (None, attribute) for a top-level key, or (sequence, key inside it)
    for an attribute path `Sequence.Key` (PS3.18 8.3.4.1, keywords or tags); 400 otherwise."""
    parts = key.split(".")
    if len(parts) == 1:
        attr = _matching_attribute(key, level)
        if attr.items:
            raise BadRequestError(
                f"{attr.keyword} is a sequence: match on a key inside it ({_item_paths(attr)})"
            )
        return None, attr
    if "" in parts:
        raise BadRequestError(f"malformed attribute path {key!r}: an empty attribute name")
    if len(parts) > 2:
        raise _Unsupported(
            f"unsupported attribute path {key!r} ignored: matching goes one sequence deep"
            " (Sequence.Key)"
        )
    seq_tag = _resolve(parts[0])
    seq = BY_TAG.get(seq_tag) if seq_tag is not None else None
    if seq is None or not seq.items:
        supported = ", ".join(_item_paths(a) for a in BY_TAG.values() if a.items)
        raise _Unsupported(
            f"unsupported attribute path {key!r} ignored: {parts[0]!r} is not a sequence with"
            f" matching keys (supported: {supported})"
        )
    _matching_attribute(seq.keyword, level)  # the level check
    tag = _resolve(parts[1])
    item = ITEM_KEYS.get((seq.tag, tag)) if tag is not None else None
    if item is None:
        raise _Unsupported(
            f"unsupported attribute path {key!r} ignored: {parts[1]!r} is not a matching key"
            f" inside {seq.keyword} (supported: {_item_paths(seq)})"
        )
    return seq, item


def _item_paths(seq: Attribute) -> str:
    return ", ".join(f"{seq.keyword}.{i.keyword}" for i in seq.items)


def _item_match(attr: Attribute, value: str) -> ItemMatch:
    m = _match(attr, value, fuzzy=False, multiple=False)
    if not isinstance(m, SingleValueMatch | WildcardMatch | UniversalMatch):
        raise AssertionError(f"{attr.keyword}: no item matching for {type(m).__name__}")
    return m


def _match(attr: Attribute, value: str, fuzzy: bool, multiple: bool) -> Match:
    listed = attr.vr == "UI" or attr.keyword == "ModalitiesInStudy"
    if len(value) > MAX_MATCH_VALUE_CHARS and not listed:
        raise BadRequestError(f"value of {attr.keyword} is longer than {MAX_MATCH_VALUE_CHARS}")
    if _CONTROL.search(value):
        # PS3.5 6.1.2: no control characters but ESC, LF, FF, CR and TAB in any value
        # (PostgreSQL would also refuse a NUL in text).
        raise BadRequestError(f"value of {attr.keyword} has a control character: {value!r}")
    if value in ("", "*"):
        return UniversalMatch(attr)
    if multiple and "\\" in value and _multi_valued(attr):
        return _multiple_value_match(attr, value)
    if listed:
        return _list_match(attr, value)
    if attr.vr in _PARSERS:
        return _range_or_single(attr, value)
    if attr.vr == "IS":
        return SingleValueMatch(attr, _int_param(attr.keyword, value, -(2**31), 2**31 - 1))
    if attr.vr == "PN" and fuzzy:
        words = tuple(w for w in re.split(r"[\s^=,]+", value.replace("*", "")) if w)
        return FuzzyMatch(attr, words) if words else UniversalMatch(attr)
    if attr.vr == "PN" and "=" in value:
        return _groups_match(attr, value)
    if "*" in value or "?" in value:
        return WildcardMatch(attr, value)
    return SingleValueMatch(attr, value)


def _list_match(attr: Attribute, value: str) -> Match:
    """A key whose value is a list (a UID, Modalities in Study): values separated by `,` or `\\`."""
    values = tuple(v.strip() for v in re.split(r"[,\\]", value) if v.strip())
    if not values:  # e.g. "," or a repeated empty parameter: nothing to match on
        return UniversalMatch(attr)
    _check_list(attr, values)
    if attr.vr == "UI":
        bad = [v for v in values if not _UID.match(v) or len(v) > 64]
        if bad:
            raise BadRequestError(f"{attr.keyword}: {bad[0]!r} is not a valid UID")
    elif any("*" in v or "?" in v for v in values) and len(values) == 1:
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


def _multi_valued(attr: Attribute) -> bool:
    return attr.vr in _MULTIPLE_VALUE_VRS and dictionary_VM(attr.tag) not in ("", "1")


def _multiple_value_match(attr: Attribute, value: str) -> Match:
    """`multiplevaluematching=true` and values separated by `\\` (the VM delimiter, PS3.5 6.4):
    every value must be held (PS3.4 C.2.2.2.8). "Key Attribute Values shall not include wild
    cards": a `*` or `?` is a 400, and so is a `,` (this server's any-value list, which cannot
    be told apart from an all-values one in the same key)."""
    if "," in value:
        raise BadRequestError(
            f"{attr.keyword}: {value!r} mixes values separated by `\\` (all must match, as"
            " multiplevaluematching=true asks) with `,` (any may match); use one separator"
        )
    values = tuple(dict.fromkeys(v.strip() for v in value.split("\\") if v.strip()))
    if not values:  # only separators: nothing to match on
        return UniversalMatch(attr)
    _check_list(attr, values)
    if any("*" in v or "?" in v for v in values):
        raise BadRequestError(
            f"{attr.keyword}: {value!r} has a wildcard; with multiplevaluematching=true the"
            " values shall not include wild cards (PS3.4 C.2.2.2.8)"
        )
    if len(values) == 1:
        return SingleValueMatch(attr, values[0])
    return MultipleValueMatch(attr, values)


def _groups_match(attr: Attribute, value: str) -> Match:
    """A PN value with component groups (`=`), each matched at its position."""
    groups = tuple(g.rstrip("^ ").lower() for g in value.split("="))
    if len(groups) > _PN_GROUPS:
        raise BadRequestError(
            f"{attr.keyword}: {value!r} has more than {_PN_GROUPS} component groups"
        )
    if all(g in ("", "*") for g in groups):
        return UniversalMatch(attr)
    return ComponentGroupMatch(attr, groups)


def _range_or_single(attr: Attribute, value: str) -> Match:
    if attr.vr == "DT":
        return _dt_match(attr, value)
    parse_one = _PARSERS[attr.vr]
    if "-" in value:
        lo_s, _, hi_s = value.partition("-")
        lo = parse_one(lo_s) if lo_s else None
        hi = parse_one(hi_s) if hi_s else None
        if (lo_s and lo is None) or (hi_s and hi is None) or (lo is None and hi is None):
            raise BadRequestError(f"{attr.keyword}: {value!r} is not a valid {attr.vr} range")
        return RangeMatch(attr, lo, hi)
    one = parse_one(value)
    if one is None:
        raise BadRequestError(f"{attr.keyword}: {value!r} is not a valid {attr.vr} value")
    return SingleValueMatch(attr, one)


_DT_PLUS_READ_AS_SPACE = re.compile(r"(?<=[0-9]) (?=[0-9]{4}(?:-|$))")


def _dt(value: str) -> dt.datetime | None:
    """A DT query value as the naive UTC datetime the index holds (vr.dt_as_utc)."""
    parsed = parse_dt(value)
    return dt_as_utc(parsed) if parsed is not None else None


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
        hi = _dt(hi_s) if hi_s else None
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


def _includes(
    values: list[str], level: Level, path_uids: Mapping[Level, str], matches: tuple[Match, ...]
) -> tuple[Include, list[str]]:
    """`includefield` values (PS3.18 8.3.4.3) -> Include, and a warning for each one that will
    not be returned: unknown names, and attributes the level's results never carry (PS3.18
    10.6.3.3 returns those "supported by the origin server"; at series level, never instance
    attributes). Field notes 10: ignored with a Warning, never a failed query."""
    tags: set[int] = set()
    unknown: set[str] = set()
    warnings: list[str] = []
    for raw in values:
        for key in (k.strip() for k in raw.split(",")):
            if not key:
                continue
            if key == "all":
                return Include(all=True), warnings
            tag = _resolve(key)
            if tag is None and key not in unknown:
                unknown.add(key)
                warnings.append(f"includefield {key!r} is not a DICOM attribute; ignored")
            elif tag is not None and tag not in tags:
                tags.add(tag)
                if not _returned(tag, level, path_uids, matches):
                    warnings.append(_not_returned(key, tag, level, path_uids))
    return Include(tags=frozenset(tags)), warnings


def _returned(
    tag: int, level: Level, path_uids: Mapping[Level, str], matches: tuple[Match, ...]
) -> bool:
    """Whether results at `level` can carry `tag` (sql.render_rows). Instance results carry
    any attribute stored with the instance, and every result its matched attributes (PS3.18
    10.6.3.3). Series results carry the study's attributes asked for, scoped by the study's
    UID or not (PS3.18 10.6.3.3.2: "Series or Study Level Attributes passed as includefield")."""
    if level is Level.INSTANCE or any(m.attr.tag == tag for m in matches):
        return True
    levels = [level, Level.STUDY] if level is Level.SERIES else [level]
    return any(tag in LEVEL_TAGS[lvl] or tag in _COMPUTED_TAGS[lvl] for lvl in levels)


def _not_returned(key: str, tag: int, level: Level, path_uids: Mapping[Level, str]) -> str:
    keyword = keyword_for_tag(tag)
    name = repr(key) + (f" ({keyword})" if keyword and keyword != key else "")
    scope = " within a study" if path_uids else ""
    return f"includefield {name} is not returned by {level.value} searches{scope}; ignored"


def _matches(
    raw: Mapping[str, list[str]], level: Level, fuzzy: bool, multiple: bool, warnings: list[str]
) -> tuple[Match, ...]:
    matches: list[Match] = []
    items: dict[Attribute, dict[Attribute, ItemMatch]] = {}  # by sequence, then key
    for key, values in raw.items():
        try:
            seq, attr = _matching_path(key, level)
        except _Unsupported as exc:
            warnings.append(exc.message)
            continue
        if len(values) > 1 and attr.vr != "UI":
            raise BadRequestError(f"{key} is given {len(values)} times; give it once")
        if seq is None:
            matches.append(_match(attr, ",".join(values), fuzzy, multiple))
            continue
        keys = items.setdefault(seq, {})
        if attr in keys:  # the same key by keyword and by tag
            raise BadRequestError(f"{seq.keyword}.{attr.keyword} is given twice; give it once")
        keys[attr] = _item_match(attr, values[0])
    matches += [SequenceMatch(seq, tuple(keys.values())) for seq, keys in items.items()]
    return tuple(matches)


# Search parameters of PS3.18 Table 8.3.4-1 this server does not implement: "true" searches
# as if they were absent, with the Warning text 8.3.4.5 prescribes. (multiplevaluematching,
# 8.3.4.6, is performed: PS3.4 C.2.2.2.8, MultipleValueMatch.)
_OPTIONAL_MATCHING = {
    "emptyvaluematching": "The emptyvaluematching parameter is not supported. Empty Value "
    "Matching has not been performed.",
}


# The boolean search parameters of PS3.18 Table 8.3.4-1 (8.3.4.2, 8.3.4.5, 8.3.4.6).
_FLAGS = ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")


def _once(
    given: dict[str, int], key: str, value: int, differ: str = "twice with different values"
) -> int:
    """A parameter into `given`, which given twice must say the same: either reading drops the
    other silently (STYLE rule 5). `multiplevaluematching=true&multiplevaluematching=false`
    read as the last ran a search for any of the values for a client that asked for all of
    them; `offset` given twice skips or repeats a page."""
    if given.setdefault(key, value) != value:
        raise BadRequestError(f"{key} is given {differ}; give it once")
    return value


def _flag(given: dict[str, int], key: str, value: str) -> None:
    """A boolean parameter into `given` (_once), else 400."""
    if value not in ("true", "false"):
        raise BadRequestError(f"{key} must be true or false, got {value!r}")
    _once(given, key, value == "true", "both true and false")


def parse(level: Level, params: Sequence[tuple[str, str]], path_uids: Mapping[Level, str]) -> Query:
    """Parse QIDO-RS query parameters (already percent-decoded) into a Query, or raise 400."""
    limit, offset = QIDO_DEFAULT_LIMIT, 0
    given: dict[str, int] = {}  # paging and flags, each taken once
    include_values: list[str] = []
    raw_matches: dict[str, list[str]] = {}
    warnings: list[str] = []
    for key, value in params:
        if key == "limit":
            # Any size: above QIDO_MAX_LIMIT it is lowered, below (PS3.18 8.3.4.4).
            limit = _once(given, key, _int_param("limit", value, 0, None))
        elif key == "offset":
            offset = _once(given, key, _int_param("offset", value, 0, QIDO_MAX_OFFSET))
        elif key in _FLAGS:
            _flag(given, key, value)
        elif key == "includefield":
            include_values.append(value)
        elif key in ("", "accept", "charset"):
            # Weasis sends `?&...` (an empty parameter); `accept` and `charset` are the
            # content negotiation parameters, read by the route (PS3.18 8.3.3)
            continue
        else:
            raw_matches.setdefault(key, []).append(value)
    if given.get("emptyvaluematching"):
        warnings.append(_OPTIONAL_MATCHING["emptyvaluematching"])
    if limit == 0 or limit > QIDO_MAX_LIMIT:
        # PS3.18 8.3.4.4: the server may return fewer results than asked; say so.
        warnings.append(f"limit lowered to the maximum of {QIDO_MAX_LIMIT}")
        limit = QIDO_MAX_LIMIT
    fuzzy = bool(given.get("fuzzymatching"))
    multiple = bool(given.get("multiplevaluematching"))  # PS3.18 8.3.4.6
    matches = _matches(raw_matches, level, fuzzy, multiple, warnings)
    include, include_warnings = _includes(include_values, level, path_uids, matches)
    return Query(
        level=level,
        path_uids=dict(path_uids),
        matches=matches,
        include=include,
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
        warnings=(*warnings, *include_warnings),
    )
