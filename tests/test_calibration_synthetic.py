"""Calibration of the fairness tests and intervals where the truth is known.

Fast version of benchmarks/calibration.py (user_cold-shaped worlds, 2,000 vectorised draws):
enough draws to tell a 5% false-positive rate from 8% (MC s.e. 0.005), so a return to the
raw-difference permutation test, or to percentile intervals, fails here. Plus an end-to-end check
on the synthetic data source through audit.fairness.group_comparison.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from audit.fairness import group_comparison
from benchmarks import calibration as C
from metarec.data.synthetic import generate

DRAWS = 2000
SE = math.sqrt(0.05 * 0.95 / DRAWS)


@pytest.fixture(scope="module")
def null_mae():
    d = C.design(0)
    return d, C.draw_values(d, "mae", DRAWS, 0.0, np.random.default_rng(1))


def test_gender_gap_test_keeps_its_level_where_the_raw_difference_does_not(null_mae):
    """user_cold gender sizes and spreads (46 women, sd 0.256; 114 men, sd 0.198), equal means."""
    d, V = null_mae
    r = C.analyse(V, d.labels["gender"], np.full(C.N_USERS, 0.8), 10, 199, seed=3, raw=True)
    fpr = np.mean(r.p_gap <= 0.05)
    raw = np.mean(r.p_raw_difference <= 0.05)
    assert fpr <= 0.05 + 3 * SE                      # 0.065
    assert raw > 0.05 + 3 * SE                       # the previous test: about 8-9% here
    assert np.mean(r.cover_gap) >= 0.95 - 3 * SE     # Welch interval of the F - M difference


def test_small_groups_intervals_cover_and_tests_hold_at_the_default_min_size(null_mae):
    """Age in seven buckets of 5 to 55 users (the two of 5 merge at the default minimum of 10),
    smaller buckets noisier, skewed values; group means of 5 users covered by Student t."""
    d, V = null_mae
    r = C.analyse(V, d.labels["age"], np.full(C.N_USERS, 0.8), 10, 199, seed=4)
    assert np.mean(r.p_gap <= 0.05) <= 0.05 + 3 * SE
    assert np.mean(r.cover_pairs) >= 0.93             # all 15 pairwise intervals at once
    assert np.mean(r.cover_rest) >= 0.93
    assert np.mean(r.cover_means[10]) >= 0.93
    five = V[:, d.labels["age"] == "<18"]             # n = 5, the noisiest bucket
    half = C.stats.t_quantile(0.95, 4) * five.std(axis=1, ddof=1) / math.sqrt(5)
    assert np.mean(np.abs(five.mean(axis=1) - 0.8) <= half) >= 0.93  # percentile: ~0.83


def test_planted_gap_is_found_and_the_family_stays_honest():
    """A 0.15 MAE gender gap at user_cold sizes: raw power >= 0.8; nothing else is rejected
    more than BH allows."""
    d = C.design(0)
    rng = np.random.default_rng(2)
    draws = 300
    mae = C.draw_values(d, "mae", draws, 0.15, rng)
    truth = 0.8 + 0.15 * d.planted
    fam = {("mae", a): C.analyse(mae, d.labels[a], truth, 10, 999, seed=5)
           for a in ("gender", "age")}
    assert np.mean(fam[("mae", "gender")].p_gap <= 0.05) >= 0.8
    _, fdp, _ = C.family(fam)
    assert fdp.mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / draws)


def _draw(seed: int, effects: list[dict]) -> tuple[pd.Series, pd.Series, dict]:
    data, truth = generate({"seed": seed, "n_users": 300, "n_items": 300, "n_ratings": 9000,
                            "effects": effects})
    r = data.ratings
    resid = r["rating"] - r.groupby("item_id")["rating"].transform("mean")
    per_user = resid.groupby(r["user_id"]).mean()
    gender = data.users.set_index("user_id")["gender"].astype(str)
    return per_user, gender, truth


def test_planted_bias_on_the_synthetic_source_is_covered_and_detected() -> None:
    covered = detected = 0
    n = 40
    for seed in range(n):
        values, gender, truth = _draw(seed, [{"type": "bias", "attribute": "gender", "group": "F",
                                              "size": -0.3}])
        shift = truth["effects"][0]["realised_mean_shift"]
        gc = group_comparison(values, gender, n_perm=199, seed=seed, min_size=10)
        f = gc.table.set_index("group").loc["F"]
        covered += f.gap_ci_low <= shift <= f.gap_ci_high
        detected += gc.p_value < 0.05
    assert covered / n >= 0.95 - 2 * math.sqrt(0.05 * 0.95 / n)
    assert detected / n >= 0.9
