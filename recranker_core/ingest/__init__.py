"""Ingest: one interaction file becomes one batch. In one transaction, read it once, typing and
classifying every row (merge or quarantine, with reasons) batch by batch and inserting the valid
rows as it goes (repeats send the batch through a staging table, where they become duplicates or
quarantined conflicts); then quarantine the rest, validate with Great Expectations and write the
ledger. A re-run of the same content is a no-op.

The modules, in the order of a run: run (entry points, IngestResult), read (header, layout,
readers), classify (the plan, rows typed and classified), staging (staging tables, a stop's
clean-up), catalogue (the batch's item and user files), merge (the transaction), insert (rows
into recranker.interactions), quarantine, batches (the ledger: a batch's row, read-only queries);
timing (step timer, slow statements)."""

from recranker_core.ingest.batches import ledger, quarantined, table_counts
from recranker_core.ingest.run import IngestResult, ingest, ingest_file, ingest_outcome
from recranker_core.ingest.staging import STAGING_SCHEMA, sweep_staging

__all__ = [
    "STAGING_SCHEMA",
    "IngestResult",
    "ingest",
    "ingest_file",
    "ingest_outcome",
    "ledger",
    "quarantined",
    "sweep_staging",
    "table_counts",
]
