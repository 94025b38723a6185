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


def test_gather_rows_matches_embedding_in_value_and_gradient_under_autograd_and_torch_func():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(6, 4, dtype=torch.float64, generator=g)
    index = torch.tensor([[5, 0, 2], [2, 2, 1]])                       # repeats accumulate
    weights = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)

    def loss(fn, t):
        return (fn(t) * weights).sum()

    ours = lambda t: pooling.gather_rows(t, index)                     # noqa: E731
    ref = lambda t: torch.nn.functional.embedding(index, t)            # noqa: E731
    torch.testing.assert_close(ours(table), ref(table), rtol=0, atol=0)
    leaf = table.clone().requires_grad_(True)
    g_ours = torch.autograd.grad(loss(ours, leaf), leaf)[0]
    g_ref = torch.autograd.grad(loss(ref, leaf), leaf)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.func.grad(lambda t: loss(ours, t))(table), g_ref, rtol=0, atol=1e-15)
    # strided incoming gradients (a slice of a wider one) take the same path
    wide = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
    leaf = table.clone().requires_grad_(True)
    (g_strided,) = torch.autograd.grad(ours(leaf), leaf, wide[..., :4])
    torch.testing.assert_close(g_strided, torch.autograd.grad(ref(leaf), leaf, wide[..., :4].contiguous())[0],
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("factor", [0, 10_000])
def test_embed_sets_constant_set_has_the_same_value_and_sends_no_gradient(monkeypatch, factor):
    monkeypatch.setattr(network, "TABLE_FACTOR", factor)              # per-row path and table path
    net = _net()
    buffers = net.buffers_dict()
    user_x = torch.tensor([[1], [2]])
    support, s_rows = torch.tensor([[0, 2, 3], [4, 1, 0]]), torch.tensor([[True, True, False], [True, True, True]])
    query, q_rows = torch.tensor([[1, 4], [3, 2]]), torch.tensor([[True, True], [True, False]])
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.params().items()}
    u, (xs, xq) = network.embed_sets(params, buffers, net.spec, user_x, [(support, s_rows), (query, q_rows)],
                                     constant=(True, False))
    _, x_ref = embed_parts(params, buffers, net.spec, user_x, torch.cat([support, query], 1),
                           torch.cat([s_rows, q_rows], 1))
    torch.testing.assert_close(xs, x_ref[:, :3].detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(xq.detach(), x_ref[:, 3:].detach(), rtol=0, atol=1e-12)
    assert not xs.requires_grad and xq.requires_grad
    assert float(xs[0, 2].abs().sum()) == 0.0 and float(xq.detach()[1, 1].abs().sum()) == 0.0   # padding: zeros
    grads = torch.autograd.grad(xq.sum(), list(params.values()), allow_unused=True)
    ref = torch.autograd.grad(x_ref[:, 3:].sum(), list(params.values()), allow_unused=True)
    for a, b in zip(grads, ref):
        if a is None or b is None:
            assert (a is None or float(a.abs().sum()) == 0.0) and (b is None or float(b.abs().sum()) == 0.0)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
