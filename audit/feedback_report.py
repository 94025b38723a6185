"""The report's feedback-loop section: its context, built from metrics/feedback.json.

The template partial reports/templates/feedback.html.j2 reads `feedback_context(...)`; charts are
the report's own inline SVG (audit.charts), so the section stays byte-identical across runs.
Charts show round means; the tables beside them carry the 95% intervals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audit.charts import Series, line_chart

CURVE_METRICS = ("utility_shown", "homogenisation", "coverage", "mae_heldout")


def _curve(records: list[dict], **where: Any) -> list[dict]:
    return sorted((r for r in records if r["kind"] == "curve" and all(r.get(k) == v for k, v in where.items())),
                  key=lambda r: r["round"])


def feedback_context(path: str | Path = "metrics/feedback.json") -> dict | None:
    """None when the stage did not run; else charts, headline rows, gap growth and trade-off."""
    p = Path(path)
    if not p.is_file():
        return None
    data = json.loads(p.read_text(encoding="utf-8"))
    recs, cfg = data["records"], data["config"]
    oracle = cfg["oracles"][0]
    head = data.get("headline") or []
    attribute = head[0]["attribute"] if head else None
    charts = []
    arms = sorted({(r["model"], r["policy"]) for r in recs if r["kind"] == "curve" and r["oracle"] == oracle})
    for metric in CURVE_METRICS:
        series = [Series(f"{m}/{p}", tuple((c["round"], c["mean"]) for c in
                                           _curve(recs, oracle=oracle, model=m, policy=p, metric=metric, attribute="all")))
                  for m, p in arms]
        charts.append(line_chart(series, title=f"{metric} per round ({oracle} oracle)", x_label="round", y_label=metric))
    for m in cfg["models"]:
        groups = sorted({r["group"] for r in recs if r["kind"] == "curve" and r.get("attribute") == attribute
                         and r["model"] == m})
        series = [Series(f"{g}", tuple((c["round"], c["mean"]) for c in
                                       _curve(recs, oracle=oracle, model=m, policy="greedy", metric="utility_shown",
                                              attribute=attribute, group=g))) for g in groups]
        charts.append(line_chart(series, title=f"{m} greedy: utility_shown by {attribute}", x_label="round",
                                 y_label="utility_shown"))
    growth = [r for r in recs if r["kind"] == "gap_growth" and r["metric"] == "utility_shown"
              and r["attribute"] == attribute]
    growing = [r for r in growth if r.get("p_adjusted") is not None and r["p_adjusted"] < 0.05 and r["growth"] > 0]
    return {"oracles": data.get("oracles", []), "config": cfg, "population": data.get("population"),
            "headline": head, "charts": charts,
            "growth": growth, "growing": growing, "exploration": [r for r in recs if r["kind"] == "exploration"],
            "sensitivity": [r for r in recs if r["kind"] == "oracle_sensitivity"],
            "disagreements": sum(1 for r in recs if r["kind"] == "oracle_sensitivity" and not r["agree"])}
