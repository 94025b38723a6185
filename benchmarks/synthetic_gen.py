"""Time the synthetic generator on 1M ratings (target: under 30 s).

Run: python benchmarks/synthetic_gen.py [n_ratings]
"""

from __future__ import annotations

import sys
import time

from metarec.data.synthetic import generate


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    cfg = {"seed": 0, "n_users": 6040, "n_items": 3706, "n_ratings": n,
           "effects": [{"type": "bias", "attribute": "gender", "group": "F", "size": -0.3}]}
    start = time.perf_counter()
    data, _ = generate(cfg)
    seconds = time.perf_counter() - start
    print(f"{len(data.ratings)} ratings in {seconds:.2f} s")


if __name__ == "__main__":
    main()
