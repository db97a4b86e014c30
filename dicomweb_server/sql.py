"""Query -> (sql_text, args) for asyncpg, and result rows -> DICOM JSON. Pure.

Every value is a `$n` parameter; column names come only from attributes.py (STYLE.md rule 4).
LIKE patterns escape `\\`, `%` and `_` before `*` and `?` are translated (ESCAPE '\\').
Keys inside a sequence are matched in the level's `attrs` jsonb: single values by containment
(the GIN index on the sequence), wildcards by LIKE over the values of each item.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dicomweb_server.attributes import DEFAULT_RETURN, LEVEL_TAGS, Attribute, Level, tag_hex
from dicomweb_server.matching import (
    FUZZY_WORD_SEPARATORS,
    ComponentGroupMatch,
    EmptyValueMatch,
    FuzzyMatch,
    Match,
    MultipleValueMatch,
    RangeMatch,
    SequenceMatch,
    SingleValueMatch,
    UidListMatch,
    UniversalMatch,
    WildcardMatch,
    is_universal,
)
from dicomweb_server.query import Query
from dicomweb_server.response_json import absolutize_bulk_uris

__all__ = [
    "compile_search",
    "compile_search_keys",
    "compile_search_rows",
    "iter_rendered",
    "like_pattern",
    "render_rows",
    "returned_levels",
]

_ALIAS = {Level.PATIENT: "st", Level.STUDY: "st", Level.SERIES: "se", Level.INSTANCE: "i"}
_UID_COLUMN = {
    Level.STUDY: "st.study_instance_uid",
    Level.SERIES: "se.series_instance_uid",
    Level.INSTANCE: "i.sop_instance_uid",
}
_FROM = {
    Level.STUDY: "FROM study st",
    Level.SERIES: "FROM series se JOIN study st ON st.pk = se.study_fk",
    Level.INSTANCE: (
        "FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk"
    ),
}
# The DICOM JSON each level's row keeps of its attributes (study and series: the
# attributes.LEVEL_TAGS of their first instance; instance: all of it).
_DOC = {Level.STUDY: "st.attrs", Level.SERIES: "se.attrs", Level.INSTANCE: "i.metadata"}
_VISIBLE = {
    Level.STUDY: "st.num_instances > 0",
    Level.SERIES: "se.num_instances > 0",
    Level.INSTANCE: "TRUE",
}


def like_pattern(dicom_pattern: str) -> str:
    """DICOM wildcard (`*`, `?`) to a LIKE pattern with `\\` as the escape character."""
    out = []
    for ch in dicom_pattern:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


class _Args:
    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _column(attr: Attribute) -> str:
    assert attr.column is not None
    return f"{_ALIAS[attr.level]}.{attr.column}"


def _sequence_condition(m: SequenceMatch, args: _Args) -> str | None:
    """PS3.4 C.2.2.2.6: some item of the sequence matches every key. Single values are one
    containment test on the sequence (`{"Value": [{key: {"Value": [v]}, ...}]}`: an item with
    all of them), which the GIN index answers; wildcards add a LIKE on the values of that
    same item, and Empty Value Matching (C.2.2.2.7) a test that the item holds no value of
    the key. Tags come from attributes.py (8 hex digits), values are parameters."""
    singles = {
        tag_hex(i.attr.tag): {"Value": [i.value]}
        for i in m.items
        if isinstance(i, SingleValueMatch)
    }
    wildcards = [i for i in m.items if isinstance(i, WildcardMatch)]
    empties = [i for i in m.items if isinstance(i, EmptyValueMatch)]
    if not singles and not wildcards and not empties:
        return None  # universal matching: no key restricts the items
    seq = f"{_column(m.attr)} -> '{tag_hex(m.attr.tag)}'"
    parts = []
    if singles:
        parts.append(f"{seq} @> {args.add(json.dumps({'Value': [singles]}))}::jsonb")
    if not wildcards and not empties:
        return parts[0]
    conds = [f"item @> {args.add(json.dumps(singles))}::jsonb"] if singles else []
    for w in wildcards:
        p = args.add(like_pattern(w.pattern))
        conds.append(
            f"EXISTS (SELECT 1 FROM jsonb_path_query(item, '$.\"{tag_hex(w.attr.tag)}\".Value[*]')"
            f" AS v WHERE v #>> '{{}}' LIKE {p} ESCAPE '\\')"
        )
    conds += [f"NOT {_has_value('item', e.attr)}" for e in empties]
    # Lax jsonpath: a missing or malformed sequence yields no items rather than an error.
    parts.append(
        f"EXISTS (SELECT 1 FROM jsonb_path_query({seq}, '$.Value[*]') AS item"
        f" WHERE {' AND '.join(conds)})"
    )
    return " AND ".join(parts)


def _groups_condition(m: ComponentGroupMatch, args: _Args) -> str:
    """Each non-empty group of the value against the stored group at its position (the
    column holds the groups in order, record.pn_groups; PostgreSQL arrays count from 1).
    The exact groups are also one containment test, which the GIN index answers."""
    col = _column(m.attr)
    exact = [g for g in m.groups if g and "*" not in g and "?" not in g]
    parts = [f"{col} @> {args.add(exact)}::text[]"] if exact else []
    for i, group in enumerate(m.groups, start=1):
        if is_universal(group):
            continue
        if group in exact:
            parts.append(f"{col}[{i}] = {args.add(group)}")
        else:
            parts.append(_pn_group_like(f"{col}[{i}]", group, args))
    return " AND ".join(parts)


# PS3.5 6.2.1: a component group has five components (family, given, middle, prefix, suffix).
_PN_COMPONENTS = 5


def _pn_group_like(group: str, dicom_pattern: str, args: _Args) -> str:
    """A stored PN group (lower-cased, trailing `^` removed: record.pn_groups) against a
    wildcard pattern (PS3.4 C.2.2.2.4). A pattern with a `^` is also tried on the group with
    its empty trailing components written out (`smith^john` as `smith^john^^^`): the index
    drops them, so `Smith^John^^^*`, or `*.^` for `Carter^John^T^Dr.^`, matched nothing,
    not even the name as stored. PN wildcard matching is implementation dependent (PS3.4
    C.2.2.2.4); conformance/STATEMENT.md says this one."""
    p = args.add(like_pattern(dicom_pattern.lower()))
    plain = f"{group} LIKE {p} ESCAPE '\\'"
    if "^" not in dicom_pattern:
        return plain
    delimiters = f"length({group}) - length(replace({group}, '^', ''))"
    padded = f"{group} || repeat('^', {_PN_COMPONENTS - 1} - ({delimiters}))"
    # An empty group is no name (`Yamada^Tarou==やまだ^たろう` has no ideographic one), not
    # five empty components: written out as `^^^^` it matched `^*` and `=^*`.
    return f"({plain} OR ({group} <> '' AND {padded} LIKE {p} ESCAPE '\\'))"


# A "Value" item that is a value: neither null nor "" (PS3.18 F.2.5).
_VALUED = '@.type() != "null" && (@.type() != "string" || @ != "")'
# A PN "Value" item that is a name (PS3.18 F.2.2): some component group holding more than
# delimiters and padding, as record.pn_groups indexes it (`^^^^` is no name, is_empty_name).
_PN_VALUED = " || ".join(
    [f'@.{group} like_regex "[^ ^]"' for group in ("Alphabetic", "Ideographic", "Phonetic")]
    + ['(@.type() == "string" && @ like_regex "[^ ^=]")']
)


def _has_value(doc: str, attr: Attribute) -> str:
    """Whether the DICOM JSON `doc` holds a value of `attr`: a "Value" item that is neither
    null nor "" (PS3.18 F.2.5: an attribute of zero length has no "Value"), for a PN a name
    of more than delimiters. Lax jsonpath: a document without the attribute holds none. The
    tag comes from attributes.py."""
    valued = _PN_VALUED if attr.vr == "PN" else _VALUED
    return f"jsonb_path_exists({doc}, '$.\"{tag_hex(attr.tag)}\".Value[*] ? ({valued})')"


def _empty_condition(m: EmptyValueMatch) -> str:
    """PS3.4 C.2.2.2.7: the attribute has no value, zero length or absent (the index stores
    both alike). The column says so first, indexably: NULL for a date, time or number, NULL
    or '' for a string (PatientID is '' when absent), no component group for a PN (a name
    of delimiters only, `^^^^`, is indexed as none: every component null, PS3.5 6.2.1), no
    modality for ModalitiesInStudy. A value the column cannot hold (a date that is not
    valid, a number out of its range, a string or a name whose first value is empty) is
    indexed as none too, but it is a value: the level's DICOM JSON tells it apart (_has_value)."""
    col = _column(m.attr)
    if m.attr.keyword == "ModalitiesInStudy":  # computed from the series: no document
        return f"cardinality({col}) = 0"
    if m.attr.vr == "PN":
        # The column holds the first name's groups: `\\Doe^Jane` is indexed as none.
        blank = f"coalesce(cardinality({col}), 0) = 0"
    elif m.attr.vr in ("DA", "TM", "DT", "IS"):
        blank = f"{col} IS NULL"
    else:
        blank = f"{col} IS NULL OR {col} = ''"
    return f"(({blank}) AND NOT {_has_value(_DOC[m.attr.level], m.attr)})"


