"""DVC stage `train@<model>-<seed>`: fit one model under one seed, save it, predict every scenario."""

from __future__ import annotations

import argparse
import time

import pandas as pd

from metarec.compute import ComputeConfig
from metarec.io import atomic_write_json, atomic_write_parquet
from metarec.models import registry
from metarec.predict import catalogue_rankings, join_shards, query_predictions
from metarec.seeding import seed_everything
from metarec.splits import SplitConfig, partition
from pipelines.common import (load_encoder, load_evaluation_split, load_params, load_prepared, load_split,
                              scenarios_present, stage, stage_executor, with_original_ids)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a name from params.yaml models")
    p.add_argument("--seed", required=True, type=int)
    return p.parse_args()


def rank_shard(name: str, seed: int, scenario: str, shard: int, n_shards: int, params: dict) -> pd.DataFrame:
    """A compute job: shard `shard` of `n_shards` of one scenario's catalogue lists, scored by the
    model the stage saved (models/<name>/seed<seed>)."""
    data = load_prepared()
    seed_everything(seed, torch_too=name not in registry.CLASSIC)
    model = registry.load(name, f"models/{name}/seed{seed}", train=load_split("train", data))
    new_items = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    ev = params["evaluation"]
    return catalogue_rankings(model, load_evaluation_split(scenario, data), new_items, int(ev["catalogue_k"]),
                              seed=int(ev["seed"]), shard=(shard, n_shards))


def _sharded(model, params: dict) -> bool:
    """Whether catalogue scoring runs in shards on the engine: on a cluster (`compute.address`) and
    for a model that scores each task on its own (MeLU, the torch baselines), from its saved copy;
    any shard count gives the same lists (metarec.predict.join_shards). Locally the matrix's cells
    already fill the cores, and a model fitted on every task at once (the classic models, an
    external one) is scored in one piece, so both stay in this process."""
    return bool(ComputeConfig.from_params(params).address) and getattr(model, "predict_chunk", 1) is not None


def _sharded_rankings(name: str, seed: int, params: dict, scenarios: list[str]) -> list[pd.DataFrame]:
    """Every scenario's catalogue lists, in one shard per CPU of the cluster."""
    with stage_executor(params) as ex:
        n = ex.width()
        print(f"catalogue scoring: {n} shards per scenario on the cluster")
        parts = ex.map(rank_shard, [(name, seed, s, j, n, params) for s in scenarios for j in range(n)],
                       label="scoring")
    return [join_shards(parts[i * n:(i + 1) * n]) for i in range(len(scenarios))]


@stage
def main() -> None:
    args = _args()
    params = load_params()
    model_params = (params.get("model_params") or {}).get(args.model) or {}
    seed_everything(args.seed, torch_too=args.model not in registry.CLASSIC)
    data = load_prepared()
    encoder = load_encoder()
    train, val = load_split("train", data), load_split("val", data)
    t0 = time.perf_counter()
    model = registry.build(args.model, model_params, args.seed)
    if getattr(model, "external", False):   # predictions checked against the scale; owner's ids
        model.rating_scale = (data.spec.rating_min, data.spec.rating_max)
        if any(data.id_map(key).kind == "string" for key in ("user_id", "item_id")):
            model.original_ids = {key: data.id_map(key) for key in ("user_id", "item_id")}
    model.fit(train, val, encoder)
    fit_s = time.perf_counter() - t0
    out_dir = f"models/{args.model}/seed{args.seed}"
    model.save(out_dir)
    new_items = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    ev, sharded = params["evaluation"], _sharded(model, params)
    preds, ranks = [], []
    scenarios = list(scenarios_present())
    for scenario in scenarios:
        split = load_evaluation_split(scenario, data)
        preds.append(query_predictions(model, split))
        if not sharded:
            ranks.append(catalogue_rankings(model, split, new_items, int(ev["catalogue_k"]), seed=int(ev["seed"])))
    if sharded:
        ranks = _sharded_rankings(args.model, args.seed, params, scenarios)
    atomic_write_parquet(f"predictions/{args.model}/seed{args.seed}.parquet",
                         with_original_ids(pd.concat(preds, ignore_index=True), data))
    atomic_write_parquet(f"rankings/{args.model}/seed{args.seed}.parquet",
                         with_original_ids(pd.concat(ranks, ignore_index=True), data))
    history = registry.history(model)
    atomic_write_json(f"plots/history/{args.model}-seed{args.seed}.json", history)
    print(f"{args.model} seed {args.seed}: fit {fit_s:.1f}s, predict {time.perf_counter() - t0 - fit_s:.1f}s")


if __name__ == "__main__":
    main()
