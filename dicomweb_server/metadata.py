"""Metadata resources (PS3.18 10.4.1.1.2): the stored DICOM JSON of a study, series or
instance, served from the index, never from the files (field notes 1), with Available Transfer
Syntax UID added; study and series metadata assembled per series and cached by series version.
Also what an instance can be converted to (pixel_info, targets_of), shared with retrieve/."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio

from dicomweb_server.config import VERSION
from dicomweb_server.errors import NotFoundError, ServiceUnavailableError
from dicomweb_server.index.rows import MetadataRow, SeriesState, StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import NOT_FOR_WEB
from dicomweb_server.response_json import absolutize_bulk_uris_bytes
from dicomweb_server.transcode.codecs import PixelInfo, available_targets, codec_fingerprint

__all__ = [
    "METADATA_FETCH_ROWS",
    "METADATA_FORMAT",
    "METADATA_PART_CACHE_MAX_BYTES",
    "MetadataChangedError",
    "metadata_digest",
    "metadata_json",
    "metadata_runs",
    "not_found",
    "pixel_info",
    "series_states",
    "targets_of",
]

# Instances of a study's or series' metadata read from the database at a time, and so held in
# memory at a time (2.7 KB of JSON each for a small CT): a study of 5,000 instances was read
# in one statement and built whole, 55 MB for a 13 MB body.
METADATA_FETCH_ROWS = 200
# A series' metadata up to this size is kept in the metadata cache (config.
# METADATA_CACHE_BYTES), by version; a larger one is read again when asked for. 4 MiB: about
# 1,500 instances, OHIF's usual series and more.
METADATA_PART_CACHE_MAX_BYTES = 4 * 1024 * 1024
# Rows rendered on the event loop; more, in a worker thread.
METADATA_INLINE_ROWS = 20
# The version of what this module writes into a metadata body beyond the stored rows: raise
# it whenever the same rows would make other bytes (Available Transfer Syntax UID, the order
# of instances), so that entity tags made before change with it (metadata_digest).
METADATA_FORMAT = 1


def not_found(series: str | None, sop: str | None) -> NotFoundError:
    what = "instance" if sop else "series" if series else "study"
    return NotFoundError(f"no such {what} in the archive")


async def metadata_json(svc: Services, base_url: str, study: str, series: str, sop: str) -> bytes:
    """The stored DICOM JSON of an instance, as a one-element JSON array (no blob is read)."""
    found = await svc.index.metadata_texts(study, series, sop)
    if not found:
        raise not_found(series, sop)
    doc = ",".join(_with_available_ts(t, inst) for inst, t in found)
    return absolutize_bulk_uris_bytes(b"[" + doc.encode("utf-8") + b"]", base_url)


async def series_states(svc: Services, study: str, series: str | None) -> list[SeriesState]:
    """The series a study's (or a series') metadata is made of, with their versions: one
    statement, all an unchanged body costs (a 304 reads nothing else)."""
    states = await svc.index.series_states(study, series)
    if not states:
        raise not_found(series, None)
    return states


def metadata_digest(states: list[SeriesState], base_url: str, media: str) -> str:
    """32 hex digits of what the bytes of a study's or series' metadata body depend on, known
    before a byte of it is read: the series and their versions, in order (the instances and
    their order are those of a version), the base URL of the BulkDataURIs, the media type,
    and what writes the body (this server's version, METADATA_FORMAT, and the codecs that
    make its Available Transfer Syntax UIDs). The same digest is the same body: a strong
    entity tag (RFC 9110 8.8.3)."""
    digest = hashlib.sha256()
    for text in (str(METADATA_FORMAT), VERSION, _codecs(), media, base_url):
        digest.update(text.encode("utf-8", "surrogateescape") + b"\x00")
    for state in states:
        digest.update(f"{state.uid}/{state.version}\x00".encode("ascii", "replace"))
    return digest.hexdigest()[:32]


@functools.cache
def _codecs() -> str:
    return codec_fingerprint()


class MetadataChangedError(ServiceUnavailableError):
    """A series changed while its metadata was read (an instance stored, a reindex): what was
    read no longer makes the body the entity tag names."""

    def __init__(self) -> None:
        super().__init__(
            "the metadata changed while it was read; ask again", headers={"Retry-After": "1"}
        )


async def metadata_runs(
    svc: Services, states: list[SeriesState], base_url: str
) -> AsyncIterator[bytes]:
    """The instances of `states`' series as DICOM JSON objects, comma-separated, a run at a
    time: a cached series whole, the others METADATA_FETCH_ROWS instances at a time at most
    (the runs of a batch split by series). The runs joined by commas within `[` `]` are the
    body metadata_digest names; MetadataChangedError when a series read is no longer of the
    version in `states`.

    A series' run is kept in `svc.metadata` with its version (up to
    METADATA_PART_CACHE_MAX_BYTES), so that the version read in a later request tells a
    current part from a stale one, in every process. Series not cached are read together
    (_stale_batches): one statement for METADATA_FETCH_ROWS instances or fewer, however many
    series hold them."""
    cached = {s.pk: part for s in states if (part := _cached_part(svc, s)) is not None}
    stale = [s for s in states if s.pk not in cached]
    rows = _Rows(_stale_batches(svc, stale))
    try:
        # Every version checked before the first run is given: the response has not started,
        # so a series grown since `states` is a body begun again, not one cut short (a cached
        # series or a first batch past METADATA_INLINE_BYTES started it before the rest).
        await rows.start(stale)
        for state in states:
            if state.pk in cached:
                part = cached.pop(state.pk)[8:]  # copied one series at a time
                yield absolutize_bulk_uris_bytes(part, base_url)
                continue
            kept: list[bytes] | None = []
            size = 0
            while (run_rows := await rows.of(state)) is not None:
                run = await _rendered(svc, run_rows)
                size += len(run) + 1
                if size > METADATA_PART_CACHE_MAX_BYTES:
                    kept = None  # too large to keep: not held either
                elif kept is not None:
                    kept.append(run)
                yield absolutize_bulk_uris_bytes(run, base_url)
            if kept:
                _cache_part(svc, state, b",".join(kept))
    finally:
        await rows.batches.aclose()


class _Rows:
    """The rows of _stale_batches handed out a series at a time."""

    def __init__(self, batches: AsyncGenerator[list[MetadataRow], None]) -> None:
        self.batches = batches
        self._pending: list[MetadataRow] = []

    async def start(self, stale: list[SeriesState]) -> None:
        """Reads the first batch (and, past it, the keys of every instance) and checks each
        row of it against its series' state: MetadataChangedError before anything is given."""
        if not stale:
            return
        try:
            self._pending = await anext(self.batches)
        except StopAsyncIteration:
            return
        by_pk = {s.pk: s for s in stale}
        for row in self._pending:
            if row.revision != by_pk[row.series_pk].revision:
                raise MetadataChangedError

    async def of(self, state: SeriesState) -> list[MetadataRow] | None:
        """The next rows of the series (those of one batch), None when it has no more.
        MetadataChangedError when the series' revision is no longer `state`'s (`reindex`
        rewrote rows). An instance stored since (the version grown) changes no row of those
        the state names, and is not among them (index.reads._ORDERED_INSTANCES)."""
        if not self._pending:
            try:  # not anext(..., default): a tuple default is a SystemError in Python 3.11
                self._pending = await anext(self.batches)
            except StopAsyncIteration:
                self._pending = []
        count = 0
        for row in self._pending:
            if row.series_pk != state.pk:
                break
            if row.revision != state.revision:
                raise MetadataChangedError
            count += 1
        if count == 0:
            return None
        rows, self._pending = self._pending[:count], self._pending[count:]
        return rows


