"""metrics/provenance.json: which data and which task split an audit scored, as digests.

Why: comparing a candidate with the last release is only meaningful on the same users and the
same held-out ratings. Every audit records the canonical checksum of its ratings and a digest of
its task split; the file is one of the signed metrics, so a later audit can check both before it
compares anything (audit.regression).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from metarec.errors import MetarecError
from metarec.prepared import SAMPLE_FILE
from metarec.tasks import SPLITS

__all__ = ["ProvenanceError", "tasks_digest", "sample_digest", "provenance", "write_provenance"]

_SPLIT_COLUMNS = ["scenario", "user_id", "item_id", "role", "rating"]
_SAMPLE_COLUMNS = ["scenario", "user_id", "stratum", "sampled", "weight"]


class ProvenanceError(MetarecError):
    """The prepared data or the task split cannot be read."""


def _frame_digest(h: Any, name: str, frame: pd.DataFrame, columns: list[str]) -> None:
    """Content, not file bytes: parquet files of the same rows differ with the writer's version."""
    frame = frame.sort_values(columns, kind="stable")
    h.update(f"{name}\n".encode())
    h.update(frame.to_csv(index=False, float_format="%.6g").encode())


def tasks_digest(task_dir: Path) -> str:
    """sha256 over every split's (scenario, user, item, role, rating) rows in a canonical order.

    Only the splits (metarec.tasks.SPLITS) are digested: the tasks stage also writes the evaluation
    sample there when `evaluation.sample` is set, which `sample_digest` records on its own.
    """
    h = hashlib.sha256()
    files = sorted(f for f in Path(task_dir).glob("*.parquet") if f.stem in SPLITS)
    if not files:
        raise ProvenanceError(f"cannot record provenance: no task split in {task_dir} (run the tasks stage)")
    for f in files:
        frame = pd.read_parquet(f, columns=_SPLIT_COLUMNS)
        _frame_digest(h, f.stem, frame.astype({"user_id": str, "item_id": str, "rating": float}), _SPLIT_COLUMNS)
    return h.hexdigest()


def sample_digest(task_dir: Path) -> str | None:
    """sha256 over the evaluation sample's (scenario, user, stratum, sampled, weight) rows; None when
    everyone is evaluated (no sample file). Two audits are paired only on the same sample."""
    path = Path(task_dir) / SAMPLE_FILE
    if not path.exists():
        return None
    h = hashlib.sha256()
    frame = pd.read_parquet(path, columns=_SAMPLE_COLUMNS)
    _frame_digest(h, path.stem, frame.astype({"user_id": str, "stratum": int, "sampled": bool, "weight": float}),
                  _SAMPLE_COLUMNS)
    return h.hexdigest()


def provenance(root: Path) -> dict[str, Any]:
    meta_path = Path(root) / "data" / "prepared" / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ProvenanceError(f"cannot record provenance: {meta_path} is missing or not JSON") from None
    checksum = (meta.get("provenance") or {}).get("canonical_sha256")
    if not checksum:
        raise ProvenanceError(f"cannot record provenance: {meta_path} has no provenance.canonical_sha256")
    task_dir = Path(root) / "data" / "tasks"
    return {"source": meta.get("source"), "data_canonical_sha256": checksum, "tasks_sha256": tasks_digest(task_dir),
            "sample_sha256": sample_digest(task_dir), "counts": meta.get("counts", {})}


def write_provenance(root: Path) -> Path:
    from metarec.io import atomic_write_json

    return atomic_write_json(Path(root) / "metrics" / "provenance.json", provenance(root))
