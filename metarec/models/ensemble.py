"""The support-set ensemble: many small per-user (or per-cluster) models, combined per new user.

Idea: a new user's support set tells us which existing users they resemble. Each base learner is a
small model of item features -> rating trained on one training user's ratings (group_by="user")
or on the pooled ratings of one KMeans cluster of users (group_by="cluster"). For a new user, every
base learner predicts the support items; learners that fit the support well get more say:

- combine="weighted": weights = softmax(-mse_b / temperature), mse_b = learner b's MSE on the
  support. temperature -> 0 picks the best learner, temperature -> inf is the plain average; an
  empty support gives equal losses, hence the plain average.
- combine="stacking": a scikit-learn Ridge(alpha) fitted on the support with the learners'
  predictions as features, applied to the candidates. With fewer than two support ratings a
  regression is meaningless, so it falls back to the weighted average (uniform when empty).

Base learner (per learner, parameters stacked along a leading learner axis): an embedding per item
feature of the FeatureEncoder item table (item_id, 0 = unknown; single-valued features such as the
release-year bucket; multi-label features such as genres, mean-pooled over labels), then either a
linear read-out (hidden=0: scalar embeddings summed plus a bias, i.e. a linear model on the
one-hot features) or a one-hidden-layer MLP. item_id embeddings start at zero, so an item the
learner never saw contributes nothing and is predicted from its other features only.

All learners train together as batched tensors (padded per-learner rows with masks, full-batch
Adam): the loss is the sum of per-learner mean losses and Adam is elementwise, so each learner
follows exactly the path it would follow alone (tests check this), while ML-100K's ~600 users
train in seconds. Each learner early-stops on its own held-out slice (`holdout`) and keeps its
best parameters. User attributes are used only for clustering; predictions depend on the
support alone. `device` ("auto", "cpu" or "cuda"; `metarec.models.device`) is where the learners
train and rate the catalogue; learners are initialised on the CPU, and everything after the
catalogue table (the per-user combination) is NumPy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from metarec.errors import ConfigError
from metarec.features import PAD, FeatureEncoder
from metarec.io import atomic_write_bytes, atomic_write_json
from metarec.models.base import CONFIG, Estimator, check_choice, check_number
from metarec.models.device import device_record, resolve_device, to_numpy
from metarec.seeding import rng as named_rng
from metarec.tasks import Task, TaskSet

GROUP_BY = ("user", "cluster")
COMBINE = ("weighted", "stacking")
MAX_ONEHOT_CARDINALITY = 50  # attributes with more values (e.g. zip codes) are left out of clustering


# ---------------------------------------------------------------------------------------- base learners
def init_params(n: int, item_names: Sequence[str], item_cards: Sequence[int], ml_names: Sequence[str],
                ml_cards: Sequence[int], hidden: int, emb_dim: int, bias: torch.Tensor,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Stacked parameters of n learners. `bias` [n]: each learner's starting output (its mean rating)."""
    d = 1 if hidden == 0 else emb_dim
    params: dict[str, torch.Tensor] = {}
    for name, card in zip(item_names, item_cards):
        if name == "item_id" or hidden == 0:
            params[f"emb.{name}"] = torch.zeros(n, card, d)
        else:
            params[f"emb.{name}"] = torch.randn(n, card, d, generator=generator) * 0.1
    for name, card in zip(ml_names, ml_cards):
        params[f"ml.{name}"] = (torch.zeros(n, card, d) if hidden == 0
                                else torch.randn(n, card, d, generator=generator) * 0.1)
    if hidden == 0:
        params["bias"] = bias.clone().float()
    else:
        k = (len(item_names) + len(ml_names)) * d
        params["w1"] = torch.randn(n, k, hidden, generator=generator) * math.sqrt(2.0 / max(k, 1))
        params["b1"] = torch.zeros(n, hidden)
        params["w2"] = torch.randn(n, hidden, generator=generator) * math.sqrt(1.0 / hidden)
        params["b2"] = bias.clone().float()
    return params


