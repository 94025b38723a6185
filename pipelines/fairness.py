"""DVC stage `fairness`: group metrics, gaps with simultaneous intervals and studentized
permutation p-values (BH-adjusted per model and scenario), UGF, parity, exposure,
miscalibration, and the counterfactual test of each sensitive attribute.

Every kind except the counterfactual test uses all training seeds: per-user metrics are averaged
over seeds, parity pools the predictions of every seed, exposure pools every seed's lists and
miscalibration averages each user's C_KL over seeds. Groups are sized inside each scored
population (audit.fairness), so the strata are derived here without a global minimum."""

from __future__ import annotations

import pandas as pd

from audit.counterfactual import (counterfactual_changes, counterfactual_records, gains_from_relevant, merge_shards,
                                  own_groups, substitutes)
from audit.evaluation import item_table, strata_for
from audit.fairness import fairness_records
from audit.sampling import Design, sample_note
from metarec.compute import ComputeConfig, Executor, executor
from metarec.errors import ConfigError
from metarec.io import atomic_write_json, atomic_write_text
from metarec.models import registry
from metarec.predict import catalogue_tasks
from metarec.seeding import seed_everything
from metarec.splits import SplitConfig, partition
from metarec.tasks import SCENARIOS
from pipelines.common import (TASKS, load_evaluation_split, load_params, load_prepared, load_split, scenarios_present,
                              stage, stage_executor)


def _counterfactual(params: dict, data, strata, threshold: float, ex: Executor | None = None) -> list[dict]:
    """Counterfactual records for every sensitive attribute, from the models of every training seed.

    Substitutes come from the declared schema (a representative of each other bucket or each other
    category); each user's changes are averaged over the seeds before groups are summarised. Seeds:
    `fairness.counterfactual_seeds` when set (each seed costs one full set of predict calls), else
    every training seed. Scenarios without users are skipped and said so. Each (model, seed)
    re-scoring is one compute job (`counterfactual_one`); `ex` defaults to an in-process loop.
    """
    fp = params["fairness"]
    seeds = [int(s) for s in (fp.get("counterfactual_seeds") or params["seeds"])]
    unknown = [s for s in seeds if s not in [int(x) for x in params["seeds"]]]
    if unknown:
        raise ConfigError(f"params.yaml: fairness.counterfactual_seeds names seed {unknown[0]}, which is not "
                          f"trained; expected some of {params['seeds']}")
    scenarios = []
    for scenario in [s for s in fp.get("counterfactual_scenarios", []) if s in scenarios_present()]:
        if len(load_split(scenario, data)):
            scenarios.append(scenario)
        else:
            print(f"counterfactual: scenario {scenario} skipped (data/tasks/{scenario}.parquet holds no tasks)")
    names = [n for n in fp.get("counterfactual_models", []) if n in params["models"]] if scenarios else []
    ex = ex or executor(ComputeConfig(backend="serial"))
    n = ex.width()    # shards per (model, seed): any number gives the same frames (merge_shards)
    jobs = [(name, seed, scenarios, threshold, params, j, n) for name in names for seed in seeds for j in range(n)]
    done = iter(ex.map(counterfactual_one, jobs, label="counterfactual"))
    sensitive = _sensitive(data)
    groups = strata.frame[["user_id", *[a for a in sensitive if a in strata.frame]]] if names else None
    design = Design.load(TASKS)
    recs = []
    for name in names:
        frames = []
        for _ in seeds:
            shards = [next(done) for _ in range(n)]     # per shard, one frame per scenario
            frames += [merge_shards([sh[i] for sh in shards], sensitive) for i in range(len(scenarios))]
        recs += counterfactual_records(pd.concat(frames, ignore_index=True), sensitive, model_name=name,
                                       groups=groups, seeds=seeds, weights=None if design is None else design.weights())
    return recs


def _sensitive(data) -> list[str]:
    return [a for a in data.spec.sensitive if a in data.users]


def counterfactual_one(name: str, seed: int, scenarios: list[str], threshold: float,
                       params: dict, shard: int = 0, n_shards: int = 1) -> list[pd.DataFrame]:
    """A compute job: the counterfactual changes of one trained model (name, seed), one frame per
    scenario, each user's catalogue re-scored under every substitute of every sensitive attribute;
    only shard `shard` of `n_shards` of the users (audit.counterfactual.merge_shards joins them)."""
    data = load_prepared()
    sensitive = _sensitive(data)
    values = {a: substitutes(data.spec, data.users, a) for a in sensitive}
    own = own_groups(data.spec, data.users, sensitive)
    new = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    k = int(params["evaluation"]["catalogue_k"])
    seed_everything(seed)
    model = registry.load(name, f"models/{name}/seed{seed}", train=load_split("train", data))
    frames = []
    for scenario in scenarios:
        split = load_evaluation_split(scenario, data)
        truth = {t.user_id: set(t.candidates[y >= threshold].tolist()) for t, y in split.tasks_with_truth()}
        tasks = catalogue_tasks(split, new)
        frames.append(counterfactual_changes(model, tasks, sensitive, gains=gains_from_relevant(tasks, truth),
                                             values=values, own=own, k=k, seed=seed,
                                             shard=(shard, n_shards)).assign(seed=seed))
    return frames


