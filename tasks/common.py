"""Task-level helpers shared by every stage: resources created once per flow run and the one
retry policy for transient failures."""

from __future__ import annotations

import os
import threading
from typing import Any

from prefect import get_run_logger, task

from recranker_core.config import Settings

# SQLSTATEs a second try can fix: this transaction lost a race (serialization failure, deadlock
# victim), or the server dropped or refused the session (shutting down, restarting).
TRANSIENT_SQLSTATES = {
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
    "08000": "connection_exception",
    "08001": "sqlclient_unable_to_establish_sqlconnection",
    "08003": "connection_does_not_exist",
    "08004": "sqlserver_rejected_establishment_of_sqlconnection",
    "08006": "connection_failure",
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
}
# libpq reports a refused, reset or lost connection without a SQLSTATE; these are its words.
# Every other psycopg.OperationalError (a cancelled statement, a timeout, a connection left
# busy by an interrupted command: "another command is already in progress") is not transient.
TRANSIENT_CONNECTION_MESSAGES = (
    "connection refused",
    "connection reset",
    "server closed the connection unexpectedly",
    "could not receive data from server",
    "could not send data to server",
    "the connection is lost",
    "no route to host",
)


def is_transient(exc: BaseException) -> bool:
    """Whether a second try can fix what raised `exc`: a refused or reset connection (to
    PostgreSQL or S3) or a serialization failure. Anything else, and any stop (SIGINT,
    SIGTERM), is final."""
    import botocore.exceptions
    import psycopg

    if isinstance(exc, psycopg.Error):
        if exc.sqlstate is not None:
            return exc.sqlstate in TRANSIENT_SQLSTATES
        message = str(exc).lower()
        return isinstance(exc, psycopg.OperationalError) and any(
            words in message for words in TRANSIENT_CONNECTION_MESSAGES
        )
    return isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError  # refused, unreachable
        | botocore.exceptions.ConnectionClosedError  # reset
        | ConnectionRefusedError
        | ConnectionResetError
        | ConnectionAbortedError,
    )


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for TRANSIENT_RETRIES: retry only what `is_transient` says."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified, never swallowed
        return is_transient(exc)
    return False


# The one retry policy of every task in tasks/ that retries: `@task(..., **TRANSIENT_RETRIES)`.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_transient,
}


# Shorter waits than the policy's: an operator at a terminal is waiting for this one.
@task(name="resolve-database", **{**TRANSIENT_RETRIES, "retry_delay_seconds": [2, 10]})
def resolve_database(settings: Settings) -> str:
    """The database URL (starting the embedded server when none is configured), checked to
    carry the schema this code expects."""
    from recranker_core.db.connect import redact_url
    from recranker_core.db.migrate import require_current
    from recranker_core.stack import database_url

    url = database_url(settings)
    require_current(url)
    get_run_logger().info("database %s", redact_url(url))
    return url


_STORES: dict[tuple[int, Any], Any] = {}
_STORES_LOCK = threading.Lock()


def store_for(settings: Settings) -> Any:
    """The S3 artifact store of the settings (the local SeaweedFS when none is configured), one
    per process and endpoint/credentials: a ranking run's shards share its S3 client (boto3
    clients are thread-safe; building one costs tens of milliseconds)."""
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore

    config = s3_config(settings)
    key = (os.getpid(), config)
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = S3ArtifactStore(config)
        return _STORES[key]
