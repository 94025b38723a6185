"""Cost of the `feedback` stage: wall and CPU seconds of the default configuration and of larger ones.

Run from a scratch clone in which `dvc repro train` has produced the models the configurations
use (the stage writes metrics/feedback.json, results/feedback_long.parquet and plots/feedback.csv
there). Each configuration runs in a fresh forked process, so imports and oracle fits are counted
as the stage pays them; the simulation seeds run in that process (`compute.backend: serial`), so its
CPU seconds are the whole cost. Results go to stdout as one JSON line per configuration; docs/PERFORMANCE.md
and docs/FEEDBACK.md quote them.

    python benchmarks/feedback_cost.py                       # the params.yaml configuration
    python benchmarks/feedback_cost.py --set rounds=8 --set seeds=[0,1,2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time

import yaml


def _child(params: dict, conn) -> None:
    from pipelines.feedback import run

    t0 = time.perf_counter()
    run(params)
    conn.send(time.perf_counter() - t0)


def measure(params: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(params, child))
    t0 = time.perf_counter()
    proc.start()
    inner = parent.recv()
    proc.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(time.perf_counter() - t0, 1), "stage_s": round(inner, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a feedback: key, e.g. rounds=8 or models=[melu,svd]")
    args = p.parse_args()
    with open("params.yaml", encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    for item in args.set:
        key, _, value = item.partition("=")
        params["feedback"][key] = yaml.safe_load(value)
    params["compute"] = {**(params.get("compute") or {}), "backend": "serial"}
    fp = params["feedback"]
    config = {k: fp[k] for k in ("oracles", "models", "policies", "seeds", "rounds", "k", "n_bootstrap")}
    print(json.dumps({"config": config, **measure(params)}))


if __name__ == "__main__":
    main()
