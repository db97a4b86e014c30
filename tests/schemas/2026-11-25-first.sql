-- The index schema: the single source of truth, applied at every start (idempotent).
-- Searchable tables hold only complete instances: an instance row is inserted in the same
-- transaction that makes it visible, after its blob is durable. The pending half of the
-- two-phase store lives in blob_reservation (status 'pending' until the row is committed).

CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY);
INSERT INTO schema_version VALUES (1) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS patient (
    pk                   bigserial PRIMARY KEY,
    patient_id           text NOT NULL,
    issuer_of_patient_id text NOT NULL DEFAULT '',
    patient_name         text,
    patient_birth_date   date,
    patient_sex          text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (patient_id, issuer_of_patient_id)
);

CREATE TABLE IF NOT EXISTS study (
    pk                       bigserial PRIMARY KEY,
    patient_fk               bigint NOT NULL REFERENCES patient (pk),
    study_instance_uid       text NOT NULL UNIQUE,
    study_date               date,
    study_time               time,
    accession_number         text,
    study_id                 text,
    study_description        text,
    -- PN columns hold the lower-cased component groups (alphabetic, ideographic, phonetic)
    -- so that PN matching is case-insensitive and works on any group.
    referring_physician_name text[],
    patient_name             text[],
    patient_id               text,
    patient_birth_date       date,
    patient_sex              text,
    -- Aggregates, maintained under the study row lock by every commit (always consistent).
    modalities_in_study      text[] NOT NULL DEFAULT '{}',
    sop_classes_in_study     text[] NOT NULL DEFAULT '{}',
    num_series               integer NOT NULL DEFAULT 0,
    num_instances            integer NOT NULL DEFAULT 0,
    -- DICOM JSON of the study-level attributes (attributes.LEVEL_TAGS) of the first instance.
    attrs                    jsonb NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS study_patient_id ON study (patient_id);
CREATE INDEX IF NOT EXISTS study_accession ON study (accession_number);
CREATE INDEX IF NOT EXISTS study_date_idx ON study (study_date);
CREATE INDEX IF NOT EXISTS study_patient_fk ON study (patient_fk);
CREATE INDEX IF NOT EXISTS study_modalities ON study USING gin (modalities_in_study);
CREATE INDEX IF NOT EXISTS study_patient_name ON study USING gin (patient_name);

CREATE TABLE IF NOT EXISTS series (
    pk                     bigserial PRIMARY KEY,
    study_fk               bigint NOT NULL REFERENCES study (pk),
    series_instance_uid    text NOT NULL UNIQUE,
    modality               text,
    series_number          integer,
    series_description     text,
    body_part_examined     text,
    pps_start_date         date,
    pps_start_time         time,
    num_instances          integer NOT NULL DEFAULT 0,
    attrs                  jsonb NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS series_study_fk ON series (study_fk);
CREATE INDEX IF NOT EXISTS series_modality ON series (modality);

CREATE TABLE IF NOT EXISTS instance (
    pk                   bigserial PRIMARY KEY,
    series_fk            bigint NOT NULL REFERENCES series (pk),
    sop_instance_uid     text NOT NULL UNIQUE,
    sop_class_uid        text NOT NULL,
    instance_number      integer,
    acquisition_datetime timestamp,
    blob_key             text NOT NULL UNIQUE,
    transfer_syntax_uid  text NOT NULL,
    size_bytes           bigint NOT NULL,
    sha256               bytea NOT NULL,
    number_of_frames     integer NOT NULL DEFAULT 0,
    -- Per frame: offset and length in the blob of its bytes (native) or of its fragment items
    -- (encapsulated: item headers included). NULL when frames are not range-readable
    -- (deflated, big endian, bit-packed frames not on byte boundaries).
    frame_offsets        bigint[],
    frame_lengths        bigint[],
    encapsulated         boolean NOT NULL DEFAULT false,
    -- DICOM JSON of the whole instance; bulk data replaced by BulkDataURIs relative to the
    -- DICOMweb root ("/studies/..."), made absolute when served.
    metadata             jsonb NOT NULL,
    -- Bulk data of the instance: {"<tag path>": [offset, length, vr]} for range reads.
    bulk_ranges          jsonb NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS instance_series_fk ON instance (series_fk);
CREATE INDEX IF NOT EXISTS instance_sop_class ON instance (sop_class_uid);

-- A blob written (or being written) whose index row is not committed yet. Rows whose owner
-- process is gone (its advisory lock released) are rolled back at start: blob deleted, row
-- deleted.
CREATE TABLE IF NOT EXISTS blob_reservation (
    blob_key    text PRIMARY KEY,
    owner       bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
