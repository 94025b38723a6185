"""Release gates: named thresholds from params.yaml checked against the metrics files.

Why a separate checker: `dvc metrics diff` exits 0 even when a metric worsens, so a release needs
its own pass/fail decision with an exit code CI can act on. Two entry points share one evaluator:

- `metarec-audit gate` (CLI, `run_gate_command`): prints a table, writes reports/gate.junit.xml and
  reports/gate.md, exits 0 (all pass), 1 (a gate fails) or 2 (an input is missing or invalid).
- `record_gates` (the DVC `gate` stage): writes metrics/gate.json and never raises because a gate
  failed, so the pipeline always completes and the report can show the verdict; CI fails on the
  command's exit code instead.

Gate format (docs/DESIGN.md): `{name, file, where, field, op, threshold, description?, interval?,
on_inconclusive?}`; `where` selects exactly one record of metrics/<file>.json by key/value equality;
`field` is read from it.

Three outcomes. A point estimate next to a threshold says little when its interval straddles the
threshold, so a gate on a quantity with an interval compares the threshold with the whole interval:
`pass` when every value in it satisfies the rule, `fail` when none does, `inconclusive` otherwise.
`interval: [lo_field, hi_field]` names the record's bounds; without it the bounds are looked up from
the field's name (`mean` -> `ci_users_low/ci_users_high`, then `ci_low/ci_high`; `mean_diff` ->
`ci_low/ci_high`; `difference` -> `diff_ci_low/diff_ci_high`; any `F` -> `F_ci_low/F_ci_high` or
`F_mc_low/F_mc_high`, e.g. a p-value's Monte-Carlo interval); `interval: null` compares the bare value
(for booleans and for fields that are themselves bounds). A record marked `insufficient`, or a missing
value or bound, is also inconclusive. `on_inconclusive: fail | pass` (default fail) decides whether an
inconclusive gate counts against the verdict; the outcome itself is always reported as inconclusive.
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
OUTCOMES = ("pass", "fail", "inconclusive")
# Interval bounds looked up for a field when the gate names none (first pair present in the record wins):
# accuracy means quote the interval over seeds and users (issue 12), comparisons and gaps their own CI.
_NAMED_INTERVALS: dict[str, tuple[tuple[str, str], ...]] = {
    "mean": (("ci_users_low", "ci_users_high"), ("ci_low", "ci_high")),
    "mean_diff": (("ci_low", "ci_high"),),
    "difference": (("diff_ci_low", "diff_ci_high"),),
}
_SUFFIX_INTERVALS = (("_ci_low", "_ci_high"), ("_mc_low", "_mc_high"))
_NO_INTERVAL = object()


# Gates read the audit's own signed metrics files only (metrics/<name>.json), never a path.
GATE_FILES = ("summary", "fairness", "robustness", "reproducibility", "regression", "feedback")


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
    outcome: str = "fail"
    passed: bool = False
    on_inconclusive: str = "fail"
    message: str = ""
    description: str = ""
    interval: str = ""
    interval_low: float | None = None
    interval_high: float | None = None
    error: str | None = None

    def decide(self, outcome: str, message: str) -> "GateResult":
        """Set the outcome and whether it counts as passed (an inconclusive gate follows on_inconclusive)."""
        self.outcome, self.message = outcome, message
        self.passed = outcome == "pass" or (outcome == "inconclusive" and self.on_inconclusive == "pass")
        return self

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
            except RecursionError:
                raise GateInputError(f"gate {gate!r}: metrics/{stem}.json is nested too deeply to be audit output") from None
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
    if not gates:
        raise GateInputError("params.yaml 'gates' is empty: a release gate needs at least one named threshold")
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
        stem = gate["file"][:-5] if gate["file"].endswith(".json") else gate["file"]
        if stem not in GATE_FILES:
            raise GateInputError(f"gate {name!r}: file {gate['file']!r} is not one of the audit's metrics files "
                                 f"({', '.join(GATE_FILES)})")
        if gate.get("on_inconclusive", "fail") not in ("fail", "pass"):
            raise GateInputError(f"gate {name!r}: on_inconclusive must be 'fail' or 'pass', "
                                 f"got {gate['on_inconclusive']!r}")
        interval = gate.get("interval")
        if interval is not None:
            if not (isinstance(interval, list) and len(interval) == 2 and all(isinstance(x, str) for x in interval)):
                raise GateInputError(f"gate {name!r}: 'interval' must be a list of two field names "
                                     f"[low, high] or null, got {interval!r}")
            if gate["op"] == "==":
                raise GateInputError(f"gate {name!r}: op '==' cannot be checked against an interval; "
                                     f"use <, <=, > or >=, or remove 'interval'")
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


def interval_fields(gate: dict[str, Any], rec: dict[str, Any]) -> tuple[str, str] | None:
    """The record fields holding the bounds the gate compares, or None for a point comparison.

    Explicit `interval: [lo, hi]` must exist in the record; `interval: null` (or op '==') means none;
    otherwise the first known pair for the field's name that the record carries (module docstring).
    """
    name, fld = gate["name"], gate["field"]
    if "interval" in gate:
        if gate["interval"] is None:
            return None
        lo, hi = gate["interval"]
        missing = [f for f in (lo, hi) if f not in rec]
        if missing:
            raise GateInputError(f"gate {name!r}: the matching record has no interval field(s) {missing}")
        return lo, hi
    if gate["op"] == "==":
        return None
    pairs = _NAMED_INTERVALS.get(fld, ()) + tuple((fld + a, fld + b) for a, b in _SUFFIX_INTERVALS)
    return next(((lo, hi) for lo, hi in pairs if lo in rec and hi in rec), None)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def evaluate_gate(gate: dict[str, Any], cache: _MetricsCache) -> GateResult:
    """Evaluate one validated gate; raises GateInputError when its record or field is missing."""
    name = gate["name"]
    res = GateResult(name=name, file=gate["file"], where=dict(gate["where"]), field=gate["field"], op=gate["op"],
                     threshold=gate["threshold"], description=str(gate.get("description") or ""),
                     on_inconclusive=str(gate.get("on_inconclusive", "fail")))
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
    bounds = interval_fields(gate, rec)
    if bounds is not None:
        res.interval = f"{bounds[0]}, {bounds[1]}"
        lo, hi = rec[bounds[0]], rec[bounds[1]]
        res.interval_low = None if _missing(lo) else lo
        res.interval_high = None if _missing(hi) else hi
    if rec.get("insufficient") is True:
        n = f" (n = {rec['n']})" if "n" in rec else ""
        return res.decide("inconclusive", f"the selected record is marked insufficient{n}: its groups are below "
                                          f"the minimum size, so the gate cannot pass on it")
    if _missing(observed):
        return res.decide("inconclusive", f"observed {gate['field']} is missing (null or NaN), so the gate cannot pass")
    rule = f"{gate['op']} {format_value(gate['threshold'])}"
    if bounds is None:
        ok = _compare(gate["op"], observed, gate["threshold"], name)
        return res.decide("pass" if ok else "fail",
                          f"{gate['field']} = {format_value(observed)} {rule} {'holds' if ok else 'is violated'}")
    if res.interval_low is None or res.interval_high is None:
        return res.decide("inconclusive", f"the interval [{bounds[0]}, {bounds[1]}] of {gate['field']} is missing "
                                          f"(null or NaN), so the gate cannot pass")
    ends = [_compare(gate["op"], x, gate["threshold"], name) for x in (res.interval_low, res.interval_high)]
    span = f"[{format_value(res.interval_low)}, {format_value(res.interval_high)}]"
    if all(ends):
        return res.decide("pass", f"{gate['field']} interval {span} lies wholly {rule}")
    if not any(ends):
        return res.decide("fail", f"{gate['field']} interval {span} lies wholly outside {rule}")
    return res.decide("inconclusive", f"{gate['field']} interval {span} straddles the threshold "
                                      f"{format_value(gate['threshold'])}: neither {rule} nor its opposite is established")


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
    doc = {"passed": bool(results) and all(r.passed for r in results), "verdict": verdict_line(results),
           "records": [r.record() for r in results]}
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


def result_label(r: GateResult) -> str:
    """PASS, FAIL, or INCONCLUSIVE with what it counts as (on_inconclusive decides the exit code)."""
    if r.outcome != "inconclusive":
        return r.outcome.upper()
    return f"INCONCLUSIVE (counts as {'pass' if r.passed else 'fail'})"


def format_interval(r: GateResult) -> str:
    """The compared interval as text, or '' for a point comparison."""
    if not r.interval:
        return ""
    return f"[{format_value(r.interval_low)}, {format_value(r.interval_high)}]"


def verdict_line(results: list[GateResult]) -> str:
    """'a of n gates pass; f fail; i inconclusive (k counted as failing)'."""
    n_pass = sum(r.outcome == "pass" for r in results)
    n_fail = sum(r.outcome == "fail" for r in results)
    inconclusive = [r for r in results if r.outcome == "inconclusive"]
    line = f"{n_pass} of {len(results)} gates pass"
    if n_fail:
        line += f"; {n_fail} fail"
    if inconclusive:
        line += (f"; {len(inconclusive)} inconclusive "
                 f"({sum(not r.passed for r in inconclusive)} counted as failing)")
    return line


def format_table(results: list[GateResult]) -> str:
    """Plain-text table for the terminal: name, observed, op, threshold, compared interval, outcome."""
    rows = [("gate", "observed", "op", "threshold", "interval", "result")]
    rows += [(r.name, format_value(r.observed), r.op, format_value(r.threshold), format_interval(r), result_label(r))
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(verdict_line(results))
    return "\n".join(lines)


def junit_xml(results: list[GateResult]) -> str:
    """JUnit XML (one testcase per gate) so CI systems display gates as tests.

    A failed gate is a <failure type="GateFailed">; an inconclusive one is a <failure
    type="GateInconclusive"> when it counts as failing and <skipped> when `on_inconclusive: pass`,
    so the third state stays visible in CI either way.
    """
    failures = sum(not r.passed for r in results)
    skipped = sum(r.passed and r.outcome == "inconclusive" for r in results)
    suite = ET.Element("testsuite", name="metarec-audit gates", tests=str(len(results)),
                       failures=str(failures), errors="0", skipped=str(skipped))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"gates.{r.file}", name=r.name)
        detail = (f"{r.field} observed {format_value(r.observed)}"
                  + (f" with interval {format_interval(r)}" if r.interval else "")
                  + f", required {r.op} {format_value(r.threshold)} (metrics/{r.file}.json where {format_where(r.where)})")
        if r.outcome == "inconclusive" and r.passed:
            ET.SubElement(case, "skipped", message=f"inconclusive (counts as pass): {r.message}").text = detail
        elif not r.passed:
            kind = "GateInconclusive" if r.outcome == "inconclusive" else "GateFailed"
            ET.SubElement(case, "failure", message=r.message, type=kind).text = detail
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
    lines = [f"## metarec-audit gates: {'PASSED' if passed else 'FAILED'}", "", verdict_line(results) + ".", "",
             "| gate | observed | op | threshold | interval compared | result |", "|---|---|---|---|---|---|"]
    for r in results:
        label = result_label(r)
        lines.append("| " + " | ".join(_md_cell(c) for c in (r.name, format_value(r.observed), r.op,
                                                               format_value(r.threshold), format_interval(r))) +
                     f" | {label if r.outcome == 'pass' else '**' + label + '**'} |")
    open_ = [r for r in results if r.outcome != "pass"]
    if open_:
        lines += ["", "Gates that did not pass:", ""]
        lines += [f"- `{_md_cell(r.name)}` ({r.outcome}): {_md_cell(r.message)}" for r in open_]
    return "\n".join(lines) + "\n"


def write_gate_reports(root: Path, results: list[GateResult]) -> tuple[Path, Path]:
    from audit.signing import make_public

    root = Path(root)
    junit = make_public(atomic_write_text(root / "reports" / "gate.junit.xml", junit_xml(results)))
    md = make_public(atomic_write_text(root / "reports" / "gate.md", markdown(results)))
    return junit, md
