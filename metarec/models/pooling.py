"""Item embeddings as one table per batch, with multi-label features mean-pooled by a sparse product.

Why: gathering [rows, labels, d] embeddings and scatter-adding their gradient back was the largest
fixed cost of a meta-batch (for MeLU's actor feature, 8,030 labels and up to ten per item, 1.7 ms
of a 13 ms first-order step on ML-1M shapes; the sparse product below takes about 0.3 ms), and a
meta-batch of 32 tasks rates about as many (user, item) rows as the catalogue has items. So the
item part of the input is computed for every item once per batch and the rows are a plain gather
of that table. Each multi-label feature is the product of a constant sparse matrix A (items x
labels, 1 / label count at each of an item's labels: the mean over its labels, the padding label 0
left out) with the embedding table, and its gradient is A^T times the incoming gradient: both are
sparse-dense products over the nonzeros only. A and A^T are built once per item table and cached.

The result is the same function as the per-row gather in `network.embed_parts` (the tests check
values and gradients); that path stays for catalogues much larger than a batch.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# Compute the whole item table when the catalogue has at most this many items per embedded row.
TABLE_FACTOR = 4

# id(label table) -> (weak reference to it, {(version, n_labels, dtype): (A, A^T)}); tensors compare
# elementwise, so they cannot key a WeakKeyDictionary. An entry leaves with its table.
_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


class _Pooling:
    """The constant pair (A, A^T), handed to the autograd function as one opaque object so that
    torch.func transforms do not try to wrap sparse tensors (they cannot)."""

    __slots__ = ("a", "a_t")

    def __init__(self, a: Tensor, a_t: Tensor) -> None:
        self.a, self.a_t = a, a_t

    def transposed(self) -> "_Pooling":
        return _Pooling(self.a_t, self.a)


class _SparseProducts(torch.autograd.Function):
    """[A_1 @ W_1 | A_2 @ W_2 | ...] with every A_j constant and sparse, side by side; the
    backward is A_j^T @ (its block of the gradient). One function for all the features, because
    each application of an autograd.Function costs about as much as a product of this size."""

    @staticmethod
    def forward(pools: tuple[_Pooling, ...], *weights: Tensor) -> Tensor:
        return torch.cat([torch.sparse.mm(p.a, w) for p, w in zip(pools, weights)], dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.pools = inputs[0]
        ctx.widths = [w.shape[1] for w in inputs[1:]]

    @staticmethod
    def backward(ctx, grad: Tensor):
        blocks = [g.contiguous() for g in grad.split(ctx.widths, dim=1)]
        if torch._C._are_functorch_transforms_active():
            # Under torch.func the products must see plain tensors: apply this function again,
            # with A and A^T swapped (which also keeps it differentiable).
            grads = [_SparseProducts.apply((p.transposed(),), g) for p, g in zip(ctx.pools, blocks)]
        else:
            grads = [torch.sparse.mm(p.a_t, g) for p, g in zip(ctx.pools, blocks)]
        return (None, *grads)


def pooling_matrices(labels: Tensor, n_labels: int, dtype: torch.dtype) -> _Pooling:
    """(A, A^T) in CSR for a padded label table [n_items, width] (0 = no label): row i of A holds
    1 / (number of labels of item i) at each of its labels. Cached per table, version and dtype."""
    key = (labels._version, int(n_labels), dtype)
    entry = _CACHE.get(id(labels))
    if entry is None or entry[0]() is not labels:
        entry = (weakref.ref(labels, lambda _, k=id(labels): _CACHE.pop(k, None)), {})
        _CACHE[id(labels)] = entry
    if key in entry[1]:
        return entry[1][key]
    n_items, width = labels.shape
    keep = labels != 0
    rows = torch.arange(n_items)[:, None].expand(n_items, width)[keep]
    cols = labels[keep].to(torch.long)
    counts = keep.sum(1).clamp(min=1).to(dtype)
    vals = (1.0 / counts)[rows]
    # Built outside any torch.func transform (under one, sparse layouts cannot be created): A is a
    # constant of the data, not a function of the parameters.
    with warnings.catch_warnings(), torch._C._DisableFuncTorch():
        warnings.simplefilter("ignore", UserWarning)   # "sparse CSR support is in beta": products only, tested
        a = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n_items, n_labels)).coalesce()
        a_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n_labels, n_items)).coalesce()
        pair = _Pooling(a.to_sparse_csr(), a_t.to_sparse_csr())
    entry[1][key] = pair
    return pair


def item_table(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], n_single: int, n_multi: int,
               dtype: torch.dtype) -> Tensor:
    """Item part of the input for every item of the catalogue: [n_items, (n_single + n_multi) * d]."""
    parts: list[Tensor] = []
    for j in range(n_single):
        parts.append(F.embedding(buffers["item_x"][:, j], params[f"item_emb.{j}.weight"]))
    weights: list[Tensor] = []
    pools: list[_Pooling] = []
    for j in range(n_multi):
        weights.append(params[f"ml_emb.{j}.weight"])
        pools.append(pooling_matrices(buffers[f"item_ml_{j}"], weights[-1].shape[0], dtype))
    if pools:
        parts.append(_SparseProducts.apply(tuple(pools), *weights))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
