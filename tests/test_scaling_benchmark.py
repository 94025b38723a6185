"""The scaling benchmark's own pieces: the fixed configuration it runs (valid, the same at every
size but for the data), how it measures a command, and the table it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from audit.config import validate_params
from benchmarks.scaling import (SIZES, StageCost, growth_table, markdown_table, reused, run_measured,
                                scaling_params, stage_command)

REPO = Path(__file__).resolve().parents[1]


def base_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_every_size_runs_the_same_valid_configuration() -> None:
    base = base_params()
    configs = {size: scaling_params(base, size) for size in SIZES}
    for size, params in configs.items():
        validate_params(params, REPO)
        n_ratings, n_users, n_items = SIZES[size]
        assert params["data"]["source"] == "synthetic"
        assert params["data"]["synthetic"] == {"seed": 0, "n_users": n_users, "n_items": n_items,
                                               "n_ratings": n_ratings, "effects": []}
        assert params["seeds"] == [0, 1] and params["models"] == ["melu", "bias", "svd", "mean"]
        every = [params["fairness"]["models"], params["fairness"]["counterfactual_models"],
                 params["robustness"]["models"], params["robustness"]["shilling"]["models"],
                 params["feedback"]["models"], [params["determinism"]["model"], params["meta_learner"]]]
        assert all(names and set(names) <= set(params["models"]) for names in every)   # every stage has work
        assert not (params.get("compute") or {}).get("address")          # local unless asked
    without_data = [{k: v for k, v in p.items() if k != "data"} for p in configs.values()]
    assert all(p == without_data[0] for p in without_data)
    assert base == base_params()                                  # the caller's mapping is left alone
    assert scaling_params(base, "1m", "127.0.0.1:6379")["compute"]["address"] == "127.0.0.1:6379"
    assert all(p["evaluation"]["sample"] is None for p in configs.values())   # everyone, unless asked
    sampled = scaling_params(base, "10m", max_per_group=500)
    validate_params(sampled, REPO)
    assert sampled["evaluation"]["sample"] == {"max_per_group": 500}
    assert {k: v for k, v in sampled.items() if k != "evaluation"} == \
        {k: v for k, v in configs["10m"].items() if k != "evaluation"}
    assert all(p["feedback"]["max_users"] is None for p in configs.values())
    capped = scaling_params(base, "10m", feedback_users=2000)
    validate_params(capped, REPO)
    assert capped["feedback"] == {**configs["10m"]["feedback"], "max_users": 2000}
    assert {k: v for k, v in capped.items() if k != "feedback"} == \
        {k: v for k, v in configs["10m"].items() if k != "feedback"}
    assert SIZES["1m"] == (1_000_000, 6_040, 3_706) and SIZES["10m"] == (10_000_000, 69_878, 10_677)


def test_a_command_is_measured_with_its_children(tmp_path: Path) -> None:
    """A child that holds 300 MB for a second: the peak RSS sees it, and the CPU time is its own.
    Measured from a small process: a spawned child's peak also counts the memory of the process it
    was spawned from until it exec'd, and this test process is large (the benchmark's own is small)."""
    child = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
             "\"import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)\"], "
             "check=True); sys.exit(3)")
    measure = ("import json, os, sys; from pathlib import Path; from benchmarks.scaling import run_measured; "
               f"rc, cost = run_measured([sys.executable, '-c', {child!r}], Path('.'), os.environ, Path('log')); "
               "print(json.dumps([rc, cost.__dict__]))")
    out = subprocess.run([sys.executable, "-c", measure], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    rc, cost = json.loads(out.stdout)
    assert rc == 3
    assert 0.29 <= cost["rss_max_gb"] <= 0.4 and cost["rss_tree_gb"] >= cost["rss_max_gb"]
    assert cost["wall_s"] >= 1.0 and 0 < cost["cpu_s"] < cost["wall_s"]


def test_table_rows_ratios_and_total() -> None:
    def rec(size: str, costs: list[tuple[str, float, float, float]]) -> dict:
        return {"size": size, "stages": [StageCost(n, w, c, r, r).__dict__ for n, w, c, r in costs]}

    table = markdown_table([rec("100k", [("tasks", 2.0, 1.0, 0.5), ("fairness", 10.0, 20.0, 1.0)]),
                            rec("1m", [("tasks", 30.0, 8.0, 1.5), ("fairness", 50.0, 100.0, 2.25)])])
    lines = table.splitlines()
    assert lines[0] == ("| stage | 100k wall s | 100k CPU s | 100k peak RSS GB | 1m wall s | 1m CPU s | 1m peak RSS GB "
                        "| 100k->1m wall | 100k->1m CPU |")
    assert lines[2] == "| tasks | 2.0 | 1.0 | 0.50 | 30.0 | 8.0 | 1.50 | 15.0x | 8.0x |"
    assert lines[3] == "| fairness | 10.0 | 20.0 | 1.00 | 50.0 | 100.0 | 2.25 | 5.0x | 5.0x |"
    assert lines[4] == "| **all stages** | 12.0 | 21.0 | 1.00 | 80.0 | 108.0 | 2.25 | 6.7x | 5.1x |"


def test_stage_commands_follow_dvc_yaml() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["fairness"]["cmd"] == "exec python " + " ".join(stage_command("fairness"))
    assert stages["train"]["cmd"].replace("${item.model}", "melu").replace("${item.seed}", "1") == \
        "exec python " + " ".join(stage_command("train@melu-1"))


def test_growth_table_flags_functions_growing_faster_than_the_data(tmp_path: Path) -> None:
    import cProfile
    import importlib.util

    src = tmp_path / "audit" / "fake_stage.py"
    src.parent.mkdir()
    src.write_text("import time\n\ndef linear(s):\n    time.sleep(s)\n\ndef quadratic(s):\n    time.sleep(s)\n")
    spec = importlib.util.spec_from_file_location("fake_stage", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, (lin, quad) in {"small": (0.05, 0.01), "big": (0.2, 0.5)}.items():
        prof = cProfile.Profile()
        prof.runcall(lambda: (mod.linear(lin), mod.quadratic(quad)))
        prof.dump_stats(tmp_path / f"{name}.prof")
    table = growth_table(tmp_path / "small.prof", tmp_path / "big.prof", factor=10, min_seconds=0.1)
    rows = {line.split("`")[1].split(":")[0] + ":" + line.split("(")[1].split(")")[0]: line
            for line in table.splitlines()[2:]}
    assert set(rows) == {"audit/fake_stage.py:quadratic", "audit/fake_stage.py:linear"}
    assert rows["audit/fake_stage.py:quadratic"].endswith("| superlinear |")
    assert rows["audit/fake_stage.py:linear"].endswith("|  |")
    assert table.splitlines()[2].startswith("| `audit/fake_stage.py:6(quadratic)` | 0.0 | 0.")   # biggest first


def test_a_cut_run_totals_only_the_stages_every_size_measured() -> None:
    def rec(size: str, costs: list[tuple[str, float]]) -> dict:
        return {"size": size, "stages": [StageCost(n, w, w, 1.0, 1.0).__dict__ for n, w in costs]}

    table = markdown_table([rec("100k", [("prepare", 1.0), ("tasks", 2.0), ("train@melu-0", 50.0)]),
                            rec("1m", [("prepare", 3.0), ("tasks", 27.0)])])
    lines = table.splitlines()
    assert lines[4] == "| train@melu-0 | 50.0 | 50.0 | 1.00 | - | - | - | - | - |"
    assert lines[5] == "| **the 2 stages measured at every size** | 3.0 | 3.0 | 1.00 | 30.0 | 30.0 | 1.00 | 10.0x | 10.0x |"


def test_reuse_refuses_a_size_measured_under_another_configuration(tmp_path: Path) -> None:
    import pytest

    saved = tmp_path / "10m.json"
    saved.write_text(json.dumps({"size": "10m", "address": None, "max_per_group": 500, "feedback_users": None,
                                 "stages": []}))
    assert reused(saved, None, 500)["size"] == "10m"
    with pytest.raises(SystemExit, match=rf"^--reuse: {saved} was measured with max_per_group=500, not None; run "
                                         rf"without --reuse or with another --workdir$"):
        reused(saved, None, None)
    with pytest.raises(SystemExit, match=r"was measured with address=None, not '127.0.0.1:6379'"):
        reused(saved, "127.0.0.1:6379", 500)
    with pytest.raises(SystemExit, match=r"was measured with feedback_users=None, not 2000"):
        reused(saved, None, 500, 2000)
