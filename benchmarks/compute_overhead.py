"""What starting the compute layer costs a stage: `ray.init` of a local instance, the first map (Ray
workers start and import the job's module), a second map on the warm workers, and the shutdown;
each repeated in a fresh process. One JSON line per repetition on stdout; docs/PERFORMANCE.md
("Compute layer") quotes them. It decides when `compute.backend: auto` starts Ray (metarec/compute.py).

    python benchmarks/compute_overhead.py --repeats 3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
from metarec.compute import ComputeConfig, executor
from tests import compute_jobs
imported = time.perf_counter()
ex = executor(ComputeConfig(workers=int(sys.argv[1]), backend="ray"))
ex._start()
started = time.perf_counter()
jobs = [(i, 0) for i in range(2 * int(sys.argv[1]))]
ex.map(compute_jobs.square_and_pid, jobs)
first = time.perf_counter()
ex.map(compute_jobs.square_and_pid, jobs)
second = time.perf_counter()
ex.close()
done = time.perf_counter()
print(json.dumps({"import_s": round(imported - t0, 2), "ray_init_s": round(started - imported, 2),
                  "first_map_s": round(first - started, 2), "warm_map_s": round(second - first, 3),
                  "shutdown_s": round(done - second, 2), "total_s": round(done - t0, 2)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "RAY_USAGE_STATS_ENABLED": "0"}
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.workers)], cwd=root, env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(json.dumps({**json.loads(out), "workers": args.workers, "cores": os.cpu_count(),
                          "load_1min": round(load, 1)}), flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
