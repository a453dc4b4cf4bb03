"""The evaluation report: the docs/METHOD.md table stored in recranker.ranker_evaluations and
written as a static HTML page with plots (inline SVG, no plotting dependency) under
$RECRANKER_HOME/reports/."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recranker_core.db.connect import connect
from recranker_core.ranker.evaluate import EvalReport

METRICS = ("hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10")
COLORS = {
    "base": "#8c8c8c",
    "pointwise": "#4e79a7",
    "pairwise": "#f28e2b",
    "listwise": "#59a14f",
    "hybrid": "#e15759",
    "hybrid_tuned": "#b07aa1",
}


def save_evaluation(
    database_url: str,
    report: EvalReport,
    *,
    model_id: int,
    adapter_id: int | None,
    params: dict[str, Any],
    report_path: Path | None,
) -> int:
    with connect(database_url) as conn:
        row = conn.execute(
            """INSERT INTO recranker.ranker_evaluations
                   (model_id, adapter_id, metrics, weights, counts, params, report_path)
               VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING evaluation_id""",
            (
                model_id,
                adapter_id,
                json.dumps(report.table),
                json.dumps(report.weights),
                json.dumps(report.counts),
                json.dumps(params),
                str(report_path) if report_path else None,
            ),
        ).fetchone()
        conn.commit()
    assert row is not None
    return int(row[0])


def table_rows(report: EvalReport) -> list[dict[str, Any]]:
    """One row per method and target: what the Prefect table artifact and the HTML show."""
    rows = []
    for mode, targets in report.table.items():
        for target, metrics in targets.items():
            rows.append(
                {"method": mode, "split": target, **{m: round(metrics[m], 4) for m in METRICS}}
            )
    return rows


def _bars(report: EvalReport, target: str, metric_names: tuple[str, ...]) -> str:
    modes = [m for m in report.table if target in report.table[m]]
    width, height, pad = 640, 240, 40
    group = (width - pad) / len(metric_names)
    bar = group / (len(modes) + 1)
    top = max((report.table[m][target][k] for m in modes for k in metric_names), default=0.0) or 1.0
    parts = [f'<svg width="{width}" height="{height + 40}" role="img">']
    for g, name in enumerate(metric_names):
        x0 = pad + g * group
        parts.append(
            f'<text x="{x0 + group / 2 - 20:.0f}" y="{height + 20}" font-size="12">{name}</text>'
        )
        for b, mode in enumerate(modes):
            value = report.table[mode][target][name]
            h = (height - 20) * value / top
            x = x0 + b * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                f'fill="{COLORS.get(mode, "#333")}"><title>{mode} {name} {value:.4f}</title></rect>'
            )
    for b, mode in enumerate(modes):
        parts.append(
            f'<rect x="{pad + b * 100}" y="{height + 28}" width="10" height="10" '
            f'fill="{COLORS.get(mode, "#333")}"/><text x="{pad + b * 100 + 14}" '
            f'y="{height + 38}" font-size="11">{mode}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _positions(pairs: list[tuple[int, int]], n: int) -> str:
    """A grid of counts: rows = position of the test item in the base list, columns = after
    re-ranking; the diagonal is 'unchanged', left of it 'moved up'."""
    counts = [[0] * n for _ in range(n)]
    for before, after in pairs:
        counts[before][after] += 1
    peak = max((c for row in counts for c in row), default=0) or 1
    cell, pad = 28, 60
    parts = [f'<svg width="{pad + n * cell + 10}" height="{pad + n * cell + 10}" role="img">']
    parts.append(
        f'<text x="{pad}" y="14" font-size="12">after re-ranking (position) &#8594;</text>'
    )
    parts.append('<text x="4" y="40" font-size="12">base &#8595;</text>')
    for i in range(n):
        parts.append(
            f'<text x="{pad + i * cell + 10}" y="{pad - 6}" font-size="10">{i + 1}</text>'
            f'<text x="{pad - 18}" y="{pad + i * cell + 18}" font-size="10">{i + 1}</text>'
        )
        for j in range(n):
            c = counts[i][j]
            shade = int(255 - 200 * c / peak)
            parts.append(
                f'<rect x="{pad + j * cell}" y="{pad + i * cell}" width="{cell - 1}" '
                f'height="{cell - 1}" fill="rgb({shade},{shade},255)"><title>base {i + 1} -> '
                f"{j + 1}: {c}</title></rect>"
            )
            if c:
                parts.append(
                    f'<text x="{pad + j * cell + 6}" y="{pad + i * cell + 18}" '
                    f'font-size="10">{c}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def write_html(report: EvalReport, directory: Path, *, title: str, context: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"ranker-eval-{stamp}.html"
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    body = "".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['split']}</td>"
        + "".join(f"<td>{r[m]:.4f}</td>" for m in METRICS)
        + "</tr>"
        for r in table_rows(report)
    )
    ctx = "".join(
        f"<li><b>{html.escape(str(k))}</b>: {html.escape(json.dumps(v, default=str))}</li>"
        for k, v in context.items()
    )
    n = max((max(p) for p in report.positions.get("test", [])), default=9) + 1
    charts = "".join(
        f"<h2>{label} metrics per method</h2>{_bars(report, target, METRICS)}"
        for target, label in (("test", "Test"), ("valid", "Validation"))
        if target in report.table["base"]
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}
td,th{{padding:2px 8px;text-align:right}} table{{border-collapse:collapse}}
tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Written {stamp}. Metrics over all evaluable users (a user whose
held-out item is not among the base model's candidates is a miss for every method).</p>
<ul>{ctx}<li><b>weights</b>: {html.escape(json.dumps(report.weights))}</li>
<li><b>counts</b>: {html.escape(json.dumps(report.counts))}</li></ul>
<table><tr><th>method</th><th>split</th>{head}</tr>{body}</table>
{charts}
<h2>Position of the test item before and after re-ranking (hybrid)</h2>
{_positions(report.positions.get("test", []), n)}
</body></html>"""
    path.write_text(page, encoding="utf-8")
    return path
