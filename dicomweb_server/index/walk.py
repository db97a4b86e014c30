"""Walks of the stored instances and their blobs, for the commands that work on the whole
archive: `reindex` (each instance's rows rebuilt from its file) and `check` (the index
against the blob store). Reads only, in pages (keyset pagination on the row key), so that
memory stays bounded and no statement holds a snapshot for the whole walk."""

from __future__ import annotations

from collections.abc import Sequence

from dicomweb_server.index.pool import Pooled
from dicomweb_server.index.rows import StoredBlob

__all__ = ["Walk"]

# Which of some Study Instance UIDs the index holds no stored instance of, in the order given
# (the `--study` of `reindex` and `check`: a UID mistyped walked nothing, and passed).
_UNKNOWN_STUDIES = """
SELECT named.uid FROM unnest($1::text[]) WITH ORDINALITY AS named (uid, n)
WHERE NOT EXISTS (
    SELECT 1 FROM study st
    JOIN series se ON se.study_fk = st.pk
    JOIN instance i ON i.series_fk = se.pk
    WHERE st.study_instance_uid = named.uid
)
ORDER BY named.n
"""
_STORED_COLUMNS = """
SELECT i.pk, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.blob_key,
       i.sha256, i.size_bytes
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
"""
# Stored instances in row-key order, from a key on, optionally of some studies only.
_STORED_INSTANCES = (
    _STORED_COLUMNS
    + "WHERE i.pk > $1 AND ($3::text[] IS NULL OR st.study_instance_uid = ANY($3::text[]))"
    + " ORDER BY i.pk LIMIT $2"
)
# Each stored instance's blob key and recorded size, in row-key order, from a key on: the
# table alone (its primary key walked), no join: `check` reads a million in seconds. The
# UIDs of the few whose blob is not whole are read after (instances_by_key).
_BLOB_SIZES = "SELECT pk, blob_key, size_bytes FROM instance WHERE pk > $1 ORDER BY pk LIMIT $2"
# The same of some studies only. A statement of its own, not `$3 IS NULL OR ...`: a prepared
# statement's generic plan cannot tell the two cases apart.
_BLOB_SIZES_OF_STUDIES = """
SELECT i.pk, i.blob_key, i.size_bytes
FROM instance i
JOIN series se ON se.pk = i.series_fk
JOIN study st ON st.pk = se.study_fk
WHERE i.pk > $1 AND st.study_instance_uid = ANY($3::text[])
ORDER BY i.pk
LIMIT $2
"""
# Which of some blob keys an instance row or a reservation holds. One statement, so one
# snapshot (READ COMMITTED takes one per statement): a commit moves a key from
# blob_reservation to instance in one transaction, and a blob repair (Store.replace_blob)
# moves the old key the other way, so a key held throughout is found in one of the two. Two
# statements could miss a key that moved between them.
_REFERENCED = """
SELECT blob_key FROM instance WHERE blob_key = ANY($1::text[])
UNION ALL
SELECT blob_key FROM blob_reservation WHERE blob_key = ANY($1::text[])
"""


class Walk(Pooled):
    """The stored instances in pages, and which blob keys the index references."""

    async def stored_instances(
        self, after_pk: int, limit: int, studies: Sequence[str] | None = None
    ) -> list[StoredBlob]:
        """Up to `limit` stored instances with a row key above `after_pk`, in key order, of
        the given studies only when `studies` is not None."""
        rows = await self._fetch(_STORED_INSTANCES, after_pk, limit, studies)
        return [StoredBlob(*row) for row in rows]

    async def blob_sizes(
        self, after_pk: int, limit: int, studies: Sequence[str] | None = None
    ) -> list[tuple[int, str, int]]:
        """Up to `limit` (row key, blob key, recorded size) of the stored instances with a
        row key above `after_pk`, in key order, of the given studies only when `studies` is
        not None."""
        if studies is None:
            rows = await self._fetch(_BLOB_SIZES, after_pk, limit)
        else:
            rows = await self._fetch(_BLOB_SIZES_OF_STUDIES, after_pk, limit, list(studies))
        return [(row[0], row[1], row[2]) for row in rows]

    async def instances_by_key(self, pks: Sequence[int]) -> dict[int, StoredBlob]:
        """The instance rows of these row keys as they are now (those still there)."""
        rows = await self._fetch(_STORED_COLUMNS + "WHERE i.pk = ANY($1::bigint[])", list(pks))
        return {row["pk"]: StoredBlob(*row) for row in rows}

    async def referenced_keys(self, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that an instance row or a blob reservation (a store in progress, or
        one a crash left for the next start's recovery) holds."""
        rows = await self._fetch(_REFERENCED, list(keys))
        return {row["blob_key"] for row in rows}

    async def unknown_studies(self, studies: Sequence[str]) -> list[str]:
        """Those of `studies` (Study Instance UIDs, each once) that the index holds no stored
        instance of, in the order given."""
        named = list(dict.fromkeys(studies))
        rows = await self._fetch(_UNKNOWN_STUDIES, named)
        return [row["uid"] for row in rows]

    async def has_schema(self) -> bool:
        """Whether the index schema is there (`initdb`, or a server's start, applied it)."""
        found = await self._fetchrow(
            "SELECT to_regclass('instance') IS NOT NULL AND"
            " to_regclass('blob_reservation') IS NOT NULL"
        )
        return bool(found and found[0])
