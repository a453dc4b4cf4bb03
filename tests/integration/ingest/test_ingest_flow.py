"""The ingest stage through its Prefect flow and its command line, against real PostgreSQL,
SeaweedFS and a Prefect API: s3:// sources, artifacts, exit codes and --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from recranker_core.config import Settings
from recranker_core.ingest import ingest
from recranker_core.stack import s3_config

HEADER = "user_id,item_id,rating,timestamp\n"
ITEMS = "item_id,title,year,genres\ni1,One,1999,Drama\ni2,Two,2001,Comedy\n"


def test_ingest_from_s3_prefix(s3_settings: Settings, settings: Settings, clean_db: str):
    cfg = s3_config(s3_settings)
    client = cfg.client()
    client.put_object(
        Bucket=cfg.bucket,
        Key="drop/2026-11-20.csv",
        Body=(HEADER + "u1,i1,4,1000000000\nu2,i2,5,1000000001\n").encode(),
    )
    client.put_object(Bucket=cfg.bucket, Key="drop/items.csv", Body=ITEMS.encode())
    results = ingest(f"s3://{cfg.bucket}/drop/", settings, clean_db, s3=cfg)
    assert [(r.status, r.rows_merged, r.source) for r in results] == [
        ("merged", 2, f"s3://{cfg.bucket}/drop/2026-11-20.csv")
    ]
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT source FROM recranker.ingest_batches").fetchone() == (
            f"s3://{cfg.bucket}/drop/2026-11-20.csv",
        )


@pytest.fixture()
def flow_env(clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"RECRANKER_DATABASE_URL": clean_db, "RECRANKER_HOME": str(tmp_path / "home")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_flow_publishes_ledger_and_validation_artifacts(prefect_api: str, flow_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest_flow

    (tmp_path / "items.csv").write_text(ITEMS)
    (tmp_path / "day.csv").write_text(HEADER + "u1,i1,4,1000000000\n")
    results = ingest_flow(str(tmp_path / "day.csv"))
    assert [(r.status, r.rows_merged) for r in results] == [("merged", 1)]

    with get_client(sync_client=True) as client:
        ledger = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-ledger"]))
        )
        validation = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"validation-batch-{results[0].batch_id}"])
            )
        )
    # The harness is shared by the session: other tests' ingest runs wrote this key too, so
    # read the newest one (this flow's).
    assert ledger and "day.csv" in str(max(ledger, key=lambda a: a.created).data)
    assert validation and "expect_column_values_to_not_be_null" in str(validation[0].data)


def test_flow_fails_on_rejected_batch(prefect_api: str, flow_env, tmp_path):
    from flows.ingest import ingest_flow
    from recranker_core.errors import ValidationFailed

    (tmp_path / "items.csv").write_text(ITEMS)
    (tmp_path / "bad.csv").write_text(HEADER + "u1,i1,9,1000000000\n")
    with pytest.raises(ValidationFailed, match="over the failure budget"):
        ingest_flow(str(tmp_path / "bad.csv"))


def _cli(args: list[str], env: dict[str, str], api: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        env={**os.environ, **env, "PREFECT_API_URL": api},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_json_and_exit_codes(prefect_api: str, flow_env, tmp_path):
    (tmp_path / "items.csv").write_text(ITEMS)
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "u1,i1,4,1000000000\nu1,i1,4,1000000000\n")
    first = _cli(["ingest", str(good), "--json"], flow_env, prefect_api)
    assert first.returncode == 0, first.stderr
    row = json.loads(first.stdout.strip().splitlines()[-1])
    assert (row["status"], row["rows_read"], row["rows_merged"], row["rows_duplicate"]) == (
        "merged",
        2,
        1,
        1,
    )
    again = _cli(["ingest", str(good), "--json"], flow_env, prefect_api)
    assert again.returncode == 0
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "already_ingested"

    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "u1,i1,0,1000000000\n")
    rejected = _cli(["ingest", str(bad), "--json"], flow_env, prefect_api)
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout.strip().splitlines()[-1])["status"] == "rejected"

    batch = json.loads(rejected.stdout.strip().splitlines()[-1])["batch_id"]
    shown = _cli(["quarantine", str(batch), "--json"], flow_env, prefect_api)
    assert json.loads(shown.stdout) == {
        "batch_id": batch,
        "reasons": {"rating_out_of_range": 1},
        "rows": [{"line": 2, "reasons": ["rating_out_of_range"], "raw": "u1,i1,0,1000000000"}],
    }
    listed = _cli(["batches", "--json"], flow_env, prefect_api)
    statuses = [json.loads(line)["status"] for line in listed.stdout.strip().splitlines()]
    assert statuses == ["rejected", "merged"]

    missing = _cli(["ingest", str(tmp_path / "nope.csv")], flow_env, prefect_api)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
