"""A team's own model through the whole trimmed pipeline, and a model behind the reference server
audited through `endpoint` (the README's "Audit your own model" recipe, on the second dataset
shape of tests/byo_dataset.py so that it runs in a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import byo_dataset
from tests.test_byo_pipeline import REPO, copy_repo, trimmed_params

EXAMPLE = REPO / "examples" / "custom_model" / "src"


def _env(root: Path) -> dict:
    bindir = Path(sys.executable).parent
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{EXAMPLE}",
            "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


def _run(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_team_model_and_served_model_run_the_whole_audit(tmp_path: Path) -> None:
    copy_repo(tmp_path)
    params = trimmed_params(byo_dataset.write(tmp_path / "byo"))
    params["models"] = ["mean", "bias", "team"]
    params["model_params"]["team"] = {"class": "my_recs.models:AttributeFactors", "params": {"dim": 4, "n_iter": 3}}
    params["fairness"]["models"] = ["bias", "team"]
    params["robustness"]["models"] = ["bias", "team"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _run(tmp_path, "dvc", "init", "--no-scm", "-q").returncode == 0
    repro = _run(tmp_path, "dvc", "repro")
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    team = pd.read_parquet(tmp_path / "predictions/team/seed0.parquet")
    assert set(team.scenario) == {"warm", "user_cold"} and team.y_pred.between(1, 5).all()
    assert (tmp_path / "models/team/seed0/model/attribute_factors.json").is_file()   # its own save()
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert {r["model"] for r in summary["records"] if r.get("kind") == "accuracy"} == {"mean", "bias", "team"}
    fairness = json.loads((tmp_path / "metrics/fairness.json").read_text())
    assert any(r.get("model") == "team" and r.get("kind") == "gap" for r in fairness["records"])
    robustness = json.loads((tmp_path / "metrics/robustness.json").read_text())
    assert any(r.get("model") == "team" and r.get("kind") == "curve" for r in robustness["records"])
    html = (tmp_path / "reports/audit.html").read_text()
    assert "item biases and factors fitted by alternating ridge regressions" in html   # the class's own words

    # the trained bias model behind the reference server, audited as `prod` through its endpoint
    server = subprocess.Popen([str(Path(sys.executable).parent / "metarec-audit"), "serve", "--model", "bias",
                               "--seed", "0", "--port", "0"], cwd=tmp_path, env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving bias (seed 0) at http://127.0.0.1:"), line + server.stderr.read()
        url = line.split(" at ")[1].split(" ")[0] + "score"
        params["models"].append("prod")
        params["model_params"]["prod"] = {"endpoint": url, "batch_size": 100000, "timeout": 120}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        repro = _run(tmp_path, "dvc", "repro")
        assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
        assert "train@bias-0" not in repro.stdout.split("Running stage")[1:]   # cached: only prod is new
    finally:
        server.terminate()
        server.wait(timeout=30)
    prod = pd.read_parquet(tmp_path / "predictions/prod/seed0.parquet")
    bias = pd.read_parquet(tmp_path / "predictions/bias/seed0.parquet")
    pd.testing.assert_frame_equal(prod, bias)   # the service answers exactly what the model does
    external = json.loads((tmp_path / "models/prod/seed0/external.json").read_text())
    assert external["pretrained"] and external["definition"]["endpoint"] == url
