"""Expected failures print one clear line and exit with the README's code (issue 16, item 6): the
CLI run as a subprocess against a real PostgreSQL (a database that does not exist, a server
that does not listen, a database without the schema) and a Prefect API. Tracebacks only with
--debug, or for an unexpected error (exit 4). The damaged artifact during `rank` (exit 3) is in
test_artifact_trust.py."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from recranker_core.db.connect import libpq_url

HEADER = "user_id,item_id,rating,timestamp\n"


def cli(
    args: list[str], env: dict[str, str], api: str | None = None
) -> subprocess.CompletedProcess[str]:
    extra = {"PREFECT_API_URL": api} if api else {}
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        env={**os.environ, **env, **extra},
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr, which must be the error line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


@pytest.fixture()
def empty_database(pg_server_url: str) -> Iterator[str]:
    """A database that exists but has no recranker schema."""
    name = f"recranker_test_empty_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(pg_server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_missing_or_unreachable_database_is_one_line_and_exit_2(
    pg_server_url: str, tmp_path: Path, prefect_api: str
) -> None:
    base = libpq_url(pg_server_url).rpartition("/")[0]
    missing = {
        "RECRANKER_DATABASE_URL": f"{base}/recranker_no_such_db_{uuid.uuid4().hex[:6]}",
        "RECRANKER_HOME": str(tmp_path / "home"),
    }
    (tmp_path / "day.csv").write_text(HEADER + "u1,i1,4,1000000000\n")
    for args in (["batches"], ["rank"], ["ingest", str(tmp_path / "day.csv")], ["db", "status"]):
        done = cli(args, missing, prefect_api)
        assert done.returncode == 2, (args, done.stderr[-3000:])
        line = one_error_line(done)
        assert "does not exist" in line and "RECRANKER_DATABASE_URL" in line, line
        assert "recranker db upgrade" in line and done.stdout == ""

    unreachable = {**missing, "RECRANKER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"}
    done = cli(["runs"], unreachable)
    assert done.returncode == 2
    assert "Connection refused" in one_error_line(done)

    # --debug: the same exit code, with the traceback before the line.
    done = cli(["--debug", "batches"], missing)
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "psycopg.OperationalError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot use the database")


def test_a_database_without_the_schema_says_to_upgrade(
    empty_database: str, tmp_path: Path, prefect_api: str
) -> None:
    env = {"RECRANKER_DATABASE_URL": empty_database, "RECRANKER_HOME": str(tmp_path / "home")}
    for args in (["rank"], ["batches"], ["models", "list"]):
        done = cli(args, env, prefect_api)
        assert done.returncode == 2, (args, done.stderr[-3000:])
        assert "recranker db upgrade" in one_error_line(done)


def test_a_rejected_batch_exits_1_without_a_traceback_or_a_long_repr(
    clean_db: str, tmp_path: Path, prefect_api: str
) -> None:
    env = {"RECRANKER_DATABASE_URL": clean_db, "RECRANKER_HOME": str(tmp_path / "home")}
    (tmp_path / "items.csv").write_text("item_id,title,year,genres\ni1,One,1999,Drama\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "u1,i1,9,1000000000\nu2,i1,0,1000000001\n")
    done = cli(["ingest", str(bad)], env, prefect_api)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "batch 1 rejected" in done.stdout and "over the failure budget" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # The exception's repr is its message: the results it carries never reach a log line.
    assert "IngestResult(" not in done.stderr and "ValidationFailed('1 of 1" in done.stderr
    assert max(len(line) for line in done.stderr.splitlines()) < 1000


def test_a_usage_error_exits_2() -> None:
    done = cli(["rank", "--no-such-option"], {})
    assert done.returncode == 2 and "No such option" in done.stderr


def test_each_failure_maps_to_its_exit_code() -> None:
    """describe_failure over real exceptions of each kind (an unexpected error cannot be
    produced on purpose through a command; this is the mapping main() applies)."""
    from cli.common import describe_failure
    from recranker_core.errors import (
        ArtifactIntegrityError,
        BatchRankBusyError,
        ConfigError,
        DataError,
        ValidationFailed,
    )

    assert describe_failure(ValidationFailed("rejected", []))[1] == 1
    for exc in (ConfigError("c"), DataError("d"), BatchRankBusyError("b")):
        assert describe_failure(exc) == (str(exc), 2)
    assert describe_failure(ArtifactIntegrityError("s3://x disagrees"))[1] == 3
    try:
        psycopg.connect("postgresql://nobody@127.0.0.1:1/x", connect_timeout=3)
    except psycopg.OperationalError as exc:
        assert describe_failure(exc)[1] == 2
    from botocore.exceptions import EndpointConnectionError

    assert describe_failure(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))[1] == 2
    message, code = describe_failure(KeyError("oops"))
    assert code == 4 and "a bug" in message
