"""The `recranker` command line: local stack, schema, datasets and the pipeline's stages.

Imports stay inside the commands so that `recranker --help` answers at once. This module builds
the app from a module per command group and holds `main`, the console script.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import adapters, base, data, demo, deploy, experiment, ingest, models, ranker, stack
from cli.common import _DEBUG, EXIT_INTERRUPTED, _fail, describe_failure

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # main() reports errors: one line for expected ones, a masked traceback otherwise (rich's
    # pretty tracebacks would also print local variables, database URLs among them).
    pretty_exceptions_enable=False,
    help="recranker: batch recommendations with an LLM ranker, as a Prefect data product.",
)
# typer lists the top-level commands in the order they are registered, then the groups in theirs.
ingest.register(app)
base.register(app)
ranker.register(app)
stack.register(app)
demo.register(app)
deploy.register(app)
app.add_typer(stack.stack_app, name="stack")
app.add_typer(stack.db_app, name="db")
app.add_typer(data.data_app, name="data")
app.add_typer(models.models_app, name="models")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(experiment.experiment_app, name="experiment")


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Print the traceback of every error, expected ones too (credentials masked).",
        ),
    ] = False,
) -> None:
    """recranker: batch recommendations with an LLM ranker, as a Prefect data product."""
    from recranker_core.redact import show_tracebacks

    _DEBUG["on"] = debug
    show_tracebacks(debug)


def _use_local_prefect_server() -> None:
    """Point PREFECT_API_URL at the server `stack up --ui` runs under this RECRANKER_HOME when it
    is unset, so flows show in that UI and `recranker deploy` finds it."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from recranker_core.config import load_settings
    from recranker_core.stack import local_prefect_api

    try:
        api = local_prefect_api(load_settings())
    except ValueError:  # an invalid setting: the command itself reports it
        return
    if api:
        os.environ["PREFECT_API_URL"] = api
        logging.getLogger("recranker").info("Prefect API: %s (stack up --ui)", api)


def main() -> None:
    from recranker_core.redact import install_log_masking

    home = os.environ.get("RECRANKER_HOME", ".recranker")
    os.environ.setdefault("PREFECT_HOME", str(Path(home).expanduser().resolve() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    install_log_masking()
    logging.basicConfig(
        level=os.environ.get("RECRANKER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("great_expectations", "botocore", "urllib3", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _use_local_prefect_server()
    try:
        app()
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - every failure ends here, as one line or a report
        message, code = describe_failure(exc)
        _fail(message, code, exc)
