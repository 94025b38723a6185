"""Shared fixtures: the real MovieLens-100K files (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The folder of GroupLens ML-100K files: $METAREC_ML100K, else <repo>/../shared/datasets/ml-100k."""
    path = Path(os.environ.get("METAREC_ML100K") or (REPO / ".." / "shared" / "datasets" / "ml-100k")).resolve()
    missing = [f for f in ("u.data", "u.user", "u.item") if not (path / f).is_file()]
    if missing:
        pytest.skip(f"MovieLens-100K files not found in {path} (missing {', '.join(missing)}); "
                    f"set METAREC_ML100K to a folder holding u.data, u.user and u.item")
    return path


@pytest.fixture(scope="session")
def ml100k_data(ml100k_dir: Path):
    """The parsed and validated MovieLens-100K tables."""
    from metarec.data.load import load_dataset

    return load_dataset({"source": "movielens-100k", "path": str(ml100k_dir)}, log=lambda _: None)