def forward(params: dict[str, torch.Tensor], item_x: torch.Tensor, item_ml: dict[str, torch.Tensor],
            item_names: Sequence[str], ml_names: Sequence[str], rows: torch.Tensor) -> torch.Tensor:
    """Predictions [n, N] of n stacked learners, learner b on item-table rows rows[b]."""
    n, width = rows.shape
    feats = []
    x = item_x[rows]  # [n, N, F]
    # gather along the learner's own table; its backward is a scatter-add, much faster on CPU
    # than embedding_dense_backward for these many small tables
    for f, name in enumerate(item_names):
        table = params[f"emb.{name}"]
        idx = x[..., f].unsqueeze(-1).expand(n, width, table.shape[2])
        feats.append(torch.gather(table, 1, idx))
    for name in ml_names:
        table = params[f"ml.{name}"]
        labels = item_ml[name][rows]  # [n, N, L]
        n_lab = labels.shape[2]
        idx = labels.reshape(n, width * n_lab, 1).expand(n, width * n_lab, table.shape[2])
        e = torch.gather(table, 1, idx).reshape(n, width, n_lab, table.shape[2])
        mask = (labels != PAD).unsqueeze(-1).to(e.dtype)
        feats.append((e * mask).sum(2) / mask.sum(2).clamp(min=1.0))
    if "bias" in params:
        out = params["bias"].unsqueeze(1)
        for f in feats:
            out = out + f.squeeze(-1)
        return out
    z = torch.cat(feats, dim=-1)
    h = torch.relu(torch.einsum("bnk,bkh->bnh", z, params["w1"]) + params["b1"].unsqueeze(1))
    return torch.einsum("bnh,bh->bn", h, params["w2"]) + params["b2"].unsqueeze(1)


@dataclass
class LearnerData:
    """Each learner's rows (item-table rows, ratings, held-out flags), packed for batched training.

    Learners are sorted by size into buckets of similar length and padded per bucket, so padding
    stays small even when one user has 700 ratings and most have 50. `buckets` holds, per bucket,
    (learner indices, rows [nb, w], ratings [nb, w], train mask, held-out mask).
    """

    n_learners: int
    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, rows: Sequence[np.ndarray], ratings: Sequence[np.ndarray], held_out: Sequence[np.ndarray],
              max_buckets: int = 16) -> "LearnerData":
        n = len(rows)
        order = np.argsort(np.array([len(r) for r in rows]), kind="stable")
        size = max(1, math.ceil(n / max_buckets))
        buckets = []
        for start in range(0, n, size):
            idx = order[start: start + size]
            width = max(max(len(rows[i]) for i in idx), 1)
            r_t = torch.zeros(len(idx), width, dtype=torch.long)
            y_t = torch.zeros(len(idx), width)
            tm = torch.zeros(len(idx), width, dtype=torch.bool)
            vm = torch.zeros(len(idx), width, dtype=torch.bool)
            for j, i in enumerate(idx):
                k = len(rows[i])
                r_t[j, :k] = torch.from_numpy(np.asarray(rows[i], dtype=np.int64))
                y_t[j, :k] = torch.from_numpy(np.asarray(ratings[i], dtype=np.float32))
                tm[j, :k] = torch.from_numpy(~np.asarray(held_out[i], dtype=bool))
                vm[j, :k] = torch.from_numpy(np.asarray(held_out[i], dtype=bool))
            buckets.append((torch.from_numpy(idx.astype(np.int64)), r_t, y_t, tm, vm))
        return cls(n, buckets)

    def train_means(self) -> torch.Tensor:
        """Each learner's mean training rating (its starting output), on the CPU."""
        out = torch.zeros(self.n_learners, device="cpu")
        for idx, _, y, tm, _ in self.buckets:
            out[idx] = (y * tm).sum(1) / tm.sum(1).clamp(min=1)
        return out

    def to(self, device: torch.device) -> "LearnerData":
        """The same data with every bucket's tensors on `device`."""
        return LearnerData(self.n_learners, [tuple(t.to(device) for t in b) for b in self.buckets])


