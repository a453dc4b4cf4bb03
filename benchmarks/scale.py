"""How cost grows with users, items and interactions: generated data at 1x, 2x, 4x (users, items
and interactions all doubling), each stage of the pipeline timed with the peak RSS of the process
that ran it, and the growth of each stage between sizes; then the same ranking run on a Dask
LocalCluster of worker processes against the default threads runner, in the same run.

    python benchmarks/scale.py [--users 125000 --items 25000 --interactions 2500000]
                               [--sizes 1,2,4] [--sample-users 1000] [--dask-workers 2]

Stages, each in its own process (so its peak RSS is its own): ingest (the generated CSV through
the product's ingest: staging, classification, GX, merge), split (load_split: the interactions
streamed into compact arrays), train (the retrain-base flow with MF for one epoch: split, fit,
full-ranking evaluation, ONNX export with parity check, S3, registry, promotion), rank (the
batch-rank flow: candidates of every user from the ONNX champion, the `--sample-users` most active
re-ranked by the LLM with a tiny random Llama and a one-step adapter, the rest base lists, every
shard COPY-written, published). `make bench-scale` runs it after `recranker stack up --ui` (the
flows report to that Prefect server). Each size gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("bench-scale")

STAGES = ("ingest", "split", "train", "tune", "rank")

# A tiny backbone's tuning settings: the adapter only has to exist; this is a cost benchmark.
TINY_ENV = {
    "RECRANKER_SAMPLING__USERS": "24",
    "RECRANKER_PROMPTS__HISTORY_MAX": "6",
    "RECRANKER_TUNE__EPOCHS": "1",
    "RECRANKER_TUNE__BATCH_SIZE": "4",
    "RECRANKER_TUNE__GRAD_ACCUMULATION": "1",
    "RECRANKER_TUNE__VALID_USERS": "8",
    # The pointwise hint's rating model, trained by the retrain (train stage) and reused by
    # tuning: two epochs do here.
    "RECRANKER_BASE__BIASEDMF__EPOCHS": "2",
    # Full-ranking evaluation costs users x items, which grows 4x per doubling; the train stage
    # measures a retrain as it would be configured at this scale: a 20,000-user sample.
    "RECRANKER_BASE__EVAL_MAX_USERS": "20000",
}


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    """Largest peak resident set of the child processes reaped so far (Dask workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# One stage, run in a child process: prints one JSON line.


def run_stage(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    from recranker_core.config import load_settings

    settings = load_settings()
    url = os.environ["RECRANKER_DATABASE_URL"]
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if stage == "ingest":
        from recranker_core.datasets.sources import describe_file
        from recranker_core.ingest import ingest_file

        result = ingest_file(describe_file(Path(args.file), None), settings, url)
        out["status"] = result.status
        out["rows_merged"] = result.rows_merged
        out["rows_per_s"] = round(result.rows_read / (time.perf_counter() - started))
    elif stage == "split":
        from recranker_core.base.split import load_split

        data = load_split(url, like_threshold=settings.retrain.like_threshold)
        out["split"] = data.stats
    elif stage == "train":
        from flows.retrain_base import retrain_base_flow

        result = retrain_base_flow(["mf"])
        out["fit_s"] = result["seconds"]["mf"]["train"]
        out["promoted"] = result["promoted"]
    elif stage == "tune":
        from flows.tune_ranker import tune_ranker_flow

        out["adapter"] = tune_ranker_flow(max_steps=1)["adapter_id"]
    elif stage == "rank":
        from flows.batch_rank import batch_rank_flow

        result = batch_rank_flow()
        out |= {
            k: result[k]
            for k in ("users", "rows", "llm_users", "base_users", "candidates_s", "llm_s")
        }
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["children_peak_rss_mb"] = round(children_peak_rss_mb(), 1)
    return out


# ---------------------------------------------------------------------------------------------
# The driver.


def child(stage: str, env: dict[str, str], extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--stage", stage, *(extra or [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    log.info("  %s: %s", stage, result)
    return result


def growth(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Time ratio of each size to the previous one (2.00 is linear when sizes double)."""
    out = ["-"]
    for prev, cur in zip(rows, rows[1:], strict=False):
        a, b = prev.get(key), cur.get(key)
        out.append(f"{b / a:.2f}" if a and b else "n/a")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, default=125_000)
    parser.add_argument("--items", type=int, default=25_000)
    parser.add_argument("--interactions", type=int, default=2_500_000)
    parser.add_argument("--sizes", default="1,2,4", help="Multiples of the base size.")
    parser.add_argument("--sample-users", type=int, default=1000)
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument(
        "--dask-size", type=int, default=1, help="The size multiple ranked on Dask too (0: none)."
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="Stages to run, in order (tune needs train; rank needs train and tune).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the databases.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    if args.stage:
        print(json.dumps(run_stage(args.stage, args)))
        return
    stages = [st for st in args.stages.split(",") if st]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    for later, needs in (("tune", ("train",)), ("rank", ("train", "tune"))):
        if later in stages and not set(needs) <= set(stages):
            parser.error(f"stage {later} needs {' and '.join(needs)} in --stages")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # A stopped run (kill, Ctrl-C) still drops its database: SIGTERM unwinds like an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import psycopg

    from recranker_core.config import load_settings
    from recranker_core.datasets.synthetic import generate
    from recranker_core.db.connect import libpq_url
    from recranker_core.db.migrate import upgrade
    from recranker_core.llm.tiny import build_tiny_model
    from recranker_core.stack import database_url, local_prefect_api

    settings = load_settings()
    server = database_url(settings)
    api = os.environ.get("PREFECT_API_URL") or local_prefect_api(settings)
    if not api:
        raise SystemExit(
            "no Prefect API: run `recranker stack up --ui` first (or set PREFECT_API_URL)"
        )
    root = settings.home / "bench" / "scale"
    tiny = root / "tiny-llama"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny)
    admin = libpq_url(server)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    dask: dict[str, Any] | None = None
    for factor in sizes:
        users, items, n = args.users * factor, args.items * factor, args.interactions * factor
        log.info("size %dx: %s users, %s items, %s interactions", factor, users, items, n)
        out = root / f"{users}-{items}-{n}"
        t0 = time.perf_counter()
        files = generate(out, users=users, items=items, interactions=n, seed=1)
        generate_s = time.perf_counter() - t0
        name = f"recranker_scale_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{admin.rpartition('/')[0]}/{name}"
        try:
            upgrade(url)
            env = {
                **os.environ,
                **TINY_ENV,
                "PREFECT_API_URL": api,
                "RECRANKER_DATABASE_URL": url,
                "RECRANKER_BACKBONE__PATH": str(tiny),
                "RECRANKER_BASE__MF__EPOCHS": "1",
                "RECRANKER_RANK__LLM_MAX_USERS": str(args.sample_users),
                "RECRANKER_LOG_LEVEL": "WARNING",
                "PREFECT_LOGGING_LEVEL": "WARNING",
            }
            row: dict[str, Any] = {
                "size": factor,
                "users": users,
                "items": items,
                "interactions": n,
                "generate_s": round(generate_s, 1),
            }
            rows.append(row)
            for stage in STAGES:
                if stage in stages or (stage == "ingest" and stages):
                    extra = ["--file", str(files.interactions)] if stage == "ingest" else None
                    row[stage] = child(stage, env, extra)
                    save(args, rows, dask)
            if factor == args.dask_size:
                dask_env = {
                    **env,
                    "RECRANKER_RUNNER__KIND": "dask",
                    "RECRANKER_RUNNER__WORKERS": str(args.dask_workers),
                }
                if "rank" in stages:
                    on_dask = child("rank", dask_env)
                    dask = {"size": factor, "threads": row["rank"], "dask": on_dask}
                    save(args, rows, dask)
        finally:
            if not args.keep:
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    report(rows, dask, args)


def save(args: argparse.Namespace, rows: list[dict[str, Any]], dask: dict[str, Any] | None) -> None:
    """The results so far (after every stage, so an interrupted run keeps what it measured)."""
    if args.json:
        payload = {"rows": rows, "dask": dask, "machine": machine(), "date": today()}
        args.json.write_text(json.dumps(payload, indent=2))


def machine() -> str:
    from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script

    return f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def report(rows: list[dict[str, Any]], dask: dict[str, Any] | None, args: Any) -> None:
    print(f"\nmachine: {machine()}; date {today()}")
    for r in rows:
        print(
            f"- {r['size']}x: {r['users']:,} users, {r['items']:,} items, "
            f"{r['interactions']:,} interactions (generated in {r['generate_s']} s)"
        )
    sizes = [f"{r['size']}x" for r in rows]
    steps = [f"{b} / {a}" for a, b in zip(sizes, sizes[1:], strict=False)]
    print(
        "\n| stage | "
        + " | ".join(f"{s} s" for s in sizes)
        + "".join(f" | {step}" for step in steps)
        + " | peak RSS MB ("
        + ", ".join(sizes)
        + ") |"
    )
    print("|---|" + "---:|" * (len(sizes) + len(steps) + 1))
    for stage, key, label in (
        ("ingest", "seconds", "ingest (whole file)"),
        ("split", "seconds", "split (load_split)"),
        ("train", "seconds", "train-base flow (MF, 1 epoch)"),
        ("train", "fit_s", "- of which fit (1 epoch + validation)"),
        ("rank", "seconds", "batch-rank flow (all users)"),
        ("rank", "candidates_s", "- candidates, shard-seconds"),
        ("rank", "llm_s", f"- LLM, {args.sample_users:,} users, shard-seconds"),
    ):
        if not any(stage in r for r in rows):
            continue
        measured = [r.get(stage, {}) for r in rows]
        values = [m.get(key, "-") for m in measured]
        ratios = growth(measured, key)[1:]
        rss = (
            ", ".join(str(round(m["peak_rss_mb"])) if m else "-" for m in measured)
            if key == "seconds"
            else ""
        )
        print(
            f"| {label} | "
            + " | ".join(str(v) for v in values)
            + "".join(f" | {ratio}" for ratio in ratios)
            + f" | {rss} |"
        )
    if dask:
        t, d = dask["threads"], dask["dask"]
        print(
            f"\nrank at {dask['size']}x, same run: threads runner {t['seconds']} s "
            f"(peak RSS {t['peak_rss_mb']} MB); Dask LocalCluster of {args.dask_workers} worker "
            f"processes {d['seconds']} s (flow process {d['peak_rss_mb']} MB, largest worker "
            f"{d['children_peak_rss_mb']} MB); threads / Dask time: "
            f"{t['seconds'] / d['seconds']:.2f}"
        )


if __name__ == "__main__":
    main()
