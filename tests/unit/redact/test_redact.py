"""The one masking function: every credential form is masked, nothing else is, and log records
are masked at creation (message, arguments, traceback)."""

from __future__ import annotations

import logging

import pytest

from recranker_core.errors import ArtifactIntegrityError
from recranker_core.redact import install_log_masking, redact, redact_value, register_secret

SECRET = "Zq8-sEcReT-4471"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"postgresql://app:{SECRET}@db:5432/rec", "postgresql://app:***@db:5432/rec"),
        (f"postgresql+psycopg://app:{SECRET}@db/rec", "postgresql+psycopg://app:***@db/rec"),
        ("postgresql://app:p%40ss%3Aw0rd@db/rec", "postgresql://app:***@db/rec"),
        ("postgresql://app:p@ss@db/rec", "postgresql://app:***@db/rec"),  # unencoded '@'
        (f"postgresql://:{SECRET}@db/rec", "postgresql://:***@db/rec"),
        (
            f"postgresql://app@db/rec?sslmode=require&password={SECRET}&x=1",
            "postgresql://app@db/rec?sslmode=require&password=***&x=1",
        ),
        (f"postgresql://db/rec?PASSWORD={SECRET}", "postgresql://db/rec?PASSWORD=***"),
        (f"postgresql://db/rec?sslpassword={SECRET}", "postgresql://db/rec?sslpassword=***"),
        (
            f"host=db port=5432 user=app password={SECRET} dbname=rec",
            "host=db port=5432 user=app password=*** dbname=rec",
        ),
        (f"host=db password = '{SECRET} x\\' y' dbname=rec", "host=db password = *** dbname=rec"),
        (f"PGPASSWORD={SECRET} psql -h db", "PGPASSWORD=*** psql -h db"),
        (f"AWS_SECRET_ACCESS_KEY={SECRET}", "AWS_SECRET_ACCESS_KEY=***"),
        (
            f'{{"secretKey": "{SECRET}", "accessKey": "AK1"}}',
            '{"secretKey": ***, "accessKey": "AK1"}',
        ),
        (f"secret_key: {SECRET}", "secret_key: ***"),
        (f"aws_session_token={SECRET}", "aws_session_token=***"),
    ],
)
def test_every_credential_form_is_masked(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert SECRET not in redact(f"error: could not connect to {text}: refused")


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app@db:5432/rec",
        "http://127.0.0.1:4200/api",
        "s3://recranker/models/mf/20260101-ab12cd34/model.onnx",
        "max_tokens=512 tokens=10 passwords_seen=3 secret_free_dict",
        "sha256 0f3a... where the registry has 9c1e...",
        "",
    ],
)
def test_text_without_credentials_is_unchanged(text: str) -> None:
    assert redact(text) == text


def test_secrets_known_to_the_process_are_masked_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "pg-" + SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-" + SECRET)
    monkeypatch.setenv("RECRANKER_DATABASE_URL", f"postgresql://app:url%2F{SECRET}@db/rec")
    text = (
        f"libpq said: pg-{SECRET}; boto said aws-{SECRET}; "
        f"decoded url/{SECRET}, encoded url%2F{SECRET}"
    )
    masked = redact(text)
    assert SECRET not in masked and masked.count("***") == 4
    register_secret("generated-" + SECRET)
    assert redact(f"[generated-{SECRET}]") == "[***]"
    register_secret("ab")  # too short to mask in free text without starring out words
    assert redact("abc") == "abc"
    assert redact_value({"a": [f"password={SECRET}", 3], "b": (f"x:{SECRET}@",)}) == {
        "a": ["password=***", 3],
        "b": (f"x:{SECRET}@",),
    }


def test_log_records_are_masked_at_creation(caplog: pytest.LogCaptureFixture) -> None:
    install_log_masking()
    log = logging.getLogger("recranker_core.test_redact")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("database %s", f"postgresql://app:{SECRET}@db/rec")
        try:
            raise RuntimeError(f"connect failed: host=db password={SECRET}")
        except RuntimeError:
            log.exception("unexpected")
        try:
            raise ArtifactIntegrityError(f"s3://b/m/model.onnx does not match; password={SECRET}")
        except ArtifactIntegrityError:
            log.exception("expected")
    assert SECRET not in caplog.text
    unexpected, expected = caplog.records[1], caplog.records[2]
    assert "Traceback" in caplog.text and "RuntimeError: connect failed" in caplog.text
    assert unexpected.exc_text and "password=***" in unexpected.exc_text
    # An expected failure: one line saying what, no traceback.
    assert expected.exc_text is None and expected.exc_info is None
    assert expected.getMessage() == (
        "expected: ArtifactIntegrityError: s3://b/m/model.onnx does not match; password=***"
    )
