"""Intervals over seeds and users (audit.hierarchical, audit.accuracy): coverage by simulation in
known-mean worlds, calibration of paired comparisons, the group RMSE definition, empty scenarios."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from audit.accuracy import UserSeedCube, accuracy_records, comparison_records, group_level, seed_level
from audit.evaluation import evaluate_run
from audit.hierarchical import seed_values, two_level_interval, user_weights
from audit.stats import t_interval

N_USERS, N_SEEDS, DRAWS, BOOT = 160, 5, 2000, 200
# Monte-Carlo standard error of a coverage near 0.95 from DRAWS draws.
MC_SE = float(np.sqrt(0.95 * 0.05 / DRAWS))


def _world(rng: np.random.Generator, user_sd: float, seed_sd: float, noise_sd: float, mu: float = 0.8) -> np.ndarray:
    """users x seeds: mu + user effect + seed effect + user x seed noise (true mean mu)."""
    return (mu + rng.normal(0, user_sd, (N_USERS, 1)) + rng.normal(0, seed_sd, (1, N_SEEDS))
            + rng.normal(0, noise_sd, (N_USERS, N_SEEDS)))


def _coverage(user_sd: float, seed_sd: float, noise_sd: float) -> tuple[float, float]:
    rng = np.random.default_rng(12)
    hits = widths = 0.0
    for i in range(DRAWS):
        x = _world(rng, user_sd, seed_sd, noise_sd)
        res = two_level_interval(seed_values(x, user_weights(N_USERS, BOOT, i)))
        hits += res["ci_low"] <= 0.8 <= res["ci_high"]
        widths += res["ci_high"] - res["ci_low"]
    return hits / DRAWS, widths / DRAWS


@pytest.mark.parametrize("user_sd, seed_sd, noise_sd", [
    (0.22, 0.004, 0.05),  # ML-100K-like: users dominate (user_cold MAE +-0.033 with users, +-0.005 over seeds)
    (0.05, 0.03, 0.05),   # seeds dominate
    (0.10, 0.01, 0.10),   # both, with a large user x seed interaction
])
def test_seeds_and_users_interval_covers_the_true_mean(user_sd: float, seed_sd: float, noise_sd: float) -> None:
    cover, _ = _coverage(user_sd, seed_sd, noise_sd)
    assert cover >= 0.93 - 2 * MC_SE, cover
    assert cover <= 0.99, cover  # and is not uselessly wide


def test_interval_over_seeds_alone_undercovers_when_users_vary() -> None:
    """Why both intervals exist: with the split fixed, the seed interval ignores user sampling."""
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(300):
        ti = t_interval(_world(rng, 0.22, 0.004, 0.05).mean(axis=0))
        hits += ti["ci_low"] <= 0.8 <= ti["ci_high"]
    assert hits / 300 < 0.5


def test_naive_hierarchical_percentile_bootstrap_undercovers_when_seeds_dominate() -> None:
    """Why seeds enter through their t spread: resampling five seeds understates their variance by a
    fifth and the percentile ignores the t tail (measured here, independently coded)."""
    rng = np.random.default_rng(5)
    hits = 0
    draws = 500
    for i in range(draws):
        x = _world(rng, 0.05, 0.03, 0.05)
        # replicate b: users drawn with replacement (counts wu), seeds drawn with replacement (counts ws);
        # its mean over the drawn (user, seed) cells is wu' x ws / (n_users n_seeds)
        wu, ws = user_weights(N_USERS, BOOT, 2 * i), user_weights(N_SEEDS, BOOT, 2 * i + 1)
        reps = ((wu @ x) * ws).sum(axis=1) / (N_USERS * N_SEEDS)
        lo, hi = np.quantile(reps, [0.025, 0.975])
        hits += lo <= 0.8 <= hi
    assert hits / draws < 0.90


def test_paired_comparison_is_calibrated_and_paired_over_users() -> None:
    rng = np.random.default_rng(8)
    reject = 0
    draws = 1000
    for i in range(draws):
        users = rng.normal(0, 0.22, (N_USERS, 1))
        a = 0.8 + users + rng.normal(0, 0.004, (1, N_SEEDS)) + rng.normal(0, 0.05, (N_USERS, N_SEEDS))
        b = 0.8 + users + rng.normal(0, 0.004, (1, N_SEEDS)) + rng.normal(0, 0.05, (N_USERS, N_SEEDS))
        w = user_weights(N_USERS, BOOT, i)
        reject += two_level_interval(seed_values(a, w) - seed_values(b, w))["p_value"] < 0.05
    # null: equal means; 1000 draws tell 5% from 8% (SE 0.0069)
    assert reject / draws <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / draws)
    # pairing: a shared user effect cancels, so the difference's interval is far narrower than either mean's
    w = user_weights(N_USERS, BOOT, 0)
    da = seed_values(a, w)
    diff = two_level_interval(da - seed_values(b, w))
    single = two_level_interval(da)
    assert (diff["ci_high"] - diff["ci_low"]) < 0.3 * (single["ci_high"] - single["ci_low"])


def _per_user(rng: np.random.Generator, scenarios=("user_cold", "warm")) -> pd.DataFrame:
    """Per-user values with a user effect shared by seeds and models, as in the pipeline."""
    rows = []
    for scen in scenarios:
        base = rng.gamma(2.0, 0.4, 40)
        for model, shift in (("melu", 0.0), ("mean", 0.05)):
            for seed in range(3):
                for u in range(40):
                    mse = abs(float(base[u] + shift + rng.normal(0, 0.01)))
                    rows += [(model, seed, scen, u, "mse", mse), (model, seed, scen, u, "rmse", np.sqrt(mse)),
                             (model, seed, scen, u, "mae", np.sqrt(mse) * 0.8),
                             (model, seed, scen, u, "list_ndcg@10", np.nan if u % 7 == 0 else rng.random())]
    return pd.DataFrame(rows, columns=["model", "seed", "scenario", "user_id", "metric", "value"])


def test_accuracy_records_carry_both_labelled_intervals_around_the_seed_mean() -> None:
    pu = _per_user(np.random.default_rng(0))
    cube = UserSeedCube(pu, n_boot=300, seed=0)
    recs = {(r["model"], r["scenario"], r["metric"]): r for r in accuracy_records(seed_level(pu), cube)}
    r = recs[("melu", "user_cold", "rmse")]
    per_seed = [np.sqrt(pu[(pu.model == "melu") & (pu.scenario == "user_cold") & (pu.metric == "mse")
                           & (pu.seed == s)]["value"].mean()) for s in range(3)]
    assert r["mean"] == pytest.approx(np.mean(per_seed))  # RMSE: root of the mean squared error per seed
    assert r["ci_users_low"] < r["ci_low"] <= r["mean"] <= r["ci_high"] < r["ci_users_high"]
    assert r["interval"].startswith("95% Student-t interval over training seeds")
    assert r["interval_users"].startswith("95% interval over seeds and users") and r["n_users"] == 40
    nd = recs[("melu", "user_cold", "list_ndcg@10")]
    assert nd["n_users"] == 40 - 6 and nd["ci_users_low"] < nd["mean"] < nd["ci_users_high"]  # NaN users left out
    # the same seed gives the same numbers; comparisons share one draw of users per scenario
    again = accuracy_records(seed_level(pu), UserSeedCube(pu, n_boot=300, seed=0))
    assert again == list(recs.values())


def test_comparison_records_holm_and_interval_over_seeds_and_users() -> None:
    pu = _per_user(np.random.default_rng(1))
    comp = comparison_records(UserSeedCube(pu, n_boot=300, seed=0), "melu", ["melu", "mean"], metrics=("mae", "rmse"))
    assert {(c["scenario"], c["metric"]) for c in comp} == {(s, m) for s in ("user_cold", "warm") for m in ("mae", "rmse")}
    c = next(c for c in comp if c["scenario"] == "user_cold" and c["metric"] == "rmse")
    assert c["ci_low"] < c["mean_diff"] < c["ci_high"] and c["mean_diff"] < 0
    assert c["interval"].startswith("95% interval over seeds and users") and "paired" in c["interval"]
    assert c["p_holm"] == pytest.approx(min(1.0, 4 * min(x["p_value"] for x in comp))) or c["p_holm"] >= c["p_value"]


def test_group_rmse_is_root_of_group_mean_squared_error() -> None:
    pu = pd.DataFrame({"model": "m", "seed": 0, "scenario": "s", "user_id": [1, 1, 2, 2],
                       "metric": ["mse", "rmse", "mse", "rmse"], "value": [1.0, 1.0, 9.0, 3.0]})
    strata = pd.DataFrame({"user_id": [1, 2], "gender": ["F", "F"]})
    g = group_level(pu, strata, ["gender"])
    rmse = g[(g.metric == "rmse")]["value"].iloc[0]
    assert rmse == pytest.approx(np.sqrt(5.0)) and rmse != pytest.approx(2.0)  # not the mean of per-user RMSE


def test_empty_scenario_is_skipped() -> None:
    pu = _per_user(np.random.default_rng(2), scenarios=("user_cold",))
    cube = UserSeedCube(pu, n_boot=50, seed=0)
    assert cube.values("item_cold", "melu", "mae") is None
    assert {r["scenario"] for r in accuracy_records(seed_level(pu), cube)} == {"user_cold"}
    empty_pred = pd.DataFrame(columns=["user_id", "item_id", "scenario", "y_true", "y_pred"])
    empty_rank = pd.DataFrame(columns=["user_id", "scenario", "rank", "item_id", "score", "n_candidates"])
    items = pd.DataFrame({"item_id": [1, 2], "genres": ["A", "B"], "popularity": [1.0, 2.0]})
    pu2, lw = evaluate_run(empty_pred, empty_rank, items, {"catalogue_k": 1, "like_threshold": 4},
                           {"item_cold": [1, 2]})
    assert pu2.empty and lw.empty
