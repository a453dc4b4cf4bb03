"""Schema migrations: numbered SQL files in the `sql` package, each applied once, in its own
transaction, and recorded in recranker.schema_migrations."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from recranker_core.db.connect import connect
from recranker_core.errors import ConfigError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any fixed number works; it only has to be the same for every process applying migrations.
_MIGRATION_LOCK = 7_310_001


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """The migration files shipped with this version, in order."""
    found = []
    for entry in resources.files("sql").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migration files share a number: {[m.name for m in found]}")
    return found


def upgrade(database_url: str) -> list[str]:
    """Apply every migration not yet recorded; returns the names applied (empty: up to date).

    Refuses to run when an applied migration's file has changed since, since the database would
    no longer match what the code expects.
    """
    applied_now: list[str] = []
    with connect(database_url, autocommit=True) as conn:
        # A migration's WARNING (e.g. a right it could not change) reaches the operator.
        conn.add_notice_handler(_log_warning)
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS recranker")
            conn.execute(
                """CREATE TABLE IF NOT EXISTS recranker.schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                row[0]: (row[1], row[2])
                for row in conn.execute(
                    "SELECT version, name, checksum FROM recranker.schema_migrations"
                )
            }
            for mig in available_migrations():
                if mig.version in done:
                    name, checksum = done[mig.version]
                    if checksum != mig.checksum:
                        raise ConfigError(
                            f"migration {mig.name} was applied as {name} with different content; "
                            "never edit an applied migration, add a new numbered file instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(mig.sql.encode())
                    conn.execute(
                        "INSERT INTO recranker.schema_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)",
                        (mig.version, mig.name, mig.checksum),
                    )
                log.info("applied migration %s", mig.name)
                applied_now.append(mig.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied_now


def _log_warning(notice: psycopg.errors.Diagnostic) -> None:
    if notice.severity_nonlocalized in ("WARNING", "ERROR"):
        log.warning("%s", notice.message_primary)


def current_version(database_url: str) -> int:
    """The highest applied migration number (0 for an empty database)."""
    with connect(database_url) as conn:
        exists = conn.execute(
            "SELECT to_regclass('recranker.schema_migrations') IS NOT NULL"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM recranker.schema_migrations"
        ).fetchone()
        return int(row[0]) if row else 0


def require_current(database_url: str) -> None:
    """Refuse to work on a database whose schema is behind this code."""
    latest = available_migrations()[-1].version
    have = current_version(database_url)
    if have < latest:
        raise ConfigError(
            f"the database schema is at migration {have:04d}, this code needs {latest:04d}: "
            "run `recranker db upgrade`"
        )
