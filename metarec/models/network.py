"""MeLU's rating network (Lee et al., KDD 2019), written functionally.

The parameters are a flat dict of tensors and the forward is a pure function of (params, buffers,
inputs), so the same code runs under `torch.func.functional_call`, `grad` and `vmap`: the reference
form of MeLU's local update (`inner_adapt`) is a `torch.func.grad` of a masked support loss,
vectorised over the tasks of a batch. What runs by default is the same update in closed form
(`gram.gram_adapt_predict`), which the tests hold to this reference.

Layout: one embedding table per user attribute and per single-valued item feature, and one per
multi-label item feature, mean-pooled over the item's labels (gather + masked mean: padding index 0
is ignored, never a dense multi-hot product). The embeddings are concatenated and fed to the
"decision" layers, dense ReLU layers ending in one output (the rating). Only decision layers are
adapted per user, so the embedding part can be computed once per batch outside the vmap.

Parameter names: `user_emb.{j}.weight`, `item_emb.{j}.weight`, `ml_emb.{j}.weight` (the
"embedding" group) and `dense.{k}.weight`, `dense.{k}.bias` for k = 0..len(hidden) (the
"decision" group; k = len(hidden) is the output layer). Buffers: `item_x` [n_items, n_single] and
`item_ml_{j}` [n_items, width_j], the encoder's item table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from metarec.models.gram import gram_adapt_predict
from metarec.models.pooling import TABLE_FACTOR, gather_rows, item_table

Params = dict[str, Tensor]

EMBEDDING_PREFIXES = ("user_emb.", "item_emb.", "ml_emb.")
DECISION_PREFIX = "dense."


@dataclass(frozen=True)
class NetworkSpec:
    """Shapes of the network: cardinalities come from the FeatureEncoder (index 0 = unknown)."""

    user_cardinalities: tuple[int, ...]
    item_cardinalities: tuple[int, ...]
    multilabel_cardinalities: tuple[int, ...]
    embedding_dim: int = 32
    hidden: tuple[int, ...] = (64, 64)

    @classmethod
    def from_encoder(cls, encoder, embedding_dim: int = 32, hidden: Sequence[int] = (64, 64)) -> "NetworkSpec":
        return cls(tuple(encoder.user_cardinalities()), tuple(encoder.item_cardinalities()),
                   tuple(encoder.multilabel_cardinalities()), int(embedding_dim), tuple(int(h) for h in hidden))

    @property
    def n_dense(self) -> int:
        """Number of dense layers, output layer included."""
        return len(self.hidden) + 1

    @property
    def input_dim(self) -> int:
        n = len(self.user_cardinalities) + len(self.item_cardinalities) + len(self.multilabel_cardinalities)
        return n * self.embedding_dim

    def to_dict(self) -> dict:
        return {"user_cardinalities": list(self.user_cardinalities),
                "item_cardinalities": list(self.item_cardinalities),
                "multilabel_cardinalities": list(self.multilabel_cardinalities),
                "embedding_dim": self.embedding_dim, "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "NetworkSpec":
        return cls(tuple(d["user_cardinalities"]), tuple(d["item_cardinalities"]),
                   tuple(d["multilabel_cardinalities"]), int(d["embedding_dim"]), tuple(d["hidden"]))


def dense_names(spec: NetworkSpec, layers: Sequence[int] | None = None) -> list[str]:
    """Parameter names of the given dense layers (None: all; negative indices count from the output)."""
    n = spec.n_dense
    idx = range(n) if layers is None else sorted({int(k) % n for k in layers})
    if layers is not None:
        for k in layers:
            if not -n <= int(k) < n:
                raise ValueError(f"adapt_layers: layer {k} does not exist (the network has {n} dense layers)")
    return [f"{DECISION_PREFIX}{k}.{p}" for k in idx for p in ("weight", "bias")]


def adapted_layers(adapt: Sequence[str], n_dense: int) -> tuple[int, ...] | None:
    """Indices of the wholly adapted dense layers, or None when `adapt` is not a set of whole
    layers (then only the generic autograd inner loop applies)."""
    layers = []
    for k in range(n_dense):
        has_w = f"{DECISION_PREFIX}{k}.weight" in adapt
        has_b = f"{DECISION_PREFIX}{k}.bias" in adapt
        if has_w != has_b:
            return None
        if has_w:
            layers.append(k)
    if len(layers) * 2 != len(set(adapt)):
        return None
    return tuple(layers)


def split_params(params: Mapping[str, Tensor]) -> tuple[Params, Params]:
    """(embedding, decision) groups of a parameter dict."""
    emb = {k: v for k, v in params.items() if k.startswith(EMBEDDING_PREFIXES)}
    dec = {k: v for k, v in params.items() if k.startswith(DECISION_PREFIX)}
    return emb, dec


# ------------------------------------------------------------------------------------------ pure functions
def embed_parts(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec,
                user_x: Tensor, items: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(user part [B, n_user_attrs * d], item part [B, N, n_item_features * d]) of the input.

    Kept apart so the first dense layer can apply its user columns once per user instead of once
    per (user, item) row: half of the network's multiply-adds in the inner loop. `rows` (bool
    [B, N]): embed only these rows and leave zeros elsewhere (padding). One item set of
    `embed_sets`.
    """
    u, (x,) = embed_sets(params, buffers, spec, user_x, [(items, rows)])
    return u, x


