"""Service fixtures shared by every test: a real PostgreSQL database (the machine's server on
127.0.0.1:5432 when reachable, else the embedded one), created fresh for the session and dropped
after; a real SeaweedFS with generated credentials; Prefect's test harness."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Tests read run logs (on stderr and in Prefect's log table): the same logging whatever the
# environment of the machine running them says (a CI that quiets Prefect to WARNING, say).
os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "true"

MACHINE_PG = os.environ.get("RECRANKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _machine_pg_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(MACHINE_PG, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def services_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$RECRANKER_HOME of the test session (embedded services, caches)."""
    return tmp_path_factory.mktemp("recranker-home")


@pytest.fixture(scope="session")
def pg_server_url(services_home: Path) -> Iterator[str]:
    """An admin URL of a running PostgreSQL server."""
    if _machine_pg_reachable():
        yield MACHINE_PG
        return
    from recranker_core.config import Settings
    from recranker_core.stack import database_url, stack_down

    settings = Settings(home=services_home, database_url=None, s3_endpoint=None)
    url = database_url(settings, start=True)
    try:
        yield url
    finally:
        stack_down(settings)


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped afterwards."""
    import psycopg

    from recranker_core.db.connect import libpq_url
    from recranker_core.db.migrate import upgrade

    name = f"recranker_test_{uuid.uuid4().hex[:10]}"
    admin = libpq_url(pg_server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin.rpartition("/")
    url = f"{base}/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def clean_db(database_url: str) -> str:
    """The session database with every recranker table emptied."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'recranker' "
                "AND tablename <> 'schema_migrations'"
            )
        ]
        if tables:
            conn.execute(
                "TRUNCATE " + ", ".join(f"recranker.{t}" for t in tables) + " RESTART IDENTITY"
            )
    return database_url


@pytest.fixture()
def settings(tmp_path: Path, database_url: str):  # type: ignore[no-untyped-def]
    from recranker_core.config import Settings

    return Settings(home=tmp_path / "home", database_url=database_url)


@pytest.fixture(scope="session")
def s3_settings(services_home: Path):  # type: ignore[no-untyped-def]
    """Settings whose S3 is a real SeaweedFS started for this session with generated
    credentials (a wrong key is refused), stopped afterwards."""
    from recranker_core.config import Settings
    from recranker_core.stack import stack_down, stack_up

    settings = Settings(home=services_home, s3_endpoint=None)
    stack_up(settings, postgres=False, s3=True)
    try:
        yield settings
    finally:
        stack_down(settings)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Prefect's test harness (a real API server on a temporary database), once per session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture()
def tiny_pipeline(
    tmp_path: Path, settings, s3_settings, clean_db: str, prefect_api: str, monkeypatch
) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A generated catalogue ingested, an MF champion trained by the retrain-base flow, a tiny
    random Llama as the backbone, and settings small enough for a tuning run in seconds (set in
    the environment, as an operator would)."""
    from flows.retrain_base import retrain_base_flow
    from recranker_core.datasets.sources import describe_file
    from recranker_core.datasets.synthetic import generate
    from recranker_core.ingest import ingest_file
    from recranker_core.llm.tiny import build_tiny_model

    files = generate(tmp_path / "synth", users=120, items=100, interactions=5000, seed=5)
    ingest_file(describe_file(files.interactions, None), settings, clean_db)
    tiny = build_tiny_model(tmp_path / "tiny")
    for key, value in {
        "RECRANKER_DATABASE_URL": clean_db,
        "RECRANKER_HOME": str(s3_settings.home),
        "RECRANKER_BASE__MF__EPOCHS": "3",
        "RECRANKER_BASE__MF__PATIENCE": "1",
        "RECRANKER_BASE__BIASEDMF__EPOCHS": "3",
        "RECRANKER_BACKBONE__PATH": str(tiny),
        "RECRANKER_SAMPLING__USERS": "24",
        "RECRANKER_PROMPTS__HISTORY_MAX": "6",
        "RECRANKER_TUNE__EPOCHS": "2",
        "RECRANKER_TUNE__BATCH_SIZE": "4",
        "RECRANKER_TUNE__GRAD_ACCUMULATION": "2",
        "RECRANKER_TUNE__EVAL_EVERY": "4",
        "RECRANKER_TUNE__PATIENCE": "10",
        "RECRANKER_TUNE__VALID_USERS": "8",
        "RECRANKER_TUNE__LR": "5e-3",
    }.items():
        monkeypatch.setenv(key, value)
    retrain_base_flow(["mf"])
    return {"tiny": tiny, "database_url": clean_db, "files": files}


@pytest.fixture()
def tune_promoted(tiny_pipeline: dict[str, object]):  # type: ignore[no-untyped-def]
    """Run the tune-ranker flow and make its adapter champion even when the gate rejected it
    (a tiny random backbone's fused ranking beats the base order only by chance), as an
    operator would with `recranker adapters promote`: for tests of what serves an adapter."""
    from flows.tune_ranker import tune_ranker_flow
    from recranker_core import registry

    def run(**kwargs: object) -> dict[str, object]:
        summary = tune_ranker_flow(**kwargs)  # type: ignore[arg-type]
        if not summary["promoted"]:
            registry.promote_adapter(
                str(tiny_pipeline["database_url"]),
                int(summary["adapter_id"]),
                "promoted by the test: the tiny backbone's gate decision is chance",
            )
        return summary

    return run
