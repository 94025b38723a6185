"""MeLU: meta-learned user preference estimator (Lee et al., KDD 2019), vectorised with torch.func.

Each user is a task. The local update adapts the decision layers on the user's support ratings
with a few SGD steps on the masked support MSE; the global update minimises the masked query MSE
after adaptation, averaged over a meta-batch of tasks, with Adam. The tasks of a meta-batch are
padded and computed together (no Python work per task); the embeddings do not adapt, so they are
computed once per batch. The local update runs in one form: "gram" (`inner`'s default), the
support-loss gradient derived by hand, written with batched matmuls and the first layer's update
expressed through the support Gram matrix (`gram.py`). "autograd", a `torch.func.grad` of the
support loss vmapped over the tasks (`network.inner_adapt`), is the reference the tests hold it
to. Either way, second-order MAML differentiates through the local update with autograd;
first-order MAML detaches its gradients.

`loop_meta_gradient` is the same math as a plain per-task Python loop over unpadded tasks with
`torch.autograd`: the independent check of both (no padding, no masks, no vmap) and the baseline
the benchmark times.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from metarec.errors import ConfigError
from metarec.features import FeatureEncoder
from metarec.models.base import check_choice, check_number
from metarec.models.device import batch_to
from metarec.models.network import (NetworkSpec, Params, adapt_and_rate, embed, embed_sets, mlp, split_params,
                                    task_mse)
from metarec.models.training import EarlyStopping, History, NeuralRecommender, progress
from metarec.seeding import rng, seed_everything
from metarec.tasks import Batch, PackedTasks, Task, TaskSet, iterate_batches, pack_tasks

Order = Literal["first", "second"]
Inner = Literal["gram", "autograd"]

# Support blocks per meta-batch when MeLU's `support_groups` is None: two was the closed form's
# best on ML-100K and ML-1M-shaped batches (docs/PERFORMANCE.md; `benchmarks/meta_train.py --groups`).
DEFAULT_GROUPS = 2


# ------------------------------------------------------------------------------------------ meta objective
def _support_groups(batch: Batch, groups: int) -> tuple[Batch, list[slice]]:
    """The batch reordered by support size, and up to `groups` contiguous blocks of it, so that each
    block is padded only to its own longest support (uniform 3..90 supports waste about half of
    one shared pad). Reordering the integer inputs up front keeps every block a view: no gather of
    embedded rows, and no scatter in the backward pass. The meta-objective is a sum over tasks,
    so the order does not change its value."""
    n = len(batch)
    groups = max(1, min(int(groups), n))
    if groups == 1:
        return batch, [slice(None)]
    order = torch.argsort(batch.support_mask.sum(1), stable=True)
    batch = Batch(*(getattr(batch, f.name)[order] for f in fields(Batch)))
    return batch, [slice(int(block[0]), int(block[-1]) + 1) for block in np.array_split(np.arange(n), groups)]


def meta_objective(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec, batch: Batch,
                   adapt: Sequence[str], local_lr: float, local_steps: int, first_order: bool,
                   groups: int = 1, inner: Inner = "gram") -> Tensor:
    """Mean over tasks (with at least one query row) of the masked query MSE after adaptation.

    Embeddings are computed once for the whole batch; the tasks then go through the local update
    in blocks of similar support size (`groups`=1: the whole batch at once). Grouping only
    changes how much padding is computed (and the order of a sum), not the value. `inner`:
    "gram" runs the local update in closed form (`gram.gram_adapt_predict`, the fast path),
    "autograd" through `torch.func.grad` (`network.inner_adapt`); both are the same function.
    "gram" needs whole layers in `adapt` and falls back to "autograd" otherwise.
    """
    batch, blocks = _support_groups(batch, groups)
    # First order differentiates nothing on the support side (both inner forms detach it), so its
    # rows are gathered without a gradient path; the value is the same.
    u, (xs, xq) = embed_sets(params, buffers, spec, batch.user_x,
                             [(batch.support_items, batch.support_mask), (batch.query_items, batch.query_mask)],
                             constant=(first_order, False))
    ys, yq = batch.support_y.to(xq.dtype), batch.query_y.to(xq.dtype)
    _, dense = split_params(params)
    total = xq.new_zeros(())
    for idx in blocks:
        ms = batch.support_mask[idx]
        width = max(int(ms.sum(1).max()), 1)
        pred = adapt_and_rate(dense, u[idx], xs[idx, :width], ys[idx, :width], ms[:, :width], xq[idx], adapt,
                              local_lr, local_steps, spec.n_dense, first_order, inner)
        losses = task_mse(pred, yq[idx], batch.query_mask[idx])
        total = total + (losses * batch.query_mask[idx].any(dim=1).to(losses.dtype)).sum()
    n_tasks = batch.query_mask.any(dim=1).sum().clamp(min=1).to(xq.dtype)
    return total / n_tasks


def meta_gradient(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec, batch: Batch,
                  adapt: Sequence[str], local_lr: float, local_steps: int,
                  first_order: bool, groups: int = 1, inner: Inner = "gram") -> tuple[Params, Tensor]:
    """(gradient of `meta_objective` w.r.t. every parameter, loss value), vectorised over tasks.

    The outer gradient is reverse-mode autograd over the pure objective (the same value as
    `torch.func.grad_and_value(meta_objective)`, which the tests check, without its per-op
    wrapper cost).
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = meta_objective(leaves, buffers, spec, batch, list(adapt), local_lr, local_steps, first_order, groups,
                          inner)
    return _gradients(loss, leaves), loss.detach()


