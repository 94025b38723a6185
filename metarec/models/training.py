"""Training-loop pieces shared by the neural models (MeLU, GlobalModel, FineTune).

Early stopping that keeps the best weights, a JSON training history, a progress bar that stays
quiet in CI, safetensors persistence (never pickle), and `NeuralRecommender`, the base class that
gives every network-based model the same predict (adapt on the support set, then rate the
candidates), validation MAE, save and load.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from metarec.errors import ConfigError, MetarecError
from metarec.features import FeatureEncoder
from metarec.io import atomic_write_bytes, atomic_write_json
from metarec.models.base import CONFIG, Estimator
from metarec.models.device import batch_to, device_record, resolve_device, to_numpy
from metarec.models.network import NetworkSpec, RatingNetwork, batched_adapt_predict, dense_names
from metarec.tasks import Batch, PackedTasks, Task, TaskSet, make_batch, pack_tasks

T = TypeVar("T")
WEIGHTS = "weights.safetensors"
HISTORY = "history.json"


# ------------------------------------------------------------------------------------------ loop helpers
@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat float denormals as zero on this thread while a network trains (`torch.set_flush_denormal`).

    Why: Adam's first moment of an embedding row that no batch touches shrinks by beta1 every step;
    about 750 steps after its last gradient it is a float32 denormal, where x86 arithmetic is many
    times slower, and it stays one (0.9 times the smallest denormal rounds back to it). A user
    attribute with tens of thousands of values (a zip-like code at 10M ratings) leaves most of its
    rows untouched by any one meta-batch, so the denormal rows pile up: the fused AdamW step over a
    37,715 x 32 table went from 0.8 to 5.1 ms within 2,000 steps (benchmarks/adam_denormals.py),
    and the optimizer was 29% of the 10M MeLU fit (docs/SCALING.md). Flushing turns a value under
    1.2e-38 into zero; in Adam that moves a parameter by under lr * 1e-38 / eps, below float32's
    resolution for any weight larger than about 1e-26. That is an argument, not a guarantee (the
    flush applies to all the thread's arithmetic), so it was checked: AdamW bit for bit over 800
    steps (tests/test_denormals.py), and byte-identical MeLU cells at 10M and ML-100K. Only the
    calling thread is affected: with a model's `threads` above one, the other OpenMP threads keep
    the hardware default and part of the slowdown stays. The previous setting is restored.
    """
    was = _flushing()
    if not torch.set_flush_denormal(True):     # not supported on this CPU: nothing to restore
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def _flushing() -> bool:
    """Whether this thread flushes float32 denormals now (torch has no getter for it). On the CPU
    whatever torch's default device is: the flag is the CPU's."""
    return float(torch.tensor([1e-39], dtype=torch.float32, device="cpu")[0] * 1.0) == 0.0


class EarlyStopping:
    """Stop when the monitored value (lower is better) has not improved for `patience` epochs,
    remembering a copy of the best state so that training can end on it rather than the last."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0) -> None:
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float = float("inf")
        self.best_epoch: int = 0
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0

    def step(self, value: float, epoch: int, state: Mapping[str, Tensor]) -> bool:
        """Record one epoch; returns True when training should stop."""
        if value < self.best - self.min_delta or self.best_state is None:
            self.best, self.best_epoch = float(value), int(epoch)
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, params: Mapping[str, Tensor]) -> None:
        """Copy the best state back into the live parameters."""
        if self.best_state is None:
            return
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.best_state[k])


class History(list):
    """Per-epoch records {epoch, train_loss, val_loss, ...}; written as history.json."""

    def add(self, epoch: int, train_loss: float, val_loss: float | None, **extra: Any) -> dict:
        rec = {"epoch": int(epoch), "train_loss": float(train_loss),
               "val_loss": None if val_loss is None else float(val_loss), **extra}
        self.append(rec)
        return rec


def quiet() -> bool:
    """Progress bars are off in CI logs (env CI set to anything but '', '0', 'false')."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def progress(iterable: Iterable[T], verbose: bool = True, **kwargs: Any) -> Iterator[T]:
    """tqdm when verbose and not in CI, the bare iterable otherwise."""
    if not verbose or quiet():
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, leave=False, **kwargs))


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically (contiguous CPU copies: safetensors requires it)."""
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write_bytes(path, st_save(data, metadata=dict(metadata) if metadata else None))


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """Read safetensors (no code execution, unlike pickle-based torch.load)."""
    return st_load(Path(path).read_bytes())


def truncate_support(tasks: Sequence[Task], max_support: int | None) -> list[Task]:
    """Keep each task's last `max_support` support ratings (tasks list them oldest first)."""
    if max_support is None:
        return list(tasks)
    k = int(max_support)
    out = []
    for t in tasks:
        if len(t.support_items) > k:
            t = t.replace(support_items=t.support_items[len(t.support_items) - k:],
                          support_ratings=t.support_ratings[len(t.support_ratings) - k:])
        out.append(t)
    return out


