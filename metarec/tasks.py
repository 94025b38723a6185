"""Cold-start tasks: one per (user, scenario), a support set the model adapts on and a query set
it is judged on, stored columnar (one long table per split, never one file per task).

Long table columns: task_id, scenario, user_id, item_id, rating, timestamp, role ('support' or
'query'). A `TaskSet` joins it with the users and items tables; `make_batch` turns tasks into
padded tensors with masks for the vectorised models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from metarec.features import FeatureEncoder

if TYPE_CHECKING:  # torch is imported where tensors are made: the classic models never need it
    import torch

SCENARIOS = ("warm", "user_cold", "item_cold", "user_item_cold")
SPLITS = ("train", "val", *SCENARIOS)
TASK_COLUMNS = ("task_id", "scenario", "user_id", "item_id", "rating", "timestamp", "role")


@dataclass(frozen=True)
class Task:
    """What a model is given for one user: who they are, what they rated, what to score.

    `user_attrs` holds raw attribute values (e.g. {"gender": "F", "age": 31}); counterfactual and
    robustness checks change them or the support set and ask again. Query ratings are not here:
    models must not see them.
    """

    user_id: int
    user_attrs: Mapping[str, object]
    support_items: np.ndarray
    support_ratings: np.ndarray
    candidates: np.ndarray
    scenario: str = ""

    def replace(self, **changes) -> "Task":
        from dataclasses import replace

        return replace(self, **changes)


@dataclass
class TaskSet:
    """One split: the long table plus the users and items tables it refers to."""

    frame: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame

    @classmethod
    def read(cls, path: str | Path, users: pd.DataFrame, items: pd.DataFrame) -> "TaskSet":
        return cls(pd.read_parquet(path), users, items)

    def __len__(self) -> int:
        return int(self.frame["task_id"].nunique()) if len(self.frame) else 0

    @property
    def user_ids(self) -> np.ndarray:
        return np.unique(self.frame["user_id"].to_numpy())

    def tasks(self) -> list[Task]:
        """Tasks whose candidates are the query items, ordered by task_id."""
        return [t for t, _ in self.tasks_with_truth()]

    def tasks_with_truth(self) -> list[tuple[Task, np.ndarray]]:
        """(task, query ratings aligned with task.candidates), for training and evaluation.

        Within a task, support and query rows are ordered oldest first (ties by item id)."""
        if not len(self.frame):
            return []
        f = self.frame.sort_values(["task_id", "role", "timestamp", "item_id"], kind="stable")
        task = f["task_id"].to_numpy()
        is_query = (f["role"] == "query").to_numpy()
        items = f["item_id"].to_numpy(np.int64)
        ratings = f["rating"].to_numpy(np.float32)
        users = f["user_id"].to_numpy(np.int64)
        scenarios = f["scenario"].to_numpy()
        # role sorts "query" before "support": each task is [query rows | support rows]
        starts = np.flatnonzero(np.r_[True, task[1:] != task[:-1]])
        ends = np.r_[starts[1:], len(task)]
        attrs = self.users.drop_duplicates("user_id").set_index("user_id").to_dict("index")
        out = []
        for a, b in zip(starts, ends):
            q = a + int(is_query[a:b].sum())
            uid = int(users[a])
            out.append((Task(user_id=uid, user_attrs=attrs[uid], support_items=items[q:b].copy(),
                             support_ratings=ratings[q:b].copy(), candidates=items[a:q].copy(),
                             scenario=str(scenarios[a])), ratings[a:q].copy()))
        return out

    def all_ratings(self) -> pd.DataFrame:
        """Support and query rows together (what a non-meta model trains on for a training split)."""
        return self.frame[["user_id", "item_id", "rating", "timestamp"]]


@dataclass
class Batch:
    """Padded tensors for a meta-batch of B tasks; masks are True on real rows.

    Item columns hold rows of the encoder's item table, not raw ids; padded rows point at row 0
    and carry rating 0, and every loss must be masked.
    """

    user_x: torch.Tensor          # [B, n_user_attrs] long
    support_items: torch.Tensor   # [B, S] long
    support_y: torch.Tensor       # [B, S] float
    support_mask: torch.Tensor    # [B, S] bool
    query_items: torch.Tensor     # [B, Q] long
    query_y: torch.Tensor         # [B, Q] float (zeros when no truth was given)
    query_mask: torch.Tensor      # [B, Q] bool

    def __len__(self) -> int:
        return int(self.user_x.shape[0])


def _pad(rows: Sequence[np.ndarray], dtype, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = np.zeros((len(rows), width), dtype=dtype)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


def make_batch(tasks: Sequence[Task], encoder: FeatureEncoder, targets: Sequence[np.ndarray] | None = None,
               support_width: int | None = None, query_width: int | None = None) -> Batch:
    """Pad a list of tasks into one Batch (targets: query ratings aligned with candidates)."""
    import torch

    user_x = encoder.encode_users([t.user_attrs for t in tasks])
    s_items, s_mask = _pad([encoder.item_rows(t.support_items) for t in tasks], np.int64, support_width)
    s_y, _ = _pad([t.support_ratings for t in tasks], np.float32, support_width)
    q_items, q_mask = _pad([encoder.item_rows(t.candidates) for t in tasks], np.int64, query_width)
    q_y, _ = _pad(targets if targets is not None else [np.zeros(len(t.candidates), np.float32) for t in tasks],
                  np.float32, query_width)
    return Batch(torch.from_numpy(user_x), torch.from_numpy(s_items), torch.from_numpy(s_y), torch.from_numpy(s_mask),
                 torch.from_numpy(q_items), torch.from_numpy(q_y), torch.from_numpy(q_mask))


def _ragged(rows: Sequence[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(rows back to back, offsets [n + 1])."""
    off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=off[1:])
    flat = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if rows else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), off


