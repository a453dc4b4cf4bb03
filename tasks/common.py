"""Task-level helpers shared by every stage: resources created once per flow run and the retry
policy for transient failures."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from recranker_core.config import Settings


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only failures a second try can fix: lost connections and unreachable services."""
    import botocore.exceptions
    import psycopg

    try:
        state.result()
    except (
        psycopg.OperationalError,
        botocore.exceptions.EndpointConnectionError,
        ConnectionError,
        TimeoutError,
    ):
        return True
    except Exception:
        return False
    return False


@task(name="resolve-database", retries=2, retry_delay_seconds=[2, 10])
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


def store_for(settings: Settings) -> Any:
    """The S3 artifact store of the settings (the local SeaweedFS when none is configured)."""
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore

    return S3ArtifactStore(s3_config(settings))
