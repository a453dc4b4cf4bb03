-- A stop (SIGINT, SIGTERM) is neither a failure nor a success: an ingest batch or a ranking run
-- that was stopped is recorded as 'cancelled' (an ingest batch with nothing merged and zero
-- counts; a ranking run that can be resumed like a failed one).
ALTER TABLE recranker.ingest_batches DROP CONSTRAINT ingest_batches_status_check;
ALTER TABLE recranker.ingest_batches ADD CONSTRAINT ingest_batches_status_check
    CHECK (status IN ('merged', 'rejected', 'cancelled'));

ALTER TABLE recranker.ranking_runs DROP CONSTRAINT ranking_runs_status_check;
ALTER TABLE recranker.ranking_runs ADD CONSTRAINT ranking_runs_status_check
    CHECK (status IN ('running', 'complete', 'published', 'failed', 'cancelled', 'dropped'));

-- What a shard counted besides rows and users (cold users, LLM failures and retries, prompt
-- tokens), so that a run's counts are summed from its shards in the database, whichever
-- process (or resumed run) wrote them.
ALTER TABLE recranker.ranking_shards ADD COLUMN counts jsonb NOT NULL DEFAULT '{}';
