-- The current recommendations of one user, best first.
--   psql "$READER_URL" -v user_id=196 [-v k=5] -f top_k_for_user.sql
-- Served by the primary key (run_id, user_id, rank) of the published run's partition.
\if :{?k}
\else
    \set k 10
\endif
SELECT rank, item_id, score, base_rank, source, run_id
FROM recranker.recommendations_current
WHERE user_id = :'user_id'
  AND rank <= :'k'::int
ORDER BY rank;
