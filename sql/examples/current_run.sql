-- Which ranking run consumers see now, and since when (no row: nothing published yet).
--   psql "$READER_URL" -f current_run.sql
SELECT run_id, published_at
FROM recranker.recommendations_current
LIMIT 1;
