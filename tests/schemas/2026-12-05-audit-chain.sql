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

-- An index created only when missing: CREATE INDEX IF NOT EXISTS takes a SHARE lock on its
-- table before it looks, held to the end of the schema's transaction, so each start of a command
-- or worker made every STOW wait, and deadlocked with a `reindex` that had rewritten a series
-- row and went on to its study row (found by a load run). to_regclass looks without a lock.
CREATE OR REPLACE FUNCTION _create_index_if_missing(name text, definition text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass(format('%I.%I', current_schema(), name)) IS NULL THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I %s', name, definition);
    END IF;
END
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
-- Columns added after the first schema (an index created by it is brought up to date here),
-- and series.revision (below). Added only when missing: ALTER TABLE takes an ACCESS EXCLUSIVE
-- lock before it looks, and queued behind a long read it would stop every query of a serving
-- server at each start of a command or worker (found by review).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'study' AND column_name = 'patient_name_text') THEN
        ALTER TABLE study ADD COLUMN IF NOT EXISTS referring_physician_name_text text;
        ALTER TABLE study ADD COLUMN IF NOT EXISTS patient_name_text text;
    END IF;
END
$$;
-- Rows stored before those two columns existed have them NULL, and PN wildcard matching
-- (sql.py: a LIKE on the joined groups, then the groups) found none of those studies until
-- `reindex` (found by an upgrade from the first release). They are the arrays joined with
-- '=', as record.py writes them: filled once, marked done by schema_version 2 (so that a
-- start does not scan the study table again).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM schema_version WHERE version = 2) THEN
        UPDATE study
        SET patient_name_text = coalesce(patient_name_text, array_to_string(patient_name, '=')),
            referring_physician_name_text = coalesce(referring_physician_name_text,
                array_to_string(referring_physician_name, '='))
        WHERE patient_name_text IS NULL OR referring_physician_name_text IS NULL;
        INSERT INTO schema_version VALUES (2) ON CONFLICT DO NOTHING;
    END IF;
END
$$;
SELECT _create_index_if_missing('study_patient_id', $$ON study (patient_id)$$);
SELECT _create_index_if_missing('study_accession', $$ON study (accession_number)$$);
SELECT _create_index_if_missing('study_date_idx', $$ON study (study_date)$$);
SELECT _create_index_if_missing('study_patient_fk', $$ON study (patient_fk)$$);
SELECT _create_index_if_missing('study_modalities', $$ON study USING gin (modalities_in_study)$$);
SELECT _create_index_if_missing('study_patient_name', $$ON study USING gin (patient_name)$$);
SELECT _create_index_if_missing('study_patient_name_trgm',
    $$ON study USING gin (patient_name_text gin_trgm_ops)$$);
SELECT _create_index_if_missing('study_referring_trgm',
    $$ON study USING gin (referring_physician_name_text gin_trgm_ops)$$);
SELECT _create_index_if_missing('study_description_trgm',
    $$ON study USING gin (study_description gin_trgm_ops)$$);

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
-- Bumped when `reindex` rewrites an instance of the series: num_instances + revision names one
-- state of the series' metadata (metadata caches compare it, in every process), and the
-- revision with a blob key one state of an instance's row (frame and rendering caches).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'series' AND column_name = 'revision') THEN
        ALTER TABLE series ADD COLUMN revision integer NOT NULL DEFAULT 0;
    END IF;
END
$$;
SELECT _create_index_if_missing('series_study_fk', $$ON series (study_fk)$$);
SELECT _create_index_if_missing('series_modality', $$ON series (modality)$$);
-- QIDO matching inside RequestAttributesSequence (ScheduledProcedureStepID,
-- RequestedProcedureID; PS3.18 Table 10.6.1-5): single values are a containment test on the
-- sequence's DICOM JSON (sql.py), which this index answers. Only the sequence is indexed, not
-- the whole attrs document. Wildcards are matched per item and are not index-assisted.
SELECT _create_index_if_missing('series_request_attributes',
    $$ON series USING gin ((attrs -> '00400275') jsonb_path_ops)$$);

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
SELECT _create_index_if_missing('instance_series_fk', $$ON instance (series_fk)$$);
-- A series' instances in primary key order (metadata reads the first of them by key:
-- index.reads._ORDERED_INSTANCES). Without it, `ORDER BY pk LIMIT n` of one series may walk
-- the primary key of the whole table, filtering on series_fk: a series stored after 150,000
-- instances of another took 13-26 ms a statement instead of 1-2 ms, growing with the table.
SELECT _create_index_if_missing('instance_series_pk', $$ON instance (series_fk, pk)$$);
SELECT _create_index_if_missing('instance_sop_class', $$ON instance (sop_class_uid)$$);

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
-- An earlier signature of it (without i_owner), dropped so that only one remains.
DROP FUNCTION IF EXISTS dicomweb_commit_instance(
    text, text, text, date, text, text, date, time, text, text, text, text[], text[], jsonb,
    text, text, text, text, integer, text, text, date, time, jsonb, text, text, integer,
    timestamp, text, text, bigint, bytea, integer, bigint[], bigint[], boolean, jsonb, jsonb);
