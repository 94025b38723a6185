"""DVC stage `prepare`: fetch, validate and normalise the ratings, users and items tables."""

from __future__ import annotations

from audit.config import load_checked
from metarec.io import atomic_write_json, atomic_write_parquet
from pipelines.common import ID_TABLES, PREPARED, load_params, stage


@stage
def main() -> None:
    params = load_params()
    # The one validation pass (params schema, data, data against params, strata and perturbed
    # attributes against the schema): nothing is written unless all of it passed.
    _, data = load_checked(params, workdir=".")
    provenance = dict(data.provenance)
    truth = provenance.pop("ground_truth", None)
    atomic_write_parquet(PREPARED / "ratings.parquet", data.ratings)
    atomic_write_parquet(PREPARED / "users.parquet", data.users)
    atomic_write_parquet(PREPARED / "items.parquet", data.items)
    for key, name in ID_TABLES.items():
        atomic_write_parquet(PREPARED / name, data.id_map(key).to_frame())
    meta = {"source": data.source, "provenance": provenance, "spec": data.spec.to_dict(),
            "id_kinds": {key: data.id_map(key).kind for key in ID_TABLES},
            "counts": {"ratings": len(data.ratings), "users": len(data.users), "items": len(data.items)}}
    atomic_write_json(PREPARED / "meta.json", meta)
    # Always written (empty for real data) so the stage's outputs are the same set for every source.
    atomic_write_json(PREPARED / "ground_truth.json", truth or {})
    print(f"source: {data.source}; {len(data.ratings)} ratings, {len(data.users)} users, {len(data.items)} items")


if __name__ == "__main__":
    main()