def _condition(m: Match, args: _Args) -> str | None:
    if isinstance(m, UniversalMatch):
        return None
    if isinstance(m, EmptyValueMatch):
        return _empty_condition(m)
    if isinstance(m, SequenceMatch):
        return _sequence_condition(m, args)
    if isinstance(m, ComponentGroupMatch):
        return _groups_condition(m, args)
    col = _column(m.attr)
    pn = m.attr.vr == "PN"
    array = pn or m.attr.keyword == "ModalitiesInStudy"
    if isinstance(m, SingleValueMatch):
        if pn:  # containment uses the GIN index on the groups
            value = str(m.value).rstrip("^ ").lower()
            return f"{col} @> ARRAY[{args.add(value)}::text]"
        if array:
            return f"{args.add(m.value)} = ANY ({col})"
        return f"{col} = {args.add(m.value)}"
    if isinstance(m, UidListMatch):
        if array:
            return f"{col} && {args.add(list(m.values))}::text[]"
        return f"{col} = ANY ({args.add(list(m.values))}::text[])"
    if isinstance(m, MultipleValueMatch):
        # PS3.4 C.2.2.2.8: the column holds every value of the key (array containment, which
        # the GIN index answers). A PN column holds one name's groups, not several names.
        if not array or pn:
            raise AssertionError(f"{m.attr.keyword}: no multiple value matching on {col}")
        return f"{col} @> {args.add(list(m.values))}::text[]"
    if isinstance(m, WildcardMatch):
        return _wildcard_condition(m, col, pn, array, args)
    if isinstance(m, RangeMatch):
        return _range_condition(m, col, args)
    if isinstance(m, FuzzyMatch):
        return _fuzzy_condition(m, col, args)
    raise AssertionError(m)