CREATE OR REPLACE FUNCTION dicomweb_commit_instance(
    p_patient_id text, p_issuer text, p_patient_name text, p_birth date, p_sex text,
    s_uid text, s_date date, s_time time, s_accession text, s_id text, s_description text,
    s_referring text[], s_patient_name text[], s_attrs jsonb, s_referring_text text,
    s_patient_name_text text,
    se_uid text, se_modality text, se_number integer, se_description text, se_body_part text,
    se_pps_date date, se_pps_time time, se_attrs jsonb,
    i_sop text, i_class text, i_number integer, i_acquisition timestamp, i_blob_key text,
    i_ts text, i_size bigint, i_sha256 bytea, i_frames integer, i_offsets bigint[],
    i_lengths bigint[], i_encapsulated boolean, i_metadata jsonb, i_bulk jsonb, i_owner bigint,
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
            -- In UID order, as reindex recomputes it: not in order of arrival, which
            -- concurrent stores make differ from one archive to another.
            sop_classes_in_study = CASE WHEN i_class = ANY (sop_classes_in_study)
                                        THEN sop_classes_in_study
                                        ELSE (SELECT array_agg(c ORDER BY c) FROM unnest(
                                            array_append(sop_classes_in_study, i_class)) c)
                                        END,
            updated_at = now()
        WHERE pk = v_study;
        -- Our reservation must still be there: if another process took us for dead and rolled
        -- it back (deleting the blob), this instance must not be committed.
        DELETE FROM blob_reservation WHERE blob_key = i_blob_key AND owner = i_owner;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'DW003';
        END IF;
        outcome := 'stored';
    EXCEPTION
        WHEN SQLSTATE 'DW001' THEN
            outcome := 'series-conflict';
        WHEN SQLSTATE 'DW003' THEN
            outcome := 'reservation-lost';
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

-- One instance's rows rewritten from its stored file, parsed again (`dicomweb-server reindex`):
-- the same parameters as dicomweb_commit_instance. The instance row is found by SOP Instance
-- UID, blob key, series and study, all unchanged; its series row and study row are rewritten
-- only from their first instance (the one whose commit made them). Rows are written only where
-- a value differs; then the series' revision is bumped (metadata caches) and the study's
-- aggregates recomputed. outcome: 'updated', 'unchanged', or 'missing' (no such row: deleted,
-- or the file now names another series or study, which reindex does not move).
CREATE OR REPLACE FUNCTION dicomweb_reindex_instance(
    p_patient_id text, p_issuer text, p_patient_name text, p_birth date, p_sex text,
    s_uid text, s_date date, s_time time, s_accession text, s_id text, s_description text,
    s_referring text[], s_patient_name text[], s_attrs jsonb, s_referring_text text,
    s_patient_name_text text,
    se_uid text, se_modality text, se_number integer, se_description text, se_body_part text,
    se_pps_date date, se_pps_time time, se_attrs jsonb,
    i_sop text, i_class text, i_number integer, i_acquisition timestamp, i_blob_key text,
    i_ts text, i_size bigint, i_sha256 bytea, i_frames integer, i_offsets bigint[],
    i_lengths bigint[], i_encapsulated boolean, i_metadata jsonb, i_bulk jsonb,
    OUT outcome text)
LANGUAGE plpgsql AS $$
DECLARE
    v_instance bigint;
    v_series bigint;
    v_study bigint;
    v_patient bigint;
    v_study_first boolean;
    v_changed boolean := false;
BEGIN
    SELECT i.pk, i.series_fk, se.study_fk INTO v_instance, v_series, v_study
    FROM instance i JOIN series se ON se.pk = i.series_fk
    JOIN study st ON st.pk = se.study_fk
    WHERE i.sop_instance_uid = i_sop AND i.blob_key = i_blob_key
      AND se.series_instance_uid = se_uid AND st.study_instance_uid = s_uid;
    IF v_instance IS NULL THEN
        outcome := 'missing';
        RETURN;
    END IF;
    -- Instance rows are only ever added, with greater keys: whether this one is its study's
    -- first holds without a lock. Its patient row is made before the study row is locked,
    -- in the order a commit takes them (a commit making the same patient cannot deadlock).
    v_study_first := v_instance = (SELECT min(i.pk) FROM instance i
                                   JOIN series se ON se.pk = i.series_fk
                                   WHERE se.study_fk = v_study);
    IF v_study_first THEN
        INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,
                             patient_sex)
        VALUES (p_patient_id, p_issuer, p_patient_name, p_birth, p_sex)
        ON CONFLICT (patient_id, issuer_of_patient_id) DO NOTHING;
        SELECT pk INTO v_patient FROM patient
        WHERE patient_id = p_patient_id AND issuer_of_patient_id = p_issuer;
    END IF;
    PERFORM 1 FROM study WHERE pk = v_study FOR UPDATE;

    UPDATE instance SET sop_class_uid = i_class, instance_number = i_number,
        acquisition_datetime = i_acquisition, transfer_syntax_uid = i_ts, size_bytes = i_size,
        sha256 = i_sha256, number_of_frames = i_frames, frame_offsets = i_offsets,
        frame_lengths = i_lengths, encapsulated = i_encapsulated, metadata = i_metadata,
        bulk_ranges = i_bulk
    WHERE pk = v_instance
      AND (sop_class_uid, instance_number, acquisition_datetime, transfer_syntax_uid,
           size_bytes, sha256, number_of_frames, frame_offsets, frame_lengths, encapsulated,
           metadata, bulk_ranges)
          IS DISTINCT FROM
          (i_class, i_number, i_acquisition, i_ts, i_size, i_sha256, i_frames, i_offsets,
           i_lengths, i_encapsulated, i_metadata, i_bulk);
    v_changed := FOUND;

    IF v_instance = (SELECT min(pk) FROM instance WHERE series_fk = v_series) THEN
        UPDATE series SET modality = se_modality, series_number = se_number,
            series_description = se_description, body_part_examined = se_body_part,
            pps_start_date = se_pps_date, pps_start_time = se_pps_time, attrs = se_attrs
        WHERE pk = v_series
          AND (modality, series_number, series_description, body_part_examined,
               pps_start_date, pps_start_time, attrs)
              IS DISTINCT FROM
              (se_modality, se_number, se_description, se_body_part, se_pps_date,
               se_pps_time, se_attrs);
        v_changed := v_changed OR FOUND;
    END IF;

    IF v_study_first THEN
        UPDATE study SET patient_fk = v_patient, study_date = s_date, study_time = s_time,
            accession_number = s_accession, study_id = s_id, study_description = s_description,
            referring_physician_name = s_referring, patient_name = s_patient_name,
            patient_id = p_patient_id, patient_birth_date = p_birth, patient_sex = p_sex,
            attrs = s_attrs, referring_physician_name_text = s_referring_text,
            patient_name_text = s_patient_name_text
        WHERE pk = v_study
          AND (patient_fk, study_date, study_time, accession_number, study_id,
               study_description, referring_physician_name, patient_name, patient_id,
               patient_birth_date, patient_sex, attrs, referring_physician_name_text,
               patient_name_text)
              IS DISTINCT FROM
              (v_patient, s_date, s_time, s_accession, s_id, s_description, s_referring,
               s_patient_name, p_patient_id, p_birth, p_sex, s_attrs, s_referring_text,
               s_patient_name_text);
        v_changed := v_changed OR FOUND;
    END IF;

    IF NOT v_changed THEN
        outcome := 'unchanged';
        RETURN;
    END IF;
    UPDATE series SET revision = revision + 1, updated_at = now() WHERE pk = v_series;
    UPDATE study SET
        modalities_in_study = (
            SELECT coalesce(array_agg(DISTINCT modality ORDER BY modality), '{}')
            FROM series WHERE study_fk = v_study AND num_instances > 0
                              AND modality IS NOT NULL),
        -- Sorted, as a commit keeps them: the same whatever order instances arrived in.
        sop_classes_in_study = (
            SELECT coalesce(array_agg(DISTINCT i.sop_class_uid ORDER BY i.sop_class_uid), '{}')
            FROM instance i JOIN series se ON se.pk = i.series_fk WHERE se.study_fk = v_study),
        updated_at = now()
    WHERE pk = v_study;
    outcome := 'updated';
