"""Transfer baselines for MeLU: the same network without meta-learning.

`GlobalModel` trains the rating network on every training rating (support and query rows of the
training tasks) with minibatch Adam and early stopping on validation MAE, and predicts without
adaptation. `FineTune` trains the same way, then fine-tunes the decision layers per user on the
support set at predict time, through the very inner loop MeLU uses (`network.adapt_and_rate`, via
`batched_adapt_predict`), so that the two differ only in how the starting point was learned.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from metarec.errors import ConfigError
from metarec.features import FeatureEncoder
from metarec.models.base import check_number
from metarec.models.network import embed, mlp, split_params
from metarec.models.training import EarlyStopping, History, NeuralRecommender, progress
from metarec.seeding import rng, seed_everything
from metarec.tasks import TaskSet, iterate_batches


class GlobalModel(NeuralRecommender):
    """One network for everybody: rates (user attributes, item features) pairs, no adaptation.
    `device` ("auto", "cpu" or "cuda"): where training and scoring run (`metarec.models.device`)."""

    name = "global"
    description = ("one rating network (user-attribute and item-feature embeddings, dense layers) trained on all "
                   "training ratings; no per-user adaptation, so a new user's support ratings are not used")

    def __init__(self, embedding_dim: int = 32, hidden: Sequence[int] = (64, 64), global_lr: float = 1e-3,
                 batch_size: int = 256, epochs: int = 30, patience: int = 5, weight_decay: float = 0.0,
                 seed: int = 0, threads: int = 1, max_support: int | None = None, verbose: bool = False,
                 device: str = "auto") -> None:
        self.embedding_dim = embedding_dim
        self.hidden = hidden
        self.global_lr = global_lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.weight_decay = weight_decay
        self.seed = seed
        self.threads = threads
        self.max_support = max_support
        self.verbose = verbose
        self.device = device

    def _check_params(self) -> None:
        super()._check_params()
        for param in ("batch_size", "patience", "threads"):
            check_number(self.name, param, getattr(self, param), 1, integer=True)
        check_number(self.name, "epochs", self.epochs, 0, integer=True)
        if self.max_support is not None:
            check_number(self.name, "max_support", self.max_support, 0, integer=True)

    def _adaptation(self) -> tuple[list[str], float, int]:
        return [], 0.0, 0

    def _rows(self, train: TaskSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user_x [n, U], item rows [n], ratings [n]) for every rating of the training tasks."""
        assert self.encoder_ is not None
        frame = train.all_ratings()
        users = train.users.drop_duplicates("user_id").sort_values("user_id").reset_index(drop=True)
        table = self.encoder_.encode_users(users)
        uids = users["user_id"].to_numpy(np.int64)
        pos = np.searchsorted(uids, frame["user_id"].to_numpy(np.int64))
        pos = np.clip(pos, 0, max(len(uids) - 1, 0))
        if len(uids) == 0 or np.any(uids[pos] != frame["user_id"].to_numpy(np.int64)):
            raise ConfigError("GlobalModel.fit: some training users are missing from the users table")
        return (torch.from_numpy(table[pos]), torch.from_numpy(self.encoder_.item_rows(frame["item_id"].to_numpy())),
                torch.from_numpy(frame["rating"].to_numpy(np.float32)))

    def _fit(self, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder | None) -> "GlobalModel":
        """Minibatch Adam on all training ratings (MSE); early stopping on validation MAE. The rating
        rows move to the network's device once; minibatches are gathered there."""
        enc = self._require_encoder(encoder)
        seed_everything(int(self.seed), int(self.threads))
        net = self._build_network(enc, self.embedding_dim, self.hidden, self.seed)
        user_x, items, y = self._rows(train)
        if len(y) == 0:
            raise ConfigError(f"{type(self).__name__}.fit: the training split has no ratings")
        self.rating_mean_ = float(y.double().mean())
        net.set_output_bias(self.rating_mean_)
        user_x, items, y = (t.to(net.device) for t in (user_x, items, y))
        val_data = self._encode_split(val) if val is not None and len(val) else None
        params = net.params()
        buffers = net.buffers_dict()
        opt = torch.optim.Adam(params.values(), lr=float(self.global_lr), weight_decay=float(self.weight_decay),
                               fused=True)
        order_rng = rng(int(self.seed), "global-row-order")
        stopper = EarlyStopping(self.patience)
        self.history_ = History()
        for epoch in progress(range(1, int(self.epochs) + 1), self.verbose, desc=type(self).__name__):
            total, n = 0.0, 0
            for block in iterate_batches(len(y), int(self.batch_size), order_rng):
                ix = torch.from_numpy(block).to(net.device)
                x = embed(params, buffers, net.spec, user_x[ix], items[ix][:, None])
                pred = mlp(split_params(params)[1], x, net.spec.n_dense)[:, 0]
                loss = ((pred - y[ix]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(block)
                n += len(block)
            if self._end_epoch(epoch, total / n, val_data, stopper, params):
                break
        self._keep_best(stopper, params)
        return self


class FineTune(GlobalModel):
    """GlobalModel plus per-user fine-tuning of the decision layers on the support set at predict
    time (`steps` SGD steps of size `lr`; `adapt_layers` as in MeLU, None = all dense layers).
    Validation during training uses the unadapted network, exactly as GlobalModel."""

    name = "finetune"
    description = ("transfer-learning baseline: the global rating network trained on all training ratings without "
                   "meta-learning, then fine-tuned for each user by a few SGD steps on its dense layers over that "
                   "user's support ratings")
    _finetuning = True   # False while training: validation uses the unadapted network

    def __init__(self, embedding_dim: int = 32, hidden: Sequence[int] = (64, 64), global_lr: float = 1e-3,
                 batch_size: int = 256, epochs: int = 30, patience: int = 5, weight_decay: float = 0.0,
                 steps: int = 5, lr: float = 0.05, adapt_layers: Sequence[int] | None = None, seed: int = 0,
                 threads: int = 1, max_support: int | None = None, verbose: bool = False,
                 device: str = "auto") -> None:
        super().__init__(embedding_dim=embedding_dim, hidden=hidden, global_lr=global_lr, batch_size=batch_size,
                         epochs=epochs, patience=patience, weight_decay=weight_decay, seed=seed, threads=threads,
                         max_support=max_support, verbose=verbose, device=device)
        self.steps = steps
        self.lr = lr
        self.adapt_layers = adapt_layers

    def _check_params(self) -> None:
        super()._check_params()
        check_number(self.name, "steps", self.steps, 0, integer=True)

    def _adaptation(self) -> tuple[list[str], float, int]:
        if not self._finetuning:
            return [], 0.0, 0
        return self._adapt_layer_names(self.adapt_layers), float(self.lr), int(self.steps)

    def _fit(self, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder | None) -> "FineTune":
        """Train exactly like GlobalModel (validation without fine-tuning)."""
        self._finetuning = False
        try:
            super()._fit(train, val, encoder)
        finally:
            del self._finetuning
        return self
