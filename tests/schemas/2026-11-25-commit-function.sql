-- The index schema: the single source of truth, applied at every start (idempotent).
-- Searchable tables hold only complete instances: an instance row is inserted in the same
-- transaction that makes it visible, after its blob is durable. The pending half of the
-- two-phase store lives in blob_reservation (status 'pending' until the row is committed).

-- Trigram indexes make wildcard matching on names ("*smith*", "doe*") index-assisted.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- The first value of a US element of a DICOM JSON document, or NULL (used by the index to read
-- the Image Pixel module without parsing files).
CREATE OR REPLACE FUNCTION _us(doc jsonb, tag text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(doc -> tag -> 'Value' -> 0) = 'number'
                THEN (doc -> tag -> 'Value' ->> 0)::numeric::integer END
$$;

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
    -- The same groups joined with '=': the target of the trigram index.
    referring_physician_name_text text,
    patient_name_text        text,
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
CREATE INDEX IF NOT EXISTS study_patient_name_trgm
    ON study USING gin (patient_name_text gin_trgm_ops);
CREATE INDEX IF NOT EXISTS study_referring_trgm
    ON study USING gin (referring_physician_name_text gin_trgm_ops);
CREATE INDEX IF NOT EXISTS study_description_trgm
    ON study USING gin (study_description gin_trgm_ops);

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

-- One instance committed in one round trip (index.commit_instance): patient, study (locked, so
-- that the aggregates stay exact under concurrent stores), series, instance, aggregates, and
-- the reservation dropped. A duplicate SOP Instance UID or a series of another study rolls
-- back this instance's inserts (the inner block is a subtransaction) and is reported instead.
CREATE OR REPLACE FUNCTION dicomweb_commit_instance(
    p_patient_id text, p_issuer text, p_patient_name text, p_birth date, p_sex text,
    s_uid text, s_date date, s_time time, s_accession text, s_id text, s_description text,
    s_referring text[], s_patient_name text[], s_attrs jsonb, s_referring_text text,
    s_patient_name_text text,
    se_uid text, se_modality text, se_number integer, se_description text, se_body_part text,
    se_pps_date date, se_pps_time time, se_attrs jsonb,
    i_sop text, i_class text, i_number integer, i_acquisition timestamp, i_blob_key text,
    i_ts text, i_size bigint, i_sha256 bytea, i_frames integer, i_offsets bigint[],
    i_lengths bigint[], i_encapsulated boolean, i_metadata jsonb, i_bulk jsonb,
    OUT outcome text, OUT existing_sha256 bytea, OUT existing_study text, OUT existing_series text)
LANGUAGE plpgsql AS $$
DECLARE
    v_patient bigint;
    v_study bigint;
    v_series bigint;
    v_series_study bigint;
BEGIN
    BEGIN
        INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,
                             patient_sex)
        VALUES (p_patient_id, p_issuer, p_patient_name, p_birth, p_sex)
        ON CONFLICT (patient_id, issuer_of_patient_id) DO NOTHING;
        SELECT pk INTO v_patient FROM patient
        WHERE patient_id = p_patient_id AND issuer_of_patient_id = p_issuer;

        INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time, accession_number,
            study_id, study_description, referring_physician_name, patient_name, patient_id,
            patient_birth_date, patient_sex, attrs, referring_physician_name_text,
            patient_name_text)
        VALUES (v_patient, s_uid, s_date, s_time, s_accession, s_id, s_description, s_referring,
            s_patient_name, p_patient_id, p_birth, p_sex, s_attrs, s_referring_text,
            s_patient_name_text)
        ON CONFLICT (study_instance_uid) DO NOTHING;
        SELECT pk INTO v_study FROM study WHERE study_instance_uid = s_uid FOR UPDATE;

        INSERT INTO series (study_fk, series_instance_uid, modality, series_number,
            series_description, body_part_examined, pps_start_date, pps_start_time, attrs)
        VALUES (v_study, se_uid, se_modality, se_number, se_description, se_body_part,
            se_pps_date, se_pps_time, se_attrs)
        ON CONFLICT (series_instance_uid) DO NOTHING;
        SELECT pk, study_fk INTO v_series, v_series_study FROM series
        WHERE series_instance_uid = se_uid;
        IF v_series_study <> v_study THEN
            RAISE EXCEPTION USING ERRCODE = 'DW001';
        END IF;

        INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number,
            acquisition_datetime, blob_key, transfer_syntax_uid, size_bytes, sha256,
            number_of_frames, frame_offsets, frame_lengths, encapsulated, metadata, bulk_ranges)
        VALUES (v_series, i_sop, i_class, i_number, i_acquisition, i_blob_key, i_ts, i_size,
            i_sha256, i_frames, i_offsets, i_lengths, i_encapsulated, i_metadata, i_bulk)
        ON CONFLICT (sop_instance_uid) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'DW002';
        END IF;

        UPDATE series SET num_instances = num_instances + 1, updated_at = now()
        WHERE pk = v_series;
        UPDATE study SET
            num_instances = num_instances + 1,
            num_series = (SELECT count(*) FROM series WHERE study_fk = v_study
                          AND num_instances > 0),
            modalities_in_study = (
                SELECT coalesce(array_agg(DISTINCT modality ORDER BY modality), '{}')
                FROM series WHERE study_fk = v_study AND num_instances > 0
                                  AND modality IS NOT NULL),
            sop_classes_in_study = CASE WHEN i_class = ANY (sop_classes_in_study)
                                        THEN sop_classes_in_study
                                        ELSE array_append(sop_classes_in_study, i_class) END,
            updated_at = now()
        WHERE pk = v_study;
        DELETE FROM blob_reservation WHERE blob_key = i_blob_key;
        outcome := 'stored';
    EXCEPTION
        WHEN SQLSTATE 'DW001' THEN
            outcome := 'series-conflict';
        WHEN SQLSTATE 'DW002' THEN
            outcome := 'duplicate';
            SELECT i.sha256, st.study_instance_uid, se.series_instance_uid
            INTO existing_sha256, existing_study, existing_series
            FROM instance i JOIN series se ON se.pk = i.series_fk
            JOIN study st ON st.pk = se.study_fk
            WHERE i.sop_instance_uid = i_sop;
    END;
END
$$;