def embed_sets(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec, user_x: Tensor,
               sets: Sequence[tuple[Tensor, Tensor | None]],
               constant: Sequence[bool] = ()) -> tuple[Tensor, list[Tensor]]:
    """The user part [B, Du] and the item part of each item set (items [B, N_i], rows [B, N_i] bool
    or None): [B, N_i, Da] with zeros outside `rows`.

    The sets share one item table: when the catalogue is not much larger than the rows asked for,
    the item part is computed for every item once (`pooling.item_table`, multi-label features as
    a sparse product) and gathered. `constant[i]`: set i is used without its gradient (first-order
    MAML's support rows), so it is gathered from the detached table and sends nothing back.
    """
    B = user_x.shape[0]
    dtype = next(iter(params.values())).dtype
    if spec.user_cardinalities:
        u = torch.cat([F.embedding(user_x[:, j], params[f"user_emb.{j}.weight"])
                       for j in range(len(spec.user_cardinalities))], dim=-1)
    else:
        u = torch.zeros(B, 0, dtype=dtype, device=user_x.device)
    n_single, n_multi = len(spec.item_cardinalities), len(spec.multilabel_cardinalities)
    n_rows = sum(int(r.sum()) if r is not None else i.numel() for i, r in sets)
    use_table = bool(n_single + n_multi) and buffers["item_x"].shape[0] <= TABLE_FACTOR * max(n_rows, 1)
    table = item_table(params, buffers, n_single, n_multi, dtype) if use_table else None   # every item once
    out = []
    for i, (items, rows) in enumerate(sets):
        fixed = i < len(constant) and constant[i]
        if table is not None:                    # padded rows gather item 0, then are zeroed
            src = table.detach() if fixed else table
            x = gather_rows(src, items if rows is None else torch.where(rows, items, 0))
            out.append(x if rows is None else x * rows[..., None].to(x.dtype))
            continue
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fixed):
            if rows is None:
                out.append(_item_rows(params, buffers, spec, items, dtype))
            else:                                # the real rows only: padding is often half a batch
                real = _item_rows(params, buffers, spec, items[rows][None, :], dtype)[0]
                out.append(real.new_zeros(*items.shape, real.shape[-1]).index_put((rows,), real))
    return u, out


def _item_rows(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec, items: Tensor,
               dtype: torch.dtype) -> Tensor:
    """Item part [B, N, Da] straight from the feature tables (catalogues much larger than a batch)."""
    B, N = items.shape
    parts: list[Tensor] = []
    if spec.item_cardinalities:
        ix = buffers["item_x"][items]                                  # [B, N, n_single]
        for j in range(len(spec.item_cardinalities)):
            parts.append(F.embedding(ix[..., j], params[f"item_emb.{j}.weight"]))
    for j in range(len(spec.multilabel_cardinalities)):
        idx = buffers[f"item_ml_{j}"][items]                           # [B, N, L], 0 = pad
        e = F.embedding(idx, params[f"ml_emb.{j}.weight"])             # [B, N, L, d]
        keep = (idx != 0).to(e.dtype)
        pooled = (e * keep[..., None]).sum(-2) / keep.sum(-1, keepdim=True).clamp(min=1.0)
        parts.append(pooled)
    return torch.cat(parts, dim=-1) if parts else torch.zeros(B, N, 0, dtype=dtype, device=items.device)


