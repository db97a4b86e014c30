"""Reads of stored instances: locate (the rows WADO-RS and DIMSE retrieve by), metadata texts
and series versions (the metadata cache), bulk data listings, QIDO search, and the counts of
the landing page."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dicomweb_server.index.pool import Pooled, Record
from dicomweb_server.index.rows import MetadataRow, SeriesState, StoredInstance

__all__ = ["Reads"]

_LOCATE = """
SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,
       i.blob_key, i.transfer_syntax_uid, i.size_bytes, i.number_of_frames, i.frame_offsets,
       i.frame_lengths, i.encapsulated,
       _us(i.metadata, '00280100'), _us(i.metadata, '00280101'), _us(i.metadata, '00280002'),
       _us(i.metadata, '00280103'), i.metadata #>> '{{00280004,Value,0}}',
       _us(i.metadata, '00280010'), _us(i.metadata, '00280011'),
       i.metadata ?| ARRAY['7FE00008', '7FE00009'], _us(i.metadata, '00280006'),
       se.revision{extra}
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
WHERE st.study_instance_uid = $1
  AND ($2::text IS NULL OR se.series_instance_uid = $2)
  AND ($3::text IS NULL OR i.sop_instance_uid = $3)
ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk
"""

# The BulkDataURIs of an instance's metadata, at any depth (strict mode: lax `**` unwraps
# arrays and would give nested values twice), and its bulk byte ranges.
_BULK_LISTING = (
    ", ARRAY(SELECT jsonb_path_query(i.metadata, 'strict $.**.BulkDataURI') #>> '{}'),"
    " i.bulk_ranges::text"
)


def _tag_path_order(path: str) -> tuple[int, ...]:
    """`54000100/1/54001010` -> (0x54000100, 1, 0x54001010): tags and item numbers compared
    as numbers, so values come in the order of the data set."""
    return tuple(int(p, 16) if i % 2 == 0 else int(p) for i, p in enumerate(path.split("/")))


# A study's series that hold instances (or the one named), in the order metadata lists them,
# each with its version (rows.SeriesState): what study and series metadata are made of.
_SERIES_STATES = """
SELECT se.series_instance_uid, se.pk, se.num_instances + se.revision, se.revision
FROM series se
JOIN study st ON st.pk = se.study_fk
WHERE st.study_instance_uid = $1 AND ($2::text IS NULL OR se.series_instance_uid = $2)
  AND se.num_instances > 0
ORDER BY se.series_number NULLS LAST, se.pk
"""

# The instances of the series $1 (primary keys, in metadata order) as a state of each names
# them (rows.SeriesState): the first `count` of series $1[k] by primary key, $2[k] its count
# (within a study, primary keys follow commit order: dicomweb_commit_instance locks the study
# row before it inserts, and the instance sequence hands out one value at a time, CACHE 1,
# its default: so the instances a snapshot with that count holds are those first ones, and
# an instance stored since is not among them). In metadata order: series in the
# order given, instances by Instance Number. Reads only plain columns and the metadata text:
# every `->` on a compressed jsonb value decompresses it, and the nine lookups of _LOCATE
# cost more than the rest of this statement. The series' version and revision come with
# each row, read in the same snapshot.
_ORDERED_INSTANCES = """
FROM unnest($1::bigint[], $2::int[]) WITH ORDINALITY AS s(pk, c, n)
CROSS JOIN LATERAL (SELECT i.pk, i.instance_number FROM instance i
                    WHERE i.series_fk = s.pk ORDER BY i.pk LIMIT s.c) i
ORDER BY s.n, i.instance_number NULLS LAST, i.pk
"""
_METADATA_COLUMNS = """
SELECT se.pk, se.num_instances + se.revision, se.revision, i.transfer_syntax_uid,
       i.number_of_frames, i.metadata::text
"""
# The first $3 instances: their order found on keys alone (a sort of the rows with their
# metadata text would turn every instance's jsonb into text), then their rows.
_METADATA_FIRST = f"""
WITH k AS (SELECT i.pk, s.n, i.instance_number {_ORDERED_INSTANCES} LIMIT $3)
{_METADATA_COLUMNS}
FROM k JOIN instance i ON i.pk = k.pk JOIN series se ON se.pk = i.series_fk
ORDER BY k.n, k.instance_number NULLS LAST, k.pk
"""
# The keys of the instances of the series, and the series' revisions, of one snapshot.
_METADATA_KEYS = f"""
SELECT ARRAY(SELECT i.pk {_ORDERED_INSTANCES}),
       ARRAY(SELECT se.revision
             FROM unnest($1::bigint[]) WITH ORDINALITY AS s(pk, n)
             JOIN series se ON se.pk = s.pk ORDER BY s.n)
