"""DVC stage `evaluate`: per-user metrics for every model and seed, accuracy with intervals over
seeds and over seeds and users, and paired, Holm-corrected comparisons of the meta-learner with every
other model. A scenario without evaluated users has no rows and is skipped. When `evaluation.sample`
drew a sample of users (audit.sampling), means are stratified and the users bootstrap resamples
within strata; every record says so in its `sample` field."""

from __future__ import annotations

import pandas as pd

from audit.accuracy import (UserSeedCube, accuracy_records, best_baseline_records, comparison_records, group_level,
                            seed_level, winner_records)
from audit.evaluation import evaluate_run, item_table, read_run, strata_for
from audit.sampling import Design, sample_note
from metarec.io import atomic_write_json, atomic_write_parquet, atomic_write_text
from metarec.predict import catalogue_exclusions
from metarec.splits import SplitConfig, partition
from pipelines.common import (TASKS, load_evaluation_split, load_params, load_prepared, scenarios_present, stage,
                              stage_executor, with_original_ids)


def evaluate_one(model: str, seed: int, ev: dict, tasks: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A compute job: the per-user and listwise metrics of one (model, seed) run, read from its
    predictions and rankings; the item table and candidate pools come from the prepared data."""
    data = load_prepared()
    items = item_table(data.items, pd.read_parquet(TASKS / "train.parquet"))
    new = partition(data, SplitConfig.from_params(tasks)).new_items
    ids = data.items["item_id"].astype(int)
    pools = {s: ids[ids.isin(new) == (s in ("item_cold", "user_item_cold"))].tolist()
             for s in ("warm", "user_cold", "item_cold", "user_item_cold")}
    design = Design.load(TASKS)
    pu, lw = evaluate_run(*read_run(model, seed), items, ev, pools, None if design is None else design.weights())
    return pu.assign(model=model, seed=seed), lw.assign(model=model, seed=seed)


@stage
def main() -> None:
    params = load_params()
    ev = params["evaluation"]
    data = load_prepared()
    strata = strata_for(data, params["strata"])
    runs = [(model, seed, ev, params["tasks"]) for model in params["models"] for seed in params["seeds"]]
    with stage_executor(params) as ex:
        done = ex.map(evaluate_one, runs, label="evaluate")
    design = Design.load(TASKS)
    weights = design.weights() if design is not None else None
    per_user, listwise = [pu for pu, _ in done], [lw for _, lw in done]
    per_user = pd.concat(per_user, ignore_index=True)[["model", "seed", "scenario", "user_id", "metric", "value"]]
    seeds = pd.concat([seed_level(per_user, weights), pd.concat(listwise, ignore_index=True)], ignore_index=True)
    groups = group_level(per_user, strata.frame, strata.attributes, weights)
    long = pd.concat([seeds.assign(attribute="all", group="all"), groups], ignore_index=True)
    long["perturbation"] = "none"
    meta = params["meta_learner"]
    cube = UserSeedCube(per_user, n_boot=int(ev["bootstrap"]), seed=int(ev["seed"]),
                        design=design.frame[design.frame.sampled] if design is not None else None)
    acc = accuracy_records(seeds, cube)
    comp = comparison_records(cube, meta, params["models"], alpha=float(ev["alpha"]))
    records = acc + comp + best_baseline_records(acc, comp, meta) + winner_records(acc)
    extra = {}
    if design is not None:
        for r in records:
            r["sample"] = sample_note(design, r["scenario"], r.get("metric", ""), r["kind"])
        extra["sample"] = design.record
    atomic_write_parquet("results/per_user.parquet", with_original_ids(per_user, data))
    atomic_write_parquet("results/accuracy_long.parquet", long)
    # users with k or fewer catalogue candidates have no top-k lists (metarec.predict): count them
    new = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    excluded = [r for s in scenarios_present() for r in catalogue_exclusions(load_evaluation_split(s, data), new,
                                                                              int(ev["catalogue_k"]))]
    atomic_write_json("metrics/summary.json", {
        "meta_learner": meta, "models": params["models"], "seeds": params["seeds"],
        "like_threshold": ev["like_threshold"], "strata": strata.counts().to_dict(orient="records"),
        "headline": _headline(acc), "records": records, "excluded": excluded, **extra})
    for r in excluded:
        if r["n_users"]:
            print(f"{r['scenario']}: {r['n_users']} of {r['of_users']} users left out of the catalogue metrics "
                  f"({r['reason']})")
    mae = seeds[seeds.metric == "mae"].groupby(["model", "scenario"])["value"].mean().reset_index()
    atomic_write_text("plots/accuracy.csv", mae.assign(model=mae.model + " / " + mae.scenario)
                      .rename(columns={"value": "mae"})[["model", "mae"]].to_csv(index=False))
    table = pd.DataFrame([r for r in acc if r["metric"] in ("mae", "ndcg@3", "list_ndcg@10")])
    print(table.pivot_table(index=["scenario", "model"], columns="metric", values="mean").round(4).to_string())


def _headline(acc: list[dict]) -> dict:
    """model -> scenario -> {mae, list_ndcg@10}: the scalars `dvc metrics show` and `dvc metrics diff` display."""
    out: dict = {}
    for r in acc:
        if r["metric"] in ("mae", "list_ndcg@10"):
            out.setdefault(r["model"], {}).setdefault(r["scenario"], {})[r["metric"]] = r["mean"]
    return out


if __name__ == "__main__":
    main()
