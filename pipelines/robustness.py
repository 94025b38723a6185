"""DVC stage `robustness`: degradation curves under support-size, rating-noise, attribute-noise and
demographic-shift perturbations, overall and per group, and profile-injection (shilling) attacks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from audit.evaluation import strata_for
from audit.sampling import Design, sample_note
from audit.strata import INTERSECTION_SEP, derive_strata
from audit.metrics import per_user_accuracy, per_user_query_ndcg
from audit.robustness import AttributePerturbations, most_damaging_by, plan_attribute_perturbations, robustness_curve
from audit.shilling import AttackCell, attack_records, choose_targets, plan_attack
from metarec.io import atomic_write_json, atomic_write_parquet, atomic_write_text
from metarec.models import registry
from metarec.predict import catalogue_rankings
from metarec.seeding import seed_everything
from metarec.splits import SplitConfig, partition
from metarec.tasks import TaskSet
from pipelines.common import (TASKS, load_encoder, load_evaluation_split, load_params, load_prepared, load_split,
                              stage, stage_executor)


LONG_COLUMNS = ["model", "seed", "scenario", "perturbation", "attribute", "group", "metric", "value"]


def _evaluate(pred: pd.DataFrame) -> pd.DataFrame:
    pu = pd.concat([per_user_accuracy(pred), per_user_query_ndcg(pred, (3,))], ignore_index=True)
    return pu[pu.metric.isin(["mae", "rmse", "ndcg@3"])][["user_id", "metric", "value"]]


def _scenarios(params: dict, data) -> tuple[list[str], list[dict]]:
    """(scenarios with users, records of the skipped ones with the reason).

    A scenario's split may be empty (e.g. no item released after `tasks.new_item_year`); it is
    skipped, and said so, rather than crashing the stage.
    """
    keep, skipped = [], []
    for scenario in params["robustness"]["scenarios"]:
        if len(load_split(scenario, data)):
            keep.append(scenario)
        else:
            reason = f"data/tasks/{scenario}.parquet holds no tasks: no user of this scenario met the split's conditions"
            skipped.append({"kind": "skipped", "scenario": scenario, "reason": reason})
            print(f"robustness: scenario {scenario} skipped ({reason})")
    return keep, skipped


def _design_weights(scenario: str) -> pd.Series | None:
    """user_id -> design weight of the scenario's sampled users, or None when everyone is evaluated."""
    design = Design.load(TASKS)
    return None if design is None else design.sampled(scenario).set_index("user_id")["weight"]


def _groups(params: dict, data) -> tuple[AttributePerturbations, pd.DataFrame]:
    """The attribute perturbations and the groups of the per-group curves: every single-attribute
    stratum, plus the shifted one if it is not among them."""
    strata = strata_for(data, params["strata"])
    plan = plan_attribute_perturbations(params["robustness"], data, min_size=strata.min_size)
    names = list(dict.fromkeys([a for a in strata.attributes if INTERSECTION_SEP not in a] + [plan.shift_attribute]))
    groups = derive_strata(data.users, names, spec=data.spec, counts=data.ratings.groupby("user_id").size(),
                           min_size=strata.min_size).frame
    return plan, groups


def curves_one(name: str, scenarios: list[str], params: dict) -> list[dict]:
    """A compute job: every degradation curve of one model (its `robustness.seed` run), per scenario."""
    rp = params["robustness"]
    seed = int(rp["seed"])
    data = load_prepared()
    plan, groups = _groups(params, data)
    scale = {"rating_min": data.spec.rating_min, "rating_max": data.spec.rating_max}
    seed_everything(seed)
    model = registry.load(name, f"models/{name}/seed{seed}", train=load_split("train", data))
    recs = []
    for scenario in scenarios:
        pairs = load_evaluation_split(scenario, data).tasks_with_truth()
        tasks, truth = [t for t, _ in pairs], [y for _, y in pairs]
        kw = dict(evaluate=_evaluate, groups=groups, seed=seed, model_name=name, weights=_design_weights(scenario))
        recs += robustness_curve(model, tasks, truth, "support_size", [None, *rp["support_size"]], **kw)
        recs += robustness_curve(model, tasks, truth, "rating_noise", [0, *rp["rating_noise"]], **kw, **scale)
        recs += robustness_curve(model, tasks, truth, f"attribute_noise:{plan.noise_attribute}",
                                 [0, *plan.noise_levels], **kw)
        recs += robustness_curve(model, tasks, truth, "demographic_shift", [None, dict(plan.shift_mix)],
                                 attribute=plan.shift_attribute, **kw)
    return recs


def _shilling_jobs(params: dict, data) -> list[tuple[str, list[AttackCell]]]:
    """(model, its planned attack cells) for every attacked model, the classic ones first."""
    sp = params["robustness"]["shilling"]
    seed = int(params["robustness"]["seed"])
    real = load_split("train", data).all_ratings()
    targets = choose_targets(real, int(sp["n_targets"]), np.random.default_rng(seed))
    cells = plan_attack(real, strategies=sp["strategies"], fractions=sp["fractions"], targets=targets,
                        filler_size=int(sp["filler_size"]),
                        rating_scale=(int(data.spec.rating_min), int(data.spec.rating_max)), seed=seed)
    return [(name, cells) for name in sorted(sp["models"], key=lambda m: m not in registry.CLASSIC)
            if name in params["models"]]