def slice_batch(batch: Batch, idx: np.ndarray | Sequence[int]) -> Batch:
    """Rows idx of a padded batch, with padding trimmed to the longest support/query among them
    (gathered on the batch's device)."""
    ix = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=batch.user_x.device)
    sm, qm = batch.support_mask[ix], batch.query_mask[ix]
    s = max(int(sm.sum(1).max()) if len(ix) else 0, 1)
    q = max(int(qm.sum(1).max()) if len(ix) else 0, 1)
    return Batch(batch.user_x[ix], batch.support_items[ix, :s], batch.support_y[ix, :s], sm[:, :s],
                 batch.query_items[ix, :q], batch.query_y[ix, :q], qm[:, :q])


def chunk_by_rows(lengths: Sequence[int], max_rows: int, max_tasks: int,
                  then: Sequence[int] | None = None) -> list[np.ndarray]:
    """Group tasks (sorted by length, ties by `then`) so that tasks x padded width stays under
    max_rows: warm users can have hundreds of support ratings, and padding everyone to the longest
    wastes memory. `then`: the support lengths when scoring a catalogue, where every task's length
    (support plus unrated items) is the catalogue's size, so without it one long support would pad
    its whole chunk."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.asarray(then, dtype=np.int64), lengths)) if then is not None else \
        np.argsort(lengths, kind="stable")
    chunks: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_tasks and \
                (end - start + 1) * max(int(lengths[order[end]]), 1) <= max_rows:
            end += 1
        chunks.append(order[start:end])
        start = end
    return chunks


def mae(preds: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Mean absolute error pooled over all query rows."""
    p = np.concatenate([np.asarray(a, dtype=np.float64) for a in preds]) if preds else np.zeros(0)
    y = np.concatenate([np.asarray(a, dtype=np.float64) for a in truth]) if truth else np.zeros(0)
    return float(np.mean(np.abs(p - y))) if len(y) else float("nan")


