"""The local stack with real processes: embedded PostgreSQL and SeaweedFS started, found, refused
with wrong credentials, restarted with their data, and never confused with a process not ours."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from recranker_core.config import Settings
from recranker_core.errors import ConfigError, StackError
from recranker_core.stack import (
    S3Config,
    ServiceStatus,
    database_url,
    s3_config,
    stack_down,
    stack_status,
    stack_up,
)

OBJECT_KEY = "stack-test/hello.txt"


def _by_name(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {s.name: s for s in statuses}


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _secrets(home: Path) -> list[str]:
    pg = json.loads((home / "pg" / "credentials.json").read_text())["password"]
    s3 = json.loads((home / "s3" / "credentials.json").read_text())["secret_key"]
    return [pg, s3]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, list[ServiceStatus]]]:
    """One stack for the module (a SeaweedFS start and stop costs seconds); always torn down."""
    settings = Settings(
        home=tmp_path_factory.mktemp("stack-home"), database_url=None, s3_endpoint=None
    )
    try:
        yield settings, stack_up(settings)
    finally:
        stack_down(settings)


@pytest.fixture()
def unrelated_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not ours, whose pid a stale pid file can name."""
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_up_starts_both_on_loopback(stack: tuple[Settings, list[ServiceStatus]]) -> None:
    settings, statuses = stack
    up = _by_name(statuses)
    assert [s.name for s in statuses] == ["postgres", "s3"]
    assert {s.state for s in statuses} == {"running"}
    assert up["postgres"].detail.startswith("initialized and started (pid ")
    assert up["s3"].detail.startswith("started (pid ")
    assert up["postgres"].address.startswith("postgresql://postgres:***@127.0.0.1:")
    assert up["s3"].address.startswith("http://127.0.0.1:")
    assert all(s.pid is not None and not _gone(s.pid) for s in statuses)
    for now, before in zip(stack_status(settings), statuses, strict=True):
        assert (now.name, now.state, now.pid, now.address) == (
            before.name,
            "running",
            before.pid,
            before.address,
        )
        assert now.detail.startswith(f"running (pid {before.pid}) on 127.0.0.1:")
    for name in ("pg/credentials.json", "s3/credentials.json", "s3/identities.json"):
        assert (settings.home / name).stat().st_mode & 0o777 == 0o600, name


