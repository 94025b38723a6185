"""The DVC pipeline definition itself: it parses, expands its matrix, and DVC is allowed to run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _git_worktree() -> bool:
    if shutil.which("git") is None:
        return False
    r = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "true"


@pytest.mark.skipif(not _git_worktree(), reason="needs a git checkout")
def test_dvc_lock_is_not_git_ignored():
    """DVC refuses to run at all ("'dvc.lock' is git-ignored") when git ignores its lock file."""
    r = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=ROOT)
    assert r.returncode == 1, "dvc.lock must not be git-ignored: `dvc repro` stops at once otherwise"


def test_dvc_expands_the_training_matrix_from_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists():
        pytest.skip("dvc is not installed next to this python")
    r = subprocess.run([str(dvc), "stage", "list", "--name-only"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = set(r.stdout.split())
    expected = {f"train@{m}-{s}" for m in params["models"] for s in params["seeds"]}
    assert expected <= names
    assert {"prepare", "tasks", "evaluate", "fairness", "robustness", "reproducibility", "collect", "gate", "report"} <= names
