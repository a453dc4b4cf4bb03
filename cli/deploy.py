"""`recranker deploy` and `serve`: the deployments of infra/prefect.yaml, registered with a Prefect
API or served from this process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import _settings

DEPLOY_FILE = Path(__file__).resolve().parent.parent / "infra" / "prefect.yaml"


def load_deploy_file(path: Path) -> dict[str, Any]:
    """infra/prefect.yaml with every `{{ $VAR }}` replaced: a `RECRANKER_*` variable by that
    setting (environment or default, validated), any other by the environment's value or by
    `definitions.env_defaults` when it is unset."""
    import re

    import yaml

    from recranker_core.config import setting_value
    from recranker_core.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path}: no deployment file here; pass --file infra/prefect.yaml")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("deployments"), list):
        raise ConfigError(f"{path}: expected a mapping with a `deployments` list")
    defaults = (spec.get("definitions") or {}).get("env_defaults") or {}
    pattern = re.compile(r"{{\s*\$(\w+)\s*}}")

    settings = _settings()

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        try:
            value = setting_value(settings, name)
        except KeyError:
            value = os.environ.get(name) or defaults.get(name)
        if value is None:
            raise ConfigError(f"{path}: {name} is not set and has no entry in env_defaults")
        return str(value)

    def resolve(node: Any) -> Any:
        if isinstance(node, str):
            return pattern.sub(lookup, node)
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        return node

    resolved: dict[str, Any] = resolve(spec)
    return resolved


def _require_prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    from recranker_core.errors import ConfigError

    url = PREFECT_API_URL.value()
    if not url:
        # Without it Prefect would register into a throw-away ephemeral server.
        raise ConfigError(
            "PREFECT_API_URL is not set: point it at the Prefect server, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (`prefect server start`)"
        )
    return str(url)


def _ensure_work_pools(pools: list[dict[str, Any]]) -> list[str]:
    """Create the work pools that do not exist yet (an existing pool is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from recranker_core.errors import ConfigError

    lines = []
    with get_client(sync_client=True) as client:
        for pool in pools:
            if pool.get("type", "process") != "process":
                raise ConfigError(f"work pool {pool['name']}: only type `process` is supported")
            try:
                found = client.read_work_pool(pool["name"])
                lines.append(f"work pool {found.name} ({found.type}): exists")
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool["name"],
                        type="process",
                        description=pool.get("description"),
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
                lines.append(f"work pool {pool['name']} (process): created")
    return lines


def build_deployments(
    spec: dict[str, Any], source_dir: Path, only: list[str] | None, with_pools: bool
) -> list[Any]:
    """RunnerDeployments from a loaded deployment file: flow code read from `source_dir` (the
    run's working directory too), parameters checked against the flows' typed parameters."""
    import typing

    import pydantic
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    from recranker_core.errors import ConfigError

    entries = [d for d in spec["deployments"] if not only or d["name"] in only]
    unknown = set(only or ()) - {d["name"] for d in spec["deployments"]}
    if unknown:
        raise ConfigError(f"no deployment named {', '.join(sorted(unknown))} in the file")
    built = []
    for entry in entries:
        name = entry["name"]
        try:
            schedules = [
                Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                for s in entry.get("schedules") or []
            ]
            deployment: RunnerDeployment = RunnerDeployment.from_storage(  # type: ignore[assignment]
                storage=LocalStorage(path=str(source_dir)),
                entrypoint=entry["entrypoint"],
                name=name,
                description=entry.get("description"),
                tags=entry.get("tags"),
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                concurrency_limit=entry.get("concurrency_limit"),
                work_pool_name=(entry.get("work_pool") or {}).get("name") if with_pools else None,
                job_variables=(entry.get("work_pool") or {}).get("job_variables") or None
                if with_pools
                else None,
            )
        except (ValueError, ImportError, AttributeError, KeyError) as exc:
            raise ConfigError(f"deployment {name!r}: {type(exc).__name__}: {exc}") from exc
        from prefect.flows import load_flow_from_entrypoint

        fn: Any = load_flow_from_entrypoint(entry["entrypoint"]).fn
        hints = typing.get_type_hints(fn)
        for key, value in deployment.parameters.items():
            if key not in hints:
                raise ConfigError(f"deployment {name!r}: the flow has no parameter {key!r}")
            try:
                pydantic.TypeAdapter(hints[key]).validate_python(value)
            except pydantic.ValidationError as exc:
                raise ConfigError(f"deployment {name!r}, parameter {key!r}: {exc}") from exc
        built.append(deployment)
    return built


def deploy(
    file: Annotated[Path, typer.Option(help="The deployment file.")] = DEPLOY_FILE,
    source_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where workers find this code (the runs' working directory). Default: the "
            "directory above the deployment file."
        ),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Register only this deployment (repeatable).")
    ] = None,
) -> None:
    """Register the work pools (those missing) and the deployments of infra/prefect.yaml with
    the Prefect API at PREFECT_API_URL; re-running updates them in place."""
    api = _require_prefect_api()
    spec = load_deploy_file(file)
    source = (source_dir or file.resolve().parent.parent).resolve()
    # Every deployment is built and checked before anything is registered.
    deployments = build_deployments(spec, source, only, with_pools=True)
    for line in _ensure_work_pools((spec.get("definitions") or {}).get("work_pools") or []):
        typer.echo(line)
    for deployment in deployments:
        deployment_id = deployment.apply()
        when = ", ".join(
            f"{s.schedule.cron} {s.schedule.timezone}" for s in deployment.schedules or []
        )
        typer.echo(
            f"deployment {deployment.flow_name}/{deployment.name} ({deployment_id}): pool "
            f"{deployment.work_pool_name}, " + (f"cron {when}" if when else "manual runs")
        )
    typer.echo(f"registered with {api}; start a worker: prefect worker start --pool cpu")


def serve(
    file: Annotated[Path, typer.Option(help="The deployment file.")] = DEPLOY_FILE,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Serve only this deployment (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs at the same time.")] = 1,
) -> None:
    """Run the deployments of infra/prefect.yaml from this process, schedules included, without
    work pools or workers (one machine); stops on Ctrl-C."""
    from prefect import serve as prefect_serve

    _require_prefect_api()
    spec = load_deploy_file(file)
    deployments = build_deployments(spec, file.resolve().parent.parent, only, with_pools=False)
    prefect_serve(*deployments, limit=limit)


def register(app: typer.Typer) -> None:
    """The deployment commands, in the order `recranker --help` lists them."""
    app.command("deploy")(deploy)
    app.command("serve")(serve)