def _wildcard_condition(m: WildcardMatch, col: str, pn: bool, array: bool, args: _Args) -> str:
    """LIKE on the column: on any of its values for an array column, on any component group
    of a PN (lower-cased, as the groups are stored)."""
    pattern = like_pattern(m.pattern.lower() if pn else m.pattern)
    if pn:
        # A group matching the pattern implies the joined groups contain a match (of the
        # pattern less the `^`, `*` and `?` it ends with, which may match the components
        # _pn_group_like writes out): that prefilter uses the trigram index; the EXISTS
        # keeps the whole-group semantics.
        core = m.pattern.lower()
        core = core.rstrip("^*?") if "^" in core else core
        pre = args.add(f"%{like_pattern(core)}%")
        group = _pn_group_like("g", m.pattern, args)
        return (
            f"{col}_text LIKE {pre} ESCAPE '\\' AND"
            f" EXISTS (SELECT 1 FROM unnest({col}) AS g WHERE {group})"
        )
    if array:
        p = args.add(pattern)
        return f"EXISTS (SELECT 1 FROM unnest({col}) AS g WHERE g LIKE {p} ESCAPE '\\')"
    return f"{col} LIKE {args.add(pattern)} ESCAPE '\\'"


def _range_condition(m: RangeMatch, col: str, args: _Args) -> str:
    parts = []
    if m.lower is not None:
        parts.append(f"{col} >= {args.add(m.lower)}")
    if m.upper is not None:
        parts.append(f"{col} <= {args.add(m.upper)}")
    return " AND ".join(parts)


