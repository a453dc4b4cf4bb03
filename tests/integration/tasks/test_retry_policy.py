"""The one retry policy (tasks/common.py) against real failures: a refused connection and a
serialization failure are retried; a connection left busy by an interrupted command, a
cancelled statement, a constraint violation and a stop are not. Every retrying task uses it."""

from __future__ import annotations

import importlib
import pkgutil
import signal
import threading

import psycopg
import pytest

import tasks
from recranker_core.interrupts import Stopped
from tasks.common import TRANSIENT_RETRIES, is_transient, retry_transient


def _raised(fn) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test wants the exception itself
        return exc
    raise AssertionError("nothing was raised")


def _refused() -> None:
    # Port 1 on the loopback: nothing listens, the kernel refuses at once.
    psycopg.connect("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=3)


def _serialization_failure(url: str) -> None:
    with (
        psycopg.connect(url, autocommit=True) as setup,
        psycopg.connect(url) as a,
        psycopg.connect(url) as b,
    ):
        setup.execute("CREATE TABLE IF NOT EXISTS retry_probe (k int PRIMARY KEY, v int)")
        setup.execute("TRUNCATE retry_probe")
        setup.execute("INSERT INTO retry_probe VALUES (1, 0), (2, 0)")
        for conn in (a, b):
            conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        # Write skew: each reads what the other writes.
        a.execute("SELECT sum(v) FROM retry_probe").fetchone()
        b.execute("SELECT sum(v) FROM retry_probe").fetchone()
        a.execute("UPDATE retry_probe SET v = 1 WHERE k = 1")
        b.execute("UPDATE retry_probe SET v = 1 WHERE k = 2")
        a.commit()
        b.commit()


def _busy_connection(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.pgconn.send_query(b"SELECT pg_sleep(0.2)")  # left running, as a stop can leave it
        conn.execute("SELECT 1")


def _cancelled_statement(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SET statement_timeout = '50ms'")
        conn.execute("SELECT pg_sleep(2)")


def _unique_violation(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t (k int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1), (1)")


def test_transient_failures_are_told_from_final_ones(database_url: str):
    import boto3
    from botocore.config import Config

    refused = _raised(_refused)
    assert isinstance(refused, psycopg.OperationalError) and is_transient(refused)
    serialization = _raised(lambda: _serialization_failure(database_url))
    assert isinstance(serialization, psycopg.errors.SerializationFailure)
    assert is_transient(serialization)
    s3 = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    s3_refused = _raised(s3.list_buckets)
    assert is_transient(s3_refused), repr(s3_refused)

    busy = _raised(lambda: _busy_connection(database_url))
    assert "another command is already in progress" in str(busy)
    assert isinstance(busy, psycopg.OperationalError) and not is_transient(busy)
    cancelled = _raised(lambda: _cancelled_statement(database_url))
    assert isinstance(cancelled, psycopg.errors.QueryCanceled) and not is_transient(cancelled)
    assert not is_transient(_raised(lambda: _unique_violation(database_url)))
    assert not is_transient(Stopped(signal.SIGTERM))
    assert not is_transient(KeyboardInterrupt())


def test_prefect_retries_only_what_the_policy_calls_transient(prefect_api: str, database_url: str):
    from prefect import flow, task

    attempts: dict[str, int] = {"refused": 0, "busy": 0}
    lock = threading.Lock()

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def connect_refused() -> None:
        with lock:
            attempts["refused"] += 1
        _refused()

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def use_busy_connection() -> None:
        with lock:
            attempts["busy"] += 1
        _busy_connection(database_url)

    @flow
    def both() -> None:
        for fn in (connect_refused, use_busy_connection):
            state = fn(return_state=True)
            assert state.is_failed()

    both()
    assert attempts == {"refused": 1 + TRANSIENT_RETRIES["retries"], "busy": 1}


def test_every_retrying_task_uses_the_one_policy():
    from prefect import Task

    found = []
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, Task) and obj.retries:
                found.append(obj.name)
                assert obj.retry_condition_fn is retry_transient, obj.name
    assert {"ingest-file", "rank-shard", "resolve-database", "load-split"} <= set(found)


@pytest.fixture(autouse=True)
def _drop_probe(database_url: str):  # type: ignore[no-untyped-def]
    yield
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS retry_probe")