END
$$;

-- API keys (`dicomweb-server apikey create`): only the SHA-256 of the secret is kept.
CREATE TABLE IF NOT EXISTS api_key (
    key_id      text PRIMARY KEY,
    secret_sha256 bytea NOT NULL,
    role        text NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- The audit trail: append-only, each row chained to the one before by SHA-256 (audit.py).
CREATE TABLE IF NOT EXISTS audit_log (
    seq        bigserial PRIMARY KEY,
    at         timestamptz NOT NULL,
    caller     text NOT NULL,
    client     text NOT NULL,
    action     text NOT NULL,
    uids       text[] NOT NULL,
    outcome    integer NOT NULL,
    bytes      bigint NOT NULL,
    detail     text NOT NULL,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);

-- Updates, deletes and truncation are refused. An owner of the database can still disable
-- this trigger: the hash chain is what makes such tampering visible (`audit verify`).
CREATE OR REPLACE FUNCTION dicomweb_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
END
$$;

-- Created only when missing or not as defined here, as the indexes are: CREATE OR REPLACE
-- TRIGGER takes a SHARE ROW EXCLUSIVE lock, which waits for every audit append in progress
-- and stops the next ones. "As defined" includes enabled ('O', or 'A' which fires in replica
-- sessions too): CREATE OR REPLACE re-enables a trigger `ALTER TABLE ... DISABLE TRIGGER`
-- turned off, as every start did before triggers were created only when missing (found by
-- review: a disabled trigger then stayed off for good). tgtype: ROW|BEFORE|UPDATE|DELETE =
-- 1+2+16+8 = 27, BEFORE|TRUNCATE (a statement trigger) = 2+32 = 34 (catalog/pg_trigger.h).
CREATE OR REPLACE FUNCTION _audit_trigger_as_defined(name text, tg_type integer) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'audit_log'::regclass AND tgname = name
                     AND tgenabled IN ('O', 'A') AND tgtype = tg_type
                     AND tgfoid = 'dicomweb_audit_append_only()'::regprocedure
                     AND tgqual IS NULL AND tgnargs = 0 AND tgattr::text = '')