def _fuzzy_condition(m: FuzzyMatch, col: str, args: _Args) -> str | None:
    """Each word as the start of some word of some component group (PN fuzzy matching), or
    the value as matched without fuzzy matching: fuzzy matching adds names, never drops one."""
    literal = _condition(m.literal, args)
    if literal is None:  # universal matching: every name
        return None
    parts = []
    for word in m.words:
        p = args.add(like_pattern(word.lower()) + "%")
        parts.append(
            f"EXISTS (SELECT 1 FROM unnest({col}) AS g,"
            f" regexp_split_to_table(g, '[{FUZZY_WORD_SEPARATORS}]+') AS w"
            f" WHERE w LIKE {p} ESCAPE '\\')"
        )
    return f"(({literal}) OR ({' AND '.join(parts)}))"


def returned_levels(q: Query) -> tuple[Level, ...]:
    """Levels whose attributes each result carries (PS3.18 10.6.3.3): a search scoped by a
    parent UID in the path leaves that parent's attributes out."""
    if q.level in (Level.PATIENT, Level.STUDY):
        return (q.level,)
    if q.level is Level.SERIES:
        return (Level.SERIES,) if Level.STUDY in q.path_uids else (Level.STUDY, Level.SERIES)
    if Level.SERIES in q.path_uids:
        return (Level.INSTANCE,)
    if Level.STUDY in q.path_uids:
        return (Level.SERIES, Level.INSTANCE)
    return (Level.STUDY, Level.SERIES, Level.INSTANCE)


def _instance_tags(q: Query) -> list[str]:
    tags = set(DEFAULT_RETURN[Level.INSTANCE]) | set(q.include.tags)
    for m in q.matches:
        tags.add(m.attr.tag)
    return sorted(tag_hex(t) for t in tags)


def _where(q: Query, args: _Args) -> str:
    where = [_VISIBLE[Level.STUDY if q.level is Level.PATIENT else q.level]]
    for level, uid in q.path_uids.items():
        where.append(f"{_UID_COLUMN[level]} = {args.add(uid)}")
    for m in q.matches:
        cond = _condition(m, args)
        if cond:
            where.append(cond)
    return " AND ".join(where)


def _compile_patients(q: Query) -> tuple[str, list[Any]]:
    """A patient-level search (DIMSE C-FIND): the patients that have a matching study, each
    once, with the Patient module of its first study and its counts (PS3.4 C.6.1.1.2)."""
    args = _Args()
    where = _where(q, args)
    sql_text = (
        "SELECT DISTINCT ON (st.patient_fk) st.patient_fk, st.attrs::text AS patient_attrs,"
        " n.num_studies, n.num_series, n.num_instances FROM study st"
        " CROSS JOIN LATERAL (SELECT count(*)::int AS num_studies,"
        " sum(s2.num_series)::int AS num_series, sum(s2.num_instances)::int AS num_instances"
        " FROM study s2 WHERE s2.patient_fk = st.patient_fk AND s2.num_instances > 0) n"
        f" WHERE {where} ORDER BY st.patient_fk, st.pk"
        f" LIMIT {args.add(q.limit + 1)} OFFSET {args.add(q.offset)}"
    )
    return sql_text, args.values


