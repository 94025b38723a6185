"""Where a train cell's prediction phase holds its memory: resident set (now and peak) after each step.

Run inside a scaling project whose `train@<model>-<seed>` cell has been trained (its saved model is
reloaded; nothing is written): the prepared data, the training split, the model, then per scenario
the split, its query predictions, its catalogue lists, and the same once they are freed. The stage's
malloc setting (`keep_freed_memory`) is applied first, as in the stage. `--slack` sets how much
resident growth the streaming loops tolerate before they trim the heap (`metarec.memory`; "off"
never trims, which is how the loops ran before), and `--scenarios` limits the scenarios probed.

    cd /tmp/metarec-scaling/10m && PYTHONPATH=$PWD python /path/to/repo/benchmarks/prediction_memory.py \
        --model melu --scenarios warm [--slack off|256]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import psutil


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="melu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slack", default=None, help="MiB of resident growth between heap trims, or 'off'")
    p.add_argument("--scenarios", default=None, help="comma-separated scenarios (default: all present)")
    args = p.parse_args()
    proc = psutil.Process()

    def mark(what: str) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"{time.strftime('%H:%M:%S')} {what}: rss {proc.memory_info().rss / 2 ** 30:.2f} GiB, "
              f"peak {peak:.2f} GiB", flush=True)

    import metarec.memory

    metarec.memory.keep_freed_memory()
    if args.slack is not None:
        metarec.memory.DEFAULT_SLACK = 1 << 62 if args.slack == "off" else int(args.slack) << 20
    from metarec.models import registry
    from metarec.predict import catalogue_rankings, query_predictions
    from metarec.splits import SplitConfig, partition
    from pipelines.common import load_evaluation_split, load_params, load_prepared, load_split, scenarios_present

    params, data = load_params(), load_prepared()
    mark("prepared")
    train = load_split("train", data)
    mark("training split")
    model = registry.load(args.model, f"models/{args.model}/seed{args.seed}", train=train)
    mark("model")
    new = partition(data, SplitConfig.from_params(params["tasks"])).new_items
    k, seed = int(params["evaluation"]["catalogue_k"]), int(params["evaluation"]["seed"])
    wanted = scenarios_present() if args.scenarios is None else args.scenarios.split(",")
    for scenario in wanted:
        split = load_evaluation_split(scenario, data)
        mark(f"{scenario} split ({len(split)} tasks)")
        start = time.perf_counter()
        preds = query_predictions(model, split)
        mark(f"{scenario} query predictions ({time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        lists = catalogue_rankings(model, split, new, k, seed=seed)
        mark(f"{scenario} catalogue lists ({time.perf_counter() - start:.1f} s)")
        del split, preds, lists
        gc.collect()
        mark(f"{scenario} freed")


if __name__ == "__main__":
    main()
