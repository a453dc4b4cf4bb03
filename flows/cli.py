"""The `recranker` command line."""

import typer

app = typer.Typer(no_args_is_help=True, help="recranker: batch recommendations with an LLM ranker.")


def main() -> None:
    app()
