"""Item embeddings as one table per batch: every item feature a sparse product, rows gathered.

Why: gathering [rows, labels, d] embeddings and scatter-adding their gradient back was the largest
fixed cost of a meta-batch (MeLU's actor feature has 8,030 labels and up to ten per item;
docs/PERFORMANCE.md has the measurements), and a meta-batch of 32 tasks rates about as many (user,
item) rows as the catalogue has items. So the item part of the input is computed for every item once
per batch and the rows are a gather of that table. Each multi-label feature is the product of a
constant sparse matrix A (items x labels, 1 / label count at each of an item's labels: the mean over
its labels, the padding label 0 left out) with the embedding table, and its gradient is A^T times
the incoming gradient: both are sparse-dense products over the nonzeros only. A single-valued
feature is the same product with a one-hot A, so all features share one autograd function. A and A^T
are built once per item table and cached. The rows' gradient goes back to the table through
`index_add_` (`gather_rows`).

The result is the same function as the per-row gather in `network.embed_parts` (the tests check
values and gradients); that path stays for catalogues much larger than a batch.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Mapping

import torch
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


class _Gather(torch.autograd.Function):
    """table[index] for any index shape, with the gradient scattered back by `index_add_`:
    `F.embedding`'s dense backward adds one row at a time through a generic kernel, which measured
    slower for a meta-batch's rows of the item table (where this is used). Same values and the same
    gradient (the tests compare both with `F.embedding`)."""

    @staticmethod
    def forward(table: Tensor, index: Tensor) -> Tensor:
        return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.n_rows = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1]).contiguous()     # index_add_ is slow on strided rows
        return flat.new_zeros(ctx.n_rows, flat.shape[1]).index_add(0, index.reshape(-1), flat), None


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """Rows of a 2-D table by an integer index of any shape: [*index.shape, table.shape[1]]."""
    return _Gather.apply(table, index)


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


def pooling_matrices(labels: Tensor, n_labels: int, dtype: torch.dtype, column: int | None = None) -> _Pooling:
    """(A, A^T) in CSR for a padded label table [n_items, width] (0 = no label): row i of A holds
    1 / (number of labels of item i) at each of its labels. With `column`, A is instead the one-hot
    matrix of that column of a table of single-valued features (0 = unknown, a category like any
    other), so that a plain lookup is the same product. Cached per table, column, version, dtype."""
    key = (labels._version, int(n_labels), dtype, column)
    entry = _CACHE.get(id(labels))
    if entry is None or entry[0]() is not labels:
        entry = (weakref.ref(labels, lambda _, k=id(labels): _CACHE.pop(k, None)), {})
        _CACHE[id(labels)] = entry
    if key in entry[1]:
        return entry[1][key]
    n_items, width = labels.shape
    device = labels.device                    # A lives where the item table does (CPU or GPU)
    if column is None:
        keep = labels != 0
        rows = torch.arange(n_items, device=device)[:, None].expand(n_items, width)[keep]
        cols = labels[keep].to(torch.long)
        vals = (1.0 / keep.sum(1).clamp(min=1).to(dtype))[rows]
    else:
        rows, cols = torch.arange(n_items, device=device), labels[:, column].to(torch.long)
        vals = torch.ones(n_items, dtype=dtype, device=device)
    # Built outside any torch.func transform (under one, sparse layouts cannot be created): A is a
    # constant of the data, not a function of the parameters.
    with warnings.catch_warnings(), torch._C._DisableFuncTorch():
        warnings.simplefilter("ignore", UserWarning)   # "sparse CSR support is in beta": products only, tested
        a = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n_items, n_labels), device=device).coalesce()
        a_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n_labels, n_items), device=device).coalesce()
        pair = _Pooling(_csr32(a), _csr32(a_t))
    entry[1][key] = pair
    return pair


def _csr32(coo: Tensor) -> Tensor:
    """CSR with 32-bit indices: MKL's sparse product takes those, and converts 64-bit ones on
    every call (a copy of both index arrays per product)."""
    csr = coo.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                   csr.values(), csr.shape, device=csr.device)


def item_table(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], n_single: int, n_multi: int,
               dtype: torch.dtype) -> Tensor:
    """Item part of the input for every item of the catalogue: [n_items, (n_single + n_multi) * d],
    every feature (single-valued ones as one-hot products) in one sparse-product function."""
    weights = [params[f"item_emb.{j}.weight"] for j in range(n_single)]
    pools = [pooling_matrices(buffers["item_x"], w.shape[0], dtype, column=j) for j, w in enumerate(weights)]
    for j in range(n_multi):
        weights.append(params[f"ml_emb.{j}.weight"])
        pools.append(pooling_matrices(buffers[f"item_ml_{j}"], weights[-1].shape[0], dtype))
    return _SparseProducts.apply(tuple(pools), *weights)