def _pad_from(flat: np.ndarray, off: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows idx of a ragged array, padded with zeros to their longest (at least 1), and the mask."""
    lens = off[idx + 1] - off[idx]
    width = max(int(lens.max()) if len(idx) else 0, 1)
    out = np.zeros((len(idx), width), dtype=flat.dtype)
    mask = np.zeros((len(idx), width), dtype=bool)
    rows = np.repeat(np.arange(len(idx)), lens)
    cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    out[rows, cols] = flat[np.repeat(off[idx], lens) + cols]
    mask[rows, cols] = True
    return out, mask


@dataclass(frozen=True)
class PackedTasks:
    """Every task of a split encoded once, its support and query rows stored back to back rather
    than padded; `take(idx)` pads only the tasks asked for.

    Why: one padded batch of a whole split costs tasks x the longest support. At 10M ratings that
    is 47,508 training tasks x 3,431 support rows, about 2 GB, most of it padding, which put MeLU's
    training cell over 4 GB. `take(idx)` equals slicing that padded batch and trimming its padding
    to the selected tasks' longest support and query (`training.slice_batch`), value for value.
    """

    user_x: np.ndarray                       # [N, n_user_attrs], as encode_users gives it
    support_items: np.ndarray                # item-table rows, back to back
    support_y: np.ndarray
    support_off: np.ndarray                  # [N + 1]
    query_items: np.ndarray
    query_y: np.ndarray
    query_off: np.ndarray                    # [N + 1]

    def __len__(self) -> int:
        return int(self.user_x.shape[0])

    @property
    def support_lengths(self) -> np.ndarray:
        return np.diff(self.support_off)

    @property
    def query_lengths(self) -> np.ndarray:
        return np.diff(self.query_off)

    def take(self, idx: np.ndarray | Sequence[int]) -> Batch:
        """The padded Batch of tasks idx (on the CPU)."""
        import torch

        idx = np.asarray(idx, dtype=np.int64)
        s_items, s_mask = _pad_from(self.support_items, self.support_off, idx)
        s_y, _ = _pad_from(self.support_y, self.support_off, idx)
        q_items, q_mask = _pad_from(self.query_items, self.query_off, idx)
        q_y, _ = _pad_from(self.query_y, self.query_off, idx)
        return Batch(torch.from_numpy(self.user_x[idx]), torch.from_numpy(s_items), torch.from_numpy(s_y),
                     torch.from_numpy(s_mask), torch.from_numpy(q_items), torch.from_numpy(q_y),
                     torch.from_numpy(q_mask))


def pack_tasks(tasks: Sequence[Task], encoder: FeatureEncoder,
               targets: Sequence[np.ndarray] | None = None) -> PackedTasks:
    """Encode tasks once, unpadded (targets: query ratings aligned with candidates; zeros if None)."""
    s_items, s_off = _ragged([encoder.item_rows(t.support_items) for t in tasks], np.int64)
    s_y, _ = _ragged([t.support_ratings for t in tasks], np.float32)
    q_items, q_off = _ragged([encoder.item_rows(t.candidates) for t in tasks], np.int64)
    q_y, _ = _ragged(targets if targets is not None else [np.zeros(len(t.candidates), np.float32) for t in tasks],
                     np.float32)
    return PackedTasks(np.asarray(encoder.encode_users([t.user_attrs for t in tasks])),
                       s_items, s_y, s_off, q_items, q_y, q_off)


def iterate_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Index blocks over n tasks, shuffled by rng (None keeps order)."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start: start + batch_size]
