"""Credentials never show (issue 16, item 5): a password in each form (URL userinfo, a password=
URL parameter, a key=value connection string, the S3 secret key, PGPASSWORD) is looked for in
the output of `recranker settings`, in the CLI's logs and tracebacks, in the process's log records
and in the Prefect log table of real flow runs, against real PostgreSQL (trust authentication, so
any password connects) and Prefect's test harness."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import flows.ingest  # noqa: F401 - importing the flows masks this process's log records, as in production
from recranker_core.db.connect import libpq_url

SECRETS = {
    "userinfo": "uSeRiNfO-" + uuid.uuid4().hex[:8],
    "query": "qUeRy-" + uuid.uuid4().hex[:8],
    "conninfo": "cOnNiNfO-" + uuid.uuid4().hex[:8],
    "s3": "s3SeCrEt-" + uuid.uuid4().hex[:8],
    "pgpassword": "pGpAsS-" + uuid.uuid4().hex[:8],
}


def leaked(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


def url_forms(database_url: str) -> dict[str, str]:
    """The same database in each form a password can take."""
    base = libpq_url(database_url)
    host_db = base.split("@", 1)[1]  # 127.0.0.1:5432/name
    host, _, rest = host_db.partition(":")
    port, _, name = rest.partition("/")
    return {
        "userinfo+query": f"postgresql://postgres:{SECRETS['userinfo']}@{host_db}"
        f"?sslmode=disable&password={SECRETS['query']}",
        "conninfo": f"host={host} port={port} user=postgres password={SECRETS['conninfo']} "
        f"dbname={name}",
        "conninfo-quoted": f"host={host} port={port} password='{SECRETS['conninfo']} x' "
        f"dbname={name}",
    }


def secret_env(database_url: str) -> dict[str, str]:
    return {
        "PGPASSWORD": SECRETS["pgpassword"],
        "AWS_ACCESS_KEY_ID": "AKIATEST",
        "AWS_SECRET_ACCESS_KEY": SECRETS["s3"],
        "RECRANKER_S3_ENDPOINT": f"http://AKIATEST:{SECRETS['s3']}@127.0.0.1:9",
    }


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_recranker_settings_masks_every_form(database_url: str, tmp_path: Path) -> None:
    for form, url in url_forms(database_url).items():
        env = {
            **secret_env(database_url),
            "RECRANKER_DATABASE_URL": url,
            "RECRANKER_HOME": str(tmp_path),
        }
        done = run_cli(["settings"], env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert leaked(done.stdout + done.stderr) == [], (form, done.stdout)
        shown = json.loads(done.stdout)
        assert "***" in shown["database_url"] and "***" in shown["s3_endpoint"], shown
        assert shown["database_url"].startswith(url[:12])  # masked, not blanked


def test_logs_and_tracebacks_of_the_cli_are_masked(
    clean_db: str, tmp_path: Path, prefect_api: str
) -> None:
    forms = url_forms(clean_db)
    env = {
        **secret_env(clean_db),
        "RECRANKER_DATABASE_URL": forms["userinfo+query"],
        "RECRANKER_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_LOGGING_LEVEL": "INFO",  # the database line is an INFO record
    }
    (tmp_path / "items.csv").write_text("item_id,title,year,genres\ni1,One,1999,Drama\n")
    (tmp_path / "day.csv").write_text("user_id,item_id,rating,timestamp\nu1,i1,4,1000000000\n")
    done = run_cli(["ingest", str(tmp_path / "day.csv")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    # The line is there, masked (the whole stderr on failure: it says which logging was used).
    assert "database postgresql://postgres:***@" in done.stderr, done.stderr
    assert leaked(done.stdout + done.stderr) == []

    # A traceback (--debug) of a failed connection in each form.
    for form, url in forms.items():
        broken = {**env, "RECRANKER_DATABASE_URL": url.replace(clean_db.rsplit("/", 1)[1], "nope")}
        done = run_cli(["--debug", "batches"], broken)
        assert done.returncode == 2 and "Traceback" in done.stderr, (form, done.stderr[-2000:])
        assert leaked(done.stdout + done.stderr) == [], (form, done.stderr[-3000:])


def _flow_logs(flow_run_id: Any, expect: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        text = "\n".join(log.message for log in logs)
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_the_prefect_log_table_of_flow_runs_holds_no_secret(
    clean_db: str,
    tmp_path: Path,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from prefect import flow, get_run_logger, task

    from flows.ingest import ingest_flow
    from recranker_core.errors import ConfigError

    forms = url_forms(clean_db)
    for key, value in {
        **secret_env(clean_db),
        "RECRANKER_DATABASE_URL": forms["userinfo+query"],
        "RECRANKER_HOME": str(tmp_path / "home"),
    }.items():
        monkeypatch.setenv(key, value)

    # A real stage: the ingest flow logs the database it uses.
    (tmp_path / "items.csv").write_text("item_id,title,year,genres\ni1,One,1999,Drama\n")
    (tmp_path / "day.csv").write_text("user_id,item_id,rating,timestamp\nu1,i1,4,1000000000\n")
    state = ingest_flow(str(tmp_path / "day.csv"), return_state=True)
    assert state.is_completed()
    ingest_logs = _flow_logs(state.state_details.flow_run_id, "database postgresql://")
    assert "database postgresql://postgres:***@" in ingest_logs, (
        ingest_logs,
        logging.getLogger("prefect").getEffectiveLevel(),
    )
    assert "password=***" in ingest_logs
    assert leaked(ingest_logs) == []

    # Every way a flow's code can put a credential into its logs: the run logger, print(),
    # a failed task's exception and traceback, an expected error's message.
    @task(name="connect", retries=0)
    def connect(conninfo: str) -> None:
        raise RuntimeError(f"could not connect with {conninfo}")

    @flow(name="leaky", log_prints=True)
    def leaky() -> None:
        logger = get_run_logger()
        for form, url in forms.items():
            logger.info("connecting (%s) to %s", form, url)
            print(f"print: {url}")
        logger.info(
            "env: PGPASSWORD=%s AWS_SECRET_ACCESS_KEY=%s",
            *(os.environ["PGPASSWORD"], os.environ["AWS_SECRET_ACCESS_KEY"]),
        )
        logger.warning("s3 secret %s and pg password %s", SECRETS["s3"], SECRETS["pgpassword"])
        try:
            connect(forms["conninfo"])
        except RuntimeError:
            logger.exception("connect task failed")
        raise ConfigError(f"bad setting RECRANKER_DATABASE_URL={forms['conninfo-quoted']}")

    with caplog.at_level(logging.INFO):
        failed = leaky(return_state=True)
    assert failed.is_failed()
    logs = _flow_logs(failed.state_details.flow_run_id, "connect task failed")
    for needle in ("connecting (conninfo)", "print: host=", "Traceback", "password=***"):
        assert needle in logs, (needle, logs[-3000:])
    assert "ConfigError" in logs and "bad setting RECRANKER_DATABASE_URL" in logs
    assert leaked(logs) == [], logs[-3000:]
    # ... and what the process itself logged and printed.
    assert leaked(caplog.text) == [] and "connecting (conninfo)" in caplog.text
    out, err = capfd.readouterr()
    assert leaked(out + err) == []
