"""DVC stage `gate`: evaluate the release gates into metrics/gate.json.

The stage never fails because a gate failed, so the pipeline always reaches the report, which shows
the verdict; CI acts on the exit code of `metarec-audit gate` instead.
"""

from __future__ import annotations

from pathlib import Path

from audit.gate import record_gates
from pipelines.common import load_params, stage


@stage
def main() -> None:
    doc = record_gates(Path("."), load_params())
    n_fail = sum(not r["passed"] for r in doc["records"])
    print(f"wrote metrics/gate.json: {'PASSED' if doc['passed'] else 'FAILED'} "
          f"({len(doc['records']) - n_fail} of {len(doc['records'])} gates pass)")


if __name__ == "__main__":
    main()
