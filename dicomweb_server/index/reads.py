"""Reads of stored instances: locate (the rows WADO-RS and DIMSE retrieve by), metadata texts
and series versions (the metadata cache), bulk data listings, QIDO search, and the counts of
the landing page."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dicomweb_server.index.pool import Pooled, Record
from dicomweb_server.index.rows import MetadataRow, StoredInstance

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


# A series' version: its instance count plus its revision (bumped by `reindex`). Both only
# grow, so a version names one state of a series' metadata.
_SERIES_VERSIONS = """
SELECT se.series_instance_uid, se.num_instances + se.revision
FROM series se
JOIN study st ON st.pk = se.study_fk
WHERE st.study_instance_uid = $1 AND se.num_instances > 0
ORDER BY se.series_number NULLS LAST, se.pk
"""

# Reads only plain columns and the metadata text: every `->` on a compressed jsonb value
# decompresses it, and the nine lookups of _LOCATE cost more than the rest of this statement.
_SERIES_METADATA = """
SELECT se.num_instances + se.revision, i.transfer_syntax_uid, i.number_of_frames,
       i.metadata::text
FROM series se
JOIN study st ON st.pk = se.study_fk
LEFT JOIN instance i ON i.series_fk = se.pk AND se.num_instances + se.revision <> $3
WHERE st.study_instance_uid = $1 AND se.series_instance_uid = $2 AND se.num_instances > 0
ORDER BY i.instance_number NULLS LAST, i.pk
"""

# Study metadata: the instances of the study's series that are not cached, in one statement.
_SERIES_METADATA_MANY = """
SELECT se.series_instance_uid, se.num_instances + se.revision, i.transfer_syntax_uid,
       i.number_of_frames, i.metadata::text
FROM series se
JOIN study st ON st.pk = se.study_fk
JOIN instance i ON i.series_fk = se.pk
WHERE st.study_instance_uid = $1 AND se.series_instance_uid = ANY($2::text[])
ORDER BY se.pk, i.instance_number NULLS LAST, i.pk
"""


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

    async def series_versions(self, study: str) -> list[tuple[str, int]]:
        """(Series Instance UID, version) of a study's series that hold instances, in the order
        metadata lists them. A version (_SERIES_VERSIONS) names one state of a series."""
        rows = await self._fetch(_SERIES_VERSIONS, study)
        return [(row[0], row[1]) for row in rows]

    async def series_metadata(
        self, study: str, series: str, known_version: int
    ) -> tuple[int, list[MetadataRow]] | None:
        """(the series' version, and, unless that is `known_version`, each instance's transfer
        syntax, number of frames and DICOM JSON text in metadata order), from one statement,
        so the version and the rows are of one snapshot; None: no such series."""
        rows = await self._fetch(_SERIES_METADATA, study, series, known_version)
        if not rows:
            return None
        version = rows[0][0]
        if version == known_version:
            return version, []
        return version, [MetadataRow(row[1], row[2], row[3]) for row in rows]

    async def series_metadata_many(
        self, study: str, series: Sequence[str]
    ) -> dict[str, tuple[int, list[MetadataRow]]]:
        """series_metadata of several series of a study in one statement (a study of many
        series costs two statements on first access, not one per series): per Series
        Instance UID found, its version and rows, read in one snapshot."""
        rows = await self._fetch(_SERIES_METADATA_MANY, study, list(series))
        out: dict[str, tuple[int, list[MetadataRow]]] = {}
        for row in rows:
            out.setdefault(row[0], (row[1], []))[1].append(MetadataRow(row[2], row[3], row[4]))
        return out

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