def _headline(records: list[dict], meta: str) -> dict:
    """scenario -> attribute -> MAE gap of the meta-learner with its simultaneous interval and raw
    and BH-adjusted p-values; gaps that rest on fewer than two sufficient groups are left out."""
    out: dict = {}
    for r in records:
        if r["kind"] == "gap" and r["model"] == meta and r["metric"] == "mae" and not r.get("insufficient"):
            out.setdefault(r["scenario"], {})[r["attribute"]] = {
                k: r.get(k) for k in ("difference", "diff_ci_low", "diff_ci_high", "interval", "p_value",
                                      "p_adjusted", "adjustment", "significant", "max_group", "min_group")}
            out[r["scenario"]][r["attribute"]]["mae_gap"] = r["difference"]
    return out


def _all_seeds(kind: str, model: str, seeds: list[int]) -> pd.DataFrame:
    """One model's predictions or rankings of every seed, with a seed column."""
    return pd.concat([pd.read_parquet(f"{kind}/{model}/seed{s}.parquet").assign(seed=s) for s in seeds],
                     ignore_index=True)


def fairness_one(model: str, scenario: str, params: dict) -> list[dict]:
    """A compute job: every fairness record of one (model, scenario), from the model's predictions,
    rankings and per-user metrics of every seed (read from their files)."""
    ev = params["evaluation"]
    data = load_prepared()
    raw = strata_for(data, {**params["strata"], "min_group_size": 1})
    items = item_table(data.items, pd.read_parquet(TASKS / "train.parquet"))
    support = pd.concat([pd.read_parquet(TASKS / f"{s}.parquet") for s in SCENARIOS], ignore_index=True)
    support = support[support.role == "support"][["user_id", "item_id", "rating", "scenario"]]
    seeds = [int(s) for s in params["seeds"]]
    design = Design.load(TASKS)   # None: everyone was evaluated
    pu = pd.read_parquet("results/per_user.parquet", filters=[("model", "==", model), ("scenario", "==", scenario)])
    return fairness_records(
        model, scenario, pu[["user_id", "seed", "metric", "value"]], raw,
        metrics=["mae", "rmse", "ndcg@3", "list_ndcg@10", "recall@10"], pred=_all_seeds("predictions", model, seeds),
        rankings=_all_seeds("rankings", model, seeds), support=support, items=items,
        interaction_counts=data.ratings.groupby("user_id").size(), threshold=float(ev["like_threshold"]),
        k=int(ev["catalogue_k"]), n_perm=int(ev["permutations"]), test_alpha=float(ev["alpha"]),
        min_group_size=int(params["strata"]["min_group_size"]), seeds=seeds, seed=int(ev["seed"]),
        design=None if design is None else design.sampled(scenario).set_index("user_id"))


@stage
def main() -> None:
    params = load_params()
    ev = params["evaluation"]
    thr = float(ev["like_threshold"])
    data = load_prepared()
    strata = strata_for(data, params["strata"])
    min_size = int(params["strata"]["min_group_size"])
    seeds = [int(s) for s in params["seeds"]]
    present = set(pd.read_parquet("results/per_user.parquet", columns=["model", "scenario"])
                  .drop_duplicates().itertuples(index=False, name=None))
    jobs = [(model, scenario, params) for model in params["fairness"]["models"] if model in params["models"]
            for scenario in scenarios_present() if (model, scenario) in present]   # no users: skipped
    with stage_executor(params) as ex:
        records = [r for recs in ex.map(fairness_one, jobs, label="fairness") for r in recs]
        records += _counterfactual(params, data, strata, thr, ex)
    design = Design.load(TASKS)
    if design is not None:
        for r in records:
            if r.get("scenario") in design.record["scenarios"]:
                r["sample"] = sample_note(design, r["scenario"], r.get("metric", ""), r["kind"])
    atomic_write_json("metrics/fairness.json", {
        "meta_learner": params["meta_learner"], "min_group_size": min_size,
        "group_sizing": "per (model, scenario, attribute, metric) population scored",
        "merged_groups": strata.merged, "group_counts": strata.counts().to_dict(orient="records"),
        "seeds": seeds, "counterfactual_seed": seeds[0], "adjustment": "BH per model x scenario",
        "alpha": float(ev["alpha"]), "headline": _headline(records, params["meta_learner"]), "records": records})
    gaps = pd.DataFrame([r for r in records if r["kind"] == "gap" and r["model"] == params["meta_learner"]])
    if len(gaps):
        gaps["label"] = gaps.scenario + " / " + gaps.attribute + " / " + gaps.metric
        gaps = gaps[~gaps.insufficient.astype(bool)]
        atomic_write_text("plots/fairness_gaps.csv", gaps[["label", "difference", "p_value", "p_adjusted"]].to_csv(index=False))
    else:
        atomic_write_text("plots/fairness_gaps.csv", "label,difference,p_value,p_adjusted\n")
    print(f"metrics/fairness.json: {len(records)} records")


if __name__ == "__main__":
    main()