async def _stale_batches(
    svc: Services, stale: list[SeriesState]
) -> AsyncGenerator[list[MetadataRow], None]:
    """The instances of the series `stale` as their states name them (the first of each
    series by primary key: index.reads._ORDERED_INSTANCES), in metadata order,
    METADATA_FETCH_ROWS at a time: the first batch as rows (one more asked for: is there
    more?); past it, the keys of the others with the series' revisions, then rows by key.
    The keys are read before the first batch is given (_Rows.start: every check that can
    begin the body again comes before the response starts). No connection is held between
    batches."""
    if not stale:
        return
    first = await svc.index.metadata_first(stale, METADATA_FETCH_ROWS + 1)
    if len(first) <= METADATA_FETCH_ROWS:
        yield first
        return
    keys, revisions = await svc.index.metadata_keys(stale)
    if revisions != [s.revision for s in stale]:
        raise MetadataChangedError
    yield first[:METADATA_FETCH_ROWS]
    del first
    for at in range(METADATA_FETCH_ROWS, len(keys), METADATA_FETCH_ROWS):
        yield await svc.index.metadata_rows(keys[at : at + METADATA_FETCH_ROWS])


async def _rendered(svc: Services, rows: list[MetadataRow]) -> bytes:
    """The rows' DICOM JSON objects, comma-separated, BulkDataURIs root-relative; rendered in a
    worker thread past METADATA_INLINE_ROWS rows (an image's JSON is parsed for its pixel
    layout: about 50 microseconds)."""
    if len(rows) <= METADATA_INLINE_ROWS:
        return _render(rows)
    return await anyio.to_thread.run_sync(_render, rows, limiter=svc.limiter)


def _render(rows: list[MetadataRow]) -> bytes:
    return ",".join(_row_with_available_ts(r) for r in rows).encode("utf-8")


def _cached_part(svc: Services, state: SeriesState) -> bytes | None:
    """What _cache_part kept of a series, the part after 8 bytes, if it is of the series'
    current version."""
    entry = svc.metadata.get(("series", state.uid))
    if entry is None or int.from_bytes(entry[:8], "little") != state.version:
        return None
    return entry


def _cache_part(svc: Services, state: SeriesState, part: bytes) -> None:
    """Keep the part of a series at its version (as 8 bytes before it)."""
    svc.metadata.put(("series", state.uid), state.version.to_bytes(8, "little") + part)


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
