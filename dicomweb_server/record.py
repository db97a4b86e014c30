"""From an instance's DICOM JSON to the row values the index stores (pure)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from dicomweb_server.attributes import LEVEL_TAGS, Level, tag_hex
from dicomweb_server.vr import dt_as_utc, parse_da, parse_dt, parse_tm, parse_utc_offset

__all__ = [
    "FrameLayout",
    "InstanceRecord",
    "build_record",
    "pn_groups",
]

JsonDict = dict[str, Any]


def pn_groups(value: Any) -> list[str]:
    """Lower-cased component groups of a PN JSON value, trailing '^' removed (PS3.5 6.2.1),
    each at its position (alphabetic, ideographic, phonetic; an empty group is "", trailing
    empty groups are dropped): a query with several groups matches them group by group."""
    groups: list[Any]
    if isinstance(value, dict):
        groups = [value.get(k) for k in ("Alphabetic", "Ideographic", "Phonetic")]
    elif isinstance(value, str):
        groups = list(value.split("="))
    else:
        return []
    out = [g.rstrip("^ ").lower() if isinstance(g, str) else "" for g in groups]
    while out and not out[-1]:
        out.pop()
    return out


def pn_text(value: Any) -> str | None:
    if isinstance(value, dict):
        groups = [value.get(k) or "" for k in ("Alphabetic", "Ideographic", "Phonetic")]
        return "=".join(groups).rstrip("=") or None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class FrameLayout:
    offsets: list[int]
    lengths: list[int]
    encapsulated: bool


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the index stores for one instance, ready for `$n` parameters."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def _first(meta: JsonDict, tag: int) -> Any:
    values = (meta.get(tag_hex(tag)) or {}).get("Value")
    return values[0] if values else None


def _str(meta: JsonDict, tag: int) -> str | None:
    v = _first(meta, tag)
    return None if v is None else str(v)


def _int(meta: JsonDict, tag: int) -> int | None:
    v = _first(meta, tag)
    try:
        n = None if v is None else int(float(v))
    except (TypeError, ValueError, OverflowError):
        return None
    # The index columns are 32-bit; a value outside is kept in the metadata, not indexed.
    return n if n is not None and -(2**31) <= n < 2**31 else None


def _date(meta: JsonDict, tag: int) -> dt.date | None:
    v = _str(meta, tag)
    return parse_da(v) if v else None


def _time(meta: JsonDict, tag: int) -> dt.time | None:
    v = _str(meta, tag)
    return parse_tm(v) if v else None


def _datetime(meta: JsonDict, tag: int) -> dt.datetime | None:
    """A DT as the naive UTC datetime the index compares (vr.dt_as_utc); without an offset
    of its own the value is in the instance's Timezone Offset From UTC (0008,0201), which
    covers "all DT Attributes ... that do not contain an explicitly encoded timezone
    offset" (PS3.3 C.12.1.1.8)."""
    v = _str(meta, tag)
    parsed = parse_dt(v) if v else None
    if parsed is None:
        return None
    tz = _str(meta, 0x00080201)
    return dt_as_utc(parsed, parse_utc_offset(tz) if tz else None)


def level_attrs(meta: JsonDict, level: Level) -> JsonDict:
    keep = _LEVEL_KEYS[level]
    return {k: v for k, v in meta.items() if k in keep}


_LEVEL_KEYS = {level: frozenset(tag_hex(t) for t in tags) for level, tags in LEVEL_TAGS.items()}


def _without_nul(node: Any) -> Any:
    """The DICOM JSON with every NUL character of its strings replaced by U+FFFD. PS3.5 6.2
    allows no NUL inside a text value, but files carry them; PostgreSQL's text and jsonb
    cannot hold one, and the instance is stored all the same (its file keeps the bytes)."""
    if isinstance(node, str):
        return node.replace("\0", "\ufffd")
    if isinstance(node, list):
        return [_without_nul(v) for v in node]
    if isinstance(node, dict):
        return {k: _without_nul(v) for k, v in node.items()}
    return node


def build_record(
    meta: JsonDict,
    *,
    transfer_syntax_uid: str,
    blob_key: str,
    size_bytes: int,
    sha256: bytes,
    number_of_frames: int,
    frames: FrameLayout | None,
    bulk_ranges: dict[str, list[Any]],
) -> InstanceRecord:
    """Column values of the patient, study, series and instance rows of one instance."""
    meta_text = json.dumps(meta)
    if "\\u0000" in meta_text:  # rare: the walk is paid only then
        meta = _without_nul(meta)
        meta_text = json.dumps(meta)
    patient_name = _first(meta, 0x00100010)
    patient = _patient_row(meta, patient_name)
    study = _study_row(meta, patient_name, patient)
    series = _series_row(meta)
    instance = {
        "sop_instance_uid": _str(meta, 0x00080018),
        "sop_class_uid": _str(meta, 0x00080016),
        "instance_number": _int(meta, 0x00200013),
        "acquisition_datetime": _datetime(meta, 0x0008002A),
        "blob_key": blob_key,
        "transfer_syntax_uid": transfer_syntax_uid,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "number_of_frames": number_of_frames,
        "frame_offsets": frames.offsets if frames else None,
        "frame_lengths": frames.lengths if frames else None,
        "encapsulated": bool(frames and frames.encapsulated),
        "metadata": meta_text,
        "bulk_ranges": json.dumps(bulk_ranges),
    }
    return InstanceRecord(patient, study, series, instance)


def _patient_row(meta: JsonDict, patient_name: Any) -> dict[str, Any]:
    return {
        "patient_id": _str(meta, 0x00100020) or "",
        "issuer_of_patient_id": _str(meta, 0x00100021) or "",
        "patient_name": pn_text(patient_name),
        "patient_birth_date": _date(meta, 0x00100030),
        "patient_sex": _str(meta, 0x00100040),
    }


def _study_row(meta: JsonDict, patient_name: Any, patient: dict[str, Any]) -> dict[str, Any]:
    """The study row; the patient's attributes are repeated in it (from `patient`)."""
    referring = pn_groups(_first(meta, 0x00080090))
    patient_groups = pn_groups(patient_name)
    return {
        "study_instance_uid": _str(meta, 0x0020000D),
        "study_date": _date(meta, 0x00080020),
        "study_time": _time(meta, 0x00080030),
        "accession_number": _str(meta, 0x00080050),
        "study_id": _str(meta, 0x00200010),
        "study_description": _str(meta, 0x00081030),
        "referring_physician_name": referring,
        "patient_name": patient_groups,
        "referring_physician_name_text": "=".join(referring),
        "patient_name_text": "=".join(patient_groups),
        "patient_id": patient["patient_id"],
        "patient_birth_date": patient["patient_birth_date"],
        "patient_sex": patient["patient_sex"],
        "attrs": json.dumps(level_attrs(meta, Level.STUDY)),
    }


def _series_row(meta: JsonDict) -> dict[str, Any]:
    return {
        "series_instance_uid": _str(meta, 0x0020000E),
        "modality": _str(meta, 0x00080060),
        "series_number": _int(meta, 0x00200011),
        "series_description": _str(meta, 0x0008103E),
        "body_part_examined": _str(meta, 0x00180015),
        "pps_start_date": _date(meta, 0x00400244),
        "pps_start_time": _time(meta, 0x00400245),
        "attrs": json.dumps(level_attrs(meta, Level.SERIES)),
    }