def _gradients(loss: Tensor, leaves: Mapping[str, Tensor]) -> Params:
    """d loss / d leaf for every leaf; zeros for leaves the loss does not reach."""
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}


def loop_meta_gradient(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec,
                       batch: Batch, adapt: Sequence[str], local_lr: float, local_steps: int,
                       first_order: bool, groups: int = 1, inner: Inner = "autograd") -> tuple[Params, Tensor]:
    """The same meta-gradient as a per-task Python loop over unpadded tasks with torch.autograd
    (`groups` and `inner` are accepted for signature parity and ignored: there is no padding here,
    and the inner gradient is always autograd's)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    n_dense = spec.n_dense
    total = next(iter(leaves.values())).new_zeros(())
    count = 0
    for b in range(len(batch)):
        ns, nq = int(batch.support_mask[b].sum()), int(batch.query_mask[b].sum())
        if nq == 0:
            continue
        ux = batch.user_x[b: b + 1]
        _, dense = split_params(leaves)
        fast = {k: dense[k] for k in adapt}
        fixed = {k: v for k, v in dense.items() if k not in fast}
        if ns > 0:
            xs = embed(leaves, buffers, spec, ux, batch.support_items[b: b + 1, :ns])[0]
            ys = batch.support_y[b, :ns].to(xs.dtype)
            for _ in range(int(local_steps)):
                loss = ((mlp({**fixed, **fast}, xs, n_dense) - ys) ** 2).mean()
                g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                fast = {k: v - local_lr * (gk.detach() if first_order else gk) for (k, v), gk in zip(fast.items(), g)}
        xq = embed(leaves, buffers, spec, ux, batch.query_items[b: b + 1, :nq])[0]
        yq = batch.query_y[b, :nq].to(xq.dtype)
        total = total + ((mlp({**fixed, **fast}, xq, n_dense) - yq) ** 2).mean()
        count += 1
    total = total / max(count, 1)
    grads = _gradients(total, leaves) if count else {k: torch.zeros_like(v) for k, v in leaves.items()}
    return grads, total.detach()


# ------------------------------------------------------------------------------------------ model
class MeLU(NeuralRecommender):
    """MeLU with scikit-learn style hyperparameters (stored as given, checked by `fit`).

    Defaults are tuned for MovieLens-100K-scale tasks (hundreds of training users, supports up to
    ~90 ratings, 10 query ratings): MeLU's published step sizes (local 5e-6, global 5e-5) learn
    next to nothing in a few epochs here, so the local SGD step is 0.05 and the global Adam step
    1e-3. Defaults were chosen on the validation users of ML-100K (never the test scenarios):
    first order with 5 local steps matched exact second order there (val MAE 0.738 vs 0.743, at
    half the cost), so `order="first"` is the default and "second" stays one parameter away.
    `adapt_layers` lists the dense layers adapted locally (None = all, output included;
    negative indices count from the output). `max_support` keeps each task's latest ratings only.
    `support_groups`: a meta-batch runs as this many blocks of similar support size, each padded to
    its own longest support (the same gradient up to summation order, less padding computed; 1 =
    one block); None picks `DEFAULT_GROUPS`.
    `resample`: every epoch, each training user's ratings are split afresh into support and query
    (same query size), so the meta-learner sees many tasks per user instead of memorising one
    split; `train_support` caps the support drawn during training (a random subset), which bounds
    the cost of a meta-batch. Neither applies at prediction time.
    `device` ("auto", "cpu" or "cuda"; `metarec.models.device`): where meta-training and scoring
    run. The network is initialised on the CPU, so one seed starts from the same weights anywhere;
    a GPU's results are close to the CPU's but not bitwise equal (docs/PERFORMANCE.md, "GPU").
    """

    name = "melu"
    description = ("MeLU, a meta-learned user preference estimator (Lee et al., KDD 2019): a rating network over "
                   "user-attribute and item-feature embeddings whose dense decision layers are meta-trained "
                   "(MAML-style) so that a few SGD steps on a user's support ratings adapt them to that user")

    def __init__(self, embedding_dim: int = 32, hidden: Sequence[int] = (64, 64), local_lr: float = 0.05,
                 local_steps: int = 5, global_lr: float = 1e-3, meta_batch_size: int = 32, epochs: int = 30,
                 patience: int = 5, order: Order = "first", adapt_layers: Sequence[int] | None = None,
                 seed: int = 0, threads: int = 1, max_support: int | None = None, support_groups: int | None = None,
                 resample: bool = True, train_support: int | None = 64, weight_decay: float = 0.0,
                 verbose: bool = False, device: str = "auto") -> None:
        self.embedding_dim = embedding_dim
        self.hidden = hidden
        self.local_lr = local_lr
        self.local_steps = local_steps
        self.global_lr = global_lr
        self.meta_batch_size = meta_batch_size
        self.epochs = epochs
        self.patience = patience
        self.order = order
        self.adapt_layers = adapt_layers
        self.seed = seed
        self.threads = threads
        self.max_support = max_support
        self.support_groups = support_groups
        self.resample = resample
        self.train_support = train_support
        self.weight_decay = weight_decay
        self.verbose = verbose
        self.device = device

    def _check_params(self) -> None:
        super()._check_params()
        check_choice("melu", "order", self.order, ("first", "second"))
        check_number("melu", "local_steps", self.local_steps, 0, 100, integer=True)
        for param in ("meta_batch_size", "patience", "threads"):
            check_number("melu", param, getattr(self, param), 1, integer=True)
        check_number("melu", "epochs", self.epochs, 0, integer=True)
        for param in ("support_groups", "max_support", "train_support"):
            if getattr(self, param) is not None:
                check_number("melu", param, getattr(self, param), 1 if param == "support_groups" else 0,
                             integer=True)

    def _adaptation(self) -> tuple[list[str], float, int]:
        return self._adapt_layer_names(self.adapt_layers), float(self.local_lr), int(self.local_steps)

    def _fit(self, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder | None) -> "MeLU":
        """Meta-train on the training tasks; early-stop on validation MAE after adaptation and keep
        the best weights. Everything random derives from `seed`. The training tasks are encoded once,
        unpadded (`PackedTasks`); each meta-batch is padded on the CPU and moved to the network's device."""
        enc = self._require_encoder(encoder)
        seed_everything(int(self.seed), int(self.threads))
        net = self._build_network(enc, self.embedding_dim, self.hidden, self.seed)
        data, _, _ = self._encode_split(train)
        pooled = self._pooled_tasks(train) if self.resample else None
        keep = np.flatnonzero(data.query_lengths > 0)   # tasks without query rows teach nothing
        if len(keep) == 0:
            raise ConfigError("MeLU.fit: the training split has no task with query ratings")
        self.rating_mean_ = float(train.frame["rating"].mean())
        net.set_output_bias(self.rating_mean_)
        val_data = self._encode_split(val) if val is not None and len(val) else None

        params = net.params()
        buffers = net.buffers_dict()
        adapt, lr, steps = self._adaptation()
        first_order = self.order == "first"
        groups = DEFAULT_GROUPS if self.support_groups is None else int(self.support_groups)
        opt = torch.optim.AdamW(params.values(), lr=float(self.global_lr), weight_decay=float(self.weight_decay),
                                fused=True)
        order_rng = rng(int(self.seed), "melu-task-order")
        stopper = EarlyStopping(self.patience)
        self.history_ = History()
        for epoch in progress(range(1, int(self.epochs) + 1), self.verbose, desc="MeLU"):
            losses, weights = [], []
            if pooled is not None:
                data = self._resampled_batch(pooled, order_rng)
            for block in iterate_batches(len(keep), int(self.meta_batch_size), order_rng):
                batch = batch_to(data.take(keep[block]), net.device)
                grads, loss = meta_gradient(params, buffers, net.spec, batch, adapt, lr, steps, first_order,
                                            groups)
                opt.zero_grad(set_to_none=True)
                for k, p in params.items():
                    p.grad = grads[k]
                opt.step()
                losses.append(float(loss))
                weights.append(len(block))
            if self._end_epoch(epoch, float(np.average(losses, weights=weights)), val_data, stopper, params):
                break
        self._keep_best(stopper, params)
        return self

    def _pooled_tasks(self, train: TaskSet) -> list[tuple[Task, np.ndarray, np.ndarray, int]]:
        """Per training task: the task, all its rated items and ratings, and its query size."""
        out = []
        for t, y in train.tasks_with_truth():
            items = np.concatenate([t.support_items, t.candidates])
            ratings = np.concatenate([t.support_ratings, y]).astype(np.float32)
            out.append((t, items, ratings, len(t.candidates)))
        return out

    def _resampled_batch(self, pooled: list[tuple[Task, np.ndarray, np.ndarray, int]],
                         gen: np.random.Generator) -> PackedTasks:
        """A fresh support/query split of every training task (same order and query sizes)."""
        assert self.encoder_ is not None
        tasks, truth = [], []
        cap = None if self.train_support is None else int(self.train_support)
        for t, items, ratings, q in pooled:
            perm = gen.permutation(len(items))
            qi, si = perm[:q], perm[q:]
            if cap is not None:
                si = si[:cap]
            tasks.append(t.replace(support_items=items[si], support_ratings=ratings[si], candidates=items[qi]))
            truth.append(ratings[qi])
        return pack_tasks(tasks, self.encoder_, truth)

    def _extra_config(self) -> dict:
        return {"adapted_parameters": self._adaptation()[0]}
