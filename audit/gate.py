"""Release gates: named thresholds from params.yaml checked against the metrics files.

Why a separate checker: `dvc metrics diff` exits 0 even when a metric worsens, so a release needs
its own pass/fail decision with an exit code CI can act on. Two entry points share one evaluator:

- `metarec-audit gate` (CLI, `run_gate_command`): prints a table, writes reports/gate.junit.xml and
  reports/gate.md, exits 0 (all pass), 1 (a gate fails) or 2 (an input is missing or invalid).
- `record_gates` (the DVC `gate` stage): writes metrics/gate.json and never raises because a gate
  failed, so the pipeline always completes and the report can show the verdict; CI fails on the
  command's exit code instead.

Gate format (docs/DESIGN.md): `{name, file, where, field, op, threshold, description?}`; `where`
selects exactly one record of metrics/<file>.json by key/value equality; `field` is read from it.
"""

from __future__ import annotations

import json
import math
import operator
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from metarec.errors import MetarecError
from metarec.io import atomic_write_json, atomic_write_text

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
}
# Interval fields shown next to an observed value (the record's own CI, whichever naming it uses).
_CI_FIELDS = (("ci_low", "ci_high"), ("diff_ci_low", "diff_ci_high"))


class GateInputError(MetarecError):
    """A gate cannot be evaluated: its metrics file, record or field is missing, or it is malformed."""


@dataclass
class GateResult:
    """One evaluated gate; `error` is set (and `passed` False) when the inputs were unusable."""

    name: str
    file: str
    where: dict[str, Any]
    field: str
    op: str
    threshold: Any
    observed: Any = None
    passed: bool = False
    message: str = ""
    description: str = ""
    ci_low: float | None = None
    ci_high: float | None = None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """Flat dict for metrics/gate.json (DESIGN.md: records are flat, so `where` becomes text)."""
        d = asdict(self)
        d["where"] = format_where(self.where)
        d["kind"] = "gate"
        return d