def compile_search(q: Query) -> tuple[str, list[Any]]:
    """SELECT for a QIDO search; fetches limit + 1 rows so the caller knows if more exist."""
    if q.level is Level.PATIENT:
        return _compile_patients(q)
    args = _Args()
    select = _select(q, args)
    where = _where(q, args)
    limit = f" LIMIT {args.add(q.limit + 1)} OFFSET {args.add(q.offset)}"
    return _in_key_order(q, select, where, limit), args.values


def compile_search_keys(q: Query, after: int, count: int) -> tuple[str, list[Any]]:
    """The primary keys of the next `count` matches of a search (not of the patient level)
    past the one whose key is `after`, in the order of compile_search: the rest of a page
    that compile_search began, to be fetched by compile_search_rows. Keys, not rows: their
    number tells whether more results exist before a byte of the rows is read."""
    args = _Args()
    key = f"{_ALIAS[q.level]}.pk"
    where = f"({_where(q, args)}) AND {key} > {args.add(after)}"
    return _in_key_order(q, key, where, f" LIMIT {args.add(count)}"), args.values


def compile_search_rows(q: Query, keys: list[int]) -> tuple[str, list[Any]]:
    """The rows compile_search gives, of the matches whose primary keys are `keys` (from
    compile_search_keys), in the same order."""
    args = _Args()
    select = _select(q, args)
    where = f"{_ALIAS[q.level]}.pk = ANY({args.add(keys)}::bigint[])"
    return _in_key_order(q, select, where), args.values


def _in_key_order(q: Query, select: str, where: str, limit: str = "") -> str:
    """The SELECT of the three compile_search* above (not of the patient level): `select`
    from the searched level's tables, WHERE `where`, in the order of the searched level's
    primary key, then `limit`. Its placeholders are numbered as the caller added them."""
    return f"SELECT {select} {_FROM[q.level]} WHERE {where} ORDER BY {_ALIAS[q.level]}.pk{limit}"


def _select(q: Query, args: _Args) -> str:
    """The columns of a QIDO search's rows: UIDs, stored attributes and counts of the levels
    returned, then the searched level's primary key (`pk`)."""
    select = [
        "st.study_instance_uid",
        "st.attrs::text AS study_attrs",
        "st.modalities_in_study",
        "st.sop_classes_in_study",
        "st.num_series",
        "st.num_instances AS study_num_instances",
    ]
    if q.level is not Level.STUDY:
        select += [
            "se.series_instance_uid",
            "se.attrs::text AS series_attrs",
            "se.num_instances AS series_num_instances",
        ]
    if q.level is Level.INSTANCE:
        select.append("i.sop_instance_uid")
        if q.include.all:
            select.append("i.metadata::text AS instance_attrs")
        else:
            keys = args.add(_instance_tags(q))
            select.append(
                "(SELECT jsonb_object_agg(key, value) FROM jsonb_each(i.metadata)"
                f" WHERE key = ANY ({keys}::text[]))::text AS instance_attrs"
            )
    select.append(f"{_ALIAS[q.level]}.pk")
    return ", ".join(select)


def _wanted(q: Query, level: Level) -> set[str] | None:
    """Hex tags to return for one level; None means all stored attributes of that level."""
    if q.include.all:
        return None
    tags = set(DEFAULT_RETURN[level]) | set(q.include.tags)
    return {tag_hex(t) for t in tags} | _matched(q, level)


def _matched(q: Query, level: Level) -> set[str]:
    """Hex tags of the attributes of `level` the query matches on (at the patient level, all:
    a patient's attributes are its study's)."""
    return {
        tag_hex(m.attr.tag) for m in q.matches if m.attr.level is level or level is Level.PATIENT
    }


def _parents_matched(q: Query) -> list[tuple[Level, set[str] | None]]:
    """A search scoped by a parent UID leaves the parent's default attributes out, but not
    those it matched on or asked for by includefield (PS3.18 10.6.3.3: every matched
    attribute; 10.6.3.3.2 and .3: "Study Level Attributes passed as includefield"), e.g.
    Modality in `/studies/{study}/series/{series}/instances?Modality=CT`, StudyDate in
    `/studies/{study}/series?includefield=StudyDate`."""
    returned = returned_levels(q)
    out: list[tuple[Level, set[str] | None]] = []
    for level in _PARENTS.get(q.level, ()):
        wanted = _matched(q, level) | {tag_hex(t) for t in q.include.tags}
        if level not in returned and wanted:
            out.append((level, wanted))
    return out


