-- Foundation schema: the catalogue, interactions and the ingest ledger with its quarantine.
-- Ids are opaque text compared byte-wise (COLLATE "C"): the same order on every machine, no
-- index corruption when the OS collation library changes, and much cheaper comparisons in the
-- primary keys that every ingest inserts into.
-- Interactions carry no foreign keys on purpose: the ingest checks users/items itself before the
-- merge, and per-row FK triggers would halve bulk-merge throughput.

CREATE SCHEMA IF NOT EXISTS recranker;
-- Scratch space for batches being staged; tables here are dropped by the merge transaction
-- or swept by the next ingest when a process died before finishing.
CREATE SCHEMA IF NOT EXISTS recranker_staging;

CREATE TABLE recranker.ingest_batches (
    batch_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source            text        NOT NULL,
    file_name         text        NOT NULL,
    content_hash      text        NOT NULL,
    format            text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('merged', 'rejected')),
    rows_read         bigint      NOT NULL DEFAULT 0,
    rows_merged       bigint      NOT NULL DEFAULT 0,
    rows_duplicate    bigint      NOT NULL DEFAULT 0,
    rows_quarantined  bigint      NOT NULL DEFAULT 0,
    items_upserted    bigint      NOT NULL DEFAULT 0,
    users_upserted    bigint      NOT NULL DEFAULT 0,
    error             text,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ingest_batches_counts_add_up
        CHECK (rows_read = rows_merged + rows_duplicate + rows_quarantined)
);
-- A file's content is merged at most once; rejected attempts may be retried (e.g. after the
-- upstream fixed it, which changes the hash, or after the failure budget was raised).
CREATE UNIQUE INDEX ingest_batches_merged_hash
    ON recranker.ingest_batches (content_hash) WHERE status = 'merged';

CREATE TABLE recranker.items (
    item_id        text COLLATE "C" PRIMARY KEY,
    title          text,
    year           integer,
    genres         text[]      NOT NULL DEFAULT '{}',
    attributes     jsonb       NOT NULL DEFAULT '{}',
    first_batch_id bigint,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recranker.users (
    user_id        text COLLATE "C" PRIMARY KEY,
    attributes     jsonb       NOT NULL DEFAULT '{}',
    first_batch_id bigint,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recranker.interactions (
    user_id   text COLLATE "C" NOT NULL,
    item_id   text COLLATE "C" NOT NULL,
    rating    real,
    event_ts  timestamptz NOT NULL,
    batch_id  bigint      NOT NULL,
    PRIMARY KEY (user_id, item_id, event_ts)
);

CREATE TABLE recranker.quarantine (
    batch_id  bigint NOT NULL,
    line      bigint NOT NULL,
    raw       text   NOT NULL,
    reasons   text[] NOT NULL,
    PRIMARY KEY (batch_id, line)
);

CREATE TABLE recranker.validation_results (
    result_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id         bigint      NOT NULL,
    stage            text        NOT NULL CHECK (stage IN ('staged', 'table')),
    suite            text        NOT NULL,
    expectation      text        NOT NULL,
    column_name      text,
    success          boolean     NOT NULL,
    element_count    bigint,
    unexpected_count bigint,
    details          jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX validation_results_batch ON recranker.validation_results (batch_id);

-- Timestamps written as text (ISO 8601) that may not be valid dates: NULL instead of an error,
-- so one bad row is quarantined rather than aborting the whole staged batch.
CREATE FUNCTION recranker.try_timestamptz(value text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

-- The read-only role downstream consumers log in through (granted on consumer views only).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'recranker_reader') THEN
        CREATE ROLE recranker_reader NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA recranker TO recranker_reader;
