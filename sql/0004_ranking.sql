-- Batch ranking output: the run ledger and its shards, the recommendations (one list partition
-- per run), the single published pointer, and the view downstream consumers read.

CREATE TABLE recranker.ranking_runs (
    run_id          text COLLATE "C" PRIMARY KEY,
    -- 'published' stays on a run after a newer one replaces it: which run is current is only
    -- ever said by recranker.published, so one UPDATE there switches consumers.
    status          text        NOT NULL
                    CHECK (status IN ('running', 'complete', 'published', 'failed', 'dropped')),
    model_id        bigint      NOT NULL REFERENCES recranker.models (model_id),
    adapter_id      bigint      REFERENCES recranker.adapters (adapter_id),
    data_watermark  timestamptz,
    params          jsonb       NOT NULL DEFAULT '{}',
    n_shards        integer     NOT NULL CHECK (n_shards >= 0),
    counts          jsonb       NOT NULL DEFAULT '{}',
    timings         jsonb       NOT NULL DEFAULT '{}',
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    published_at    timestamptz,
    dropped_at      timestamptz
);
CREATE INDEX ranking_runs_started ON recranker.ranking_runs (started_at DESC);

-- The users of every shard are stored so that a resumed run keeps the original assignment
-- (a shard marked done must still mean the same users); emptied when the run is dropped.
CREATE TABLE recranker.ranking_shards (
    run_id       text COLLATE "C" NOT NULL REFERENCES recranker.ranking_runs (run_id),
    shard        integer     NOT NULL CHECK (shard >= 0),
    status       text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done')),
    user_ids     text[] COLLATE "C" NOT NULL,
    users        integer     NOT NULL,
    rows         integer,
    llm_users    integer,
    base_users   integer,
    seconds      real,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, shard)
);

-- One partition per run, created by start_run in schema recranker_runs (out of the way of
-- tools that list recranker's tables); retention detaches and drops a whole partition, which
-- is instant and leaves no dead rows behind. No foreign key to ranking_runs: per-row checks
-- would slow the COPY, and partitions only ever exist for runs in the ledger.
CREATE SCHEMA IF NOT EXISTS recranker_runs;

CREATE TABLE recranker.recommendations (
    run_id     text COLLATE "C" NOT NULL,
    user_id    text COLLATE "C" NOT NULL,
    rank       smallint    NOT NULL CHECK (rank >= 1),
    item_id    text COLLATE "C" NOT NULL,
    score      real        NOT NULL,
    base_rank  smallint    NOT NULL CHECK (base_rank >= 1),
    source     text        NOT NULL CHECK (source IN ('llm', 'base')),
    -- Serves "the top-k of one user" as one index range scan.
    PRIMARY KEY (run_id, user_id, rank)
) PARTITION BY LIST (run_id);
-- "All users who got item X": a partition holds a single run, so run_id in this key would only
-- make the index bigger.
CREATE INDEX recommendations_item ON recranker.recommendations (item_id);

-- At most one row (the key can only be true); no row means nothing was ever published.
CREATE TABLE recranker.published (
    singleton     boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    run_id        text COLLATE "C" NOT NULL REFERENCES recranker.ranking_runs (run_id),
    published_at  timestamptz NOT NULL DEFAULT now()
);

-- The published run's rows. One statement reads the pointer and the rows under one snapshot,
-- so a reader sees the old run or the new one, never a mix. The scalar subquery lets the
-- executor prune every other run's partition before it starts.
CREATE VIEW recranker.recommendations_current AS
SELECT r.run_id, r.user_id, r.rank, r.item_id, r.score, r.base_rank, r.source, p.published_at
FROM recranker.recommendations r
JOIN recranker.published p ON p.run_id = r.run_id
WHERE r.run_id = (SELECT q.run_id FROM recranker.published q);

-- Consumers read the view and nothing else (the view runs with its owner's rights, so the
-- reader needs no grant on the tables behind it).
GRANT SELECT ON recranker.recommendations_current TO recranker_reader;
