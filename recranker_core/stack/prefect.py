"""The Prefect server (API + UI) that `stack up --ui` starts on the stack's PostgreSQL, under
$RECRANKER_HOME/prefect-server; started, found and stopped as a subprocess, never imported."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from recranker_core.config import Settings
from recranker_core.db.connect import redact_url
from recranker_core.errors import StackError
from recranker_core.stack.common import (
    _CHILDREN,
    ServiceStatus,
    _live_process,
    _log_tail,
    _port_free,
    _service_status,
    _stale_note,
    _stop_service,
    _with_notes,
)

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

# The first start of a Prefect server migrates its database and builds the UI (about a minute on
# 2 cores).
PREFECT_READY_TIMEOUT_S = 180.0


class _PrefectLayout:
    def __init__(self, settings: Settings) -> None:
        self.dir = settings.home / "prefect-server"
        self.prefect_home = settings.home / "prefect"
        self.pid_file = self.dir / "server.pid"
        self.log = self.dir / "server.log"
        self.host = settings.server.host
        self.port = settings.server.port
        self.database = settings.server.database

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _prefect_command(layout: _PrefectLayout) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start"] + [
        "--host",
        layout.host,
        "--port",
        str(layout.port),
    ]


def _prefect_find(layout: _PrefectLayout) -> tuple[psutil.Process | None, str | None]:
    """Our server from its pid file: the same interpreter running `prefect server start` with our
    PREFECT_HOME in its environment (a recycled pid never passes)."""
    import psutil

    try:
        pid = int(layout.pid_file.read_text().strip())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, "unreadable pid"
    proc = _live_process(pid, program=Path(sys.executable).name, marker="server")
    try:
        home = proc.environ().get("PREFECT_HOME") if proc is not None else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        home = None
    if proc is None or home != str(layout.prefect_home):
        return None, _stale_note(pid)
    return proc, None


def _prefect_running_status(
    layout: _PrefectLayout, proc: psutil.Process, lead: str
) -> ServiceStatus:
    return ServiceStatus(
        name="prefect",
        state="running",
        pid=proc.pid,
        address=layout.ui_url,
        detail=f"{lead} (pid {proc.pid}): UI {layout.ui_url}, API {layout.api_url}, database "
        f"{layout.database!r}",
    )


def _prefect_status(layout: _PrefectLayout) -> ServiceStatus:
    return _service_status(
        "prefect",
        _prefect_find(layout),
        lambda proc: _prefect_running_status(layout, proc, "running"),
        layout.pid_file,
    )


def _prefect_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url`` when missing; its asyncpg URL."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg
    from psycopg import sql

    from recranker_core.db.connect import libpq_url

    url = libpq_url(admin_url)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists is None:
                log.info("creating database %s for the Prefect server", name)
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise StackError(
            f"the Prefect server's database {name!r} cannot be created on {redact_url(url)} "
            f"({type(exc).__name__}: {str(exc).strip()}); create it, or set "
            "RECRANKER_SERVER__DATABASE to one the user may use"
        ) from None
    parts = urlsplit(url)
    return urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))


def _prefect_healthy(layout: _PrefectLayout) -> bool:
    import httpx

    try:
        return httpx.get(f"{layout.api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _prefect_start(layout: _PrefectLayout, admin_url: str) -> ServiceStatus:
    proc, stale = _prefect_find(layout)
    if proc is not None:
        return _prefect_running_status(layout, proc, "already running")
    notes: list[str] = []
    layout.dir.mkdir(parents=True, exist_ok=True)
    if stale:
        layout.pid_file.unlink(missing_ok=True)
        notes.append(f"stale pid file removed ({stale})")
    if not _port_free(layout.port):
        raise StackError(
            f"port {layout.port} on {layout.host} is taken by another program; stop it or set "
            "RECRANKER_SERVER__PORT"
        )
    db_url = _prefect_database(admin_url, layout.database)
    password = _url_password(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(layout.prefect_home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=db_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="true",
        # The UI's pages call this API URL; left unset they call 127.0.0.1:4200 whatever the port.
        PREFECT_SERVER_API_HOST=layout.host,
        PREFECT_SERVER_API_PORT=str(layout.port),
        PREFECT_UI_API_URL=layout.api_url,
        PREFECT_LOGGING_LEVEL="INFO",
    )
    layout.prefect_home.mkdir(parents=True, exist_ok=True)
    log.info("starting the Prefect server on %s (database %s)", layout.ui_url, layout.database)
    with open(layout.log, "wb") as log_file:
        child = subprocess.Popen(
            _prefect_command(layout),
            cwd=layout.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN[child.pid] = child
    layout.pid_file.write_text(f"{child.pid}\n")
    deadline = time.monotonic() + PREFECT_READY_TIMEOUT_S
    while not _prefect_healthy(layout):
        if child.poll() is not None:
            _CHILDREN.pop(child.pid, None)
            layout.pid_file.unlink(missing_ok=True)
            raise StackError(
                f"the Prefect server exited with status {child.returncode} while starting; "
                + _log_tail(layout.log, hide=(password,))
            )
        if time.monotonic() > deadline:
            _prefect_stop(layout)
            raise StackError(
                f"the Prefect server did not answer {layout.api_url}/health within "
                f"{PREFECT_READY_TIMEOUT_S:.0f} s; " + _log_tail(layout.log, hide=(password,))
            )
        time.sleep(0.5)
    import psutil

    status = _prefect_running_status(layout, psutil.Process(child.pid), "started")
    log.info("Prefect server %s", status.detail)
    return _with_notes(status, notes) if notes else status


def _prefect_stop(layout: _PrefectLayout) -> ServiceStatus:
    # The server runs in a session of its own; SIGTERM stops uvicorn and its services cleanly.
    return _stop_service(
        "prefect",
        "Prefect server",
        _prefect_find(layout),
        layout.pid_file,
        first=signal.SIGTERM,
        program=Path(sys.executable).name,
        marker="server",
        log_path=layout.log,
        own_pid_file=True,
    )


def _url_password(url: str) -> str:
    """The password of a URL ('' when none), only to hide it from log tails."""
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    return unquote(password) if password else ""
