"""Strata from the declared schema: declared buckets and categories, derived strata, defaults that
follow the schema, and one clear error for a name the data does not have (at prepare, exit 2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from audit import strata as S
from audit.evaluation import strata_for
from audit.robustness import plan_attribute_perturbations
from metarec.data import movielens
from metarec.data.schema import MOVIELENS_SPEC, AttrSpec, DataSpec, RatingData
from metarec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

BYO_SPEC = DataSpec(
    user_attributes=(AttrSpec("country", "categorical"), AttrSpec("plan", "categorical"),
                     AttrSpec("age", "numeric", edges=(30, 45))),
    item_features=(AttrSpec("genres", "multilabel"),),
    sensitive=("country", "plan", "age"),
)


def byo_data(n: int = 60) -> RatingData:
    """Users with country, plan and age (custom edges 30, 45); each user rates 1 + (i % 7) items."""
    users = pd.DataFrame({"user_id": np.arange(n, dtype=np.int64),
                          "country": [["DE", "FR", "US"][i % 3] for i in range(n)],
                          "plan": [["free", "pro"][i % 2] for i in range(n)],
                          "age": [20 + (i * 7) % 40 for i in range(n)]})
    rows = [(u, i, 3.0, 0) for u in range(n) for i in range(1 + u % 7)]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": np.arange(7, dtype=np.int64), "genres": "A"})
    return RatingData(ratings=ratings, users=users, items=items, spec=BYO_SPEC, source="csv")


# ------------------------------------------------------------------------------ declared buckets
def test_custom_edges_give_the_declared_buckets() -> None:
    data = byo_data()
    st = strata_for(data, {"attributes": ["age"], "intersections": [], "min_group_size": 1})
    ages = data.users["age"].to_numpy()
    want = np.where(ages < 30, "<30", np.where(ages < 45, "30-45", ">=45"))
    assert st.frame["age"].tolist() == want.tolist()
    assert set(st.frame["age"]) == {"<30", "30-45", ">=45"}


def test_declared_labels_are_used_and_missing_is_unknown() -> None:
    spec = replace(BYO_SPEC, user_attributes=(AttrSpec("age", "numeric", edges=(30, 45), labels=("young", "mid", "old")),))
    users = pd.DataFrame({"user_id": [1, 2, 3, 4, 5], "age": [29, 30, 44.5, 45, None]})
    st = S.derive_strata(users, ["age"], spec=spec, min_size=1)
    assert st.frame["age"].tolist() == ["young", "mid", "mid", "old", "unknown"]


def test_movielens_age_buckets_are_the_declared_ml1m_ones() -> None:
    ages = [5, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 80]
    users = pd.DataFrame({"user_id": range(len(ages)), "age": ages})
    st = S.derive_strata(users, ["age"], spec=MOVIELENS_SPEC, min_size=1)
    assert st.frame["age"].tolist() == ["<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44",
                                        "45-49", "45-49", "50-55", "50-55", "56+", "56+"]


def test_zip_region_is_derived_by_the_movielens_loader_and_activity_tertiles() -> None:
    z = movielens.zip_region(pd.Series(["02139", "94305", "T8H1N", "", None]))
    assert z.tolist() == ["0", "9", "other", "unknown", "unknown"]
    assert [a.name for a in movielens.SOURCE_SPEC.derived] == ["zip_region"]
    counts = pd.Series({u: c for u, c in zip(range(9), [1, 1, 1, 1, 1, 1, 50, 60, 70])})
    t = S.activity_tertile(range(10), counts)  # user 9 has no ratings -> 0
    assert t.value_counts().to_dict() == {"low": 4, "mid": 3, "high": 3}
    assert t.iloc[8] == "high" and t.iloc[9] == "low"


def test_derive_strata_merges_small_groups_and_names_intersections() -> None:
    users = pd.DataFrame({
        "user_id": range(12),
        "gender": ["F"] * 6 + ["M"] * 6,
        "age": [30] * 5 + [20] + [30] * 5 + [60],
        "occupation": ["writer"] * 5 + ["other"] * 5 + ["doctor", "lawyer"],
    })
    s = S.derive_strata(users, ["gender", "occupation", "gender x age"], spec=MOVIELENS_SPEC, min_size=3)
    assert s.frame["gender x age"].tolist()[:5] == ["F | 25-34"] * 5
    assert s.merged["occupation"] == ["doctor", "lawyer"]
    assert s.merged["gender x age"] == ["F | 18-24", "M | 56+"]
    assert (s.frame["occupation"] == "other").sum() == 7  # joins the real "other" occupation
    c = s.counts()
    assert c["n"].groupby(c["attribute"]).sum().eq(12).all()  # nobody dropped
    assert c.set_index(["attribute", "group"]).loc[("occupation", "other"), "merged"]
    with pytest.raises(ValueError, match="counts"):
        S.derive_strata(users, ["activity"])


# ------------------------------------------------------------------------------------- defaults
def test_byo_dataset_gets_its_own_strata_by_default() -> None:
    data = byo_data()
    plan = S.plan_strata({"min_group_size": 1}, data.spec)
    assert plan.attributes == ("country", "plan", "age", "activity")
    assert plan.intersections == (("country", "plan"),)
    st = strata_for(data, {"attributes": None, "intersections": None, "min_group_size": 1})
    assert st.attributes == ["country", "plan", "age", "activity", "country x plan"]
    assert set(st.frame["country"]) == {"DE", "FR", "US"} and set(st.frame["plan"]) == {"free", "pro"}
    assert st.frame.loc[0, "country x plan"] == "DE | free"


def test_movielens_defaults_are_the_schema_and_its_derived_region(ml100k_data) -> None:
    plan = S.plan_strata({"attributes": None, "intersections": None}, ml100k_data.spec)
    assert plan.names == ["gender", "age", "occupation", "activity", "zip_region", "gender x age"]
    st = strata_for(ml100k_data, {"min_group_size": 10})
    assert st.frame["zip_region"].value_counts().sum() == 943
    assert set(st.frame["age"]) <= set(MOVIELENS_SPEC.user_attr("age").labels)


def test_a_single_sensitive_attribute_has_no_default_intersection() -> None:
    spec = replace(BYO_SPEC, sensitive=("plan",))
    assert S.plan_strata(None, spec).intersections == ()


# --------------------------------------------------------------------------------------- errors
def test_unknown_intersection_attribute_gives_the_exact_error() -> None:
    with pytest.raises(ConfigError) as exc:
        S.plan_strata({"intersections": [["country", "occupation"]]}, BYO_SPEC)
    assert str(exc.value) == ("params.yaml: strata.intersections entry ['country', 'occupation'] names 'occupation', "
                              "which is not a stratum of this dataset; expected one of country, plan, age, activity")


@pytest.mark.parametrize("cfg, message", [
    ({"attributes": ["gender"]}, "params.yaml: strata.attributes names 'gender', which is not a stratum of this "
                                 "dataset; expected one of country, plan, age, activity"),
    ({"attributes": "country"}, "params.yaml: strata.attributes is 'country'; expected a list of attribute names"),
    ({"intersections": [["plan"]]}, "params.yaml: strata.intersections entry ['plan'] has fewer than two distinct "
                                    "attributes; expected two or more"),
    ({"min_group_size": 0}, "params.yaml: strata.min_group_size is 0; expected a positive integer"),
])
def test_bad_strata_params(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        S.plan_strata(cfg, BYO_SPEC)


# ------------------------------------------------------------------------------------ robustness
def test_perturbed_attributes_follow_the_schema() -> None:
    data = byo_data()
    plan = plan_attribute_perturbations({"attribute_noise": {"levels": [0.1]}}, data)
    assert (plan.noise_attribute, plan.noise_levels, plan.shift_attribute) == ("country", (0.1,), "country")
    assert plan.shift_mix == {"DE": 1 / 3, "FR": 1 / 3, "US": 1 / 3}
    plan = plan_attribute_perturbations({"demographic_shift": {"attribute": "age", "mix": {"<30": 1, ">=45": 1}}}, data)
    assert plan.shift_attribute == "age" and plan.shift_mix == {"<30": 1.0, ">=45": 1.0}


@pytest.mark.parametrize("cfg, message", [
    ({"attribute_noise": {"attribute": "gender"}},
     "params.yaml: robustness.attribute_noise.attribute names 'gender', which is not an attribute of this dataset; "
     "expected one of country, plan, age"),
    ({"demographic_shift": {"attribute": "gender", "mix": {"F": 1}}},
     "params.yaml: robustness.demographic_shift.attribute names 'gender', which is not an attribute of this "
     "dataset; expected one of country, plan, age, activity"),
    ({"demographic_shift": {"attribute": "plan", "mix": {"enterprise": 1}}},
     "params.yaml: robustness.demographic_shift.mix names group 'enterprise' of 'plan', which no user is in; "
     "expected groups among free, pro"),
    ({"attribute_noise": {"levels": [0.1, 2]}},
     "params.yaml: robustness.attribute_noise.levels is [0.1, 2]; expected a list of fractions between 0 and 1"),
])
def test_bad_robustness_attributes(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        plan_attribute_perturbations(cfg, byo_data())


# --------------------------------------------------------------------------- at the prepare stage
def write_byo(folder: Path, params_strata: dict) -> None:
    data = byo_data()
    data.ratings.to_csv(folder / "ratings.csv", index=False)
    data.users.to_csv(folder / "users.csv", index=False)
    data.items.to_csv(folder / "items.csv", index=False)
    schema = {"user_attributes": [{"name": "country", "kind": "categorical"}, {"name": "plan", "kind": "categorical"},
                                  {"name": "age", "kind": "numeric", "edges": [30, 45]}],
              "item_features": [{"name": "genres", "kind": "multilabel", "separator": "|"}],
              "sensitive": ["country", "plan", "age"], "rating_min": 1, "rating_max": 5}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"source": "csv", "interactions": "ratings.csv", "users": "users.csv", "items": "items.csv",
                      "schema": schema}
    params["strata"] = params_strata
    params["tasks"].update(min_ratings=6, query_size=3)   # this small dataset's users have few ratings
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def run_prepare(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipelines.prepare"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def test_prepare_stops_on_an_unknown_intersection_and_writes_nothing(tmp_path: Path) -> None:
    write_byo(tmp_path, {"attributes": None, "intersections": [["country", "gender"]], "min_group_size": 5})
    out = run_prepare(tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("error: params.yaml: strata.intersections entry ['country', 'gender'] names "
                                  "'gender', which is not a stratum of this dataset; expected one of country, plan, "
                                  "age, activity")
    assert not (tmp_path / "data").exists()


def test_prepare_accepts_the_default_params_on_a_byo_dataset(tmp_path: Path) -> None:
    write_byo(tmp_path, {"attributes": None, "intersections": None, "min_group_size": 5})
    out = run_prepare(tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "prepared" / "users.parquet").is_file()
