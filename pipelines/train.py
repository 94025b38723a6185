"""DVC stage `train@<model>-<seed>`: fit one model under one seed, save it, predict every scenario."""

from __future__ import annotations

import argparse
import time

import pandas as pd

from metarec.io import atomic_write_json, atomic_write_parquet
from metarec.models import registry
from metarec.predict import catalogue_rankings, query_predictions
from metarec.seeding import seed_everything
from metarec.splits import SplitConfig, partition
from pipelines.common import (load_encoder, load_evaluation_split, load_params, load_prepared, load_split,
                              scenarios_present, stage, with_original_ids)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a name from params.yaml models")
    p.add_argument("--seed", required=True, type=int)
    return p.parse_args()


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
    k = int(params["evaluation"]["catalogue_k"])
    preds, ranks = [], []
    for scenario in scenarios_present():
        split = load_evaluation_split(scenario, data)
        preds.append(query_predictions(model, split))
        ranks.append(catalogue_rankings(model, split, new_items, k, seed=int(params["evaluation"]["seed"])))
    atomic_write_parquet(f"predictions/{args.model}/seed{args.seed}.parquet",
                         with_original_ids(pd.concat(preds, ignore_index=True), data))
    atomic_write_parquet(f"rankings/{args.model}/seed{args.seed}.parquet",
                         with_original_ids(pd.concat(ranks, ignore_index=True), data))
    history = registry.history(model)
    atomic_write_json(f"plots/history/{args.model}-seed{args.seed}.json", history)
    print(f"{args.model} seed {args.seed}: fit {fit_s:.1f}s, predict {time.perf_counter() - t0 - fit_s:.1f}s")


if __name__ == "__main__":
    main()
