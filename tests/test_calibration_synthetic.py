"""Calibration of the fairness gap test on the synthetic source, where the truth is known.

Per user, the statistic is the mean residual of their ratings after removing item means. With no
planted effect the permutation test of the gender gap must reject at about the nominal 5%; with a
planted gender bias the stratified-bootstrap interval of the women-minus-rest gap must cover the
realised shift the generator reports, and the test must detect it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from audit.fairness import group_comparison
from metarec.data.synthetic import generate

DRAWS = 100


def _draw(seed: int, effects: list[dict]) -> tuple[pd.Series, pd.Series, dict]:
    data, truth = generate({"seed": seed, "n_users": 300, "n_items": 300, "n_ratings": 9000, "effects": effects})
    r = data.ratings
    resid = r["rating"] - r.groupby("item_id")["rating"].transform("mean")
    per_user = resid.groupby(r["user_id"]).mean()
    gender = data.users.set_index("user_id")["gender"].astype(str)
    return per_user, gender, truth


def _mc_bound(rate: float, n: int) -> float:
    return 2 * np.sqrt(rate * (1 - rate) / n)


def test_no_planted_effect_rejects_at_the_nominal_rate() -> None:
    rejections = 0
    for seed in range(DRAWS):
        values, gender, _ = _draw(seed, [])
        gc = group_comparison(values, gender, n_boot=50, n_perm=199, seed=seed)
        rejections += gc.p_value < 0.05
    assert rejections / DRAWS <= 0.05 + _mc_bound(0.05, DRAWS)


def test_planted_bias_is_covered_and_detected() -> None:
    covered = detected = 0
    for seed in range(DRAWS):
        values, gender, truth = _draw(seed, [{"type": "bias", "attribute": "gender", "group": "F", "size": -0.3}])
        shift = truth["effects"][0]["realised_mean_shift"]
        gc = group_comparison(values, gender, n_boot=400, n_perm=199, seed=seed)
        f = gc.table.set_index("group").loc["F"]
        covered += f.gap_ci_low <= shift <= f.gap_ci_high
        detected += gc.p_value < 0.05
    assert covered / DRAWS >= 0.95 - _mc_bound(0.05, DRAWS) - 0.02
    assert detected / DRAWS >= 0.9
