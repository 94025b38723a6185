"""DVC stage `collect`: the tidy results/metrics_long.parquet of CONTRACTS.md."""

from __future__ import annotations

import pandas as pd

from metarec.io import atomic_write_parquet
from pipelines.common import stage

COLUMNS = ["model", "seed", "scenario", "perturbation", "attribute", "group", "metric", "value"]


@stage
def main() -> None:
    parts = [pd.read_parquet(p) for p in ("results/accuracy_long.parquet", "results/robustness_long.parquet",
                                          "results/feedback_long.parquet")]
    long = pd.concat([p[COLUMNS] for p in parts], ignore_index=True)
    long = long.astype({"seed": "int64", "value": "float64"}).sort_values(COLUMNS[:-1], kind="stable")
    atomic_write_parquet("results/metrics_long.parquet", long.reset_index(drop=True))
    print(f"results/metrics_long.parquet: {len(long)} rows")


if __name__ == "__main__":
    main()
