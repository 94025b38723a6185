"""DVC stage `reproducibility`: re-train one seed and compare predictions bit for bit, split the
variance of each metric between seeds and users, fingerprint the environment (the devices each
torch model ran on included), hash the inputs."""

from __future__ import annotations

import glob

import numpy as np
import pandas as pd

from audit.fingerprint import environment, file_hashes
from audit.stats import seed_variance_share
from metarec.io import atomic_write_json
from metarec.models import registry
from metarec.models.device import saved_device
from metarec.predict import query_predictions
from metarec.seeding import seed_everything
from pipelines.common import (load_encoder, load_evaluation_split, load_params, load_prepared, load_split,
                              scenarios_present, stage)


def determinism(params: dict) -> dict:
    """Re-run one (model, seed) from scratch in this process and compare with the stored run.

    `device` is where the re-run was fitted and `stored_device` where the stored run was (both
    `device_record`s; None for a model that runs no torch): a GPU's predictions are not bitwise
    a CPU's, so a difference between two devices is expected and says nothing about seeding.
    """
    name, seed = params["determinism"]["model"], int(params["determinism"]["seed"])
    seed_everything(seed)
    data = load_prepared()
    model = registry.build(name, params.get("model_params", {}).get(name) or {}, seed)
    model.fit(load_split("train", data), load_split("val", data), load_encoder())
    fresh = pd.concat([query_predictions(model, load_evaluation_split(s, data)) for s in scenarios_present()], ignore_index=True)
    stored = pd.read_parquet(f"predictions/{name}/seed{seed}.parquet")
    same_rows = fresh[["user_id", "item_id", "scenario"]].equals(stored[["user_id", "item_id", "scenario"]])
    diff = np.abs(fresh["y_pred"].to_numpy() - stored["y_pred"].to_numpy()) if same_rows else np.array([np.inf])
    return {"kind": "determinism", "model": name, "seed": seed, "n_predictions": int(len(fresh)),
            "identical": bool(same_rows and np.array_equal(fresh["y_pred"].to_numpy(), stored["y_pred"].to_numpy())),
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "device": getattr(model, "fitted_on_", None), "stored_device": saved_device(f"models/{name}/seed{seed}")}


def devices(params: dict) -> list[dict]:
    """Where each trained torch model (model x seed) was fitted, from its saved config.json."""
    recs = []
    for name in params["models"]:
        for seed in params["seeds"]:
            record = saved_device(f"models/{name}/seed{seed}")
            if record is not None:
                recs.append({"model": name, "seed": int(seed), **record})
    return recs


def variance(per_user: pd.DataFrame) -> list[dict]:
    recs = []
    for (model, scenario, metric), g in per_user.groupby(["model", "scenario", "metric"], sort=True):
        if metric not in ("mae", "rmse", "ndcg@3", "list_ndcg@10"):
            continue
        share = seed_variance_share(g.pivot_table(index="user_id", columns="seed", values="value"))
        recs.append({"kind": "seed_variance", "model": model, "scenario": scenario, "metric": metric, **share})
    return recs


@stage
def main() -> None:
    params = load_params()
    det = determinism(params)
    per_user = pd.read_parquet("results/per_user.parquet")
    data_files = sorted(glob.glob("data/prepared/*.parquet")) + ["data/prepared/meta.json"]
    atomic_write_json("metrics/reproducibility.json", {
        "seeds": params["seeds"], "environment": environment("."), "devices": devices(params),
        "hashes": file_hashes(".", data_files + ["params.yaml", "dvc.yaml", "dvc.lock"]),
        "hashes_note": "dvc.lock as it stood when this stage ran; the signed bundle holds the final one",
        "records": [det] + variance(per_user)})
    status = "identical" if det["identical"] else f"DIFFERENT (max |diff| {det['max_abs_diff']:.3g})"
    print(f"determinism: {det['model']} seed {det['seed']} re-trained: predictions {status}")


if __name__ == "__main__":
    main()
