"""A real `prefect server` on the test PostgreSQL (a database of its own): `recranker deploy`
registers the work pools and deployments of infra/prefect.yaml, the scheduler creates the nightly
cron runs in the configured timezone (SQLAlchemy 2.1 silently stops this), the API refuses a
mistyped parameter, and a manual `ingest` run with parameters completes on a `cpu` pool worker
with its artifacts and its batch in the database."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

DEPLOYMENTS = {
    "nightly",
    "tune-ranker",
    "experiment-objectives",
    "ingest",
    "retrain-base",
    "batch-rank",
    "evaluate-ranker",
}
GPU = {"tune-ranker", "experiment-objectives"}
TIMEZONE = "Europe/Paris"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env(home: Path) -> dict[str, str]:
    """The test's environment without any Prefect setting that could point elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GX_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    return env


def _tail(path: Path, lines: int = 40) -> str:
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
    )


@pytest.fixture()
def prefect_server(pg_server_url: str, tmp_path: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with a fresh `prefect_<random>` database on the test
    PostgreSQL server; stopped and the database dropped afterwards. Yields the API URL."""
    from recranker_core.db.connect import libpq_url

    admin = libpq_url(pg_server_url)
    name = f"prefect_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    rest = admin.partition("://")[2].rpartition("/")[0]
    port = _free_port()
    env = _base_env(tmp_path / "server-home")
    env.update(
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{rest}/{name}",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120 s:\n{_tail(log)}")
            time.sleep(0.5)
        yield api
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{api}{path}", json=body, timeout=30)
    assert response.status_code < 300, (path, response.status_code, response.text)
    return response.json()


def _get(api: str, path: str) -> Any:
    response = httpx.get(f"{api}{path}", timeout=30)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def _scheduled_runs(api: str, deployment_id: str, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs: list[dict[str, Any]] = _post(
            api,
            "/flow_runs/filter",
            {
                "deployments": {"id": {"any_": [deployment_id]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            },
        )
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_deploy_schedule_and_run_on_a_worker(
    prefect_server: str, clean_db: str, tmp_path: Path
) -> None:
    from recranker_core.datasets.synthetic import generate

    api = prefect_server
    env = _base_env(tmp_path / "client-home")
    # A nightly hour half a day away: the worker below must not find a nightly run due.
    hour = (datetime.now(ZoneInfo(TIMEZONE)).hour + 12) % 24
    env.update(
        PREFECT_API_URL=api,
        RECRANKER_DATABASE_URL=clean_db,
        RECRANKER_HOME=str(tmp_path / "recranker-home"),
        RECRANKER_NIGHTLY__CRON=f"0 {hour} * * *",
        RECRANKER_NIGHTLY__TIMEZONE=TIMEZONE,
    )

    deployed = subprocess.run(
        [sys.executable, "-m", "flows", "deploy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert "work pool cpu (process): created" in deployed.stdout
    assert "work pool gpu (process): created" in deployed.stdout

    pools = {p["name"]: p for p in _post(api, "/work_pools/filter", {})}
    assert {n: p["type"] for n, p in pools.items() if n in ("cpu", "gpu")} == {
        "cpu": "process",
        "gpu": "process",
    }
    deployments = {d["name"]: d for d in _post(api, "/deployments/filter", {})}
    assert set(deployments) == DEPLOYMENTS
    assert {deployments[n]["work_pool_name"] for n in GPU} == {"gpu"}
    assert {deployments[n]["work_pool_name"] for n in DEPLOYMENTS - GPU} == {"cpu"}
    nightly = deployments["nightly"]
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == f"0 {hour} * * *"
    assert schedule["schedule"]["timezone"] == TIMEZONE
    # The typed parameters reach the UI as a form with descriptions.
    form = nightly["parameter_openapi_schema"]["definitions"]["NightlyParams"]["properties"]
    assert "RECRANKER_NIGHTLY__SOURCE" in form["source"]["description"]
    assert form["evaluate"]["default"] is True

    # Registering again updates in place: same deployments, pools left as they are.
    again = subprocess.run(
        [sys.executable, "-m", "flows", "deploy", "--only", "ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "work pool cpu (process): exists" in again.stdout
    assert {d["id"] for d in _post(api, "/deployments/filter", {})} == {
        d["id"] for d in deployments.values()
    }

    runs = _scheduled_runs(api, nightly["id"], timeout=60)
    assert runs, "the scheduler created no nightly runs within 60 s"
    for run in runs:
        start = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo(TIMEZONE))
        assert (start.hour, start.minute) == (hour, 0), start
        assert run["parameters"] == {"params": {"publish": True, "evaluate": True}}

    ingest = deployments["ingest"]
    files = generate(tmp_path / "synth", users=40, items=30, interactions=400, seed=11)
    refused = httpx.post(
        f"{api}/deployments/{ingest['id']}/create_flow_run",
        json={"parameters": {"params": {"source": str(files.interactions), "fromat": "csv"}}},
        timeout=30,
    )
    assert refused.status_code >= 400 and "fromat" in refused.text, refused.text
    run = _post(
        api,
        f"/deployments/{ingest['id']}/create_flow_run",
        {"parameters": {"params": {"source": str(files.interactions), "format": "csv"}}},
    )

    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start"]
        + ["--pool", "cpu", "--run-once", "--limit", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    finished = _get(api, f"/flow_runs/{run['id']}")
    assert finished["state_type"] == "COMPLETED", (
        finished["state"],
        (worker.stdout + worker.stderr)[-4000:],
    )
    assert worker.returncode == 0

    artifacts = _post(
        api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    by_key = {a["key"]: a for a in artifacts if a["key"]}
    assert {"ingest-ledger", "validation-batch-1", "ingest-batch-1"} <= set(by_key), set(by_key)
    table = by_key["ingest-ledger"]["data"]
    [ledger_row] = json.loads(table) if isinstance(table, str) else table
    assert ledger_row["file"] == "interactions.csv" and ledger_row["status"] == "merged"
    with psycopg.connect(clean_db) as conn:
        batch = conn.execute(
            "SELECT source, status, rows_read FROM recranker.ingest_batches"
        ).fetchall()
    assert batch == [(str(files.interactions), "merged", 400)]