# ------------------------------------------------------------------------------------------ base model
class NeuralRecommender(Estimator):
    """What the network-based models share once trained: adapt-then-predict, validation, persistence.

    Subclasses define `__init__` (hyperparameters only, see `Estimator`; `device` among them,
    `metarec.models.device`), `_fit`, and `_adaptation()` -> (adapted parameter names, step size,
    steps) used at predict time. Fitted state: `network_`, `encoder_`, `history_`, `rating_mean_`,
    `best_epoch_`, `fitted_on_` (the device training ran on, as `device.device_record` writes it).
    Prediction runs wherever `device` resolves at the time of the call, so a model fitted on a GPU
    predicts on a CPU-only machine once its `device` is auto or cpu.
    """

    network_: RatingNetwork | None = None
    encoder_: FeatureEncoder | None = None
    fitted_on_: dict[str, str | None] | None = None
    rating_mean_: float = 0.0
    best_epoch_: int = 0
    predict_rows: int = 65536     # tasks x padded width per prediction chunk
    predict_tasks: int = 1024

    def _fit_context(self) -> contextlib.AbstractContextManager:
        """Networks train with float denormals flushed (`flush_denormals`)."""
        return flush_denormals()

    # -- hooks
    def _adaptation(self) -> tuple[list[str], float, int]:
        raise NotImplementedError

    def _adapt_layer_names(self, adapt_layers: Sequence[int] | None) -> list[str]:
        assert self.network_ is not None
        return dense_names(self.network_.spec, adapt_layers)

    # -- hyperparameters shared by every network-based model
    def _check_params(self) -> None:
        self._resolved_device()

    def _resolved_device(self) -> torch.device:
        """`device` on this machine (ConfigError for a value other than auto, cpu or cuda, and for
        cuda without a CUDA device). A subclass without the parameter runs on the CPU."""
        return resolve_device(self.name, getattr(self, "device", "cpu"))

    # -- construction shared by fit and load
    def _build_network(self, encoder: FeatureEncoder, embedding_dim: int, hidden: Sequence[int],
                       seed: int | None) -> RatingNetwork:
        """A freshly initialised network on the resolved device (initialised on the CPU, so a seed
        draws the same weights whatever the device)."""
        spec = NetworkSpec.from_encoder(encoder, embedding_dim, hidden)
        device = self._resolved_device()
        self.encoder_ = encoder
        self.network_ = _cpu_network(spec, encoder, seed).to(device)
        self.fitted_on_ = device_record(device)
        return self.network_

    def _check_fitted(self) -> RatingNetwork:
        if self.network_ is None or self.encoder_ is None:
            raise MetarecError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        return self.network_

    def _placed_network(self) -> RatingNetwork:
        """The fitted network on the device `device` resolves to now (moved there once, e.g. after
        `load`, which reads weights onto the CPU)."""
        net = self._check_fitted()
        device = self._resolved_device()
        return net if net.device == device else net.to(device)

    # -- prediction
    def _predict_batch(self, batch: Batch) -> Tensor:
        """Padded predictions [B, Q] (unclipped) for one batch."""
        net = self._check_fitted()
        adapt, lr, steps = self._adaptation()
        with torch.no_grad():
            return batched_adapt_predict(net.params(), net.buffers_dict(), net.spec, batch.user_x,
                                         batch.support_items, batch.support_y, batch.support_mask,
                                         batch.query_items, adapt, lr, steps)

    def _predict_padded(self, packed: PackedTasks, lengths: np.ndarray) -> list[np.ndarray]:
        """Predictions of tasks encoded once (training-time validation, kept on the CPU), chunked;
        each chunk is padded to its own longest rows and computed on the network's device."""
        device = self._placed_network().device
        out: list[np.ndarray | None] = [None] * len(packed)
        q_len = packed.query_lengths
        for chunk in chunk_by_rows(lengths, self.predict_rows, self.predict_tasks):
            pred = to_numpy(self._predict_batch(batch_to(packed.take(chunk), device)))
            for i, t in enumerate(chunk):
                out[t] = pred[i, : int(q_len[t])]
        return self._clip(out)

    def _clip(self, preds: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        assert self.encoder_ is not None
        lo, hi = self.encoder_.spec.rating_min, self.encoder_.spec.rating_max
        return [np.clip(np.asarray(p, dtype=np.float64), lo, hi) for p in preds]

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """Predicted ratings per task, aligned with task.candidates, clipped to the rating scale.

        Each task is adapted on its own support set (no-op for an empty one, or for a model without
        adaptation); tasks are vectorised in chunks of similar support size, each chunk computed on
        the resolved device and copied back.
        """
        device = self._placed_network().device
        torch.set_num_threads(int(getattr(self, "threads", torch.get_num_threads())))
        tasks = truncate_support(tasks, getattr(self, "max_support", None))
        out: list[np.ndarray | None] = [None] * len(tasks)
        # rows per task: support plus candidates (catalogue ranking scores a thousand candidates)
        support = np.array([len(t.support_items) for t in tasks], dtype=np.int64)
        lengths = support + np.array([len(t.candidates) for t in tasks], dtype=np.int64)
        for chunk in chunk_by_rows(lengths, self.predict_rows, self.predict_tasks, then=support):
            sub = [tasks[i] for i in chunk]
            batch = batch_to(make_batch(sub, self.encoder_), device)
            pred = to_numpy(self._predict_batch(batch))
            for i, t in enumerate(chunk):
                out[t] = pred[i, : len(tasks[t].candidates)]
        return self._clip(out)

    # -- training helpers
    def _encode_split(self, split: TaskSet) -> tuple[PackedTasks, np.ndarray, list[np.ndarray]]:
        """Every task of a split encoded once and unpadded (`PackedTasks`: padding all of them to the
        longest support costs gigabytes at 10M ratings), its support lengths and query truths."""
        assert self.encoder_ is not None
        pairs = split.tasks_with_truth()
        tasks = truncate_support([t for t, _ in pairs], getattr(self, "max_support", None))
        truth = [y for _, y in pairs]
        packed = pack_tasks(tasks, self.encoder_, truth)
        return packed, np.array([len(t.support_items) for t in tasks], dtype=np.int64), truth

    def _end_epoch(self, epoch: int, train_loss: float, val: tuple[PackedTasks, np.ndarray, list[np.ndarray]] | None,
                   stopper: EarlyStopping, params: dict[str, Tensor]) -> bool:
        """Record the epoch; True when early stopping says training is over."""
        val_mae = self._val_mae(val)
        self.history_.add(epoch, train_loss, val_mae)
        return val_mae is not None and stopper.step(val_mae, epoch, params)

    def _keep_best(self, stopper: EarlyStopping, params: dict[str, Tensor]) -> None:
        """Restore the best validation state (or keep the last one when there was no validation)."""
        if stopper.best_state is not None:
            stopper.restore(params)
            self.best_epoch_ = stopper.best_epoch
        else:
            self.best_epoch_ = len(self.history_)

    def _val_mae(self, val: tuple[PackedTasks, np.ndarray, list[np.ndarray]] | None) -> float | None:
        if val is None or len(val[0]) == 0:
            return None
        return mae(self._predict_padded(val[0], val[1]), val[2])

    # -- persistence
    def _extra_config(self) -> dict[str, Any]:
        return {}

    def save(self, directory: str | Path) -> None:
        """weights.safetensors (parameters, as CPU tensors whatever the device), config.json (class,
        hyperparameters, network shapes, encoder, the device it was fitted on), history.json. Item
        tables are rebuilt from the encoder on load."""
        net = self._check_fitted()
        assert self.encoder_ is not None
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / WEIGHTS, net.params(), {"model": self.name})
        atomic_write_json(d / CONFIG, {
            "model": self.name, "params": self.config_params(), "network": net.spec.to_dict(),
            "rating_mean": self.rating_mean_, "best_epoch": self.best_epoch_,
            "encoder": json.loads(self.encoder_.to_json()), "fitted_on": self.fitted_on_, **self._extra_config(),
        })
        atomic_write_json(d / HISTORY, list(getattr(self, "history_", [])))

    @classmethod
    def load(cls, directory: str | Path, train: TaskSet | None = None) -> "NeuralRecommender":
        """Rebuild a fitted model from `save`'s directory (train is unused: all state is on disk).
        The weights are read onto the CPU; the first prediction moves them to the device `device`
        resolves to, so a model saved on a GPU loads on a machine without one."""
        d = Path(directory)
        cfg = cls.read_config(d)
        model = cls.from_config_params(cfg["params"])
        enc = FeatureEncoder.from_json(json.dumps(cfg["encoder"]))
        net = _cpu_network(NetworkSpec.from_dict(cfg["network"]), enc, None)
        weights = load_tensors(d / WEIGHTS)
        missing = set(net.params()) ^ set(weights)
        if missing:
            raise ConfigError(f"{d / WEIGHTS}: parameter names do not match the network: {sorted(missing)[:5]}")
        with torch.no_grad():
            for k, p in net.params().items():
                p.copy_(weights[k])
        model.network_, model.encoder_ = net, enc
        model.rating_mean_ = float(cfg.get("rating_mean", 0.0))
        model.best_epoch_ = int(cfg.get("best_epoch", 0))
        model.fitted_on_ = cfg.get("fitted_on")
        hist = d / HISTORY
        model.history_ = History(json.loads(hist.read_text()) if hist.exists() else [])
        return model


def _cpu_network(spec: NetworkSpec, encoder: FeatureEncoder, seed: int | None) -> RatingNetwork:
    """The network on the CPU, initialised from the CPU generator under `seed` (None: torch's global
    generator, which `load` overwrites anyway), whatever torch's default device is."""
    with torch.device("cpu"):
        item_x, item_ml = encoder.item_tensors()
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return RatingNetwork(spec, item_x, item_ml, generator=gen)
