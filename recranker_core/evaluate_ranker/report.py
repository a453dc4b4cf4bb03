"""The evaluation report: the docs/METHOD.md table (with each method's difference to the base model
and its paired-bootstrap interval, the guard's decision and the slices) stored in
recranker.ranker_evaluations, and written as a static HTML page with plots (inline SVG, no
plotting dependency) under $RECRANKER_HOME/reports/.

The stored `metrics` column holds `EvalReport.as_json()`: the methods at the top level (as in
rows written before the guard existed, so `metrics->'hybrid'->'test'` reads both), plus `guard`,
`diff_ci`, `slices` and `weights` (absent from older rows)."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recranker_core.db.connect import connect
from recranker_core.evaluate_ranker.evaluate import DIFF_METRICS, EvalReport

METRICS = ("hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10")
COLORS = {
    "base": "#8c8c8c",
    "pointwise": "#4e79a7",
    "pairwise": "#f28e2b",
    "listwise": "#59a14f",
    "hybrid": "#e15759",
    "hybrid_tuned": "#b07aa1",
    "fused": "#76b7b2",
    "published": "#edc948",
}
NO_DIFFERENCE = "no measurable difference"


def difference_text(diff: float, lo: float, hi: float) -> str:
    """A difference to the base model in words: a gain or a loss only when its interval
    excludes 0, else "no measurable difference" (docs/METHOD.md section 1).

    >>> difference_text(0.0123, 0.004, 0.021)
    '+0.0123 [+0.0040, +0.0210]'
    >>> difference_text(0.003, -0.002, 0.008)
    'no measurable difference (+0.0030 [-0.0020, +0.0080])'
    """
    shown = f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    if lo > 0 or hi < 0:
        return shown
    return f"{NO_DIFFERENCE} ({shown})"


def differences(report: EvalReport, method: str, target: str) -> dict[str, str]:
    """Each DIFF_METRICS difference of `method` to the base on `target`, in words."""
    out = {}
    ci = report.diff_ci.get(method, {}).get(target, {})
    for metric in DIFF_METRICS:
        if metric not in ci:
            out[f"{metric} vs base"] = ""
            continue
        diff = report.table[method][target][metric] - report.table["base"][target][metric]
        out[f"{metric} vs base"] = difference_text(diff, *ci[metric])
    return out


def guard_line(report: EvalReport) -> str:
    """The guard's decision as one line (or why there is none)."""
    if report.guard is None:
        return "guard: not measured (needs the validation target)"
    g = report.guard
    line = f"guard: serves {g.served.upper()}: {g.reason}; weights {g.weights.label()}"
    measured = report.guard_evaluation
    if measured is not None and measured is not g:
        line = (
            f"guard (stored with the adapter, what a fused run serves): serves "
            f"{g.served.upper()}: {g.reason}; weights {g.weights.label()}\n"
            f"guard measured here on all validation users (not served; includes the users "
            f"that chose the tuning step): {measured.served}: {measured.reason}"
        )
    return line


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
                json.dumps(report.as_json()),
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
    """One row per method and target, with each difference to the base and its interval: what
    the Prefect table artifact, the HTML and `recranker eval` show."""
    rows = []
    for mode, targets in report.table.items():
        for target, metrics in targets.items():
            row: dict[str, Any] = {
                "method": mode,
                "split": target,
                **{m: round(metrics[m], 4) for m in METRICS},
            }
            if mode != "base":
                row.update(differences(report, mode, target))
            else:
                row.update({f"{m} vs base": "" for m in DIFF_METRICS})
            rows.append(row)
    return rows


def slice_rows(report: EvalReport) -> list[dict[str, Any]]:
    """Test NDCG@3 per slice and method, with the difference to the base and its interval."""
    rows = []
    for kind, slices in report.slices.items():
        for name, entry in slices.items():
            for method, values in entry["methods"].items():
                rows.append(
                    {
                        "slice": f"{kind} {name}",
                        "users": entry["users"],
                        "method": method,
                        "ndcg@3": round(values["ndcg@3"], 4),
                        "vs base": ""
                        if method == "base"
                        else difference_text(values["diff"], *values["ci"]),
                    }
                )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _ticks(top: float, n: int = 4) -> list[float]:
    return [top * i / n for i in range(n + 1)]


def _bars(report: EvalReport, target: str, metric_names: tuple[str, ...]) -> str:
    """Grouped bars of every method per metric, with a value axis."""
    modes = [m for m in report.table if target in report.table[m]]
    width, height, left, top_pad = 760, 240, 56, 10
    group = (width - left) / len(metric_names)
    bar = group / (len(modes) + 1)
    top = max((report.table[m][target][k] for m in modes for k in metric_names), default=0.0)
    top = top * 1.1 or 1.0
    plot = height - top_pad

    def y(v: float) -> float:
        return height - plot * v / top

    parts = [f'<svg width="{width}" height="{height + 60}" role="img">']
    for t in _ticks(top):
        parts.append(
            f'<line x1="{left}" x2="{width}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">'
            f"{t:.3f}</text>"
        )
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top_pad}" y2="{height}" stroke="#333"/>')
    for g, name in enumerate(metric_names):
        x0 = left + g * group
        parts.append(
            f'<text x="{x0 + group / 2:.0f}" y="{height + 16}" font-size="12" '
            f'text-anchor="middle">{name}</text>'
        )
        for b, mode in enumerate(modes):
            value = report.table[mode][target][name]
            x = x0 + b * bar + bar / 2
            parts.append(
                f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar - 2:.1f}" '
                f'height="{height - y(value):.1f}" fill="{COLORS.get(mode, "#333")}">'
                f"<title>{mode} {name} {value:.4f}</title></rect>"
            )
    parts.append(_legend(modes, height + 30))
    parts.append("</svg>")
    return "".join(parts)


