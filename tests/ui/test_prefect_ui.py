"""The operator's path through the real Prefect UI, in headless Debian Chromium driven by
Playwright: `recranker stack up --ui` starts a Prefect server on PostgreSQL, `recranker deploy`
finds it without PREFECT_API_URL, the `nightly` deployment is opened in the UI and a custom run
started with two parameters changed in the form (a source directory typed in, evaluation switched
off); a `cpu` pool worker runs it and the UI shows it Completed. Run with `make test-ui`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

pytestmark = pytest.mark.ui

CHROMIUM = Path("/usr/bin/chromium")
# No background traffic: this machine's network is closed beyond 127.0.0.1.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "flows", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture()
def ui_stack(clean_db: str, pg_server_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`recranker stack up --ui` in a fresh home: the test PostgreSQL (external), an embedded
    SeaweedFS, and a Prefect server on its own database and port; all stopped afterwards."""
    from recranker_core.db.connect import libpq_url

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test-ui does)")
    database = f"prefect_ui_{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RECRANKER_"))}
    env.update(
        RECRANKER_HOME=str(tmp_path / "home"),
        RECRANKER_DATABASE_URL=clean_db,
        RECRANKER_SERVER__PORT=str(port),
        RECRANKER_SERVER__DATABASE=database,
        # Far from now, so the worker below never finds a scheduled nightly due.
        RECRANKER_NIGHTLY__CRON="0 0 1 1 *",
        RECRANKER_RETRAIN__KINDS='["mf"]',
        RECRANKER_BASE__MF__EPOCHS="3",
        RECRANKER_BASE__MF__PATIENCE="1",
        RECRANKER_LOG_LEVEL="INFO",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GX_ANALYTICS_ENABLED="false",
    )
    up = _cli(env, "stack", "up", "--ui", "--json")
    statuses = {s["name"]: s for s in json.loads(up.stdout)}
    try:
        assert statuses["prefect"]["state"] == "running", statuses
        assert statuses["prefect"]["address"] == f"http://127.0.0.1:{port}"
        yield {"env": env, "ui": f"http://127.0.0.1:{port}", "api": f"http://127.0.0.1:{port}/api"}
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "flows", "stack", "down", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        with psycopg.connect(libpq_url(pg_server_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        assert down.returncode == 0, down.stderr[-3000:]
        stopped = {s["name"]: s["state"] for s in json.loads(down.stdout)}
        assert stopped["prefect"] == "stopped", stopped


def test_custom_nightly_run_from_the_ui_completes(ui_stack: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from recranker_core.datasets.synthetic import generate

    env, ui, api = ui_stack["env"], ui_stack["ui"], ui_stack["api"]
    # PREFECT_API_URL is not set: deploy finds the server `stack up --ui` runs under this home.
    deployed = _cli(env, "deploy", timeout=180)
    assert f"registered with {api}" in deployed.stdout, deployed.stdout

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = generate(tmp_path / "synth", users=60, items=40, interactions=1500, seed=21)
    for path in (files.interactions, files.items, files.users):
        shutil.copy(path, inbox / path.name)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{ui}/deployments")
            page.get_by_role("link", name="nightly", exact=True).first.click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}"))
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+/run"))

            def field(label: str) -> Any:
                header = page.locator(
                    "span.schema-form-property__label", has_text=re.compile(f"^{label} ")
                )
                return page.locator("div.schema-form-property").filter(has=header).last

            source = field("Source")
            source.get_by_role("button", name="str", exact=True).click()
            source.locator("textarea").fill(str(inbox))
            evaluate = field("Evaluate").get_by_role("switch")
            expect(evaluate).to_have_attribute("aria-checked", "true")
            evaluate.click()
            expect(evaluate).to_have_attribute("aria-checked", "false")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}(\?|$)"))
            # The one run of this server that was not scheduled by the cron: the UI's.
            runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
            manual = [r for r in runs if "auto-scheduled" not in r["tags"]]
            assert len(manual) == 1, [(r["name"], r["state_type"], r["tags"]) for r in runs]
            run = manual[0]
            run_id = run["id"]
            params = run["parameters"]["params"]
            assert (params["source"], params["evaluate"], params["publish"]) == (
                str(inbox),
                False,
                True,
            ), run["parameters"]

            worker_env = dict(env, PREFECT_API_URL=api)
            worker = subprocess.run(
                [sys.executable, "-m", "prefect", "worker", "start"]
                + ["--pool", "cpu", "--run-once", "--limit", "1"],
                env=worker_env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            finished = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
            assert finished["state_type"] == "COMPLETED", (
                finished["state"],
                (worker.stdout + worker.stderr)[-4000:],
            )
            # The UI shows it: the run's page, reloaded, carries the Completed state badge.
            page.goto(f"{ui}/runs/flow-run/{run_id}")
            deadline = time.monotonic() + 60
            while True:
                page.reload()
                badge = page.locator(".state-badge, [class*=state-badge]").filter(
                    has_text="Completed"
                )
                if badge.count() or time.monotonic() > deadline:
                    break
                time.sleep(2)
            expect(badge.first).to_be_visible()
            page.screenshot(path=str(tmp_path / "completed.png"))
        finally:
            browser.close()

    with psycopg.connect(env["RECRANKER_DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT user_id) FROM recranker.recommendations_current"
        ).fetchone()
    assert row is not None and row[0] > 0
