"""What the commands share: exit codes, settings and database checks, JSON output, option
types and the one-line report of a failure."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer

# Exit codes (the README's table): 0 done, 1 an ingested batch was rejected, 2 the command could
# not run as configured (usage, settings, database or S3 missing or unreachable, nothing to work
# on yet, another batch_rank running), 3 an artifact failed its integrity check, 4 an unexpected
# error (a bug: the traceback is printed), 130 interrupted.
EXIT_REJECTED = 1
EXIT_CONFIG = 2
EXIT_INTEGRITY = 3
EXIT_UNEXPECTED = 4
EXIT_INTERRUPTED = 130
# Set by the `--debug` option (the app's callback in cli/__init__.py), read by _fail.
_DEBUG = {"on": False}


class Format(StrEnum):
    movielens = "movielens"
    csv = "csv"
    parquet = "parquet"


ProfileOption = Annotated[
    str | None, typer.Option(help="`full`, `cpu` or `cpu-demo` (default RECRANKER_TUNE__PROFILE).")
]


def _settings() -> Any:
    from recranker_core.config import load_settings
    from recranker_core.errors import ConfigError

    try:
        return load_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"invalid setting: {exc}") from exc


def _preflight() -> None:
    """Fail fast, in one line, when the database is missing, unreachable or behind this code,
    before a flow starts (whose tasks would retry the connection and log each attempt)."""
    from recranker_core.db.migrate import require_current
    from recranker_core.stack import database_url

    require_current(database_url(_settings()))


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=str, sort_keys=True))


def _served(fusion: dict[str, Any] | None) -> str:
    """The guard's decision in one cell: served, gain and se (or '-' when none applies)."""
    if not fusion:
        return "-"
    served = fusion.get("served", "?")
    if fusion.get("gain") is None:
        return str(served)
    return f"{served} {fusion['gain']:+.4f}±{fusion.get('se', 0.0):.4f}"


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """What went wrong, in one line for the user, and the exit code (the README's table)."""
    from recranker_core.errors import ArtifactIntegrityError, RecrankerError, ValidationFailed

    if isinstance(exc, RecrankerError):
        code = (
            EXIT_INTEGRITY
            if isinstance(exc, ArtifactIntegrityError)
            else EXIT_REJECTED
            if isinstance(exc, ValidationFailed)
            else EXIT_CONFIG
        )
        return str(exc), code
    service = _service_failure(exc)
    if service is not None:
        return service, EXIT_CONFIG
    return (
        f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (a bug: please report it with "
        "the traceback above)",
        EXIT_UNEXPECTED,
    )


def _service_failure(exc: BaseException) -> str | None:
    """The line for a database or S3 that is missing, unreachable or refuses us; None for any
    other failure."""
    import psycopg

    where = _database_named()
    if isinstance(exc, psycopg.OperationalError):
        said = _one_line(str(exc))
        todo = (
            "create it (`createdb`) or correct RECRANKER_DATABASE_URL, then run "
            "`recranker db upgrade`"
            if "does not exist" in said
            else "check RECRANKER_DATABASE_URL (or start the local stack: `recranker stack "
            "up`); a new database needs `recranker db upgrade`"
        )
        return f"cannot use the database {where} ({said}): {todo}"
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return (
            f"the database {where} has no recranker schema ({_one_line(str(exc))}): run "
            "`recranker db upgrade`"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return (
            f"the database {where} refused an operation ({_one_line(str(exc))}): connect as "
            "the pipeline's role (the owner of schema recranker), not as a reader"
        )
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, BotoCoreError | ClientError):
        endpoint = os.environ.get("RECRANKER_S3_ENDPOINT") or "the local SeaweedFS"
        return (
            f"cannot use S3 at '{endpoint}' ({_one_line(str(exc))}): check "
            "RECRANKER_S3_ENDPOINT, RECRANKER_S3_BUCKET and the AWS credentials (or start the "
            "local stack: `recranker stack up`)"
        )
    return None


def _database_named() -> str:
    # Quoted: the masking of a password= parameter stops at the quote, not at the next word.
    url = os.environ.get("RECRANKER_DATABASE_URL")
    return f"'{url}'" if url else "(the embedded PostgreSQL under $RECRANKER_HOME/pg)"


def _one_line(text: str) -> str:
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Print the error line (after the masked traceback when there is one to show) and exit."""
    import traceback

    from recranker_core.redact import redact

    if exc is not None and (_DEBUG["on"] or code == EXIT_UNEXPECTED):
        typer.echo(redact("".join(traceback.format_exception(exc)).rstrip()), err=True)
    typer.echo(f"error: {redact(message)}", err=True)
    sys.exit(code)