$$;
DO $$
BEGIN
    IF NOT _audit_trigger_as_defined('audit_log_append_only', 27) THEN
        CREATE OR REPLACE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
            FOR EACH ROW EXECUTE FUNCTION dicomweb_audit_append_only();
    END IF;
    IF NOT _audit_trigger_as_defined('audit_log_no_truncate', 34) THEN
        CREATE OR REPLACE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
            FOR EACH STATEMENT EXECUTE FUNCTION dicomweb_audit_append_only();
    END IF;
END
$$;

-- Appends rows to the audit chain in one round trip (index/security.py): under the advisory
-- lock that makes appenders (processes sharing the database) take turns, each row links to
-- the true last one. A row's hash is SHA-256 of the previous row's hash (p_genesis before
-- the first row) followed by its canonical bytes (p_canonical, audit.AuditEvent.canonical):
-- what audit.chain computes and `audit verify` checks. p_rows carry no seq or hashes.
CREATE OR REPLACE FUNCTION dicomweb_append_audit(
    p_lock_class integer, p_lock_key integer, p_genesis bytea, p_rows audit_log[],
    p_canonical bytea[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_prev bytea;
    v_hash bytea;
    r record;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_class, p_lock_key);
    SELECT hash INTO v_prev FROM audit_log ORDER BY seq DESC LIMIT 1;
    v_prev := coalesce(v_prev, p_genesis);
    FOR r IN SELECT * FROM unnest(p_rows) WITH ORDINALITY AS u(seq, at, caller, client, action,
             uids, outcome, bytes, detail, prev_hash, hash, n) ORDER BY n LOOP
        v_hash := sha256(v_prev || p_canonical[r.n]);
        INSERT INTO audit_log (at, caller, client, action, uids, outcome, bytes, detail,
                               prev_hash, hash)
        VALUES (r.at, r.caller, r.client, r.action, r.uids, r.outcome, r.bytes, r.detail,
                v_prev, v_hash);
        v_prev := v_hash;
    END LOOP;
END
$$;
