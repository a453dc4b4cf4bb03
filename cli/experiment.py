"""`recranker experiment`: experiments comparing ranker variants."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import ProfileOption, _echo_json, _preflight

experiment_app = typer.Typer(no_args_is_help=True, help="Experiments comparing ranker variants.")


@experiment_app.command("objectives")
def experiment_objectives(
    objective: Annotated[
        list[str] | None,
        typer.Option(
            "--objective",
            help="An objective to compare (repeatable; default sft, alro and dmpo).",
        ),
    ] = None,
    profile: ProfileOption = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop each tuning run after this many optimizer steps.")
    ] = None,
    max_users: Annotated[
        int | None,
        typer.Option(help="Evaluate a seeded random subset of this many users (each split)."),
    ] = None,
    shuffles: Annotated[
        int, typer.Option(help="Candidate orders per listwise prompt in the position-bias test.")
    ] = 3,
    bias_users: Annotated[
        int, typer.Option(help="Test users whose listwise prompts are shuffled.")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Tune SFT, ALRO and DMPO on the same sampled users and budget, evaluate each (docs/METHOD.md
    table, listwise position bias) and write the comparison under $RECRANKER_HOME/reports/. The
    adapters are registered as candidates and never promoted."""
    _preflight()
    from flows.experiment import experiment_objectives_flow

    result = experiment_objectives_flow(
        objective, profile, max_steps, max_users, shuffles, bias_users
    )
    if as_json:
        _echo_json(result)
        return
    typer.echo(Path(result["markdown"]).read_text())
    typer.echo(f"written to {result['markdown']} and {result['json']}")