def test_postgres_answers_with_password_only(stack: tuple[Settings, list[ServiceStatus]]) -> None:
    import psycopg

    settings, _ = stack
    url = database_url(settings, start=False)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("show listen_addresses").fetchone() == ("127.0.0.1",)
        conn.execute("create table survives_restart (x int)")
        conn.execute("insert into survives_restart values (42)")
    wrong = url.replace(f":{urlsplit(url).password}@", ":not-the-password@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5).close()


def test_sqlalchemy_accepts_the_url(stack: tuple[Settings, list[ServiceStatus]]) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(
        database_url(stack[0], start=False).replace("postgresql://", "postgresql+psycopg://", 1)
    )
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
    finally:
        engine.dispose()


def test_s3_put_get_and_wrong_key_refused(stack: tuple[Settings, list[ServiceStatus]]) -> None:
    from botocore.exceptions import ClientError

    settings, _ = stack
    config = s3_config(settings, start=False)
    assert config.endpoint == _by_name(stack_status(settings))["s3"].address
    client = config.client()
    client.put_object(Bucket=config.bucket, Key=OBJECT_KEY, Body=b"hello")
    assert client.get_object(Bucket=config.bucket, Key=OBJECT_KEY)["Body"].read() == b"hello"

    for access_key, secret_key in [
        (config.access_key, "0" * len(config.secret_key)),
        ("RKNOTAKEY0000000000", config.secret_key),
    ]:
        intruder = S3Config(config.endpoint, config.bucket, config.region, access_key, secret_key)
        with pytest.raises(ClientError) as refused:
            intruder.client().get_object(Bucket=config.bucket, Key=OBJECT_KEY)
        assert refused.value.response["Error"]["Code"] in {
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        }
        with pytest.raises(ClientError):
            intruder.client().put_object(Bucket=config.bucket, Key="intruder.txt", Body=b"x")

    # Around S3: the filer's own HTTP port needs a JWT only the S3 gateway can sign.
    import urllib.error
    import urllib.request

    filer = json.loads((settings.home / "s3" / "state.json").read_text())["ports"]["filer"]
    with pytest.raises(urllib.error.HTTPError) as around:
        urllib.request.urlopen(f"http://127.0.0.1:{filer}/buckets/{config.bucket}/{OBJECT_KEY}")
    assert around.value.code == 401


def test_up_again_is_idempotent(stack: tuple[Settings, list[ServiceStatus]]) -> None:
    settings, first = stack
    again = stack_up(settings)
    assert [(s.name, s.state, s.pid, s.address) for s in again] == [
        (s.name, s.state, s.pid, s.address) for s in first
    ]
    assert all(s.detail.startswith("already running (pid ") for s in again)


def test_secrets_stay_out_of_reprs_statuses_and_logs(
    stack: tuple[Settings, list[ServiceStatus]], caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = stack
    with caplog.at_level(logging.DEBUG):
        shown = [
            repr(stack_up(settings)),
            repr(stack_status(settings)),
            repr(s3_config(settings)),
            str(s3_config(settings)),
        ]
    shown += [r.getMessage() for r in caplog.records]
    for secret in _secrets(settings.home):
        assert all(secret not in text for text in shown)


def test_second_stack_runs_beside(
    stack: tuple[Settings, list[ServiceStatus]], tmp_path: Path
) -> None:
    from botocore.exceptions import ClientError

    first = s3_config(stack[0], start=False)
    other = Settings(home=tmp_path / "other", database_url=None, s3_endpoint=None)
    try:
        [status] = stack_up(other, postgres=False)
        assert status.state == "running"
        second = s3_config(other, start=False)
        assert second.endpoint != first.endpoint
        second.client().put_object(Bucket=second.bucket, Key="other.txt", Body=b"2")
        foreign = S3Config(
            second.endpoint, second.bucket, second.region, first.access_key, first.secret_key
        )
        with pytest.raises(ClientError):
            foreign.client().get_object(Bucket=second.bucket, Key="other.txt")
        assert not (other.home / "pg").exists()
    finally:
        stack_down(other)
    assert first.client().get_object(Bucket=first.bucket, Key=OBJECT_KEY)["Body"].read() == b"hello"


def test_down_stale_pid_files_and_restart(
    stack: tuple[Settings, list[ServiceStatus]], unrelated_process: subprocess.Popen[bytes]
) -> None:
    import psycopg

    settings, _ = stack
    home = settings.home
    running = _by_name(stack_status(settings))

    down = _by_name(stack_down(settings))
    assert {s.state for s in down.values()} == {"stopped"}
    for name in ("postgres", "s3"):
        assert down[name].detail == f"stopped (was pid {running[name].pid})"
        assert _gone(running[name].pid)  # type: ignore[arg-type]
    assert [s.detail for s in stack_down(settings)] == ["not running", "not running"]
    with pytest.raises(StackError, match="recranker stack up"):
        database_url(settings, start=False)
    with pytest.raises(StackError, match="recranker stack up"):
        s3_config(settings, start=False)

    # Pid files naming a live process that is not ours, as after a reboot that recycled pids.
    sleeper = unrelated_process.pid
    pgdata = home / "pg" / "data"

    def write_stale() -> None:
        (home / "s3" / "weed.pid").write_text(f"{sleeper}\n")
        (pgdata / "postmaster.pid").write_text(
            f"{sleeper}\n{pgdata}\n{int(time.time())}\n5432\n\n127.0.0.1\n  0 0\nready   \n"
        )

    write_stale()
    status = stack_status(settings)
    assert {s.state for s in status} == {"stopped"}
    assert all("stale pid file" in s.detail and str(sleeper) in s.detail for s in status)
    assert [s.detail.split(";")[0] for s in stack_down(settings)] == ["not running"] * 2
    assert unrelated_process.poll() is None
    assert not (home / "s3" / "weed.pid").exists() and not (pgdata / "postmaster.pid").exists()

    write_stale()
    # Something else took PostgreSQL's recorded port meanwhile: it moves and says so.
    old_port = json.loads((home / "pg" / "state.json").read_text())["port"]
    with socket.create_server(("127.0.0.1", old_port)):
        up = _by_name(stack_up(settings))
    assert unrelated_process.poll() is None
    assert {s.state for s in up.values()} == {"running"}
    assert all("stale pid file removed" in s.detail for s in up.values())
    assert f"port {old_port} was taken, moved to " in up["postgres"].detail
    assert up["postgres"].address != running["postgres"].address
    assert up["s3"].address == running["s3"].address  # its recorded ports were free

    with psycopg.connect(database_url(settings, start=False)) as conn:
        assert conn.execute("select x from survives_restart").fetchall() == [(42,)]
    config = s3_config(settings, start=False)
    assert config.client().get_object(Bucket=config.bucket, Key=OBJECT_KEY)["Body"].read() == (
        b"hello"
    )

    # A pid file overwritten while weed runs: weed is still found by its data directory.
    (home / "s3" / "weed.pid").write_text(f"{sleeper}\n")
    assert _by_name(stack_status(settings))["s3"].pid == up["s3"].pid
    down = _by_name(stack_down(settings))
    assert down["s3"].detail == f"stopped (was pid {up['s3'].pid})"
    assert unrelated_process.poll() is None

    # What the test session's fixture does: the database started on demand.
    with psycopg.connect(database_url(settings, start=True)) as conn:
        assert conn.execute("select x from survives_restart").fetchall() == [(42,)]
    assert _by_name(stack_status(settings))["postgres"].state == "running"


def test_external_services_are_reported_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    settings = Settings(
        home=tmp_path,
        database_url=f"postgresql://alice:{secret}@db.example.internal:5432/rec",
        s3_endpoint=None,
    )
    [pg] = stack_up(settings, s3=False)
    assert pg.state == "external" and pg.pid is None
    assert pg.address == "postgresql://alice:***@db.example.internal:5432/rec"
    assert pg.detail == "RECRANKER_DATABASE_URL is set; not managed here"
    assert _by_name(stack_status(settings))["postgres"] == pg
    assert _by_name(stack_down(settings))["postgres"] == pg
    assert database_url(settings) == settings.database_url
    assert not (tmp_path / "pg").exists()

    external_s3 = Settings(home=tmp_path, database_url=None, s3_endpoint="http://s3.example:9000")
    assert _by_name(stack_status(external_s3))["s3"].state == "external"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY") as missing:
        s3_config(external_s3)
    assert "AWS_ACCESS_KEY_ID" not in str(missing.value)
    assert not (tmp_path / "s3").exists()
