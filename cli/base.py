"""`recranker train-base` and `candidates`: the base models and the candidates they score."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import _echo_json, _preflight, _settings


def train_base(
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind", help="Model kind to train (repeatable); default RECRANKER_RETRAIN__KINDS."
        ),
    ] = None,
) -> None:
    """Split, train the base models, store and register them, and promote the best if it passes
    the gate (the `retrain-base` flow)."""
    _preflight()
    from flows.retrain_base import retrain_base_flow

    summary = retrain_base_flow(kind or None)
    _echo_json(summary)


def candidates(
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Only this user (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most users to print (0: all).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per user.")] = False,
) -> None:
    """Top-N candidates of the active users (RECRANKER_RANK__ACTIVE_WINDOW_DAYS) from the
    champion base model's ONNX scorer: what the LLM ranker re-orders."""
    from recranker_core.base.candidates import (
        CandidateStats,
        active_users,
        champion_candidates,
        data_watermark,
        load_champion,
    )
    from recranker_core.stack import database_url, s3_config
    from recranker_core.store import S3ArtifactStore

    settings = _settings()
    url = database_url(settings)
    champion = load_champion(
        url, S3ArtifactStore(s3_config(settings)), settings.home / "cache" / "artifacts"
    )
    watermark = data_watermark(url)
    users = (
        list(user)
        if user
        else active_users(url, watermark, settings.rank.active_window_days, settings.rank.work_mem)
    )
    if limit:
        users = users[:limit]
    stats = CandidateStats()
    for chunk in champion_candidates(
        url,
        champion,
        users,
        watermark,
        chunk_size=settings.rank.chunk_size,
        stats=stats,
        like_threshold=settings.retrain.like_threshold,
    ):
        for c in chunk:
            if as_json:
                _echo_json({"user_id": c.user_id, "items": c.items, "scores": c.scores})
            else:
                typer.echo(f"{c.user_id}: {', '.join(c.items)}")
    typer.echo(
        f"model {champion.model_id} ({champion.kind}), watermark {watermark:%Y-%m-%d %H:%M}: "
        f"{stats.scored} users scored, {stats.cold} cold (unknown to the model)",
        err=True,
    )


def register(app: typer.Typer) -> None:
    """The base-model commands, in the order `recranker --help` lists them."""
    app.command("train-base")(train_base)
    app.command("candidates")(candidates)
