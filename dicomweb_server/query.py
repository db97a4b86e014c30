"""QIDO-RS request parameters -> a typed Query (PS3.18 8.3.4, PS3.4 C.2.2.2). Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag, tag_for_keyword

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
from dicomweb_server.matching import (
    ItemMatch,
    Match,
    SequenceMatch,
    int_param,
    is_listed,
    item_match,
    multi_valued,
    value_match,
)

__all__ = [
    "QIDO_DEFAULT_LIMIT",
    "QIDO_MAX_LIMIT",
    "QIDO_MAX_OFFSET",
    "Include",
    "Query",
    "parse",
]

# Results per page when the client sets no limit (PS3.18 8.3.4.4).
QIDO_DEFAULT_LIMIT = 100
# Largest page; a larger `limit` is lowered to it and a Warning header says so.
QIDO_MAX_LIMIT = 1000
# Largest `offset` accepted (a bigger one is a 400: it could only be a mistake or an attack).
QIDO_MAX_OFFSET = 10_000_000

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_LEVEL_ORDER = {Level.PATIENT: -1, Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
# What a result carries besides the attributes stored for its level (attributes.LEVEL_TAGS):
# the values sql.render_rows computes from the index, per level (sql._computed). Instance
# results carry any attribute of the instance's own DICOM JSON.
# tests/test_query_sql_attributes.py checks the includefield warnings against what
# render_rows returns.
_COMPUTED_TAGS: dict[Level, frozenset[int]] = {
    Level.PATIENT: frozenset({0x00201200, 0x00201202, 0x00201204}),
    Level.STUDY: frozenset(
        {0x00080056, 0x00080061, 0x00080062, 0x00081190, 0x00201206, 0x00201208}
    ),
    Level.SERIES: frozenset({0x00081190, 0x00201209}),
}


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


@dataclass(frozen=True)
class _Flags:
    """The matching flags of PS3.18 Table 8.3.4-1: fuzzymatching (8.3.4.2), multiplevaluematching
    (8.3.4.6) and emptyvaluematching (8.3.4.5), all performed."""

    fuzzy: bool = False
    multiple: bool = False
    empty: bool = False


def _matches(
    raw: Mapping[str, list[str]], level: Level, flags: _Flags, warnings: list[str]
) -> tuple[Match, ...]:
    tops: dict[Attribute, list[str]] = {}  # values by key, named by keyword or by tag
    items: dict[Attribute, dict[Attribute, ItemMatch]] = {}  # by sequence, then key
    for key, values in raw.items():
        try:
            seq, attr = _matching_path(key, level)
        except _Unsupported as exc:
            warnings.append(exc.message)
            continue
        if seq is None:
            tops.setdefault(attr, []).extend(values)
            continue
        keys = items.setdefault(seq, {})
        if len(values) > 1 or attr in keys:  # again, or by keyword and by tag
            raise BadRequestError(f"{seq.keyword}.{attr.keyword} is given twice; give it once")
        keys[attr] = item_match(attr, values[0], flags.empty)
    matches: list[Match] = [
        value_match(
            attr, _joined(attr, values, flags.multiple), flags.fuzzy, flags.multiple, flags.empty
        )
        for attr, values in tops.items()
    ]
    matches += [SequenceMatch(seq, tuple(keys.values())) for seq, keys in items.items()]
    return tuple(matches)


def _joined(attr: Attribute, values: list[str], multiple: bool) -> str:
    """A key's values as one value. PS3.18 8.3.4.1: "Each attribute in the Query Parameter
    shall not be repeated" (a UID list is one comma-separated value). A list key given again
    adds to its list all the same: dicomweb-client sends a Python list in search_filters as
    the key repeated (`ModalitiesInStudy=CT&ModalitiesInStudy=MR`). The values are then any
    of them (`,`), or with multiplevaluematching=true, on a key it applies to, all of them
    (`\\`, PS3.4 C.2.2.2.8), as the same list written in one value is. Any other key given
    twice is a 400: taking one value would drop the other silently."""
    if len(values) == 1:
        return values[0]
    if not is_listed(attr):
        raise BadRequestError(f"{attr.keyword} is given {len(values)} times; give it once")
    return ("\\" if multiple and multi_valued(attr) else ",").join(values)


# The boolean search parameters of PS3.18 Table 8.3.4-1 (8.3.4.2, 8.3.4.5, 8.3.4.6), each
# performed (_Flags), so none gets the "not supported" Warning of 8.3.4.5 and 8.3.4.6.
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


def _sorted(
    params: Sequence[tuple[str, str]], given: dict[str, int]
) -> tuple[list[str], dict[str, list[str]]]:
    """The parameters in turn: paging and flags into `given` (each taken once), and the
    includefield values and the matching keys' values returned."""
    include_values: list[str] = []
    raw_matches: dict[str, list[str]] = {}
    for key, value in params:
        if key == "limit":
            # Any size: above QIDO_MAX_LIMIT it is lowered, below (PS3.18 8.3.4.4).
            _once(given, key, int_param("limit", value, 0, None))
        elif key == "offset":
            _once(given, key, int_param("offset", value, 0, QIDO_MAX_OFFSET))
        elif key in _FLAGS:
            _flag(given, key, value)
        elif key == "includefield":
            include_values.append(value)
        elif key not in ("", "accept", "charset"):
            # A matching key: not the empty parameter Weasis sends (`?&...`), nor `accept`
            # and `charset`, the content negotiation parameters the route reads (PS3.18 8.3.3)
            raw_matches.setdefault(key, []).append(value)
    return include_values, raw_matches


def parse(level: Level, params: Sequence[tuple[str, str]], path_uids: Mapping[Level, str]) -> Query:
    """Parse QIDO-RS query parameters (already percent-decoded) into a Query, or raise 400."""
    given: dict[str, int] = {}  # paging and flags, each taken once
    include_values, raw_matches = _sorted(params, given)
    warnings: list[str] = []
    limit = given.get("limit", QIDO_DEFAULT_LIMIT)
    if limit == 0 or limit > QIDO_MAX_LIMIT:
        # PS3.18 8.3.4.4: the server may return fewer results than asked; say so.
        warnings.append(f"limit lowered to the maximum of {QIDO_MAX_LIMIT}")
        limit = QIDO_MAX_LIMIT
    flags = _Flags(
        fuzzy=bool(given.get("fuzzymatching")),
        multiple=bool(given.get("multiplevaluematching")),
        empty=bool(given.get("emptyvaluematching")),
    )
    matches = _matches(raw_matches, level, flags, warnings)
    include, include_warnings = _includes(include_values, level, path_uids, matches)
    return Query(
        level=level,
        path_uids=dict(path_uids),
        matches=matches,
        include=include,
        limit=limit,
        offset=given.get("offset", 0),
        fuzzy=flags.fuzzy,
        warnings=(*warnings, *include_warnings),
    )
