"""metrics/headline.json: the few dozen scalars `dvc metrics show` and `dvc metrics diff` display.

Why a file of its own: DVC prints every scalar of every declared metrics file side by side, so
declaring the detailed records (hundreds of group rows, package versions, hashes) made both
commands unreadable. Only this file is a DVC metric; the detailed records stay in their own files.
It holds, for the models the audit is about (the meta-learner and the `fairness.models`), MAE and
catalogue nDCG per scenario; for the meta-learner, the largest mean-MAE gap per attribute that
rests on groups of sufficient size, with its adjusted p-value; and the gate verdict with counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from metarec.errors import MetarecError

__all__ = ["HeadlineError", "headline", "write_headline"]


class HeadlineError(MetarecError):
    """A metrics file the headline needs is missing or unreadable."""


def _read(root: Path, name: str) -> dict[str, Any]:
    path = root / "metrics" / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise HeadlineError(f"cannot write the headline: {path} is missing (run the stages before it)") from None
    except ValueError:
        raise HeadlineError(f"cannot write the headline: {path} is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise HeadlineError(f"cannot write the headline: {path} has no top-level 'records' list")
    return doc


def _round(x: Any) -> float | None:
    return None if x is None else round(float(x), 6)


def _gate_outcome(r: dict[str, Any]) -> str:
    return str(r.get("outcome") or ("pass" if r.get("passed") else "fail"))


def headline(root: Path, models: Iterable[str], meta: str, list_metric: str) -> dict[str, Any]:
    """The headline scalars from metrics/summary.json, fairness.json and gate.json under root."""
    root = Path(root)
    summary, fairness, gate = (_read(root, n) for n in ("summary", "fairness", "gate"))
    models = list(dict.fromkeys([meta, *models]))
    accuracy: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in summary["records"]:
        if r.get("kind") == "accuracy" and r.get("model") in models and r.get("metric") in ("mae", list_metric):
            accuracy.setdefault(r["model"], {}).setdefault(r["scenario"], {})[r["metric"]] = _round(r.get("mean"))
    gaps: dict[str, dict[str, Any]] = {}
    for r in fairness["records"]:
        if (r.get("kind") != "gap" or r.get("model") != meta or r.get("metric") != "mae"
                or r.get("insufficient") or r.get("difference") is None):
            continue
        best = gaps.get(r["attribute"])
        if best is None or r["difference"] > best["largest_mae_gap"]:
            gaps[r["attribute"]] = {"largest_mae_gap": _round(r["difference"]), "scenario": r["scenario"],
                                    "p_adjusted": _round(r.get("p_adjusted"))}
    records = [r for r in gate["records"] if r.get("kind", "gate") == "gate"]
    counts = {k: sum(_gate_outcome(r) == k for r in records) for k in ("pass", "fail", "inconclusive")}
    return {"verdict": "PASSED" if gate.get("passed") else "FAILED", "gates": counts,
            "accuracy": {m: accuracy[m] for m in models if m in accuracy},
            "fairness": {meta: dict(sorted(gaps.items()))}}


def write_headline(root: Path, params: dict[str, Any]) -> Path:
    from metarec.io import atomic_write_json

    k = int(params["evaluation"]["catalogue_k"])
    doc = headline(root, (params.get("fairness") or {}).get("models", []), params["meta_learner"],
                   f"list_ndcg@{k}")
    return atomic_write_json(Path(root) / "metrics" / "headline.json", doc)
