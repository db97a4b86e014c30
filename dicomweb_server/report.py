"""Structured Reports rendered as text (PS3.18 8.7.4, Table 8.7.4-1: a rendered text resource
is text/html by default, or text/plain): the document's header, then its content tree (PS3.3
C.17.3), one line or list item per content item, nested as the tree is. Runs in a thread."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicomweb_server.dicom_json import BULK_DATA_THRESHOLD_BYTES
from dicomweb_server.transcode.frames import read_stored, too_deep_to_read

__all__ = ["MAX_REPORT_DEPTH", "MAX_REPORT_ITEMS", "REPORT_MEDIA_TYPES", "render_report"]

# PS3.18 Table 8.7.4-1 (text): the first is the default.
REPORT_MEDIA_TYPES = ("text/html", "text/plain")
# Deepest content tree rendered (deeper items are summarised, not recursed into: a crafted
# report must not exhaust the stack) and most content items rendered (then a count of the rest).
MAX_REPORT_DEPTH = 50
MAX_REPORT_ITEMS = 20_000


def _first(seq: object) -> Dataset | None:
    """The first item of a sequence; None when absent, empty or not a sequence (a malformed
    report may hold a number where a sequence belongs)."""
    if isinstance(seq, list | pydicom.Sequence) and len(seq) > 0 and isinstance(seq[0], Dataset):
        return seq[0]
    return None


def _meaning(seq: object) -> str:
    """CodeMeaning of the first item of a code sequence, '' when absent."""
    item = _first(seq)
    return "" if item is None else str(getattr(item, "CodeMeaning", "") or "")


def _value(item: Dataset) -> str:
    """The value of a content item as text, by its Value Type (PS3.3 C.17.3.2.1); a value
    that is not what its type calls for (a malformed report) is shown as unreadable."""
    try:
        return _typed_value(item)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return "(unreadable value)"


def _typed_value(item: Dataset) -> str:
    kind = str(getattr(item, "ValueType", ""))
    if kind == "TEXT":
        return str(getattr(item, "TextValue", "")).replace("\r\n", "\n").replace("\r", "\n")
    if kind == "CODE":
        return _meaning(getattr(item, "ConceptCodeSequence", None))
    if kind == "NUM":
        value = _first(getattr(item, "MeasuredValueSequence", None))
        if value is None:
            return "(no value)"
        units = _first(getattr(value, "MeasurementUnitsCodeSequence", None))
        unit = "" if units is None else str(getattr(units, "CodeValue", ""))
        return f"{getattr(value, 'NumericValue', '')} {unit}".strip()
    if kind in ("DATE", "TIME", "DATETIME"):
        return str(getattr(item, {"DATE": "Date", "TIME": "Time"}.get(kind, "DateTime"), ""))
    if kind == "PNAME":
        return str(getattr(item, "PersonName", ""))
    if kind == "UIDREF":
        return str(getattr(item, "UID", ""))
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        ref = _first(getattr(item, "ReferencedSOPSequence", None))
        if ref is None:
            return "(no reference)"
        frames = getattr(ref, "ReferencedFrameNumber", None)
        shown = f", frames {frames}" if frames is not None else ""
        return f"{kind.lower()} {getattr(ref, 'ReferencedSOPInstanceUID', '')}{shown}"
    if kind in ("SCOORD", "SCOORD3D"):
        points = getattr(item, "GraphicData", None)
        count = len(points) if isinstance(points, list | tuple | pydicom.multival.MultiValue) else 1
        dims = 2 if kind == "SCOORD" else 3
        return f"{getattr(item, 'GraphicType', '')} ({count // dims} points)"
    if kind == "TCOORD":
        return str(getattr(item, "TemporalRangeType", ""))
    return ""


def _lines(items: object, depth: int, budget: list[int]) -> Iterator[tuple[int, str, str]]:
    """(depth, concept name, value) of each content item, depth first."""
    if not isinstance(items, list | pydicom.Sequence):
        return
    for item in items:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        name = _meaning(getattr(item, "ConceptNameCodeSequence", None))
        relation = str(getattr(item, "RelationshipType", ""))
        label = f"{name} ({relation.lower()})" if relation and relation != "CONTAINS" else name
        yield depth, label, _value(item)
        children = getattr(item, "ContentSequence", None)
        if children is None:
            continue
        if depth + 1 >= MAX_REPORT_DEPTH:
            yield depth + 1, "", f"({len(children)} items nested deeper, not shown)"
            continue
        yield from _lines(children, depth + 1, budget)


def _header(ds: Dataset) -> list[tuple[str, str]]:
    patient_id = str(getattr(ds, "PatientID", "") or "")
    fields = [
        (
            "Patient",
            f"{getattr(ds, 'PatientName', '')} ({patient_id})"
            if patient_id
            else str(getattr(ds, "PatientName", "")),
        ),
        ("Study date", str(getattr(ds, "StudyDate", ""))),
        ("Completion", str(getattr(ds, "CompletionFlag", ""))),
        ("Verification", str(getattr(ds, "VerificationFlag", ""))),
        ("Content date", f"{getattr(ds, 'ContentDate', '')} {getattr(ds, 'ContentTime', '')}"),
    ]
    return [(k, v.strip()) for k, v in fields if v.strip()]


def render_report(path: Path, media: str) -> bytes:
    """A Structured Report as text/html or text/plain, UTF-8. Large values (none are expected
    in a report) are left unread. A sequence pydicom runs out of stack reading when it is
    used (one of defined length holding items of undefined length nested too deep, stored
    before the ingest limited their depth) is a TranscodeError, a 406: it was a 500."""
    ds = read_stored(path, defer_size=BULK_DATA_THRESHOLD_BYTES)
    budget = [MAX_REPORT_ITEMS]
    try:
        title = _meaning(getattr(ds, "ConceptNameCodeSequence", None)) or "Structured Report"
        lines = list(_lines(getattr(ds, "ContentSequence", None), 0, budget))
    except RecursionError:
        raise too_deep_to_read() from None
    if budget[0] <= 0:
        lines.append((0, "", "(more content items, not shown)"))
    if media == "text/plain":
        return _plain_report(title, _header(ds), lines)
    return _html_report(title, _header(ds), lines)


def _plain_report(
    title: str, header: list[tuple[str, str]], lines: list[tuple[int, str, str]]
) -> bytes:
    """render_report as text/plain: the title underlined, the header, the content items
    indented by depth."""
    out = [title, "=" * len(title)]
    out += [f"{k}: {v}" for k, v in header]
    out.append("")
    for depth, name, value in lines:
        text = f"{name}: {value}" if name and value else name or value
        # continuation lines of a multi-line TEXT value indented as their item
        out.append("  " * depth + text.replace("\n", "\n" + "  " * (depth + 1)))
    return ("\n".join(out) + "\n").encode("utf-8")


def _html_report(
    title: str, header: list[tuple[str, str]], lines: list[tuple[int, str, str]]
) -> bytes:
    """render_report as text/html: the header a definition list, the content items nested
    lists."""
    esc = html.escape
    parts = [
        '<!doctype html>\n<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title></head><body>",
        f"<h1>{esc(title)}</h1><dl>",
        *(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in header),
        "</dl>",
    ]
    level = 0
    parts.append("<ul>")
    for depth, name, value in lines:
        while level < depth:
            parts.append("<ul>")
            level += 1
        while level > depth:
            parts.append("</ul>")
            level -= 1
        label = f"<b>{esc(name)}</b>" + (": " if value else "") if name else ""
        text = esc(value).replace("\n", "<br>")
        parts.append(f"<li>{label}{text}</li>")
    parts.append("</ul>" * (level + 1))
    parts.append("</body></html>\n")
    return "\n".join(parts).encode("utf-8")
