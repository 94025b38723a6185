"""DVC stage `prepare`: fetch, validate and normalise the ratings, users and items tables."""

from __future__ import annotations

from audit.robustness import plan_attribute_perturbations
from audit.strata import plan_strata
from metarec.data.load import load_dataset
from metarec.io import atomic_write_json, atomic_write_parquet
from pipelines.common import PREPARED, load_params, stage


@stage
def main() -> None:
    params = load_params()
    data = load_dataset(params["data"], workdir=".")
    # strata and perturbed attributes must exist in this data's schema: fail here, not after training
    strata = plan_strata(params.get("strata"), data.spec)
    plan_attribute_perturbations(params.get("robustness"), data, min_size=strata.min_group_size)
    provenance = dict(data.provenance)
    truth = provenance.pop("ground_truth", None)
    # Validation has already run inside load_dataset: nothing is written unless all of it passed.
    atomic_write_parquet(PREPARED / "ratings.parquet", data.ratings)
    atomic_write_parquet(PREPARED / "users.parquet", data.users)
    atomic_write_parquet(PREPARED / "items.parquet", data.items)
    meta = {"source": data.source, "provenance": provenance, "spec": data.spec.to_dict(),
            "counts": {"ratings": len(data.ratings), "users": len(data.users), "items": len(data.items)}}
    atomic_write_json(PREPARED / "meta.json", meta)
    # Always written (empty for real data) so the stage's outputs are the same set for every source.
    atomic_write_json(PREPARED / "ground_truth.json", truth or {})
    print(f"source: {data.source}; {len(data.ratings)} ratings, {len(data.users)} users, {len(data.items)} items")


if __name__ == "__main__":
    main()
