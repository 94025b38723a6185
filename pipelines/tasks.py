"""DVC stage `tasks`: cold-start splits, feature encoder and a per-scenario, per-group summary."""

from __future__ import annotations

from audit.sampling import SAMPLE_JSON, sample_evaluation_users
from metarec.features import FeatureEncoder
from metarec.prepared import SAMPLE_FILE
from metarec.io import atomic_write_json, atomic_write_parquet, atomic_write_text
from metarec.splits import SplitConfig, build_splits, check_coverage, coverage, coverage_lines, summary_table
from metarec.tasks import SCENARIOS
from pipelines.common import TASKS, load_params, load_prepared, stage


@stage
def main() -> None:
    params = load_params()
    data = load_prepared()
    cfg = SplitConfig.from_params(params["tasks"])
    cov = coverage(data, cfg)
    check_coverage(cov, cfg)  # prepare has refused this already; kept for a hand-edited params.yaml
    splits = build_splits(data, cfg)
    train = splits["train"]
    feat = params.get("features", {})
    encoder = FeatureEncoder.fit(data.spec, data.users, data.items, train["user_id"].unique(), train["item_id"].unique(),
                                 drop_sensitive=bool(feat.get("drop_sensitive", False)),
                                 item_id_feature=bool(feat.get("item_id_feature", True)),
                                 min_count=int(feat.get("min_count", 1)))
    labels = []
    for name in data.spec.sensitive:
        attr = data.spec.user_attr(name)
        col = attr.bucketize(data.users[name]) if attr.kind == "numeric" else data.users[name].astype(str)
        labels.append((name, col.set_axis(data.users["user_id"])))
    table = summary_table(splits, data.users, labels)
    for name, frame in splits.items():
        atomic_write_parquet(TASKS / f"{name}.parquet", frame)
    atomic_write_text(TASKS / "encoder.json", encoder.to_json())
    sample = sample_evaluation_users(data, splits, params.get("evaluation") or {}, params.get("strata"))
    if sample is not None:   # evaluation.sample off: no file, everyone is evaluated
        atomic_write_parquet(TASKS / SAMPLE_FILE, sample[0])
        atomic_write_json(TASKS / SAMPLE_JSON, sample[1])
        for scenario, rec in sample[1]["scenarios"].items():
            print(f"sample: {scenario}: {rec['sampled']} of {rec['population']} users in {rec['n_strata']} strata")
    empty = {s: c.empty for s, c in cov.items() if s in SCENARIOS and c.empty}
    atomic_write_json(TASKS / "summary.json", {
        "config": cfg.to_dict(), "rows": table.to_dict(orient="records"), "empty": empty,
        "coverage": {s: {"candidates": c.candidates, "eligible": c.eligible, "lost": c.lost, "empty": c.empty}
                     for s, c in cov.items()}})
    for line in coverage_lines(cov, cfg):
        print(line)
    overall = table[table.attribute == "all"].drop(columns=["attribute", "group"])
    print(overall.to_string(index=False))
    print()
    wide = table[table.attribute != "all"].pivot_table(index=["attribute", "group"], columns="split", values="users",
                                                        fill_value=0, aggfunc="sum")
    print("users per split and group:")
    print(wide.to_string())


if __name__ == "__main__":
    main()
