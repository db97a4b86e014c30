"""Metadata resources (PS3.18 10.4.1.1.2): the stored DICOM JSON of a study, series or
instance, served from the index, never from the files (field notes 1), with Available Transfer
Syntax UID added; study and series metadata assembled per series and cached by series version.
Also what an instance can be converted to (pixel_info, targets_of), shared with retrieve/."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from dicomweb_server.dicom_json import absolutize_bulk_uris_bytes
from dicomweb_server.errors import NotFoundError
from dicomweb_server.index.rows import MetadataRow, StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import NOT_FOR_WEB
from dicomweb_server.transcode.codecs import PixelInfo, available_targets

__all__ = ["metadata_json", "not_found", "pixel_info", "targets_of"]


def not_found(series: str | None, sop: str | None) -> NotFoundError:
    what = "instance" if sop else "series" if series else "study"
    return NotFoundError(f"no such {what} in the archive")


async def metadata_json(
    svc: Services, base_url: str, study: str, series: str | None = None, sop: str | None = None
) -> bytes:
    """The stored DICOM JSON of the instances, as one JSON array (no blob is read).

    Study and series metadata are assembled per series, and a series' part is kept in
    `svc.metadata` with the series' version (its instance count plus its revision, which
    `reindex` bumps; both only grow), so the version read in the same request tells a current
    part from a stale one, in every process. Series metadata is one statement whether the
    part is cached or not; study metadata is two (its series and their versions, then every
    uncached series at once), one when all its series are cached.
    """
    if sop is not None:
        found = await svc.index.metadata_texts(study, series, sop)
        if not found:
            raise not_found(series, sop)
        doc = ",".join(_with_available_ts(t, inst) for inst, t in found)
        return _json_array([doc.encode("utf-8")], base_url)
    if series is not None:
        part = await _series_part(svc, study, series)
        if part is None:
            raise not_found(series, None)
        return _json_array([part], base_url)
    versions = await svc.index.series_versions(study)
    if not versions:
        raise not_found(None, None)
    parts: dict[str, bytes] = {}
    for uid, version in versions:
        cached = _cached_part(svc, uid)
        if cached is not None and cached[0] == version:
            parts[uid] = cached[1]
    stale = [uid for uid, _ in versions if uid not in parts]
    if stale:
        for uid, (version, rows) in (await svc.index.series_metadata_many(study, stale)).items():
            parts[uid] = _cache_part(svc, uid, version, rows)
    return _json_array([parts.get(uid, b"") for uid, _ in versions], base_url)


async def _series_part(svc: Services, study: str, series: str) -> bytes | None:
    """A series' instances' DICOM JSON objects, comma-separated, BulkDataURIs root-relative;
    None when the study has no such series."""
    cached = _cached_part(svc, series)
    known = -1 if cached is None else cached[0]
    found = await svc.index.series_metadata(study, series, known)
    if found is None:
        return None
    version, rows = found
    if cached is not None and version == known:
        return cached[1]
    return _cache_part(svc, series, version, rows)


def _cached_part(svc: Services, series: str) -> tuple[int, bytes] | None:
    """(version, part) of a series as _cache_part kept it, or None."""
    entry = svc.metadata.get(("series", series))
    if entry is None:
        return None
    return int.from_bytes(entry[:8], "little"), entry[8:]


def _cache_part(svc: Services, series: str, version: int, rows: list[MetadataRow]) -> bytes:
    """The part of a series at `version` from its rows, kept in svc.metadata (the version as
    8 bytes before it; _cached_part reads it back)."""
    part = ",".join(_row_with_available_ts(r) for r in rows).encode("utf-8")
    svc.metadata.put(("series", series), version.to_bytes(8, "little") + part)
    return part


def _json_array(parts: list[bytes], base_url: str) -> bytes:
    return absolutize_bulk_uris_bytes(b"[" + b",".join(p for p in parts if p) + b"]", base_url)


def _row_with_available_ts(row: MetadataRow) -> str:
    info = None
    if row.number_of_frames > 0:
        info = _pixel_info_of_json(json.loads(row.metadata))
    return _add_available_ts(row.metadata, row.transfer_syntax_uid, info)


def _pixel_info_of_json(doc: dict[str, Any]) -> PixelInfo | None:
    """`pixel_info` from an instance's DICOM JSON (the values _LOCATE reads in SQL)."""

    def first_number(tag: str) -> int | None:
        values = doc.get(tag, {}).get("Value") or [None]
        v = values[0]
        return round(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    bits_allocated = first_number("00280100")
    if bits_allocated is None:
        return None
    photometric = (doc.get("00280004", {}).get("Value") or [None])[0]
    return PixelInfo(
        bits_allocated,
        first_number("00280101") or bits_allocated,
        first_number("00280002") or 1,
        first_number("00280103") or 0,
        str(photometric) if photometric else "MONOCHROME2",
        first_number("00280010") or 0,
        first_number("00280011") or 0,
        "7FE00008" in doc or "7FE00009" in doc,
        first_number("00280006") or 0,
    )


def pixel_info(inst: StoredInstance) -> PixelInfo | None:
    if inst.number_of_frames == 0 or inst.bits_allocated is None:
        return None
    return PixelInfo(
        inst.bits_allocated,
        inst.bits_stored or inst.bits_allocated,
        inst.samples_per_pixel or 1,
        inst.pixel_representation or 0,
        inst.photometric or "MONOCHROME2",
        inst.rows or 0,
        inst.columns or 0,
        inst.is_float,
        inst.planar_configuration or 0,
    )


def targets_of(inst: StoredInstance) -> tuple[str, ...]:
    return available_targets(inst.transfer_syntax_uid, pixel_info(inst))


def _with_available_ts(doc: str, inst: StoredInstance) -> str:
    return _add_available_ts(doc, inst.transfer_syntax_uid, pixel_info(inst))


def _add_available_ts(doc: str, stored_ts: str, info: PixelInfo | None) -> str:
    """Add Available Transfer Syntax UID (0008,3002), what this instance can be sent in, to
    the stored JSON text of an instance, in its place: "Attribute objects within a DICOM JSON
    Model object shall be ordered by their property name in ascending lexicographic
    (alphabetic) order" (PS3.18 F.2.2). The text is PostgreSQL's jsonb output, whose keys
    (all 8 characters) are in that order. A value (0008,3002) stored with the instance (a
    client sent one) is replaced: what the archive can send is the archive's to say."""
    if doc == "{}":
        return doc
    element = _available_ts_element(stored_ts, info)
    at = _top_level_key_from(doc)
    if at is None:
        return doc[:-1] + ", " + element + "}"
    if doc.startswith(_AVAILABLE_TS_KEY, at):
        _, end = _DECODER.raw_decode(doc, doc.index("{", at + len(_AVAILABLE_TS_KEY)))
        return doc[:at] + element + doc[end:]
    return doc[:at] + element + ", " + doc[at:]


_AVAILABLE_TS_KEY = '"00083002"'
# Attribute keys, `"ggggeeee": {`, of the tags from (0008,3002) on: those of groups below
# 1000 (the ones instances have; the literal `"0` makes the search fast), and the others.
# Nothing else in DICOM JSON text is an 8-digit hexadecimal key with an object for its value
# (a quote inside a string value is escaped).
_KEY_LOW = re.compile(
    r'"0(?:0(?:0(?:8(?:3(?:00[2-9A-F]|0[1-9A-F][0-9A-F]|[1-9A-F][0-9A-F]{2})'
    r"|[4-9A-F][0-9A-F]{3})|[9A-F][0-9A-F]{4})|[1-9A-F][0-9A-F]{5})|[1-9A-F][0-9A-F]{6})"
    r'": \{'
)
_KEY_HIGH = re.compile(r'"[1-9A-F][0-9A-F]{7}": \{')
# The start of a sequence item that holds attributes (the data set's own "{" is at 0).
_ITEM = re.compile(r'\{"[0-9A-F]{8}"')
_DECODER = json.JSONDecoder()


def _top_level_key_from(doc: str) -> int | None:
    """Where the first attribute of `doc` (DICOM JSON text, keys in order) whose tag is
    (0008,3002) or greater begins; None when there is none. Such keys may also be nested, in
    the items of an earlier sequence: a key met before any item is the data set's own, and a
    sequence met first is skipped whole (read by the C JSON decoder)."""
    at = 1
    while True:
        low = _KEY_LOW.search(doc, at)
        item = _ITEM.search(doc, at, len(doc) if low is None else low.end())
        if item is None:
            if low is not None:
                return low.start()
            high = _KEY_HIGH.search(doc, at)
            return None if high is None else high.start()
        high = _KEY_HIGH.search(doc, at, item.start())
        if high is not None:
            return high.start()
        # The item is of a sequence of this data set: the last key before it is the
        # sequence's ("vr", "Value" and empty items hold none).
        _, at = _DECODER.raw_decode(doc, doc.rfind('": {', at, item.start()) + 3)


@functools.lru_cache(maxsize=1024)
def _available_ts_element(stored_ts: str, info: PixelInfo | None) -> str:
    """`"00083002": {...}` for instances of this transfer syntax and pixel layout: a series
    shares one, so its metadata asks the codec registry once, not once per instance."""
    # Implicit VR and Big Endian are never sent (PS3.18 8.7.3): such an instance's first
    # syntax is what it is sent as, Explicit VR Little Endian.
    first = [] if stored_ts in NOT_FOR_WEB else [stored_ts]
    uids = [*first, *(t for t in available_targets(stored_ts, info) if t != stored_ts)]
    return f"{_AVAILABLE_TS_KEY}: {json.dumps({'vr': 'UI', 'Value': uids})}"
