"""The synthetic source: deterministic, MovieLens-shaped, and its planted effects are recoverable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metarec.data.load import load_dataset
from metarec.data.schema import MOVIELENS_SPEC
from metarec.data.synthetic import generate
from metarec.errors import ConfigError

BIAS = {"type": "bias", "attribute": "gender", "group": "F", "size": -0.3}
NOISE = {"type": "noise", "attribute": "age", "group": "56+", "size": 0.5}


@pytest.fixture(scope="module")
def planted():
    return generate({"seed": 0, "effects": [BIAS, NOISE]})


@pytest.fixture(scope="module")
def plain():
    return generate({"seed": 0})


def residuals(data) -> pd.DataFrame:
    """Ratings minus their item's mean, joined to the rater's attributes."""
    r = data.ratings.merge(data.users, on="user_id")
    r["residual"] = r["rating"] - r.groupby("item_id")["rating"].transform("mean")
    r["age_group"] = MOVIELENS_SPEC.user_attr("age").bucketize(r["age"])
    return r


def test_same_seed_gives_identical_frames() -> None:
    (a, ta), (b, tb) = generate({"seed": 7, "effects": [BIAS]}), generate({"seed": 7, "effects": [BIAS]})
    for name in ("ratings", "users", "items"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert ta == tb


def test_different_seed_gives_different_frames() -> None:
    a, _ = generate({"seed": 1})
    b, _ = generate({"seed": 2})
    assert not a.ratings.equals(b.ratings) and not a.users.equals(b.users)


def test_movielens_shape(plain) -> None:
    data, _ = plain
    assert (len(data.users), len(data.items), len(data.ratings)) == (943, 1682, 100_000)
    assert data.spec == MOVIELENS_SPEC and data.source == "synthetic"
    assert list(data.users.columns) == ["user_id", "age", "gender", "occupation", "zip"]
    assert data.users["age"].dtype == np.int64 and set(data.users["gender"]) == {"F", "M"}
    assert {"item_id", "title", "release_year", "genres"} <= set(data.items.columns)
    assert data.items["genres"].str.contains("|", regex=False).any()  # multi-label
    assert set(data.ratings["rating"]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert not data.ratings.duplicated(["user_id", "item_id"]).any()
    per_user = data.ratings.groupby("user_id").size()
    assert per_user.min() >= 20 and per_user.max() > 5 * per_user.median()  # lognormal activity
    per_item = data.ratings.groupby("item_id").size().sort_values(ascending=False)
    assert per_item.iloc[: len(per_item) // 10].sum() > 0.3 * len(data.ratings)  # Zipf popularity
    assert set(MOVIELENS_SPEC.user_attr("age").bucketize(data.users["age"])) == set(MOVIELENS_SPEC.user_attr("age").labels)


def test_planted_bias_is_recovered(planted) -> None:
    data, truth = planted
    r = residuals(data)
    means = r.groupby("gender")["residual"].mean()
    estimate = means["F"] - means["M"]
    shift = truth["group_mean_shift"]["gender"]
    assert abs(estimate - (shift["F"] - shift["M"])) < 0.1
    assert abs(estimate - BIAS["size"]) < 0.15
    bias = truth["effects"][0]
    assert bias["type"] == "bias" and bias["group"] == "F" and bias["realised_latent_shift"] == pytest.approx(-0.3)
    assert -0.3 < bias["realised_mean_shift"] < -0.2  # rounding and clipping shrink it a little


def test_no_effect_gives_no_gap(plain) -> None:
    data, truth = plain
    means = residuals(data).groupby("gender")["residual"].mean()
    assert abs(means["F"] - means["M"]) < 0.1
    assert truth["effects"] == [] and truth["group_mean_shift"] == {}


def test_planted_noise_shows_as_larger_residual_spread(planted, plain) -> None:
    data, truth = planted
    r = residuals(data)
    old = r["age_group"] == "56+"
    assert r.loc[old, "residual"].std() > r.loc[~old, "residual"].std() + 0.05
    noise = truth["effects"][1]
    assert noise["realised_noise_std"] == pytest.approx(0.5, abs=0.05) and noise["n_ratings"] == int(old.sum())
    base = residuals(plain[0])
    base_old = base["age_group"] == "56+"
    assert base.loc[base_old, "residual"].std() < r.loc[old, "residual"].std()


@pytest.mark.parametrize("effect, message", [
    ({"type": "shift", "attribute": "gender", "group": "F", "size": 1}, r"data\.effects\[0\]\.type must be 'bias' or 'noise'"),
    ({"type": "bias", "attribute": "height", "group": "F", "size": 1}, r"data\.effects\[0\]\.attribute is 'height'"),
    ({"type": "bias", "attribute": "age", "group": "60+", "size": 1}, r"data\.effects\[0\]\.group is '60\+'; expected one of <18, 18-24"),
    ({"type": "noise", "attribute": "gender", "group": "F", "size": -1}, r"must be >= 0"),
])
def test_invalid_effects_are_config_errors(effect: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate({"effects": [effect]})


def test_impossible_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"data\.n_ratings is 1000; expected between n_users\*min_per_user \(18860\)"):
        generate({"n_ratings": 1000})
    with pytest.raises(ConfigError, match=r"unknown synthetic key 'n_user'"):
        generate({"n_user": 10})


def test_load_dataset_synthetic_validates_and_carries_ground_truth() -> None:
    data = load_dataset({"source": "synthetic", "synthetic": {"seed": 3, "n_users": 200, "n_items": 300,
                                                              "n_ratings": 8000, "effects": [BIAS]}},
                        log=lambda _m: None)
    assert len(data.ratings) == 8000 and data.ratings["user_id"].dtype == np.int64
    assert data.provenance["ground_truth"]["effects"][0]["group"] == "F"
    assert len(data.provenance["canonical_sha256"]) == 64


def test_one_million_ratings_generate() -> None:
    data, _ = generate({"n_users": 6040, "n_items": 3706, "n_ratings": 1_000_000})
    assert len(data.ratings) == 1_000_000 and data.ratings.groupby("user_id").size().min() >= 20
