"""What the services of the local stack share: their address and port range, ServiceStatus, the
lock of a home, state and secret files, port picking, log tails, and finding and stopping our own
processes (never one that is not ours)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recranker_core.errors import StackError
from recranker_core.redact import register_secret

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# weed derives some gRPC addresses as http port + 10000 no matter what -*.port.grpc says (the
# mini worker dials admin at admin.port + 10000), so every gRPC port is put exactly there.
WEED_GRPC_OFFSET = 10000
# Fresh ports come from below Linux's default ephemeral range (32768-60999), so outgoing
# connections do not grab a recorded port between two runs.
PORT_LOW = 15000
PORT_HIGH = 32768
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


def _with_notes(status: ServiceStatus, notes: list[str]) -> ServiceStatus:
    return ServiceStatus(
        status.name,
        status.state,
        status.pid,
        status.address,
        f"{status.detail}; {'; '.join(notes)}",
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
# ports each service recorded, kept out of the other's fresh picks


def _recorded_pg_port(home: Path) -> set[int]:
    port = _read_json(home / "pg" / "state.json").get("port")
    return {port} if isinstance(port, int) else set()


def _recorded_s3_ports(home: Path) -> set[int]:
    ports = _read_json(home / "s3" / "state.json").get("ports")
    if not isinstance(ports, dict):
        return set()
    http = {p for p in ports.values() if isinstance(p, int)}
    return http | {p + WEED_GRPC_OFFSET for p in http}
