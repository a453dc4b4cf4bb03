"""Migrations against a real PostgreSQL: applied once, idempotent, edits refused, and the
read-only role exists."""

from __future__ import annotations

import psycopg
import pytest

from recranker_core.db.migrate import (
    available_migrations,
    current_version,
    require_current,
    upgrade,
)
from recranker_core.errors import ConfigError


def test_upgrade_is_idempotent_and_recorded(database_url: str):
    assert upgrade(database_url) == []
    assert current_version(database_url) == available_migrations()[-1].version
    require_current(database_url)
    with psycopg.connect(database_url) as conn:
        names = [
            r[0]
            for r in conn.execute("SELECT name FROM recranker.schema_migrations ORDER BY version")
        ]
        reader = conn.execute(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'recranker_reader'"
        ).fetchone()
    assert names == [m.name for m in available_migrations()]
    assert reader == (False,)


def test_edited_migration_is_refused(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE recranker.schema_migrations SET checksum = 'edited' WHERE version = 1")
    try:
        with pytest.raises(ConfigError, match="never edit an applied migration"):
            upgrade(database_url)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE recranker.schema_migrations SET checksum = %s WHERE version = 1",
                (available_migrations()[0].checksum,),
            )


def test_empty_database_is_reported_behind(pg_server_url: str):
    import uuid

    from recranker_core.db.connect import libpq_url

    name = f"recranker_empty_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(pg_server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{admin.rpartition('/')[0]}/{name}"
        assert current_version(url) == 0
        with pytest.raises(ConfigError, match="recranker db upgrade"):
            require_current(url)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