def train_learners(params: dict[str, torch.Tensor], item_x: torch.Tensor, item_ml: dict[str, torch.Tensor],
                   item_names: Sequence[str], ml_names: Sequence[str], data: LearnerData, *, lr: float,
                   weight_decay: float, max_epochs: int, patience: int
                   ) -> tuple[dict[str, torch.Tensor], list[dict], torch.Tensor]:
    """Full-batch Adam on all learners at once, each early-stopped on its own held-out rows.

    The loss is the sum of per-learner mean squared errors, so learner b's gradient (and, Adam
    being elementwise, its whole trajectory) is what it would be if trained alone. A learner
    without held-out rows is judged on its training loss. Returns each learner's best parameters
    (those before the update of its best epoch), the history (mean losses over learners per
    epoch) and each learner's best epoch. Everything runs on the device of `item_x`, where the
    parameters and `data` must already be.
    """
    n = data.n_learners
    device = item_x.device
    # one set of leaf tensors per bucket: each bucket's gradient stays its own size (no scatter
    # into the full stacked tensors), and Adam, being elementwise, is unaffected by the split
    leaves = [{k: v.detach().index_select(0, b[0]).clone().requires_grad_(True) for k, v in params.items()}
              for b in data.buckets]
    best = [{k: v.detach().clone() for k, v in p.items()} for p in leaves]
    n_val = [b[4].sum(1).to(torch.float32) for b in data.buckets]
    has_val = [nv > 0 for nv in n_val]
    best_loss = [torch.full((len(b[0]),), math.inf, device=device) for b in data.buckets]
    best_epoch = [torch.zeros(len(b[0]), dtype=torch.long, device=device) for b in data.buckets]
    bad = [torch.zeros(len(b[0]), dtype=torch.long, device=device) for b in data.buckets]
    no_decay = {"bias", "b1", "b2"}  # L2 on output offsets would pull predictions toward rating 0
    opt = torch.optim.Adam(
        [{"params": [v for k, v in p.items() if k not in no_decay], "weight_decay": weight_decay} for p in leaves]
        + [{"params": [v for k, v in p.items() if k in no_decay], "weight_decay": 0.0} for p in leaves],
        lr=lr)
    history: list[dict] = []
    for epoch in range(max_epochs):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        t_all, v_all = [], []
        done = True
        for j, (idx, rows, y, tm, vm) in enumerate(data.buckets):
            p = leaves[j]
            err = (forward(p, item_x, item_ml, item_names, ml_names, rows) - y) ** 2
            train_loss = (err * tm).sum(1) / tm.sum(1).clamp(min=1)
            total = total + train_loss.sum()
            with torch.no_grad():
                tl = train_loss.detach()
                val_loss = torch.where(has_val[j], (err.detach() * vm).sum(1) / n_val[j].clamp(min=1.0), tl)
                improved = val_loss < best_loss[j]
                for k, v in p.items():
                    best[j][k] = torch.where(improved.view(-1, *([1] * (v.dim() - 1))), v.detach(), best[j][k])
                best_loss[j] = torch.where(improved, val_loss, best_loss[j])
                best_epoch[j] = torch.where(improved, torch.full_like(best_epoch[j], epoch), best_epoch[j])
                bad[j] = torch.where(improved, torch.zeros_like(bad[j]), bad[j] + 1)
                done = done and bool((bad[j] >= patience).all())
                t_all.append(tl)
                v_all.append(val_loss[has_val[j]])
        vcat = torch.cat(v_all)
        history.append({"epoch": epoch, "train_loss": float(torch.cat(t_all).mean()),
                        "val_loss": float(vcat.mean()) if len(vcat) else float(torch.cat(t_all).mean())})
        if done:
            break
        total.backward()
        opt.step()
    order = torch.cat([b[0] for b in data.buckets])
    inverse = torch.empty(n, dtype=torch.long, device=device)
    inverse[order] = torch.arange(n, device=device)
    out = {k: torch.cat([b[k] for b in best])[inverse] for k in params}
    return out, history, torch.cat(best_epoch)[inverse]


