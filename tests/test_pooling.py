"""The whole-catalogue item table (multi-label features as a sparse product) is the per-row
gather-and-mean, in value and in gradient, and works under torch.func."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.models import network, pooling
from metarec.models.network import NetworkSpec, RatingNetwork, embed_parts


def _net() -> RatingNetwork:
    labels = torch.tensor([[2, 3, 0], [0, 0, 0], [4, 4, 2], [0, 5, 0], [3, 0, 0]])   # none; a repeat; a gap
    spec = NetworkSpec(user_cardinalities=(3,), item_cardinalities=(4,), multilabel_cardinalities=(6,),
                       embedding_dim=3, hidden=(4,))
    item_x = torch.tensor([[1], [2], [3], [1], [0]])
    return RatingNetwork(spec, item_x, [labels], generator=torch.Generator().manual_seed(0)).to(torch.float64)


def test_item_table_is_the_mean_of_each_items_labels():
    net = _net()
    params, buffers = net.params(), net.buffers_dict()
    table = pooling.item_table(params, buffers, 1, 1, torch.float64).detach().numpy()
    emb = params["ml_emb.0.weight"].detach().numpy()
    single = params["item_emb.0.weight"].detach().numpy()
    for i, row in enumerate(buffers["item_ml_0"].numpy()):
        labels = [int(v) for v in row if v != 0]
        expected = emb[labels].mean(0) if labels else np.zeros(3)      # duplicates count twice, 0 is padding
        np.testing.assert_allclose(table[i, 3:], expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(table[i, :3], single[int(buffers["item_x"][i, 0])], rtol=0, atol=0)


@pytest.mark.parametrize("with_rows", [False, True])
def test_table_path_equals_per_row_path_in_value_and_gradient(monkeypatch, with_rows):
    net = _net()
    buffers = net.buffers_dict()
    items = torch.tensor([[0, 1, 2, 2], [3, 4, 0, 1]])
    user_x = torch.tensor([[1], [2]])
    rows = torch.tensor([[True, True, True, False], [True, False, True, True]]) if with_rows else None
    outs = []
    for factor in (0, 10_000):                                         # 0: per-row path; huge: the table
        monkeypatch.setattr(network, "TABLE_FACTOR", factor)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in net.params().items()}
        u, x = embed_parts(params, buffers, net.spec, user_x, items, rows)
        weights = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape).sin()
        grads = torch.autograd.grad((x * weights).sum() + u.sum(), list(params.values()), allow_unused=True)
        outs.append((x.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params.values())]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_table_works_under_torch_func_grad():
    net = _net()
    buffers = net.buffers_dict()
    params = {k: v.detach() for k, v in net.params().items()}

    def f(p):
        return (pooling.item_table(p, buffers, 1, 1, torch.float64) ** 2).sum()

    g_func = torch.func.grad(f)(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g_auto = dict(zip(leaves, torch.autograd.grad(f(leaves), list(leaves.values()), allow_unused=True)))
    torch.testing.assert_close(g_func["ml_emb.0.weight"], g_auto["ml_emb.0.weight"], rtol=0, atol=1e-12)
