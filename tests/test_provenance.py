"""metrics/provenance.json's digests: the task split's covers the splits only, whatever else the
tasks stage writes beside them, and the evaluation sample has its own."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from audit.provenance import ProvenanceError, sample_digest, tasks_digest
from metarec.prepared import SAMPLE_FILE


def _split(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["scenario", "user_id", "item_id", "role", "rating"])


@pytest.fixture()
def tasks(tmp_path: Path) -> Path:
    _split([("train", 1, 10, "train", 4.0), ("train", 2, 11, "train", 3.0)]).to_parquet(tmp_path / "train.parquet")
    _split([("warm", 1, 11, "support", 5.0), ("warm", 1, 12, "query", 2.0)]).to_parquet(tmp_path / "warm.parquet")
    return tmp_path


def _sample(weight: float = 2.0) -> pd.DataFrame:
    return pd.DataFrame({"scenario": ["warm", "warm"], "user_id": [1, 2], "stratum": [0, 0],
                         "sampled": [True, False], "weight": [weight, 0.0]})


def test_the_split_digest_ignores_the_sample_file(tasks: Path) -> None:
    before = tasks_digest(tasks)
    assert sample_digest(tasks) is None
    _sample().to_parquet(tasks / SAMPLE_FILE)     # not a split: no scenario/item/role/rating columns
    assert tasks_digest(tasks) == before
    assert len(sample_digest(tasks)) == 64


def test_digests_are_of_content_not_row_order(tasks: Path) -> None:
    _sample().to_parquet(tasks / SAMPLE_FILE)
    split, sample = tasks_digest(tasks), sample_digest(tasks)
    pd.read_parquet(tasks / "warm.parquet").iloc[::-1].to_parquet(tasks / "warm.parquet")
    _sample().iloc[::-1].to_parquet(tasks / SAMPLE_FILE)
    assert (tasks_digest(tasks), sample_digest(tasks)) == (split, sample)


def test_a_changed_rating_or_weight_changes_its_digest(tasks: Path) -> None:
    _sample().to_parquet(tasks / SAMPLE_FILE)
    split, sample = tasks_digest(tasks), sample_digest(tasks)
    _sample(weight=3.0).to_parquet(tasks / SAMPLE_FILE)
    assert tasks_digest(tasks) == split and sample_digest(tasks) != sample
    _split([("warm", 1, 11, "support", 4.0), ("warm", 1, 12, "query", 2.0)]).to_parquet(tasks / "warm.parquet")
    assert tasks_digest(tasks) != split


def test_no_split_is_an_error_naming_the_directory(tmp_path: Path) -> None:
    _sample().to_parquet(tmp_path / SAMPLE_FILE)
    with pytest.raises(ProvenanceError, match=rf"^cannot record provenance: no task split in {tmp_path} \(run the "
                                              rf"tasks stage\)$"):
        tasks_digest(tmp_path)