def embed(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec,
          user_x: Tensor, items: Tensor) -> Tensor:
    """Input features [B, N, input_dim] (user part broadcast over the N items, then item part)."""
    u, i = embed_parts(params, buffers, spec, user_x, items)
    B, N = items.shape
    return torch.cat([u[:, None, :].expand(B, N, u.shape[-1]), i], dim=-1)


def mlp(dense: Mapping[str, Tensor], x: Tensor, n_dense: int, user: Tensor | None = None) -> Tensor:
    """Decision layers: x [..., N, input_dim] -> ratings [..., N].

    With `user` [..., Du], x holds only the item part [..., N, input_dim - Du]: the first layer's
    user columns are applied once and broadcast over the N rows (same function, fewer FLOPs).
    """
    w0, b0 = dense[f"{DECISION_PREFIX}0.weight"], dense[f"{DECISION_PREFIX}0.bias"]
    if user is None:
        h = F.linear(x, w0, b0)
    else:
        du = user.shape[-1]
        h = F.linear(x, w0[:, du:]) + F.linear(user, w0[:, :du], b0).unsqueeze(-2)
    for k in range(1, n_dense):
        h = F.linear(F.relu(h), dense[f"{DECISION_PREFIX}{k}.weight"], dense[f"{DECISION_PREFIX}{k}.bias"])
    return h.squeeze(-1)


def masked_mse(pred: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over real rows; 0 when there are none (so an empty support is a no-op).

    `torch.where` (not a multiplication) keeps whatever sits in padded rows out of the value and
    out of the gradient.
    """
    return task_mse(pred.reshape(1, -1), y.reshape(1, -1), mask.reshape(1, -1))[0]


def task_mse(pred: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """`masked_mse` of each task of a batch [B, N]: [B]."""
    diff = torch.where(mask, pred - y.to(pred.dtype), pred.new_zeros(()))
    return (diff * diff).sum(-1) / mask.sum(-1).clamp(min=1).to(pred.dtype)


def inner_adapt(fast: Params, fixed: Params, x: Tensor, y: Tensor, mask: Tensor, lr: float, steps: int,
                n_dense: int, first_order: bool = False, user: Tensor | None = None) -> Params:
    """MeLU's local update for one task: `steps` SGD steps on the masked support MSE.

    `fast` are the adapted decision parameters, `fixed` the other decision parameters. Written
    for one task; vmap it over tasks. Nested in an outer `torch.func.grad`, the inner gradient is
    differentiated through (exact second-order MAML); with first_order the inner gradients are
    detached, giving first-order MAML. `user`: see `mlp`.
    """
    def support_loss(f: Params) -> Tensor:
        return masked_mse(mlp({**fixed, **f}, x, n_dense, user), y, mask)

    g_fn = grad(support_loss)
    for _ in range(int(steps)):
        g = g_fn(fast)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        fast = {k: fast[k] - lr * g[k] for k in fast}
    return fast


def adapt_predict(fast: Params, fixed: Params, xs: Tensor, ys: Tensor, ms: Tensor, xq: Tensor, lr: float,
                  steps: int, n_dense: int, first_order: bool = False, user: Tensor | None = None) -> Tensor:
    """Adapt on one task's support features, then rate its query features [Q]."""
    f = inner_adapt(fast, fixed, xs, ys, ms, lr, steps, n_dense, first_order, user)
    return mlp({**fixed, **f}, xq, n_dense, user)


def adapt_and_rate(dense: Mapping[str, Tensor], u: Tensor, xs: Tensor, ys: Tensor, ms: Tensor, xq: Tensor,
                   adapt: Sequence[str], lr: float, steps: int, n_dense: int, first_order: bool = False,
                   inner: str = "gram") -> Tensor:
    """Query predictions [B, Q] for a padded batch of tasks, each adapted on its own support set.
    u [B, Du], xs [B, S, Da], ys/ms [B, S], xq [B, Q, Da].

    inner="gram" (the default) uses the closed-form local update (`gram.gram_adapt_predict`,
    written batched) when whole layers are adapted; otherwise, and with inner="autograd" (the
    reference), the update is `torch.func.grad` of the support loss (`inner_adapt`), vmapped over
    tasks. Both compute the same function.
    """
    layers = adapted_layers(adapt, n_dense) if inner == "gram" else None
    if layers is not None:
        W = [dense[f"{DECISION_PREFIX}{k}.weight"] for k in range(n_dense)]
        b = [dense[f"{DECISION_PREFIX}{k}.bias"] for k in range(n_dense)]
        return gram_adapt_predict(W, b, layers, u, xs, ys, ms, xq, lr, steps, first_order)
    fast = {k: dense[k] for k in adapt}
    fixed = {k: v for k, v in dense.items() if k not in fast}

    def one(u_b: Tensor, xs_b: Tensor, ys_b: Tensor, ms_b: Tensor, xq_b: Tensor) -> Tensor:
        return adapt_predict(fast, fixed, xs_b, ys_b, ms_b, xq_b, lr, steps, n_dense, first_order, u_b)

    return vmap(one)(u, xs, ys.to(xs.dtype), ms, xq)


def batched_adapt_predict(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], spec: NetworkSpec,
                          user_x: Tensor, support_items: Tensor, support_y: Tensor, support_mask: Tensor,
                          query_items: Tensor, adapt: Sequence[str], lr: float, steps: int) -> Tensor:
    """Predictions [B, Q] for a padded batch of tasks, each adapted on its own support set.

    Shared by MeLU (local update) and FineTune (per-user fine-tuning); steps=0 is the plain network.
    """
    S = support_items.shape[1]
    u, x = embed_parts(params, buffers, spec, user_x, torch.cat([support_items, query_items], dim=1))
    xs, xq = x[:, :S], x[:, S:]
    _, dense = split_params(params)
    if steps <= 0 or not adapt:
        return mlp(dense, xq, spec.n_dense, u)
    return adapt_and_rate(dense, u, xs, support_y, support_mask, xq, adapt, lr, steps, spec.n_dense)