def _legend(modes: list[str], y: float) -> str:
    return "".join(
        f'<rect x="{56 + b * 88}" y="{y}" width="10" height="10" '
        f'fill="{COLORS.get(mode, "#333")}"/><text x="{56 + b * 88 + 14}" '
        f'y="{y + 10}" font-size="11">{mode}</text>'
        for b, mode in enumerate(modes)
    )


def _diff_chart(report: EvalReport, target: str, metric: str) -> str:
    """Each method's difference to the base as a bar with its 95% interval as an error bar,
    around a zero line, with a value axis."""
    modes = [m for m in report.diff_ci if target in report.diff_ci[m]]
    if not modes:
        return ""
    rows = []
    for m in modes:
        diff = report.table[m][target][metric] - report.table["base"][target][metric]
        lo, hi = report.diff_ci[m][target][metric]
        rows.append((m, diff, lo, hi))
    bound = max((max(abs(lo), abs(hi), abs(d)) for _, d, lo, hi in rows), default=0.0) * 1.15
    bound = bound or 0.01
    width, height, left, top_pad = 760, 220, 56, 10
    mid = top_pad + (height - top_pad) / 2
    half = (height - top_pad) / 2

    def y(v: float) -> float:
        return mid - half * v / bound

    slot = (width - left) / len(rows)
    parts = [f'<svg width="{width}" height="{height + 40}" role="img">']
    for t in (-bound, -bound / 2, 0.0, bound / 2, bound):
        parts.append(
            f'<line x1="{left}" x2="{width}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
            f'stroke="{"#333" if t == 0 else "#ddd"}"/>'
            f'<text x="{left - 6}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">'
            f"{t:+.3f}</text>"
        )
    for n, (m, d, lo, hi) in enumerate(rows):
        x = left + n * slot + slot * 0.25
        w = slot * 0.5
        cx = x + w / 2
        parts.append(
            f'<rect x="{x:.1f}" y="{min(y(d), y(0)):.1f}" width="{w:.1f}" '
            f'height="{abs(y(d) - y(0)):.1f}" fill="{COLORS.get(m, "#333")}">'
            f"<title>{m}: {difference_text(d, lo, hi)}</title></rect>"
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" '
            'stroke="#000" stroke-width="1.5"/>'
            f'<line x1="{cx - 6:.1f}" x2="{cx + 6:.1f}" y1="{y(hi):.1f}" y2="{y(hi):.1f}" '
            'stroke="#000"/>'
            f'<line x1="{cx - 6:.1f}" x2="{cx + 6:.1f}" y1="{y(lo):.1f}" y2="{y(lo):.1f}" '
            'stroke="#000"/>'
            f'<text x="{cx:.1f}" y="{height + 16}" font-size="11" text-anchor="middle">{m}'
            "</text>"
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


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict | list):
        return html.escape(json.dumps(value, default=str))
    return html.escape(str(value))


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _key_values(items: dict[str, Any]) -> str:
    return _html_table([{"": k, "value": v} for k, v in items.items()])


def write_html(report: EvalReport, directory: Path, *, title: str, context: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"ranker-eval-{stamp}.html"
    weights = _html_table([{"weights": name, **w} for name, w in report.weights.items()])
    counts = _html_table([{"split": t, **c} for t, c in report.counts.items()])
    guard = (
        _key_values(
            {
                "served": report.guard.served,
                "reason": report.guard.reason,
                **{
                    k: v
                    for k, v in report.guard.as_json().items()
                    if k not in ("served", "reason", "weights")
                },
                **{f"weight {k}": v for k, v in report.guard.weights.as_dict().items()},
            }
        )
        if report.guard is not None
        else "<p>not measured (the validation target was not evaluated)</p>"
    )
    n = max((max(p) for p in report.positions.get("test", [])), default=9) + 1
    charts = "".join(
        f"<h2>{label}: metrics per method</h2>{_bars(report, target, METRICS)}"
        + "".join(
            f"<h3>{label}: {metric} difference to the base model (95% paired-bootstrap "
            f"interval)</h3>{_diff_chart(report, target, metric)}"
            for metric in DIFF_METRICS
        )
        for target, label in (("test", "Test"), ("valid", "Validation"))
        if target in report.table["base"]
    )
    sample = f"<p><b>Sample:</b> {html.escape(report.sample)}</p>" if report.sample else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:72em}}
td,th{{padding:2px 8px;text-align:right}} table{{border-collapse:collapse;margin-bottom:1em}}
tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Written {stamp}. Metrics over all evaluable users (a user whose
held-out item is not among the base model's candidates is a miss for every method). Each
difference to the base model is the mean per-user difference with its 95% paired-bootstrap
interval (resampling users); one whose interval contains 0 is "{NO_DIFFERENCE}".</p>{sample}
<h2>Run</h2>{_key_values(context)}
<h2>Guard (what batch ranking serves in mode fused)</h2>{guard}
<h2>Weights</h2>{weights}
<h2>Users</h2>{counts}
<h2>Table</h2>{_html_table(table_rows(report))}
<h2>Slices (test NDCG@3)</h2>{_html_table(slice_rows(report))}
{charts}
<h2>Position of the test item before and after re-ranking (hybrid)</h2>
{_positions(report.positions.get("test", []), n)}
</body></html>"""
    path.write_text(page, encoding="utf-8")
    return path