"""
# The rows of instances by key, in the order of the keys.
_METADATA_ROWS = f"""
{_METADATA_COLUMNS}
FROM unnest($1::bigint[]) WITH ORDINALITY AS k(pk, n)
JOIN instance i ON i.pk = k.pk JOIN series se ON se.pk = i.series_fk
ORDER BY k.n
"""
# What only the server knows of a series: its first instance's blob key, drawn at random when
# it was stored (the secret of a metadata body's multipart boundary).
_SERIES_SECRET = "SELECT blob_key FROM instance WHERE series_fk = $1 ORDER BY pk LIMIT 1"


def _pks_and_counts(states: Sequence[SeriesState]) -> tuple[list[int], list[int]]:
    return [s.pk for s in states], [s.version - s.revision for s in states]


class Reads(Pooled):
    """The statements that read instances and series."""

    async def locate(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[StoredInstance]:
        rows = await self._fetch(_LOCATE.format(extra=""), study, series, sop)
        return [StoredInstance(*row) for row in rows]

    async def metadata_texts(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[tuple[StoredInstance, str]]:
        rows = await self._fetch(_LOCATE.format(extra=", i.metadata::text"), study, series, sop)
        return [(StoredInstance(*row[:-1]), row[-1]) for row in rows]

    async def series_states(self, study: str, series: str | None = None) -> list[SeriesState]:
        """The series of a study that hold instances (only `series`, when given), in the order
        metadata lists them, with their versions."""
        rows = await self._fetch(_SERIES_STATES, study, series)
        return [SeriesState(*row) for row in rows]

    async def metadata_first(self, states: Sequence[SeriesState], count: int) -> list[MetadataRow]:
        """The first `count` instances of the series as `states` name them, in metadata
        order."""
        rows = await self._fetch(_METADATA_FIRST, *_pks_and_counts(states), count)
        return [MetadataRow(*row) for row in rows]

    async def metadata_keys(self, states: Sequence[SeriesState]) -> tuple[list[int], list[int]]:
        """(the primary keys of the instances of the series as `states` name them, in
        metadata order; the series' revisions now, in the order given), of one snapshot."""
        row = await self._fetchrow(_METADATA_KEYS, *_pks_and_counts(states))
        assert row is not None
        return list(row[0]), list(row[1])

    async def metadata_rows(self, keys: Sequence[int]) -> list[MetadataRow]:
        """The instances of these keys (metadata_keys), in the order of the keys."""
        rows = await self._fetch(_METADATA_ROWS, list(keys))
        return [MetadataRow(*row) for row in rows]

    async def series_secret(self, series_pk: int) -> str:
        """The blob key of the series' first instance ('' if it has none): a value only the
        server knows, drawn at random when the instance was stored."""
        row = await self._fetchrow(_SERIES_SECRET, series_pk)
        return "" if row is None else str(row[0])

    async def bulk_range(self, study: str, series: str, sop: str, path: str) -> list[Any] | None:
        rows = await self._fetch(_LOCATE.format(extra=", i.bulk_ranges -> $4"), study, series, sop,
                                 path)  # fmt: skip
        if not rows:
            return None
        value = rows[0][-1]
        return list(json.loads(value)) if value else []

    async def bulk_listing(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[tuple[StoredInstance, list[str], dict[str, list[Any]]]]:
        """Per instance, in retrieve order: the instance, the tag paths of every BulkDataURI its
        metadata holds (nested ones too, in DICOM order), and its recorded bulk byte ranges."""
        rows = await self._fetch(_LOCATE.format(extra=_BULK_LISTING), study, series, sop)
        out = []
        for row in rows:
            paths = [uri.rpartition("/bulk/")[2] for uri in row[-2]]
            paths.sort(key=_tag_path_order)
            out.append((StoredInstance(*row[:-2]), paths, json.loads(row[-1])))
        return out

    async def search(self, sql_text: str, args: Sequence[Any]) -> list[Record]:
        return await self._fetch(sql_text, *args)

    async def search_keys(self, sql_text: str, args: Sequence[Any]) -> list[int]:
        """The first column of each row, primary keys (sql.compile_search_keys)."""
        return [row[0] for row in await self._fetch(sql_text, *args)]

    async def counts(self) -> dict[str, int]:
        row = await self._fetchrow(
            "SELECT (SELECT count(DISTINCT patient_fk) FROM study WHERE num_instances > 0)"
            " AS patients,"
            " (SELECT count(*) FROM study WHERE num_instances > 0) AS studies,"
            " (SELECT count(*) FROM series WHERE num_instances > 0) AS series,"
            " (SELECT count(*) FROM instance) AS instances"
        )
        assert row is not None
        return dict(row)