# ------------------------------------------------------------------------------------------ module
class RatingNetwork(nn.Module):
    """Holds the parameters and the item table buffers; `forward` is the pure function above,
    so `torch.func.functional_call(net, params, (user_x, items))` works with any params dict."""

    def __init__(self, spec: NetworkSpec, item_x: Tensor, item_ml: Sequence[Tensor],
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if len(item_ml) != len(spec.multilabel_cardinalities):
            raise ValueError("one multi-label table is needed per multi-label feature")
        self.spec = spec
        d = spec.embedding_dim
        self.user_emb = nn.ModuleList([nn.Embedding(c, d) for c in spec.user_cardinalities])
        self.item_emb = nn.ModuleList([nn.Embedding(c, d) for c in spec.item_cardinalities])
        self.ml_emb = nn.ModuleList([nn.Embedding(c, d) for c in spec.multilabel_cardinalities])
        dims = [spec.input_dim, *spec.hidden, 1]
        self.dense = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.register_buffer("item_x", item_x.to(torch.long).clone())
        for j, t in enumerate(item_ml):
            self.register_buffer(f"item_ml_{j}", t.to(torch.long).clone())
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Seeded init: embeddings N(0, 0.1^2) (small, so that the 8-way concatenation starts at a
        moderate scale), dense layers PyTorch's default Kaiming-uniform."""
        for table in (*self.user_emb, *self.item_emb, *self.ml_emb):
            table.weight.normal_(0.0, 0.1, generator=generator)
        for lin in self.dense:
            fan_in = lin.weight.shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def set_output_bias(self, value: float) -> None:
        """Start predictions near the training mean rating instead of near 0."""
        self.dense[-1].bias.fill_(float(value))

    @property
    def device(self) -> torch.device:
        """Where the parameters and item tables live (`.to(device)` moves them all)."""
        return self.item_x.device

    def params(self) -> Params:
        return dict(self.named_parameters())

    def buffers_dict(self) -> dict[str, Tensor]:
        return dict(self.named_buffers())

    def forward(self, user_x: Tensor, items: Tensor) -> Tensor:
        """Ratings [B, N] for users user_x [B, U] and item rows items [B, N]."""
        params = self.params()
        x = embed(params, self.buffers_dict(), self.spec, user_x, items)
        return mlp(split_params(params)[1], x, self.spec.n_dense)
