"""The prepared data and the task split as the pipeline stores them on disk (data/prepared,
data/tasks): loaders shared by the DVC stages and the command line (`metarec-audit serve`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from metarec.data.ids import IdMap
from metarec.data.schema import DataSpec, RatingData
from metarec.features import FeatureEncoder
from metarec.tasks import SCENARIOS, TaskSet

PREPARED = Path("data/prepared")
TASKS = Path("data/tasks")
# The mapping tables from internal codes to the ids as the data owner wrote them (metarec.data.ids).
ID_TABLES = {"user_id": "user_ids.parquet", "item_id": "item_ids.parquet"}
# The evaluation users drawn when params `evaluation.sample` is set (audit.sampling writes it at the
# tasks stage): scenario, user_id, stratum, sampled, weight. Absent: every user is evaluated.
SAMPLE_FILE = "sample.parquet"


def load_prepared(root: Path = PREPARED) -> RatingData:
    meta = json.loads((root / "meta.json").read_text())
    ids = {key: IdMap.from_frame(pd.read_parquet(root / name)) for key, name in ID_TABLES.items()
           if (root / name).is_file()}
    return RatingData(
        ratings=pd.read_parquet(root / "ratings.parquet"), users=pd.read_parquet(root / "users.parquet"),
        items=pd.read_parquet(root / "items.parquet"), spec=DataSpec.from_dict(meta["spec"]),
        source=meta["source"], provenance=meta.get("provenance", {}), ids=ids)


def with_original_ids(frame: pd.DataFrame, data: RatingData) -> pd.DataFrame:
    """`frame` plus `original_user_id` / `original_item_id` next to each code column it has.

    Why: outputs that name users or items (predictions, rankings, per-user metrics) must be
    readable against the data owner's own ids; the int64 codes stay for joins inside the audit.
    The original column is int64 for integer ids and string for text ids.
    """
    out = frame.copy()
    for key in ID_TABLES:
        if key in out.columns:
            out[f"original_{key}"] = data.id_map(key).original(out[key].to_numpy()).to_numpy()
    return out


def scenarios_present(root: Path = TASKS) -> tuple[str, ...]:
    """The evaluation scenarios that have users and items, in SCENARIOS order.

    The tasks stage records each empty scenario with its reason in summary.json (`empty`); every
    later stage loops over this instead of SCENARIOS, so an empty scenario is skipped, never a crash.
    """
    empty = json.loads((root / "summary.json").read_text()).get("empty", {})
    return tuple(s for s in SCENARIOS if s not in empty)


def empty_scenarios(root: Path = TASKS) -> dict[str, str]:
    """scenario -> why it is empty (e.g. "no item has release_year >= 1997"), from summary.json."""
    return dict(json.loads((root / "summary.json").read_text()).get("empty", {}))


def load_split(name: str, data: RatingData | None = None, root: Path = TASKS) -> TaskSet:
    data = data or load_prepared()
    return TaskSet.read(root / f"{name}.parquet", data.users, data.items)


def load_evaluation_split(name: str, data: RatingData | None = None, root: Path = TASKS) -> TaskSet:
    """A scenario's split restricted to its sampled users when a sample was drawn (else all of it).

    Why one loader: every stage that scores a scenario (train, the counterfactual test, robustness,
    the determinism re-run) must score the same users, so that every model and seed is evaluated on
    the same sample and paired comparisons stay paired.
    """
    split = load_split(name, data, root)
    path = root / SAMPLE_FILE
    if not path.is_file():
        return split
    design = pd.read_parquet(path, columns=["scenario", "user_id", "sampled"])
    keep = design.loc[(design["scenario"] == name) & design["sampled"], "user_id"]
    frame = split.frame[split.frame["user_id"].isin(keep)].reset_index(drop=True)
    return TaskSet(frame, split.users, split.items)


def load_encoder(root: Path = TASKS) -> FeatureEncoder:
    return FeatureEncoder.from_json((root / "encoder.json").read_text())