def shilling_refit(name: str, cell: AttackCell, scenario: str, params: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A compute job: refit one model on the training split plus one cell's fake profiles, then its
    predictions of the targets and its catalogue top-k for the scenario's users."""
    seed = int(params["robustness"]["seed"])
    k = int(params["evaluation"]["catalogue_k"])
    data = load_prepared()
    train = load_split("train", data)
    evaluation = load_evaluation_split(scenario, data)
    new = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    target_tasks = [t.replace(candidates=np.asarray(cell.targets, dtype=np.int64)) for t in evaluation.tasks()]
    seed_everything(seed, torch_too=name not in registry.CLASSIC)
    model = registry.build(name, params.get("model_params", {}).get(name) or {}, seed)
    model.fit(_with_fakes(train, cell.fake_profiles(train.all_ratings())), load_split("val", data), load_encoder())
    preds = model.predict(target_tasks)
    pred = pd.concat([pd.DataFrame({"user_id": t.user_id, "item_id": t.candidates, "y_pred": p})
                      for t, p in zip(target_tasks, preds)], ignore_index=True)
    return pred, catalogue_rankings(model, evaluation, new, k)


def _with_fakes(train: TaskSet, extra: pd.DataFrame) -> TaskSet:
    """Training split plus one task per fake profile: filler ratings as support, targets as query."""
    if extra.empty:
        return train
    f = extra.copy()
    top = f.groupby("user_id")["rating"].transform("max")
    f["role"] = np.where(f["rating"] >= top, "query", "support")
    ids = {u: i for i, u in enumerate(sorted(f.user_id.unique()), start=int(train.frame.task_id.max()) + 1)}
    f["task_id"] = f["user_id"].map(ids).astype("int64")
    f["scenario"] = "train"
    frame = pd.concat([train.frame, f[train.frame.columns]], ignore_index=True)
    fake_users = pd.DataFrame({"user_id": sorted(ids)})
    users = pd.concat([train.users, fake_users], ignore_index=True)
    return TaskSet(frame, users, train.items)


@stage
def main() -> None:
    params = load_params()
    data = load_prepared()
    scenarios, skipped = _scenarios(params, data)
    rp = params["robustness"]
    _groups(params, data)   # a perturbation the data cannot support stops the stage before any job starts
    attacks = _shilling_jobs(params, data) if scenarios else []
    refits = [(name, cell, scenarios[0], params) for name, cells in attacks for cell in cells]
    curve_jobs = [(name, scenarios, params) for name in rp["models"] if name in params["models"]]
    with stage_executor(params) as ex:
        runs = iter(ex.map(shilling_refit, refits, label="shilling"))
        users = load_evaluation_split(scenarios[0], data).user_ids.tolist() if scenarios else []
        weights = _design_weights(scenarios[0]) if scenarios else None
        shilling = [r for name, cells in attacks
                    for r in attack_records(cells, [next(runs) for _ in cells], model_name=name,
                                            k=int(params["evaluation"]["catalogue_k"]), users=users, weights=weights)]
        shilling = [{**r, "scenario": scenarios[0]} for r in shilling]   # the users it measures
        curves = [r for recs in ex.map(curves_one, curve_jobs, label="curves") for r in recs]
    worst = most_damaging_by(curves)
    records = curves + shilling + worst + skipped
    design = Design.load(TASKS)
    if design is not None:
        for r in records:
            if r.get("scenario") in design.record["scenarios"]:
                r["sample"] = sample_note(design, r["scenario"], r.get("metric", ""), r["kind"])
    seed = int(params["robustness"]["seed"])
    long = pd.DataFrame([{"model": r["model"], "seed": seed, "scenario": r["scenario"],
                          "perturbation": f"{r['perturbation']}@{r['level']}", "attribute": r["attribute"],
                          "group": str(r["group"]), "metric": r["metric"], "value": r["value"]}
                         for r in curves], columns=LONG_COLUMNS)
    atomic_write_parquet("results/robustness_long.parquet", long)
    headline = {r["model"]: {"most_damaging": f"{r['perturbation']}@{r['level']}", "metric": r["metric"],
                             "delta": r["delta"]} for r in worst}
    atomic_write_json("metrics/robustness.json", {"seed": seed, "headline": headline, "records": records})
    overall = pd.DataFrame([r for r in curves if r["attribute"] == "all" and r["metric"] == "mae"],
                           columns=["perturbation", "model", "level", "value", "attribute", "metric"])
    atomic_write_text("plots/robustness.csv", overall[["perturbation", "model", "level", "value"]].astype(str)
                      .to_csv(index=False))
    for r in worst:
        print(f"most damaging for {r['model']} on {r['scenario']}: {r['perturbation']} at {r['level']} "
              f"({r['metric']} {r['delta']:+.4f})")


if __name__ == "__main__":
    main()