def combine_weights(losses: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(-losses / temperature); temperature 0 = argmin (ties share), inf = uniform."""
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) == 0:
        return losses
    if math.isinf(temperature):
        return np.full(len(losses), 1.0 / len(losses))
    if temperature <= 0:
        w = (losses == losses.min()).astype(np.float64)
        return w / w.sum()
    z = np.exp(-(losses - losses.min()) / temperature)
    return z / z.sum()


# ---------------------------------------------------------------------------------------- the ensemble
class SupportSetEnsemble(Estimator):
    """Per-user or per-cluster base learners, combined by their fit to a new user's support.

    Parameters: group_by ("user" | "cluster"), n_clusters (KMeans clusters for "cluster"),
    hidden (0 = linear base learner, else MLP width), emb_dim (MLP embedding size), lr,
    weight_decay (Adam's L2), max_epochs, patience (early stopping, in epochs), holdout (fraction
    of each learner's rows held out for early stopping), min_ratings (groups with fewer training
    ratings get no learner), combine ("weighted" | "stacking"), temperature, alpha (Ridge), seed,
    device ("auto" | "cpu" | "cuda": where the learners train and rate the catalogue).

    Defaults were chosen on ML-100K validation users only (two random user splits, val-query
    MAE): 50 clusters + stacking (alpha 30) was best on average; per-user learners with
    stacking (alpha 100) were within 0.01 MAE, the weighted rule ~0.03 behind (best temperature
    0.03, kept as the fallback's temperature).
    """

    name = "ensemble"
    description = ("support-set ensemble (not meta-learned): small models of item features to rating, one per "
                   "cluster of training users or per training user, combined for each new user according to how "
                   "well they predict that user's support ratings (ridge stacking, or a softmax of their errors)")
    encoder_: FeatureEncoder | None = None
    params_: dict[str, torch.Tensor] | None = None
    val_mae_: float | None = None
    fitted_on_: dict[str, str | None] | None = None
    _item_pred: np.ndarray | None = None

    def __init__(self, group_by: str = "cluster", n_clusters: int = 50, hidden: int = 0, emb_dim: int = 8,
                 lr: float = 0.05, weight_decay: float = 1e-3, max_epochs: int = 200, patience: int = 10,
                 holdout: float = 0.2, min_ratings: int = 5, combine: str = "stacking", temperature: float = 0.03,
                 alpha: float = 30.0, seed: int = 0, device: str = "auto") -> None:
        self.group_by, self.n_clusters = group_by, n_clusters
        self.hidden, self.emb_dim = hidden, emb_dim
        self.lr, self.weight_decay = lr, weight_decay
        self.max_epochs, self.patience = max_epochs, patience
        self.holdout, self.min_ratings = holdout, min_ratings
        self.combine, self.temperature, self.alpha = combine, temperature, alpha
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        resolve_device(self.name, self.device)
        check_choice("ensemble", "group_by", self.group_by, GROUP_BY)
        check_choice("ensemble", "combine", self.combine, COMBINE)
        check_number("ensemble", "holdout", self.holdout, 0.0, 1.0, high_open=True)
        for param in ("n_clusters", "max_epochs", "patience"):
            check_number("ensemble", param, getattr(self, param), 1, integer=True)
        for param in ("hidden", "emb_dim", "min_ratings", "seed"):
            check_number("ensemble", param, getattr(self, param), 0, integer=True)
        for param in ("lr", "weight_decay", "temperature", "alpha"):
            check_number("ensemble", param, getattr(self, param), 0.0)

    # -------------------------------------------------------------- grouping
    def _cluster_features(self, ratings: pd.DataFrame, users: pd.DataFrame, user_ids: np.ndarray) -> np.ndarray:
        """User attribute one-hots + standardised rating profile (mean rating, mean centred rating
        per multi-label value, e.g. per genre). The profile block is scaled to weigh as much as
        the attribute blocks together; near-unique attributes (zip) are left out."""
        enc = self.encoder_
        attrs = users.set_index("user_id").reindex(user_ids).reset_index()
        codes = enc.encode_users(attrs)
        blocks = []
        for j, card in enumerate(enc.user_cardinalities()):
            if card <= MAX_ONEHOT_CARDINALITY + 1:
                blocks.append(np.eye(card)[codes[:, j]])
        pos = {int(u): i for i, u in enumerate(user_ids)}
        ui = ratings["user_id"].map(pos).to_numpy()
        rows = enc.item_rows(ratings["item_id"].to_numpy())
        r = ratings["rating"].to_numpy(np.float64)
        n_users = len(user_ids)
        cnt = np.bincount(ui, minlength=n_users).astype(np.float64)
        mean = np.bincount(ui, weights=r, minlength=n_users) / np.maximum(cnt, 1)
        centred = r - mean[ui]
        profile = [mean[:, None]]
        for name in enc.item_multilabel:
            table = enc.item_ml[name]
            n_labels = int(table.max()) + 1 if table.size else 1
            hot = np.zeros((len(table), n_labels))
            np.put_along_axis(hot, table, 1.0, axis=1)
            hot[:, PAD] = 0.0
            h = hot[rows]
            s = np.zeros((n_users, n_labels))
            c = np.zeros((n_users, n_labels))
            np.add.at(s, ui, h * centred[:, None])
            np.add.at(c, ui, h)
            keep = c.sum(0) > 0
            profile.append((s / np.maximum(c, 1))[:, keep])
        prof = np.concatenate(profile, axis=1)
        std = prof.std(0)
        prof = (prof - prof.mean(0)) / np.where(std > 0, std, 1.0)
        prof *= math.sqrt(max(len(blocks), 1) / prof.shape[1])
        return np.concatenate(blocks + [prof], axis=1)

    def _groups(self, ratings: pd.DataFrame, users: pd.DataFrame) -> list[np.ndarray]:
        counts = ratings.groupby("user_id").size()
        user_ids = np.sort(counts.index.to_numpy(np.int64))
        if self.group_by == "user":
            return [np.array([u]) for u in user_ids if counts[u] >= self.min_ratings]
        from sklearn.cluster import KMeans

        k = max(1, min(self.n_clusters, len(user_ids)))
        labels = KMeans(n_clusters=k, random_state=self.seed, n_init=10).fit_predict(
            self._cluster_features(ratings, users, user_ids))
        groups = [user_ids[labels == c] for c in range(k)]
        return [g for g in groups if len(g) and counts[g].sum() >= self.min_ratings]

    # -------------------------------------------------------------- fitting
    def _item_tensors(self, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc = self.encoder_
        return (torch.from_numpy(enc.item_x).to(device),
                {n: torch.from_numpy(enc.item_ml[n]).to(device) for n in enc.item_multilabel})

    def _learner_data(self, ratings: pd.DataFrame) -> LearnerData:
        """Each learner's rows and the seeded held-out split of them."""
        by_user = {int(u): g for u, g in ratings.groupby("user_id")}
        split_rng = named_rng(self.seed, "ensemble-holdout")
        row_lists, y_lists, val_lists = [], [], []
        for group in self.groups_:
            g = pd.concat([by_user[int(u)] for u in group], ignore_index=True)
            n = len(g)
            n_val = int(math.floor(self.holdout * n))
            if self.holdout > 0 and n >= 2:
                n_val = max(1, min(n_val, n - 1))
            is_val = np.zeros(n, dtype=bool)
            is_val[split_rng.permutation(n)[:n_val]] = True
            row_lists.append(self.encoder_.item_rows(g["item_id"].to_numpy()))
            y_lists.append(g["rating"].to_numpy(np.float32))
            val_lists.append(is_val)
        return LearnerData.build(row_lists, y_lists, val_lists)

    def _fit(self, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder | None) -> "SupportSetEnsemble":
        """Train one learner per training user / cluster on its support+query training rows.

        `encoder` (the split's FeatureEncoder) is required: it defines the item features. `val`, if
        given, is only scored (val_mae_), never trained on.
        """
        self.encoder_ = encoder = self._require_encoder(encoder)
        ratings = train.all_ratings()[["user_id", "item_id", "rating"]].copy()
        ratings = ratings.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
        if ratings.empty:
            raise ConfigError("ensemble: the training split has no ratings.")
        self.groups_ = self._groups(ratings, train.users)
        if not self.groups_:
            raise ConfigError(f"ensemble: no training user/cluster has min_ratings={self.min_ratings} ratings.")
        device = resolve_device(self.name, self.device)
        # Packed and initialised on the CPU (the CPU generator: one seed, the same learners on any
        # device), then moved.
        with torch.device("cpu"):
            data = self._learner_data(ratings)
            init = init_params(len(self.groups_), encoder.item_names, encoder.item_cardinalities(),
                               encoder.item_multilabel, encoder.multilabel_cardinalities(), self.hidden,
                               self.emb_dim, data.train_means(), torch.Generator().manual_seed(self.seed))
        item_x, item_ml = self._item_tensors(device)
        self.fitted_on_ = device_record(device)
        self.params_, self.history_, _ = train_learners(
            {k: v.to(device) for k, v in init.items()}, item_x, item_ml, encoder.item_names,
            encoder.item_multilabel, data.to(device),
            lr=self.lr, weight_decay=self.weight_decay, max_epochs=self.max_epochs, patience=self.patience)
        self._item_pred = None
        self.val_mae_ = None
        if val is not None and len(val):
            truth = val.tasks_with_truth()
            pred = np.concatenate(self.predict([t for t, _ in truth]))
            self.val_mae_ = float(np.mean(np.abs(pred - np.concatenate([q for _, q in truth]))))
        return self

    # -------------------------------------------------------------- prediction
    def item_predictions(self) -> np.ndarray:
        """[n_learners, n_items in the encoder's item table]: every learner's rating of every item,
        computed on the device `device` resolves to now (the parameters move there once)."""
        if self.params_ is None or self.encoder_ is None:
            raise ConfigError("ensemble: call fit() (or load()) before predict().")
        if self._item_pred is None:
            device = resolve_device(self.name, self.device)
            self.params_ = {k: v.to(device) for k, v in self.params_.items()}
            item_x, item_ml = self._item_tensors(device)
            n_items = len(self.encoder_.item_ids)
            names, ml = self.encoder_.item_names, self.encoder_.item_multilabel
            out = []
            step = max(1, 2_000_000 // max(n_items * max(self.emb_dim, 1), 1))
            with torch.no_grad():
                for start in range(0, len(self.groups_), step):
                    p = {k: v[start: start + step] for k, v in self.params_.items()}
                    n = next(iter(p.values())).shape[0]
                    rows = torch.arange(n_items, device=device).expand(n, n_items)
                    out.append(to_numpy(forward(p, item_x, item_ml, names, ml, rows).double()))
            self._item_pred = np.concatenate(out, axis=0)
        return self._item_pred

    def base_predictions(self, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """(learners' predictions of the support items [B, S], of the candidates [B, C])."""
        p = self.item_predictions()
        s = self.encoder_.item_rows(np.asarray(task.support_items, dtype=np.int64))
        c = self.encoder_.item_rows(np.asarray(task.candidates, dtype=np.int64))
        return p[:, s], p[:, c]

    def support_losses(self, task: Task) -> np.ndarray:
        """Each learner's MSE on the task's support set (zeros for an empty support)."""
        ps, _ = self.base_predictions(task)
        y = np.asarray(task.support_ratings, dtype=np.float64)
        return ((ps - y) ** 2).mean(1) if len(y) else np.zeros(ps.shape[0])

    def _predict_one(self, task: Task) -> np.ndarray:
        ps, pc = self.base_predictions(task)
        y = np.asarray(task.support_ratings, dtype=np.float64)
        if self.combine == "stacking" and len(y) >= 2:
            from sklearn.linear_model import Ridge

            pred = Ridge(alpha=self.alpha).fit(ps.T, y).predict(pc.T)
        else:
            losses = ((ps - y) ** 2).mean(1) if len(y) else np.zeros(ps.shape[0])
            pred = combine_weights(losses, self.temperature) @ pc
        spec = self.encoder_.spec
        return np.clip(pred, spec.rating_min, spec.rating_max)

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """Combined predictions for each task's candidates (clipped to the rating scale)."""
        return [self._predict_one(t) for t in tasks]

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """weights.safetensors (stacked learner parameters, as CPU tensors, and group membership),
        config.json (hyperparameters, encoder, the device it was fitted on), history.json (per-epoch
        mean train/held-out loss)."""
        from safetensors.torch import save as st_save

        if self.params_ is None or self.encoder_ is None:
            raise ConfigError("ensemble: nothing to save; call fit() first.")
        d = Path(directory)
        sizes = np.array([len(g) for g in self.groups_], dtype=np.int64)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.params_.items()}
        tensors["groups.users"] = torch.from_numpy(np.concatenate(self.groups_).astype(np.int64))
        tensors["groups.sizes"] = torch.from_numpy(sizes)
        atomic_write_bytes(d / "weights.safetensors", st_save(tensors))
        atomic_write_json(d / CONFIG, {"model": self.name, "params": self.config_params(),
                                              "encoder": json.loads(self.encoder_.to_json()),
                                              "val_mae": self.val_mae_, "fitted_on": self.fitted_on_})
        atomic_write_json(d / "history.json", self.history_)

    @classmethod
    def load(cls, directory: str | Path, train: TaskSet | None = None) -> "SupportSetEnsemble":
        from safetensors.torch import load as st_load

        d = Path(directory)
        config = cls.read_config(d)
        model = cls.from_config_params(config["params"])
        model.encoder_ = FeatureEncoder.from_json(json.dumps(config["encoder"]))
        tensors = st_load((d / "weights.safetensors").read_bytes())
        users, sizes = tensors.pop("groups.users").numpy(), tensors.pop("groups.sizes").numpy()
        model.groups_ = [a.copy() for a in np.split(users, np.cumsum(sizes)[:-1])]
        model.params_ = tensors
        model.val_mae_ = config.get("val_mae")
        model.fitted_on_ = config.get("fitted_on")
        history = d / "history.json"
        model.history_ = json.loads(history.read_text()) if history.exists() else []
        return model
