"""DVC stage `compare`: the candidate against the last signed release (metrics/regression.json)."""

from __future__ import annotations

from pathlib import Path

from audit.evaluation import strata_for
from audit.regression import compare
from metarec.io import atomic_write_json
from pipelines.common import load_params, load_prepared, stage


@stage
def main() -> None:
    params = load_params()
    data = load_prepared()
    strata = strata_for(data, params["strata"]).frame
    sensitive = [a for a in data.spec.sensitive if a in strata.columns]
    doc = compare(Path("."), params, strata[["user_id", *sensitive]])
    atomic_write_json("metrics/regression.json", doc)
    print(f"wrote metrics/regression.json: {doc.get('verdict', doc.get('note'))}")


if __name__ == "__main__":
    main()
