"""Settings: environment parsing, validation, and the README's table kept in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from recranker_core.config import Settings, setting_value, settings_table
from recranker_core.db.connect import libpq_url, redact_url, set_memory, sqlalchemy_url


def test_nested_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("RECRANKER_HOME", str(tmp_path))
    monkeypatch.setenv("RECRANKER_INGEST__FAILURE_BUDGET", "0.02")
    monkeypatch.setenv("RECRANKER_INGEST__RATING_MAX", "10")
    s = Settings()
    assert s.home == tmp_path.resolve()
    assert s.ingest.failure_budget == 0.02 and s.ingest.rating_max == 10


def test_inverted_rating_scale_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECRANKER_INGEST__RATING_MIN", "5")
    monkeypatch.setenv("RECRANKER_INGEST__RATING_MAX", "1")
    with pytest.raises(ValueError, match="rating_min"):
        Settings()


def test_secret_free_dict_masks_the_password():
    s = Settings(database_url="postgresql://app:hunter2@db.internal:5432/rec")
    dumped = str(s.secret_free_dict())
    assert "hunter2" not in dumped and "app:***@db.internal:5432" in dumped


def test_url_helpers():
    assert redact_url("postgresql://a:b@h:1/d") == "postgresql://a:***@h:1/d"
    assert redact_url("postgresql://h/d") == "postgresql://h/d"
    assert libpq_url("postgresql+psycopg://a@h/d") == "postgresql://a@h/d"
    assert sqlalchemy_url("postgresql://a@h/d") == "postgresql+psycopg://a@h/d"


def test_readme_lists_every_setting():
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    assert settings_table() in readme, (
        "README's settings table is stale: paste `recranker settings --markdown`"
    )


def test_nightly_schedule_settings_are_checked(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECRANKER_NIGHTLY__TIMEZONE", "Europe/Paris")
    monkeypatch.setenv("RECRANKER_NIGHTLY__CRON", "30 1 * * *")
    s = Settings()
    assert (s.nightly.cron, s.nightly.timezone, s.nightly.tune_cron) == (
        "30 1 * * *",
        "Europe/Paris",
        "0 4 * * 0",
    )
    monkeypatch.setenv("RECRANKER_NIGHTLY__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValueError, match="not an IANA time zone"):
        Settings()
    monkeypatch.setenv("RECRANKER_NIGHTLY__TIMEZONE", "UTC")
    monkeypatch.setenv("RECRANKER_NIGHTLY__CRON", "every night")
    with pytest.raises(ValueError, match="five fields"):
        Settings()
    monkeypatch.delenv("RECRANKER_NIGHTLY__CRON")
    monkeypatch.setenv("RECRANKER_SERVER__DATABASE", "prefect; DROP")
    with pytest.raises(ValueError, match="database"):
        Settings()


def test_setting_value_follows_the_environment_variable_name():
    s = Settings(nightly={"cron": "5 3 * * *"}, server={"port": 4300})
    assert setting_value(s, "RECRANKER_NIGHTLY__CRON") == "5 3 * * *"
    assert setting_value(s, "RECRANKER_SERVER__PORT") == 4300
    assert setting_value(s, "RECRANKER_S3_BUCKET") == "recranker"
    for name in ("RECRANKER_NIGHTLY", "RECRANKER_NIGHTLY__NOPE", "HOME", "RECRANKER_RANK__K__X"):
        with pytest.raises(KeyError):
            setting_value(s, name)


def test_deploy_file_takes_schedules_from_settings(monkeypatch: pytest.MonkeyPatch):
    from cli.deploy import DEPLOY_FILE, load_deploy_file
    from recranker_core.errors import ConfigError

    monkeypatch.delenv("RECRANKER_NIGHTLY__CRON", raising=False)
    monkeypatch.setenv("RECRANKER_NIGHTLY__TIMEZONE", "Asia/Tokyo")
    spec = {d["name"]: d for d in load_deploy_file(DEPLOY_FILE)["deployments"]}
    assert spec["nightly"]["schedules"][0] == {
        "cron": "0 2 * * *",
        "timezone": "Asia/Tokyo",
        "active": True,
    }
    assert spec["tune-ranker"]["schedules"][0]["cron"] == "0 4 * * 0"
    monkeypatch.setenv("RECRANKER_NIGHTLY__TUNE_CRON", "0 4 * *")
    with pytest.raises(ConfigError, match="tune_cron"):
        load_deploy_file(DEPLOY_FILE)


def test_rank_work_mem_is_a_postgresql_size(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECRANKER_RANK__WORK_MEM", "64MB")
    assert Settings().rank.work_mem == "64MB"
    # It is sent to the server as SET LOCAL work_mem: only a size is accepted here.
    monkeypatch.setenv("RECRANKER_RANK__WORK_MEM", "64MB; DROP TABLE x")
    with pytest.raises(ValueError, match="work_mem"):
        Settings()


def test_only_memory_parameters_are_set_by_set_memory():
    # Refused before any statement reaches a connection.
    with pytest.raises(ValueError, match="not a memory parameter"):
        set_memory(None, "search_path", "public")  # type: ignore[arg-type]