_PARENTS = {Level.SERIES: (Level.STUDY,), Level.INSTANCE: (Level.STUDY, Level.SERIES)}


def _pick(doc: Mapping[str, Any], wanted: set[str] | None) -> dict[str, Any]:
    if wanted is None:
        return dict(doc)
    return {k: v for k, v in doc.items() if k in wanted}


def _element(vr: str, values: Iterable[Any] | None) -> dict[str, Any]:
    """A DICOM JSON element; without values it has no "Value" key (PS3.18 F.2.5), e.g. the
    ModalitiesInStudy of a study whose instances have no Modality."""
    present = [v for v in values or () if v is not None and v != ""]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _computed(row: Mapping[str, Any], level: Level, base_url: str) -> dict[str, Any]:
    if level is Level.PATIENT:
        return {
            "00201200": {"vr": "IS", "Value": [row["num_studies"]]},
            "00201202": {"vr": "IS", "Value": [row["num_series"]]},
            "00201204": {"vr": "IS", "Value": [row["num_instances"]]},
        }
    study = row["study_instance_uid"]
    if level is Level.STUDY:
        return {
            "00080056": {"vr": "CS", "Value": ["ONLINE"]},
            "00080061": _element("CS", row["modalities_in_study"]),
            "00080062": _element("UI", row["sop_classes_in_study"]),
            "00081190": {"vr": "UR", "Value": [f"{base_url}/studies/{study}"]},
            "00201206": {"vr": "IS", "Value": [row["num_series"]]},
            "00201208": {"vr": "IS", "Value": [row["study_num_instances"]]},
        }
    series_url = f"{base_url}/studies/{study}/series/{row['series_instance_uid']}"
    if level is Level.SERIES:
        return {
            "00081190": {"vr": "UR", "Value": [series_url]},
            "00201209": {"vr": "IS", "Value": [row["series_num_instances"]]},
        }
    return {
        "00080056": {"vr": "CS", "Value": ["ONLINE"]},
        "00081190": {"vr": "UR", "Value": [f"{series_url}/instances/{row['sop_instance_uid']}"]},
    }


def render_rows(q: Query, rows: Iterable[Mapping[str, Any]], base_url: str) -> list[dict[str, Any]]:
    """QIDO results of `rows`, as iter_rendered makes them."""
    return list(iter_rendered(q, rows, base_url))


def iter_rendered(
    q: Query, rows: Iterable[Mapping[str, Any]], base_url: str
) -> Iterator[dict[str, Any]]:
    """QIDO results, one per row as it is asked for: the stored attributes of the returned
    levels plus computed ones. What depends only on the query (the tags wanted per level) is
    worked out once; the searched level is always among the returned ones, so its
    RetrieveURL is at hand."""
    levels = _parents_matched(q) + [(level, _wanted(q, level)) for level in returned_levels(q)]
    for row in rows:
        result: dict[str, Any] = {}
        retrieve_url = None
        for level, wanted in levels:
            text = row[f"{level.value}_attrs"] or "{}"
            stored = json.loads(absolutize_bulk_uris(text, base_url))
            if level is Level.PATIENT:  # the study's own attributes are not the patient's
                stored = {k: v for k, v in stored.items() if k in _PATIENT_KEYS}
            result.update(_pick(stored, wanted))
            computed = _computed(row, level, base_url)
            if level is q.level:
                retrieve_url = computed.get("00081190")
            if wanted is not None:
                computed = {k: v for k, v in computed.items() if k in wanted}
            result.update(computed)
        if retrieve_url is not None:
            # RetrieveURL is meaningful only for the level searched: always that level's.
            result["00081190"] = retrieve_url
        yield dict(sorted(result.items()))


_PATIENT_KEYS = frozenset(tag_hex(t) for t in LEVEL_TAGS[Level.PATIENT])
