"""The batch_rank stage (flows/batch_rank.py, tasks/batch_rank.py): every active user's candidates
re-ranked as the champion adapter's guard decided, written shard by shard, published atomically.

Modules: hybrid (per-task utilities and the hybrid ranking), fusion (the fused ranking and its
guard), serving (what a run serves; the ranker and models it serves with), rank (one shard
ranked), runs (the run ledger, its shards, the one-run lock), publish (shard writes by COPY,
finish, the atomic publish, failure), retention (old runs dropped)."""
