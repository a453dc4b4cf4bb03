"""The stack's interface: start, stop and report its services, and resolve the PostgreSQL URL and
S3 configuration to use, from settings when a service is external, else the local one's."""

from __future__ import annotations

import logging
import os

from recranker_core.config import Settings
from recranker_core.db.connect import redact_url
from recranker_core.errors import ConfigError, StackError
from recranker_core.stack.common import ServiceStatus, _locked
from recranker_core.stack.postgres import (
    _pg_external,
    _pg_find,
    _pg_running_port,
    _pg_start,
    _pg_status,
    _pg_stop,
    _pg_url,
    _PgLayout,
)
from recranker_core.stack.prefect import (
    _prefect_find,
    _prefect_start,
    _prefect_status,
    _prefect_stop,
    _PrefectLayout,
)
from recranker_core.stack.s3 import (
    S3Config,
    _ensure_bucket,
    _local_s3_config,
    _s3_external,
    _s3_find,
    _s3_start,
    _s3_status,
    _s3_stop,
    _S3Layout,
)

log = logging.getLogger(__name__)


def stack_up(
    settings: Settings, *, postgres: bool = True, s3: bool = True, ui: bool = False
) -> list[ServiceStatus]:
    """Start the embedded services that are not configured externally, and with ``ui`` a Prefect
    server (API + UI) on the same PostgreSQL; idempotent."""
    statuses: list[ServiceStatus] = []
    with _locked(settings.home):
        if postgres or ui:
            statuses.append(
                _pg_external(settings) if settings.database_url else _pg_start(_PgLayout(settings))
            )
        if s3:
            statuses.append(
                _s3_external(settings) if settings.s3_endpoint else _s3_start(_S3Layout(settings))
            )
    if ui:
        # Outside the lock: database_url() takes it again to start PostgreSQL on demand.
        admin = database_url(settings)
        with _locked(settings.home):
            statuses.append(_prefect_start(_PrefectLayout(settings), admin))
    return statuses


def stack_down(settings: Settings) -> list[ServiceStatus]:
    """Stop the embedded services we started; external ones and foreign processes are untouched.
    The Prefect server (when `stack up --ui` ever ran here) stops first: it uses PostgreSQL."""
    statuses: list[ServiceStatus] = []
    with _locked(settings.home):
        prefect = _PrefectLayout(settings)
        ui = _prefect_stop(prefect) if prefect.dir.exists() else None
        statuses.append(
            _pg_external(settings) if settings.database_url else _pg_stop(_PgLayout(settings))
        )
        statuses.append(
            _s3_external(settings) if settings.s3_endpoint else _s3_stop(_S3Layout(settings))
        )
    return statuses + ([ui] if ui else [])


def stack_status(settings: Settings) -> list[ServiceStatus]:
    """Report every service without changing anything (the Prefect server only where `stack up
    --ui` ever ran)."""
    pg = _pg_external(settings) if settings.database_url else _pg_status(_PgLayout(settings))
    s3 = _s3_external(settings) if settings.s3_endpoint else _s3_status(_S3Layout(settings))
    prefect = _PrefectLayout(settings)
    return [pg, s3] + ([_prefect_status(prefect)] if prefect.dir.exists() else [])


def local_prefect_api(settings: Settings) -> str | None:
    """The API URL of the Prefect server `stack up --ui` started under this home, when it runs."""
    layout = _PrefectLayout(settings)
    if not layout.dir.exists():
        return None
    proc, _ = _prefect_find(layout)
    return layout.api_url if proc is not None else None


def database_url(settings: Settings, *, start: bool = True) -> str:
    """The PostgreSQL URL to use: RECRANKER_DATABASE_URL, else the embedded server's (with its
    password), started on demand when ``start``."""
    if settings.database_url:
        return settings.database_url
    layout = _PgLayout(settings)
    proc, _ = _pg_find(layout)
    if proc is None:
        if not start:
            raise StackError(
                f"the embedded PostgreSQL under {layout.dir} is not running: run "
                "`recranker stack up` (or set RECRANKER_DATABASE_URL to use another server)"
            )
        with _locked(settings.home):
            status = _pg_start(layout)
        log.info("embedded PostgreSQL started on demand: %s", status.detail)
    return _pg_url(layout, _pg_running_port(layout), redact=False)


def s3_config(settings: Settings, *, start: bool = True) -> S3Config:
    """The S3 endpoint, bucket and credentials to use, with the bucket created if missing.

    External (RECRANKER_S3_ENDPOINT set): credentials from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN when set). Local: the SeaweedFS under
    $RECRANKER_HOME/s3 with its generated credentials, started on demand when ``start``.
    """
    if settings.s3_endpoint:
        missing = [
            v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)
        ]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(
                f"RECRANKER_S3_ENDPOINT is set ({redact_url(settings.s3_endpoint)}) but "
                f"{' and '.join(missing)} {verb} not: export the S3 credentials for it"
            )
        config = S3Config(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        )
    else:
        layout = _S3Layout(settings)
        proc, _ = _s3_find(layout)
        if proc is None:
            if not start:
                raise StackError(
                    f"the local SeaweedFS under {layout.dir} is not running: run "
                    "`recranker stack up` (or set RECRANKER_S3_ENDPOINT to use another S3)"
                )
            with _locked(settings.home):
                status = _s3_start(layout)
            log.info("local SeaweedFS started on demand: %s", status.detail)
        config = _local_s3_config(settings, layout)
    _ensure_bucket(config)
    return config
