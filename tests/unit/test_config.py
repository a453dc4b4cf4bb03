"""Settings: environment parsing, validation, and the README's table kept in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from recranker_core.config import Settings, settings_table
from recranker_core.db.connect import libpq_url, redact_url, sqlalchemy_url


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
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert settings_table() in readme, (
        "README's settings table is stale: paste `recranker settings --markdown`"
    )
