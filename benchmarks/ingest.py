"""Ingest throughput: a generated CSV end to end (staging + classification + GX validation +
merge + ledger) against two baselines measured in the same run on the same server: a plain COPY
of the same file into an unlogged table with no index, and a COPY of it straight into an empty
copy of recranker.interactions with its primary key (what an operator would do by hand, with no
validation). Prints rows/s for each and ingest's ratio against both (ingest / baseline speed).

    python benchmarks/ingest.py [--rows 5000000] [--database-url URL]

Without --database-url it uses RECRANKER_DATABASE_URL or the embedded PostgreSQL of the local
stack. A fresh database is created for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from recranker_core.config import load_settings
from recranker_core.datasets.sources import describe_file
from recranker_core.datasets.synthetic import generate
from recranker_core.db.connect import libpq_url, redact_url
from recranker_core.db.migrate import upgrade
from recranker_core.ingest import ingest_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)

    settings = load_settings()
    if args.database_url:
        server = args.database_url
    else:
        from recranker_core.stack import database_url

        server = database_url(settings)
    out = settings.home / "bench" / f"ingest-{args.rows}-{args.users}-{args.items}"
    if not (out / "interactions.csv").exists():
        logging.info("generating %s rows into %s", f"{args.rows:,}", out)
        generate(out, users=args.users, items=args.items, interactions=args.rows, seed=1)
    csv_path = out / "interactions.csv"

    name = f"recranker_bench_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(server)
    with psycopg.connect(admin, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin.rpartition('/')[0]}/{name}"
    try:
        upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE UNLOGGED TABLE copy_baseline "
                "(user_id text, item_id text, rating real, ts bigint)"
            )
            copy_s = _copy(conn, csv_path, "copy_baseline")
            # The table as ingest fills it, primary key included; the file's unix seconds go into
            # event_ts as float8 (the same width as timestamptz: COPY cannot read them as one).
            conn.execute("CREATE TABLE keyed_baseline (LIKE recranker.interactions INCLUDING ALL)")
            conn.execute(
                "ALTER TABLE keyed_baseline ALTER COLUMN event_ts TYPE float8 USING NULL, "
                "ALTER COLUMN batch_id SET DEFAULT 0"
            )
            keyed_s = _copy(conn, csv_path, "keyed_baseline (user_id, item_id, rating, event_ts)")
            conn.execute("DROP TABLE copy_baseline, keyed_baseline")
        t0 = time.perf_counter()
        result = ingest_file(describe_file(csv_path, None), settings, url)
        ingest_s = time.perf_counter() - t0
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    rows = result.rows_read
    print(f"date        {datetime.now(UTC):%Y-%m-%d}")
    print(
        f"machine     {platform.machine()}, {platform.system()} {platform.release()}, "
        f"{__import__('os').cpu_count()} cpus"
    )
    print(f"server      PostgreSQL {version[0] if version else '?'} at {redact_url(server)}")
    print(f"file        {csv_path} ({rows:,} rows, {csv_path.stat().st_size / 1e6:.0f} MB)")
    print(f"plain COPY  {copy_s:8.1f} s  {rows / copy_s:12,.0f} rows/s  (unlogged, no index)")
    print(
        f"keyed COPY  {keyed_s:8.1f} s  {rows / keyed_s:12,.0f} rows/s  "
        "(copy of recranker.interactions with its primary key)"
    )
    print(
        f"ingest      {ingest_s:8.1f} s  {rows / ingest_s:12,.0f} rows/s  "
        f"(merged {result.rows_merged:,}, duplicate {result.rows_duplicate:,}, "
        f"quarantined {result.rows_quarantined:,})"
    )
    print("stages      " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    print(f"ratio       {copy_s / ingest_s:.3f}  (ingest speed / plain COPY speed; target >= 0.15)")
    print(f"ratio       {keyed_s / ingest_s:.3f}  (ingest speed / keyed COPY speed; target >= 0.5)")


def _copy(conn: psycopg.Connection, csv_path: Path, target: str) -> float:
    """Seconds to COPY the file into `target` (committed, so a logged table's WAL is flushed)."""
    t0 = time.perf_counter()
    with (
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy(f"COPY {target} FROM STDIN (FORMAT csv, HEADER true)") as copy,
        csv_path.open("rb") as fh,
    ):
        while block := fh.read(1 << 20):
            copy.write(block)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
