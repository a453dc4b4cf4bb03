"""Quality on MovieLens-100K, one command: the split and the base models (the nightly retrain),
the shadow models and a tuning run with a profile (default `cpu`), then the evaluation of the
tuned adapter on ALL evaluable users: each method's test NDCG@3/HR@3/NDCG@10 and the paired-
bootstrap 95% interval of its difference to the base model (docs/METHOD.md section 1).

    python benchmarks/quality.py [--profile cpu] [--objective sft] [--retrain] [--max-users N]

State lives in $RECRANKER_HOME (default .recranker) with the local stack (`recranker stack up`
is run here); the data file is ingested once (a rerun finds it in the ledger), the base models
are trained when there is no champion (or with --retrain). The tuned adapter is evaluated
whether or not its gate promoted it (the gate's decision is printed with the figures). Results
go to $RECRANKER_HOME/reports/quality-<timestamp>.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script

METHODS = (
    "base",
    "pointwise",
    "pairwise",
    "listwise",
    "hybrid",
    "hybrid_tuned",
    "fused",
    "published",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=["cpu", "cpu-demo", "full"])
    parser.add_argument("--objective", default="sft", choices=["sft", "alro", "dmpo"])
    parser.add_argument("--retrain", action="store_true", help="retrain the base models")
    parser.add_argument("--max-users", type=int, default=None, help="evaluate a sample (quick)")
    parser.add_argument(
        "--adapter", type=int, default=None, help="evaluate this adapter, skip tuning"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop tuning after this many optimizer steps (a run stopped earlier resumes from "
        "its checkpoint: the same data and settings)",
    )
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from recranker_core import registry, stack
    from recranker_core.config import load_settings
    from recranker_core.datasets.movielens import fetch_movielens_100k
    from recranker_core.db.migrate import upgrade

    settings = load_settings()
    stack.stack_up(settings)
    url = stack.database_url(settings)
    upgrade(url)
    files = fetch_movielens_100k(settings.home)
    timings: dict[str, float] = {}

    from flows.ingest import ingest_flow

    t = time.perf_counter()
    for r in ingest_flow(str(files.inter), "movielens"):
        print(r.summary())
    timings["ingest"] = time.perf_counter() - t

    if args.retrain or registry.champion(url) is None:
        from flows.retrain_base import retrain_base_flow

        t = time.perf_counter()
        summary = retrain_base_flow()
        timings["base"] = time.perf_counter() - t
        print(f"base models trained; promoted: {summary['promoted']}")
    champion = registry.champion(url)
    assert champion is not None
    print(f"champion base model {champion.model_id} ({champion.kind})")

    tuned: dict[str, Any] = {}
    adapter_id = args.adapter
    if adapter_id is None:
        from flows.tune_ranker import tune_ranker_flow

        t = time.perf_counter()
        tuned = tune_ranker_flow(
            objective=args.objective, profile=args.profile, max_steps=args.max_steps
        )
        timings["tune"] = time.perf_counter() - t
        adapter_id = int(tuned["adapter_id"])
        print(
            f"adapter {adapter_id}: kept step {tuned['best_step']} of {tuned['steps']}; "
            f"{'promoted' if tuned['promoted'] else 'not promoted'} ({tuned['reason']})"
        )
    t = time.perf_counter()
    result = evaluate_adapter(settings, url, adapter_id, args.max_users)
    timings["evaluate"] = time.perf_counter() - t

    stamp = datetime.now(UTC)
    out = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "command": "python benchmarks/quality.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
        "profile": tuned.get("profile", args.profile),
        "champion": {"model_id": champion.model_id, "kind": champion.kind},
        "adapter_id": adapter_id,
        "tuning": {
            k: tuned.get(k)
            for k in (
                "steps",
                "best_step",
                "seconds",
                "resumed_from",
                "promoted",
                "reason",
                "history",
                "fusion",
            )
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        **result,
    }
    reports = settings.home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / f"quality-{stamp.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print_table(out)
    print(f"\nwritten to {path}")


def evaluate_adapter(
    settings: Any, url: str, adapter_id: int, max_users: int | None
) -> dict[str, Any]:
    """The evaluation table of adapter `adapter_id` (promoted or not) on all evaluable users."""
    from recranker_core import registry
    from recranker_core.base.rating import RatingHints
    from recranker_core.batch_rank.serving import load_ranker
    from recranker_core.evaluate_ranker.evaluate import evaluate
    from recranker_core.llm.prompts import Catalog
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore
    from recranker_core.tune_ranker.context import BaseHints, load_base_context

    store = S3ArtifactStore(s3_config(settings))
    ctx = load_base_context(
        url, store, settings.home / "cache" / "artifacts", settings.retrain.like_threshold
    )
    record = registry.get_adapter(url, adapter_id)
    ranker = load_ranker(url, store, settings, record)
    assert ranker is not None
    settings = ranker.settings_for(settings)
    catalog = Catalog.from_database(url, ctx.data.item_ids)
    report, _ = evaluate(
        ctx,
        catalog,
        # The adapter's rating model (the one it was tuned with, as serving reads it).
        BaseHints(ctx, RatingHints(ranker.rating, ctx.data)),
        ranker.model,
        ranker.tokenizer,
        settings,
        ("valid", "test"),
        max_users=max_users,
        stored=record.fusion,
    )
    return {"evaluation": report.as_json(), "counts": report.counts, "seconds": report.seconds}


def print_table(out: dict[str, Any]) -> None:
    ev = out["evaluation"]
    print(f"\n{out['date']} · {out['machine']} · profile {out['profile']}")
    print(f"timings (s): {out['timings_s']}; guard: {ev.get('guard')}")
    print("\n| method | test NDCG@3 | test HR@3 | test NDCG@10 | NDCG@3 - base [95% CI] |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        if method not in ev:
            continue
        test = ev[method]["test"]
        ci = ev.get("diff_ci", {}).get(method, {}).get("test", {}).get("ndcg@3")
        diff = "" if method == "base" or ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
        print(
            f"| {method} | {test['ndcg@3']:.4f} | {test['hr@3']:.4f} | {test['ndcg@10']:.4f} "
            f"| {diff} |"
        )


if __name__ == "__main__":
    main()
