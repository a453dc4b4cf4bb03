-- Every user whose current recommendations contain one item, best placed first.
--   psql "$READER_URL" -v item_id=50 -f users_who_got_item.sql
-- Served by the item_id index of the published run's partition.
SELECT user_id, rank, score, source, run_id
FROM recranker.recommendations_current
WHERE item_id = :'item_id'
ORDER BY rank, user_id;