@dataclass
class _MetricsCache:
    root: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, name: str, gate: str) -> dict[str, Any]:
        stem = name[:-5] if name.endswith(".json") else name
        if stem not in self.files:
            path = self.root / "metrics" / f"{stem}.json"
            if not path.is_file():
                raise GateInputError(f"gate {gate!r}: metrics file metrics/{stem}.json does not exist")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise GateInputError(f"gate {gate!r}: metrics/{stem}.json is not readable JSON ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise GateInputError(f"gate {gate!r}: metrics/{stem}.json has no top-level 'records' list")
            self.files[stem] = data
        return self.files[stem]


def format_where(where: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items())


def validate_gates(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The gate list from params, checked for shape so later errors can name the gate."""
    gates = params.get("gates")
    if gates is None:
        raise GateInputError("params.yaml has no 'gates' list")
    if not isinstance(gates, list):
        raise GateInputError("params.yaml 'gates' must be a list of named thresholds")
    seen: set[str] = set()
    for i, gate in enumerate(gates):
        if not isinstance(gate, dict):
            raise GateInputError(f"gate #{i + 1} in params.yaml is not a mapping")
        name = gate.get("name")
        if not isinstance(name, str) or not name:
            raise GateInputError(f"gate #{i + 1} in params.yaml has no 'name'")
        if name in seen:
            raise GateInputError(f"gate {name!r} is defined twice in params.yaml")
        seen.add(name)
        for key in ("file", "where", "field", "op", "threshold"):
            if key not in gate:
                raise GateInputError(f"gate {name!r} has no '{key}'")
        if not isinstance(gate["where"], dict) or not gate["where"]:
            raise GateInputError(f"gate {name!r}: 'where' must be a non-empty mapping of record keys to values")
        if gate["op"] not in OPS:
            raise GateInputError(f"gate {name!r}: op {gate['op']!r} is not one of {', '.join(OPS)}")
        if not isinstance(gate["field"], str) or not isinstance(gate["file"], str):
            raise GateInputError(f"gate {name!r}: 'file' and 'field' must be strings")
    return gates


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _compare(op: str, observed: Any, threshold: Any, gate: str) -> bool:
    if op == "==":
        if _is_number(observed) and _is_number(threshold):
            return math.isclose(float(observed), float(threshold), rel_tol=1e-9, abs_tol=1e-12)
        return observed == threshold
    if not (_is_number(observed) or isinstance(observed, bool)) or not _is_number(threshold):
        raise GateInputError(f"gate {gate!r}: op {op!r} needs numbers, got observed {observed!r} and threshold {threshold!r}")
    return OPS[op](float(observed), float(threshold))


def evaluate_gate(gate: dict[str, Any], cache: _MetricsCache) -> GateResult:
    """Evaluate one validated gate; raises GateInputError when its record or field is missing."""
    name = gate["name"]
    res = GateResult(name=name, file=gate["file"], where=dict(gate["where"]), field=gate["field"], op=gate["op"],
                     threshold=gate["threshold"], description=str(gate.get("description") or ""))
    data = cache.get(gate["file"], name)
    matches = [r for r in data["records"] if isinstance(r, dict)
               and all(k in r and r[k] == v for k, v in gate["where"].items())]
    stem = gate["file"][:-5] if gate["file"].endswith(".json") else gate["file"]
    if not matches:
        raise GateInputError(f"gate {name!r}: no record in metrics/{stem}.json matches {format_where(gate['where'])}")
    if len(matches) > 1:
        raise GateInputError(f"gate {name!r}: {len(matches)} records in metrics/{stem}.json match "
                             f"{format_where(gate['where'])}; add keys to 'where' so exactly one matches")
    rec = matches[0]
    if gate["field"] not in rec:
        raise GateInputError(f"gate {name!r}: the matching record in metrics/{stem}.json has no field {gate['field']!r}")
    observed = rec[gate["field"]]
    res.observed = observed
    for lo, hi in _CI_FIELDS:
        if _is_number(rec.get(lo)) and _is_number(rec.get(hi)):
            res.ci_low, res.ci_high = float(rec[lo]), float(rec[hi])
            break
    if observed is None or (isinstance(observed, float) and math.isnan(observed)):
        res.passed = False
        res.message = f"observed {gate['field']} is missing (null or NaN), so the gate cannot pass"
        return res
    res.passed = _compare(gate["op"], observed, gate["threshold"], name)
    verb = "holds" if res.passed else "is violated"
    res.message = f"{gate['field']} = {format_value(observed)} {gate['op']} {format_value(gate['threshold'])} {verb}"
    return res


def evaluate_gates(root: Path, params: dict[str, Any]) -> list[GateResult]:
    """All gates; raises GateInputError at the first gate whose inputs are unusable (CLI exit 2)."""
    gates = validate_gates(params)
    cache = _MetricsCache(Path(root))
    return [evaluate_gate(g, cache) for g in gates]


def record_gates(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Write metrics/gate.json for the DVC stage; failing or unevaluable gates are recorded, not raised.

    A gate whose inputs are unusable is written with `passed: false` and `error` set, so the report
    shows the problem while `metarec-audit gate` still exits 2 on it. Only a malformed `gates` list
    raises (there is nothing meaningful to record then).
    """
    root = Path(root)
    gates = validate_gates(params)
    cache = _MetricsCache(root)
    results: list[GateResult] = []
    for g in gates:
        try:
            results.append(evaluate_gate(g, cache))
        except GateInputError as exc:
            results.append(GateResult(name=g["name"], file=g["file"], where=dict(g["where"]), field=g["field"],
                                      op=g["op"], threshold=g["threshold"], passed=False, message=str(exc),
                                      description=str(g.get("description") or ""), error=str(exc)))
    doc = {"passed": bool(results) and all(r.passed for r in results), "records": [r.record() for r in results]}
    atomic_write_json(root / "metrics" / "gate.json", doc)
    return doc


def format_value(x: Any) -> str:
    """Short, stable text for a gate value (4 significant digits for floats)."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return f"{x:.4g}"
    return str(x)


def format_table(results: list[GateResult]) -> str:
    """Plain-text table for the terminal: name, observed, op, threshold, PASS/FAIL."""
    rows = [("gate", "observed", "op", "threshold", "result")]
    rows += [(r.name, format_value(r.observed), r.op, format_value(r.threshold), "PASS" if r.passed else "FAIL")
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_fail = sum(not r.passed for r in results)
    lines.append("")
    lines.append(f"{len(results) - n_fail} of {len(results)} gates pass" + ("" if not n_fail else f"; {n_fail} fail"))
    return "\n".join(lines)


def junit_xml(results: list[GateResult]) -> str:
    """JUnit XML (one testcase per gate) so CI systems display gates as tests."""
    failures = sum(not r.passed for r in results)
    suite = ET.Element("testsuite", name="metarec-audit gates", tests=str(len(results)),
                       failures=str(failures), errors="0", skipped="0")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"gates.{r.file}", name=r.name)
        if not r.passed:
            fail = ET.SubElement(case, "failure", message=r.message, type="GateFailed")
            fail.text = (f"{r.field} observed {format_value(r.observed)}, required {r.op} {format_value(r.threshold)} "
                         f"(metrics/{r.file}.json where {format_where(r.where)})")
        if r.description:
            ET.SubElement(case, "system-out").text = r.description
    root = ET.Element("testsuites", name="metarec-audit", tests=str(len(results)), failures=str(failures))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md_cell(text: str) -> str:
    # Pipes split cells and newlines end rows; angle brackets could inject HTML into the CI summary.
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " "))


def markdown(results: list[GateResult]) -> str:
    """Markdown table for a CI job summary ($GITHUB_STEP_SUMMARY)."""
    passed = all(r.passed for r in results) and bool(results)
    lines = [f"## metarec-audit gates: {'PASSED' if passed else 'FAILED'}", "",
             "| gate | observed | op | threshold | 95% interval | result |", "|---|---|---|---|---|---|"]
    for r in results:
        ci = f"[{format_value(r.ci_low)}, {format_value(r.ci_high)}]" if r.ci_low is not None else ""
        lines.append("| " + " | ".join(_md_cell(c) for c in (r.name, format_value(r.observed), r.op,
                                                               format_value(r.threshold), ci)) +
                     f" | {'PASS' if r.passed else '**FAIL**'} |")
    failed = [r for r in results if not r.passed]
    if failed:
        lines += ["", "Failed gates:", ""] + [f"- `{_md_cell(r.name)}`: {_md_cell(r.message)}" for r in failed]
    return "\n".join(lines) + "\n"


def write_gate_reports(root: Path, results: list[GateResult]) -> tuple[Path, Path]:
    from audit.signing import make_public

    root = Path(root)
    junit = make_public(atomic_write_text(root / "reports" / "gate.junit.xml", junit_xml(results)))
    md = make_public(atomic_write_text(root / "reports" / "gate.md", markdown(results)))
    return junit, md
