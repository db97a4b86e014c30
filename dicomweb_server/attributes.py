"""Declarative tables of the attributes QIDO-RS matches on and returns.

The only map from DICOM tags to index columns (STYLE.md rule 4): `sql.py` takes column names
from here and nowhere else.

Sources: PS3.18 Table 10.6.1-5 (required matching attributes) and Tables 10.6.3-3, -4 and -5
(attributes returned for studies, series and instances).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ATTRIBUTES",
    "BY_KEYWORD",
    "BY_TAG",
    "COMPUTED",
    "DEFAULT_RETURN",
    "ITEM_KEYS",
    "LEVEL_TAGS",
    "MATCHING_PATHS",
    "PATIENT_MATCHING_TAGS",
    "Attribute",
    "Level",
    "tag_hex",
]

# Tags whose JSON key form tag_hex keeps (files may carry any number of private tags: bounded).
TAG_HEX_CACHE_SIZE = 8192


class Level(Enum):
    # DIMSE C-FIND/C-MOVE/C-GET only (Patient Root, PS3.4 C.6.1.1.2); QIDO-RS has no patient
    # resource. Patient attributes are matched on the study columns (the patient of a study
    # as stored), and a patient is listed when one of its studies matches.
    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True)
class Attribute:
    tag: int
    keyword: str
    vr: str
    level: Level
    # Index column QIDO matches on (table given by level); None for computed attributes. For a
    # sequence, the jsonb column holding its DICOM JSON under its tag (the level's `attrs`).
    column: str | None
    # For a sequence: the keys matched inside its items (PS3.4 C.2.2.2.6), named by the
    # attribute path `Sequence.Key` (PS3.18 8.3.4.1). Their `column` is None: they are matched
    # only through the sequence.
    items: tuple[Attribute, ...] = ()


S, R, INST = Level.STUDY, Level.SERIES, Level.INSTANCE

ATTRIBUTES: tuple[Attribute, ...] = (
    # Study level (Patient and General Study modules; PS3.18 Table 10.6.1-5).
    Attribute(0x00080020, "StudyDate", "DA", S, "study_date"),
    Attribute(0x00080030, "StudyTime", "TM", S, "study_time"),
    Attribute(0x00080050, "AccessionNumber", "SH", S, "accession_number"),
    Attribute(0x00080061, "ModalitiesInStudy", "CS", S, "modalities_in_study"),
    Attribute(0x00080090, "ReferringPhysicianName", "PN", S, "referring_physician_name"),
    Attribute(0x00081030, "StudyDescription", "LO", S, "study_description"),
    Attribute(0x00100010, "PatientName", "PN", S, "patient_name"),
    Attribute(0x00100020, "PatientID", "LO", S, "patient_id"),
    Attribute(0x00100030, "PatientBirthDate", "DA", S, "patient_birth_date"),
    Attribute(0x00100040, "PatientSex", "CS", S, "patient_sex"),
    Attribute(0x0020000D, "StudyInstanceUID", "UI", S, "study_instance_uid"),
    Attribute(0x00200010, "StudyID", "SH", S, "study_id"),
    # Series level (General Series module).
    Attribute(0x00080060, "Modality", "CS", R, "modality"),
    Attribute(0x0008103E, "SeriesDescription", "LO", R, "series_description"),
    Attribute(0x00180015, "BodyPartExamined", "CS", R, "body_part_examined"),
    Attribute(0x0020000E, "SeriesInstanceUID", "UI", R, "series_instance_uid"),
    Attribute(0x00200011, "SeriesNumber", "IS", R, "series_number"),
    Attribute(0x00400244, "PerformedProcedureStepStartDate", "DA", R, "pps_start_date"),
    Attribute(0x00400245, "PerformedProcedureStepStartTime", "TM", R, "pps_start_time"),
    # PS3.18 Table 10.6.1-5: Request Attributes Sequence > Scheduled Procedure Step ID and
    # > Requested Procedure ID. The sequence is matched in series.attrs (copied from the first
    # instance stored in the series, like the other series attributes).
    Attribute(
        0x00400275,
        "RequestAttributesSequence",
        "SQ",
        R,
        "attrs",
        items=(
            Attribute(0x00400009, "ScheduledProcedureStepID", "SH", R, None),
            Attribute(0x00401001, "RequestedProcedureID", "SH", R, None),
        ),
    ),
    # Instance level (SOP Common and General Image modules).
    Attribute(0x00080016, "SOPClassUID", "UI", INST, "sop_class_uid"),
    Attribute(0x00080018, "SOPInstanceUID", "UI", INST, "sop_instance_uid"),
    Attribute(0x0008002A, "AcquisitionDateTime", "DT", INST, "acquisition_datetime"),
    Attribute(0x00200013, "InstanceNumber", "IS", INST, "instance_number"),
    # Computed (returned, not matched).
    Attribute(0x00080056, "InstanceAvailability", "CS", S, None),
    Attribute(0x00080062, "SOPClassesInStudy", "UI", S, None),
    Attribute(0x00081190, "RetrieveURL", "UR", S, None),
    Attribute(0x00201206, "NumberOfStudyRelatedSeries", "IS", S, None),
    Attribute(0x00201208, "NumberOfStudyRelatedInstances", "IS", S, None),
    Attribute(0x00201209, "NumberOfSeriesRelatedInstances", "IS", R, None),
    Attribute(0x00201200, "NumberOfPatientRelatedStudies", "IS", Level.PATIENT, None),
    Attribute(0x00201202, "NumberOfPatientRelatedSeries", "IS", Level.PATIENT, None),
    Attribute(0x00201204, "NumberOfPatientRelatedInstances", "IS", Level.PATIENT, None),
)

# Matching keys of a patient-level search (PS3.4 Table C.6-1: the Patient IE keys we index).
PATIENT_MATCHING_TAGS: frozenset[int] = frozenset({0x00100010, 0x00100020, 0x00100030, 0x00100040})

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}
BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES}
COMPUTED: frozenset[int] = frozenset(a.tag for a in ATTRIBUTES if a.column is None) | {0x00080061}
# Keys inside a sequence, by (sequence tag, item key tag).
ITEM_KEYS: dict[tuple[int, int], Attribute] = {
    (a.tag, i.tag): i for a in ATTRIBUTES for i in a.items
}
# Every QIDO matching key as its attribute path (PS3.18 8.3.4.1): (attribute,) for a top-level
# key, (sequence, item key) for a key inside a sequence.
MATCHING_PATHS: tuple[tuple[Attribute, ...], ...] = tuple(
    path
    for a in ATTRIBUTES
    if a.column is not None
    for path in ([(a, i) for i in a.items] if a.items else [(a,)])
)

# Attributes copied into study.attrs / series.attrs at ingest (from the first instance stored
# in that study or series): what QIDO returns at those levels, `includefield=all` included,
# and what a C-FIND at those levels returns. At least every key PS3.4 Tables C.6-1, C.6-2 and
# C.6-5 name for the Patient and Study levels (the aggregates are computed): a C-FIND
# answered ReferencedStudySequence, PatientBirthTime... empty where Orthanc returned them.
LEVEL_TAGS: dict[Level, frozenset[int]] = {
    # Patient-level results are the Patient module attributes of the patient's first study.
    Level.PATIENT: frozenset(
        {
            0x00080005,  # SpecificCharacterSet
            0x00081120,  # ReferencedPatientSequence
            0x00100010,  # PatientName
            0x00100020,  # PatientID
            0x00100021,  # IssuerOfPatientID
            0x00100024,  # IssuerOfPatientIDQualifiersSequence
            0x00100030,  # PatientBirthDate
            0x00100032,  # PatientBirthTime
            0x00100040,  # PatientSex
            0x00101000,  # OtherPatientIDs
            0x00101001,  # OtherPatientNames
            0x00101002,  # OtherPatientIDsSequence
            0x00102160,  # EthnicGroup
            0x00104000,  # PatientComments
        }
    ),
    Level.STUDY: frozenset(
        {
            0x00080005,  # SpecificCharacterSet
            0x00080020,  # StudyDate
            0x00080030,  # StudyTime
            0x00080050,  # AccessionNumber
            0x00080051,  # IssuerOfAccessionNumberSequence
            0x00080080,  # InstitutionName
            0x00080090,  # ReferringPhysicianName
            0x00080201,  # TimezoneOffsetFromUTC
            0x00081030,  # StudyDescription
            0x00081032,  # ProcedureCodeSequence
            0x00081060,  # NameOfPhysiciansReadingStudy
            0x00081080,  # AdmittingDiagnosesDescription
            0x00081110,  # ReferencedStudySequence
            0x00081120,  # ReferencedPatientSequence
            0x00100010,  # PatientName
            0x00100020,  # PatientID
            0x00100021,  # IssuerOfPatientID
            0x00100024,  # IssuerOfPatientIDQualifiersSequence
            0x00100030,  # PatientBirthDate
            0x00100032,  # PatientBirthTime
            0x00100040,  # PatientSex
            0x00101000,  # OtherPatientIDs
            0x00101001,  # OtherPatientNames
            0x00101002,  # OtherPatientIDsSequence
            0x00101010,  # PatientAge
            0x00101020,  # PatientSize
            0x00101030,  # PatientWeight
            0x00102160,  # EthnicGroup
            0x00102180,  # Occupation
            0x001021B0,  # AdditionalPatientHistory
            0x00104000,  # PatientComments
            0x0020000D,  # StudyInstanceUID
            0x00200010,  # StudyID
            0x00321060,  # RequestedProcedureDescription
        }
    ),
    Level.SERIES: frozenset(
        {
            0x00080005,  # SpecificCharacterSet
            0x00080021,  # SeriesDate
            0x00080031,  # SeriesTime
            0x00080060,  # Modality
            0x00080070,  # Manufacturer
            0x00080201,  # TimezoneOffsetFromUTC
            0x0008103E,  # SeriesDescription
            0x00081010,  # StationName
            0x00081050,  # PerformingPhysicianName
            0x00081070,  # OperatorsName
            0x00081090,  # ManufacturerModelName
            0x00180015,  # BodyPartExamined
            0x00181030,  # ProtocolName
            0x00185100,  # PatientPosition
            0x0020000E,  # SeriesInstanceUID
            0x00200011,  # SeriesNumber
            0x00200052,  # FrameOfReferenceUID
            0x00200060,  # Laterality
            0x00400244,  # PerformedProcedureStepStartDate
            0x00400245,  # PerformedProcedureStepStartTime
            0x00400275,  # RequestAttributesSequence
        }
    ),
}

# Returned by default, PS3.18 Tables 10.6.3-3 (study), -4 (series), -5 (instance).
DEFAULT_RETURN: dict[Level, tuple[int, ...]] = {
    # PS3.4 Table C.6-1 required keys, and the patient-level counts.
    Level.PATIENT: (0x00080005, 0x00100010, 0x00100020, 0x00201200, 0x00201202, 0x00201204),
    Level.STUDY: (
        0x00080005, 0x00080020, 0x00080030, 0x00080050, 0x00080056, 0x00080061, 0x00080090,
        0x00080201, 0x00081030, 0x00081190, 0x00100010, 0x00100020, 0x00100030, 0x00100040,
        0x0020000D, 0x00200010, 0x00201206, 0x00201208,
    ),
    Level.SERIES: (
        0x00080005, 0x00080060, 0x00080201, 0x0008103E, 0x00081190, 0x0020000E, 0x00200011,
        0x00201209, 0x00400244, 0x00400245, 0x00400275,
    ),
    Level.INSTANCE: (
        0x00080005, 0x00080016, 0x00080018, 0x00080056, 0x00080201, 0x00081190, 0x00200013,
        0x00280008, 0x00280010, 0x00280011, 0x00280100,
    ),
}  # fmt: skip


@functools.lru_cache(maxsize=TAG_HEX_CACHE_SIZE)
def tag_hex(tag: int) -> str:
    """The 8-hex-digit form used as a DICOM JSON key (PS3.18 F.2.1.1). Cached: every element
    of every stored instance is keyed so, and formatting costs 3-4 times a cache hit."""
    return f"{tag:08X}"
