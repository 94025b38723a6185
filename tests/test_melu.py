"""MeLU: the vectorised meta-gradient is the per-task math, second order is real, padding is inert,
training is seeded and learns, and persistence is pickle-free."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metarec.models.melu import MeLU, loop_meta_gradient, meta_gradient, meta_objective
from metarec.models.gram import GRAM_WIDTH_FACTOR, fold_query, gram_adapt_predict
from metarec.models.network import NetworkSpec, RatingNetwork, adapt_predict, adapted_layers, dense_names
from metarec.models.training import mae
from metarec.tasks import Batch
from tests.helpers_tiny import make_tiny, mixed_batch


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=0, n_train=64, n_val=16)


def _net(encoder, dtype=torch.float32, seed=3) -> RatingNetwork:
    spec = NetworkSpec.from_encoder(encoder, embedding_dim=4, hidden=(6, 5))
    item_x, item_ml = encoder.item_tensors()
    net = RatingNetwork(spec, item_x, item_ml, generator=torch.Generator().manual_seed(seed)).to(dtype)
    net.set_output_bias(3.0)
    return net


def _batch(tiny, n=7) -> Batch:
    return mixed_batch(tiny, n)


def _flat(g: dict) -> torch.Tensor:
    return torch.cat([g[k].reshape(-1) for k in sorted(g)])


def _item_width(spec: NetworkSpec) -> int:
    return spec.input_dim - len(spec.user_cardinalities) * spec.embedding_dim


@pytest.mark.parametrize("inner", ["gram", "autograd"])
@pytest.mark.parametrize("order,groups", [("second", 1), ("first", 1), ("second", 3)])
def test_vmap_meta_gradient_equals_per_task_loop(tiny, order, groups, inner):
    net = _net(tiny.encoder)
    batch = _batch(tiny)
    assert not bool(batch.support_mask[2].any())
    adapt = dense_names(net.spec)
    # the closed-form path runs in its Gram form on this batch
    assert adapted_layers(adapt, net.spec.n_dense) == (0, 1, 2)
    assert batch.support_items.shape[1] <= GRAM_WIDTH_FACTOR * _item_width(net.spec)
    args = (net.params(), net.buffers_dict(), net.spec, batch, adapt, 0.1, 3, order == "first")
    g_vec, loss_vec = meta_gradient(*args, groups=groups, inner=inner)
    g_loop, loss_loop = loop_meta_gradient(*args)
    assert set(g_vec) == set(g_loop) == set(net.params())
    torch.testing.assert_close(loss_vec, loss_loop, atol=1e-5, rtol=0)
    for k in g_vec:
        torch.testing.assert_close(g_vec[k], g_loop[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("layers,order", [([-1], "second"), ([0], "second"), ([1], "first"), ([0, 2], "first"),
                                          ([0, 2], "second")])
def test_adapting_some_layers_matches_the_loop(tiny, layers, order):
    net = _net(tiny.encoder)
    batch = _batch(tiny)
    adapt = dense_names(net.spec, layers)
    if layers == [-1]:
        assert adapt == ["dense.2.weight", "dense.2.bias"]
    args = (net.params(), net.buffers_dict(), net.spec, batch, adapt, 0.1, 2, order == "first")
    g_vec, l_vec = meta_gradient(*args, inner="gram")
    g_loop, l_loop = loop_meta_gradient(*args)
    torch.testing.assert_close(l_vec, l_loop, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_flat(g_vec), _flat(g_loop), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [4, 1])
@pytest.mark.parametrize("hidden", [(), (7,), (6, 5, 4)])
@pytest.mark.parametrize("order", ["first", "second"])
def test_closed_form_local_update_equals_autograd_for_any_depth(tiny, hidden, order, dim):
    """gram_adapt_predict == torch.func inner loop, in value and in meta-gradient, for networks
    with no, one and three hidden layers (float64, so that only the algebra can differ). With
    embedding dim 1 the supports are wider than GRAM_WIDTH_FACTOR x the input, so the first layer
    takes the accumulated-update form."""
    spec = NetworkSpec.from_encoder(tiny.encoder, embedding_dim=dim, hidden=hidden)
    item_x, item_ml = tiny.encoder.item_tensors()
    net = RatingNetwork(spec, item_x, item_ml, generator=torch.Generator().manual_seed(5)).to(torch.float64)
    batch = _batch(tiny)
    assert (batch.support_items.shape[1] > GRAM_WIDTH_FACTOR * _item_width(spec)) == (dim == 1)
    adapt = dense_names(spec)
    args = (net.params(), net.buffers_dict(), spec, batch, adapt, 0.2, 4, order == "first")
    g_a, l_a = meta_gradient(*args, inner="gram")
    g_b, l_b = meta_gradient(*args, inner="autograd")
    torch.testing.assert_close(l_a, l_b, atol=1e-12, rtol=1e-12)
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], atol=1e-11, rtol=1e-9, msg=k)


@pytest.mark.parametrize("Q", [3, 40])
@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("order", ["first", "second"])
def test_both_first_layer_forms_equal_autograd_per_task(order, gram, Q):
    """Two tasks with different padded tails, random float64 inputs: both forms of the batched
    closed-form update give, task by task, autograd's adapted predictions and the same gradients
    of a query loss w.r.t. every input; with 40 query rows the query side takes the folded form
    (the update folded into per-task item weights), with 3 the shared product and correction."""
    g = torch.Generator().manual_seed(0)
    du, da, hs, S = 5, 7, (6, 4), 9
    assert fold_query(Q, da, hs[0]) == (Q == 40)
    dims = [du + da, *hs, 1]
    W = [torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
    b = [torch.randn(o, generator=g, dtype=torch.float64) * 0.1 for o in dims[1:]]
    u, xs, xq = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, du), (2, S, da), (2, Q, da)))
    ys = torch.randn(2, S, generator=g, dtype=torch.float64) + 3.0
    ms = torch.arange(S)[None, :] < torch.tensor([[6], [9]])
    inputs = [*W, *b, u, xs, xq]
    for t in inputs:
        t.requires_grad_(True)
    n = len(W)
    dense = {**{f"dense.{k}.weight": W[k] for k in range(n)}, **{f"dense.{k}.bias": b[k] for k in range(n)}}
    pred_a = gram_adapt_predict(W, b, tuple(range(n)), u, xs, ys, ms, xq, 0.3, 3, order == "first", gram=gram)
    pred_b = torch.stack([adapt_predict(dense, {}, xs[i], ys[i], ms[i], xq[i], 0.3, 3, n, order == "first", u[i])
                          for i in range(2)])
    torch.testing.assert_close(pred_a, pred_b, atol=1e-12, rtol=1e-12)
    ga = torch.autograd.grad((pred_a ** 2).sum(), inputs, allow_unused=True)
    gb = torch.autograd.grad((pred_b ** 2).sum(), inputs, allow_unused=True)
    for t, x, y in zip(inputs, ga, gb):     # first order: the support rows reach the query only via detached steps
        torch.testing.assert_close(torch.zeros_like(t) if x is None else x, torch.zeros_like(t) if y is None else y,
                                   atol=1e-11, rtol=1e-9)


def test_catalogue_sized_queries_fold_and_training_queries_do_not() -> None:
    """At the default widths (item part 3 x 32, first hidden layer 64) a ten-item query keeps the
    Gram form, a catalogue of candidates folds; predictions agree in float32 without gradients."""
    assert not fold_query(10, 96, 64) and fold_query(3000, 96, 64)
    g = torch.Generator().manual_seed(3)
    du, da, hs, S = 6, 12, (16, 8), 7
    dims = [du + da, *hs, 1]
    W = [torch.randn(o, i, generator=g) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
    b = [torch.randn(o, generator=g) * 0.1 for o in dims[1:]]
    u, xs, xq = (torch.randn(*s, generator=g) for s in ((4, du), (4, S, da), (4, 500, da)))
    ys, ms = torch.randn(4, S, generator=g) + 3.0, torch.arange(S)[None, :] < torch.tensor([[3], [7], [1], [5]])
    with torch.no_grad():
        for gram in (True, False):
            whole = gram_adapt_predict(W, b, (0, 1, 2), u, xs, ys, ms, xq, 0.3, 3, gram=gram)
            # the same query in 50 slices of 10 rows: each slice takes the unfolded form
            parts = torch.cat([gram_adapt_predict(W, b, (0, 1, 2), u, xs, ys, ms, xq[:, i:i + 10], 0.3, 3, gram=gram)
                               for i in range(0, 500, 10)], dim=1)
            torch.testing.assert_close(whole, parts, atol=2e-6, rtol=2e-6)


def test_packed_tasks_pad_exactly_like_the_sliced_full_batch(tiny):
    """`PackedTasks.take` (what training and validation pad per meta-batch) equals slicing the split's
    fully padded batch and trimming its padding, field by field: empty supports, cut queries, one
    task, every task, repeats and any order."""
    from dataclasses import fields

    from metarec.models.training import slice_batch
    from metarec.tasks import make_batch, pack_tasks

    pairs = tiny.train.tasks_with_truth()
    tasks, truth = [t for t, _ in pairs], [y for _, y in pairs]
    tasks[2] = tasks[2].replace(support_items=tasks[2].support_items[:0], support_ratings=tasks[2].support_ratings[:0])
    tasks[1], truth[1] = tasks[1].replace(candidates=tasks[1].candidates[:2]), truth[1][:2]
    full, packed = make_batch(tasks, tiny.encoder, truth), pack_tasks(tasks, tiny.encoder, truth)
    assert len(packed) == len(full) and packed.query_lengths[1] == 2 and packed.support_lengths[2] == 0
    gen = np.random.default_rng(0)
    for idx in ([2], [0, 1, 2, 3], list(range(len(tasks))), gen.permutation(len(tasks))[:9], [5, 5, 1]):
        want, got = slice_batch(full, idx), packed.take(idx)
        for f in fields(want):
            a, b = getattr(want, f.name), getattr(got, f.name)
            assert a.dtype == b.dtype and torch.equal(a, b), f.name


def test_closed_form_applies_to_whole_layers_only():
    assert adapted_layers(["dense.0.weight", "dense.0.bias", "dense.2.weight"], 3) is None   # weight, no bias
    assert adapted_layers(dense_names(NetworkSpec((2,), (2,), (), 4, (3, 3))), 3) == (0, 1, 2)
    assert adapted_layers(["dense.1.bias", "dense.1.weight"], 3) == (1,)


@pytest.mark.parametrize("inner", ["gram", "autograd"])
def test_second_order_matches_finite_differences_and_differs_from_first_order(tiny, inner):
    net = _net(tiny.encoder, torch.float64)
    batch = _batch(tiny, n=5)
    buffers, spec = net.buffers_dict(), net.spec
    adapt = dense_names(spec)
    lr, steps = 0.3, 2
    params = {k: v.detach().clone() for k, v in net.params().items()}
    g2, _ = meta_gradient(params, buffers, spec, batch, adapt, lr, steps, False, inner=inner)
    g1, _ = meta_gradient(params, buffers, spec, batch, adapt, lr, steps, True, inner=inner)

    gen = np.random.default_rng(0)
    used_items = torch.cat([batch.support_items[batch.support_mask], batch.query_items[batch.query_mask]])
    coords = []
    for name in ("dense.0.weight", "dense.1.weight", "dense.2.weight", "dense.0.bias", "dense.2.bias"):
        coords += [(name, int(gen.integers(params[name].numel()))) for _ in range(2)]
    # embedding rows that the batch really uses, so their gradient is not trivially zero
    row = int(buffers["item_x"][used_items[0], 0])
    coords.append(("item_emb.0.weight", row * spec.embedding_dim + 1))
    coords.append(("user_emb.0.weight", int(batch.user_x[0, 0]) * spec.embedding_dim + 2))

    eps = 1e-6
    for name, flat_i in coords:
        def value(delta: float) -> float:
            p = {k: v.clone() for k, v in params.items()}
            p[name].view(-1)[flat_i] += delta
            return float(meta_objective(p, buffers, spec, batch, adapt, lr, steps, False, inner=inner))

        fd = (value(eps) - value(-eps)) / (2 * eps)
        an = float(g2[name].reshape(-1)[flat_i])
        assert an == pytest.approx(fd, rel=1e-4, abs=1e-7), (name, flat_i, an, fd)

    diff = (_flat(g2) - _flat(g1)).abs().max()
    assert float(diff) > 1e-3 * float(_flat(g2).abs().max())


def _scramble_padding(batch: Batch, n_items: int, seed: int = 1) -> Batch:
    """Same batch with different ratings and item rows in every padded slot."""
    g = torch.Generator().manual_seed(seed)
    sm, qm = batch.support_mask, batch.query_mask
    s_items = torch.where(sm, batch.support_items, torch.randint(0, n_items, sm.shape, generator=g))
    q_items = torch.where(qm, batch.query_items, torch.randint(0, n_items, qm.shape, generator=g))
    s_y = torch.where(sm, batch.support_y, torch.rand(sm.shape, generator=g) * 40 - 20)
    q_y = torch.where(qm, batch.query_y, torch.rand(qm.shape, generator=g) * 40 - 20)
    return Batch(batch.user_x, s_items, s_y, sm, q_items, q_y, qm)


@pytest.mark.parametrize("inner", ["gram", "autograd"])
@pytest.mark.parametrize("order", ["second", "first"])
def test_padded_rows_change_nothing(tiny, order, inner):
    net = _net(tiny.encoder)
    batch = _batch(tiny)
    other = _scramble_padding(batch, len(tiny.encoder.item_ids))
    assert not torch.equal(batch.support_items, other.support_items)
    assert not torch.equal(batch.query_y, other.query_y)
    adapt = dense_names(net.spec)
    common = (net.params(), net.buffers_dict(), net.spec)
    g_a, l_a = meta_gradient(*common, batch, adapt, 0.1, 3, order == "first", inner=inner)
    g_b, l_b = meta_gradient(*common, other, adapt, 0.1, 3, order == "first", inner=inner)
    assert torch.equal(l_a, l_b)
    for k in g_a:
        assert torch.equal(g_a[k], g_b[k]), k

    model = MeLU(embedding_dim=4, hidden=(6, 5), local_steps=3, local_lr=0.1)
    model.network_, model.encoder_ = net, tiny.encoder
    p_a, p_b = model._predict_batch(batch), model._predict_batch(other)
    assert torch.equal(p_a[batch.query_mask], p_b[other.query_mask])


def _fit(tiny, seed: int, epochs: int = 3, **kw) -> MeLU:
    params = dict(embedding_dim=8, hidden=(16, 16), epochs=epochs, patience=100, meta_batch_size=16,
                  global_lr=1e-2, threads=1, seed=seed)
    params.update(kw)
    return MeLU(**params).fit(tiny.train, tiny.val, tiny.encoder)


def test_same_seed_is_bitwise_identical_and_seeds_differ(tiny):
    tasks = tiny.val.tasks()
    a = _fit(tiny, seed=5).predict(tasks)
    b = _fit(tiny, seed=5).predict(tasks)
    c = _fit(tiny, seed=6).predict(tasks)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_save_load_round_trip_without_pickle(tiny, tmp_path):
    from safetensors import safe_open

    model = _fit(tiny, seed=2, epochs=2, order="first", adapt_layers=(1, 2), max_support=8)
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "history.json", "weights.safetensors"]
    with safe_open(str(tmp_path / "weights.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(model.network_.params())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == "melu" and cfg["params"]["order"] == "first" and "vocab" in cfg["encoder"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and {"train_loss", "val_loss"} <= set(history[0])

    loaded = MeLU.load(tmp_path)
    assert loaded.get_params() == model.get_params()
    tasks = tiny.val.tasks()
    for x, y in zip(model.predict(tasks), loaded.predict(tasks)):
        assert np.array_equal(x, y)


def test_fit_beats_the_mean_and_predictions_are_clipped(tiny):
    pairs = tiny.val.tasks_with_truth()
    tasks, truth = [t for t, _ in pairs], [y for _, y in pairs]
    mean = float(tiny.train.frame["rating"].mean())
    baseline = mae([np.full(len(y), mean) for y in truth], truth)
    model = _fit(tiny, seed=0, epochs=25, patience=6)
    preds = model.predict(tasks)
    assert [len(p) for p in preds] == [len(t.candidates) for t in tasks]
    assert all(((p >= 1.0) & (p <= 5.0)).all() for p in preds)
    assert mae(preds, truth) < baseline - 0.1
    assert min(h["val_loss"] for h in model.history_) == pytest.approx(mae(preds, truth))
    first = model.history_[0]["train_loss"]
    assert min(h["train_loss"] for h in model.history_) < 0.7 * first


def test_empty_support_and_empty_task_list(tiny):
    model = _fit(tiny, seed=1, epochs=1)
    t = tiny.val.tasks()[0]
    empty = t.replace(support_items=t.support_items[:0], support_ratings=t.support_ratings[:0])
    net = model.network_
    with torch.no_grad():
        plain = net(torch.from_numpy(tiny.encoder.encode_users([t.user_attrs])),
                    torch.from_numpy(tiny.encoder.item_rows(t.candidates))[None])[0].numpy()
    (pred,) = model.predict([empty])
    np.testing.assert_allclose(pred, np.clip(plain, 1, 5), atol=1e-6)
    assert model.predict([]) == []


def test_bad_config_is_rejected():
    from metarec.errors import ConfigError

    tiny = make_tiny(n_train=4, n_val=0)
    bad = MeLU(order="third")   # scikit-learn convention: the constructor stores, fit checks
    with pytest.raises(ConfigError, match="melu: order must be one of"):
        bad.fit(tiny.train, None, tiny.encoder)
    with pytest.raises(ConfigError):
        MeLU().fit(make_tiny(n_train=4, n_val=0).train)


@pytest.mark.parametrize("inner", ["gram", "autograd"])
def test_meta_gradient_is_torch_func_grad_of_the_objective(tiny, inner):
    from torch.func import grad_and_value

    net = _net(tiny.encoder, torch.float64)
    batch = _batch(tiny)
    adapt = dense_names(net.spec)
    params = {k: v.detach() for k, v in net.params().items()}
    rest = (net.buffers_dict(), net.spec, batch, adapt, 0.1, 3, False, 1, inner)
    g_ref, l_ref = grad_and_value(meta_objective)(params, *rest)
    g, loss = meta_gradient(params, *rest)
    torch.testing.assert_close(loss, l_ref, atol=1e-12, rtol=0)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-12, rtol=1e-10, msg=k)


def test_melu_trains_and_predicts_through_the_closed_form_only(tiny, monkeypatch):
    """One local update at run time: training and prediction call `gram_adapt_predict` (whole
    layers, the default) and never the torch.func reference, which exists for the tests."""
    from metarec.models import network

    seen = {"gram": 0}
    original = network.gram_adapt_predict

    def counted(*args, **kwargs):
        seen["gram"] += 1
        return original(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("the torch.func reference ran at training or prediction time")

    monkeypatch.setattr(network, "gram_adapt_predict", counted)
    monkeypatch.setattr(network, "inner_adapt", refused)
    model = _fit(tiny, seed=0, epochs=1)
    trained = seen["gram"]
    assert trained > 0
    model.predict(tiny.val.tasks())
    assert seen["gram"] > trained
