"""The rows the index hands out: plain frozen dataclasses (no asyncpg), so that the modules
that only read them need not know how they were fetched."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "ApiKey",
    "CommitResult",
    "MetadataRow",
    "SeriesState",
    "StoredBlob",
    "StoredInstance",
]


@dataclass(frozen=True)
class CommitResult:
    stored: bool  # a new instance row was inserted
    existing_sha256: bytes | None = None  # set when the SOP Instance UID was already stored
    existing_study_uid: str | None = None
    existing_series_uid: str | None = None
    conflict: str | None = None  # the rows disagree with the index (e.g. series in another study)
    failed: str | None = None  # not stored for another reason (reservation lost, bad value)
    invalid: bool = False  # `failed` because the data set holds a value the index refuses
    reservation_lost: bool = False  # nothing references the blob and no reservation guards it


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret_sha256: bytes
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    blob_key: str
    transfer_syntax_uid: str
    size_bytes: int
    number_of_frames: int
    frame_offsets: list[int] | None
    frame_lengths: list[int] | None
    encapsulated: bool
    # Image Pixel module values (PS3.3 C.7.6.3), None when absent or not integers.
    bits_allocated: int | None = None
    bits_stored: int | None = None
    samples_per_pixel: int | None = None
    pixel_representation: int | None = None
    photometric: str | None = None
    rows: int | None = None
    columns: int | None = None
    is_float: bool = False
    planar_configuration: int | None = None
    # Its series' revision, which `reindex` bumps when it rewrites a row of the series: the
    # blob key names the file, the blob key and revision this row's values. What is made of
    # both (frames decoded by the Image Pixel values above, renderings) is cached under both,
    # so no process serves what it made before a reindex.
    revision: int = 0


@dataclass(frozen=True)
class StoredBlob:
    """An instance row as `reindex` and `check` walk them."""

    pk: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    blob_key: str
    sha256: bytes
    size_bytes: int  # of its blob, as recorded when it was stored (or reindexed)


@dataclass(frozen=True)
class SeriesState:
    """A series as study and series metadata are made of it: its version, the instance count
    plus the revision `reindex` bumps, both only growing, so that a version names one state
    of the series' metadata (every change to its instance rows changes it in the same
    transaction)."""

    uid: str
    pk: int
    version: int
    revision: int  # the part of `version` that changes rows already stored


@dataclass(frozen=True)
class MetadataRow:
    """What series metadata needs of an instance, with its series' primary key, version and
    revision read in the same statement (they tell whether the series is still the state a
    response began with, and whether this row still is)."""

    series_pk: int
    version: int
    revision: int
    transfer_syntax_uid: str
    number_of_frames: int
    metadata: str  # DICOM JSON text, BulkDataURIs root-relative
