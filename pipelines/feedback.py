"""DVC stage `feedback`: closed-loop simulation of each audited model under greedy, epsilon-greedy
and UCB policies (and the random, popularity and oracle arms) under two ground-truth oracles, and
its audit per round and group (docs/FEEDBACK.md)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from audit.feedback import Run, audit_records, collect, headline, long_records
from metarec.data.validate import group_labels
from metarec.feedback.experiment import Experiment, run_all
from metarec.compute import scratch_dir
from metarec.feedback.loop import SimUser, population_from
from metarec.feedback.oracle import load_oracles, save_oracles
from metarec.io import atomic_write_json, atomic_write_parquet, atomic_write_text
from metarec.models import registry
from metarec.predict import NEW_ITEM_SCENARIOS
from metarec.seeding import seed_everything
from metarec.splits import SplitConfig, partition
from metarec.tasks import TaskSet
from pipelines.common import load_params, load_prepared, load_split, stage, stage_executor


def _population(params: dict, data) -> tuple[Experiment, TaskSet, list[SimUser], np.ndarray, pd.Series, int]:
    """(experiment, training split, simulated population, catalogue, training rating count per item,
    number of the scenario's users the population was drawn from)."""
    fp = params["feedback"]
    exp = Experiment.from_params(fp, params["seeds"], params["models"])
    train, split = load_split("train", data), load_split(fp["scenario"], data)
    everyone = population_from(split.tasks_with_truth())
    population = exp.sample_population(everyone)
    new = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    items = np.sort(data.items["item_id"].to_numpy(np.int64))
    catalogue = items[np.isin(items, list(new)) == (fp["scenario"] in NEW_ITEM_SCENARIOS)]
    return exp, train, population, catalogue, train.all_ratings().groupby("item_id").size(), len(everyone)


def simulate_seed(seed: int, params: dict, oracles_path: str) -> list[Run]:
    """A compute job: every arm of one simulation seed, with the oracles fitted by the stage (an .npz
    of plain arrays, `save_oracles`)."""
    data = load_prepared()
    exp, train, population, catalogue, counts, _ = _population(params, data)
    exp = replace(exp, seeds=(int(seed),))
    seed_everything(exp.seed, torch_too=any(m not in registry.CLASSIC for m in exp.models))
    oracles = load_oracles(oracles_path)
    load = lambda name, s: registry.load(name, f"models/{name}/seed{s}", train=train)
    return [Run(a.oracle, a.seed, a.model, a.policy, log.shown, log.heldout, log.arrivals)
            for a, log in run_all(exp, population, catalogue, oracles, exp.choice(data),
                                  counts.reindex(catalogue).fillna(0).to_numpy(float), load)]


def run(params: dict) -> list[dict]:
    """The whole stage for one params dict (benchmarks/feedback_cost.py varies it); returns the headline.
    Each simulation seed is one compute job."""
    fp = params["feedback"]
    data = load_prepared()
    exp, _, population, catalogue, counts, n_all = _population(params, data)
    groups = pd.DataFrame({"user_id": data.users["user_id"].to_numpy(),
                           **{a: group_labels(data.users, data.spec, a).to_numpy() for a in data.spec.sensitive}})
    seed_everything(exp.seed, torch_too=any(m not in registry.CLASSIC for m in exp.models))
    oracles = exp.fit_oracles(data, np.array([u.user_id for u in population]))
    with stage_executor(params) as ex, scratch_dir() as scratch:
        path = save_oracles(scratch / "oracles.npz", oracles)
        runs = [r for seed_runs in ex.map(simulate_seed, [(s, params, str(path)) for s in exp.seeds],
                                          label="feedback") for r in seed_runs]
    genre = next(f.name for f in data.spec.item_features if f.kind == "multilabel")
    per_user, pop = collect(runs, counts, data.items.set_index("item_id")[genre], catalogue, groups, exp.attention_decay)
    records = audit_records(per_user, pop, groups, min_size=int(params["strata"]["min_group_size"]),
                            rounds=exp.loop.rounds, oracles=exp.oracles)
    attr = fp.get("headline_attribute") or data.spec.sensitive[0]
    present = groups[groups.user_id.isin([u.user_id for u in population])][attr].value_counts()
    head = headline(records, exp.models, [p for p in exp.policies if p in ("greedy", "epsilon_greedy", "ucb")],
                    attr, str(present.idxmin()), exp.loop.rounds)
    calibration = [{"oracle": o.family, "sigma": o.sigma, "fit_rmse": o.fit_rmse} for o in oracles.values()]
    sampled = {"n_population": n_all, "n_simulated": len(population),
               "design": "every user" if len(population) == n_all else
               "simple random sample (seeded, feedback.max_users): for the meta-learners' arms and the random and "
               "oracle arms, per-user means and pairwise Jaccard estimate the whole population's; the popularity "
               "arm's counts and classic models' joint refits see only the simulated users; coverage and exposure "
               "Gini describe the simulated users"}
    atomic_write_json("metrics/feedback.json", {"config": fp, "oracles": calibration, "population": sampled,
                                                "headline": head, "records": records})
    atomic_write_parquet("results/feedback_long.parquet", long_records(per_user, pop, groups, fp["scenario"]))
    curve = pd.DataFrame([r for r in records if r["kind"] == "curve" and r["attribute"] == "all"
                          and r["metric"] == "utility_shown" and r["oracle"] == exp.oracles[0]])
    curve["arm"] = curve["model"] + "/" + curve["policy"]
    atomic_write_text("plots/feedback.csv", curve[["round", "arm", "mean", "ci_low", "ci_high"]].to_csv(index=False))
    return head


@stage
def main() -> None:
    for h in run(load_params()):
        print(" ".join(f"{k}={v}" for k, v in h.items()))


if __name__ == "__main__":
    main()
