"""The compiled local update (`native`, gram_step.c): the same function as the batched Python form and
the per-task loop, both ways; independent of the thread count and of padding; built once, cached,
and replaced by the batched form (with a warning) where it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch

from metarec.models import gram_reverse, native
from metarec.models.gram import gram_adapt_predict
from metarec.models.melu import MeLU, default_groups, loop_meta_gradient, meta_gradient
from metarec.models.network import NetworkSpec, RatingNetwork, dense_names
from metarec.tasks import Batch
from tests.helpers_tiny import make_tiny, mixed_batch

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the compiled local update cannot be built here")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=0, n_train=64, n_val=16)


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel's forward and reverse calls, so a test knows the compiled path ran."""
    seen = {"local_update": 0, "local_update_reverse": 0}
    for name in seen:
        original = getattr(native, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            seen[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(native, name, counted)
    return seen


def _net(encoder, hidden=(32, 16), seed=3) -> RatingNetwork:
    spec = NetworkSpec.from_encoder(encoder, embedding_dim=8, hidden=hidden)
    item_x, item_ml = encoder.item_tensors()
    net = RatingNetwork(spec, item_x, item_ml, generator=torch.Generator().manual_seed(seed))
    net.set_output_bias(3.0)
    return net


def _batch(tiny, n=9) -> Batch:
    return mixed_batch(tiny, n)


def _block(seed=0, B=6, S=40, du=24, da=32, hidden=(64, 32)):
    """Random float32 inputs of one block, ragged prefix supports (one empty), all requiring grad;
    supports short enough for the Gram form (S <= GRAM_WIDTH_FACTOR x da)."""
    g = torch.Generator().manual_seed(seed)
    dims = [du + da, *hidden, 1]
    W = [torch.randn(o, i, generator=g) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
    b = [torch.randn(o, generator=g) * 0.1 for o in dims[1:]]
    u, xs, xq = torch.randn(B, du, generator=g), torch.randn(B, S, da, generator=g), torch.randn(B, 5, da, generator=g)
    counts = torch.tensor([S, 0, 3, S - 7, 17, 1][:B])
    ms = torch.arange(S)[None, :] < counts[:, None]
    ys = torch.where(ms, torch.randint(1, 6, (B, S), generator=g).float(), torch.zeros(()))
    xs = xs * ms[..., None]
    return [t.requires_grad_(True) for t in (*W, *b, u, xs, xq)], ys, ms


def _predict_and_grads(inputs, ys, ms, first_order, steps=4, lr=0.05):
    W, b, (u, xs, xq) = inputs[:3], inputs[3:6], inputs[6:]
    pred = gram_adapt_predict(W, b, (0, 1, 2), u, xs, ys, ms, xq, lr, steps, first_order)
    grads = torch.autograd.grad((pred ** 2).sum(), inputs, allow_unused=True)   # first order: xs unused
    return pred.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    """Equal up to float32 rounding: the largest difference within tol x the largest magnitude
    (the sums run in another order; these gradients reach the hundreds)."""
    scale = float(b.abs().max().clamp(min=1.0))
    assert float((a - b).abs().max()) <= tol * scale, what


def test_the_kernel_builds_here():
    assert native.library() is not None
    assert native.handles((64, 64)) and not native.handles((64, 24)) and not native.handles((64, 64, 64))


@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("steps", [1, 3])
def test_compiled_meta_gradient_equals_per_task_loop(tiny, calls, order, steps):
    net = _net(tiny.encoder)
    batch = _batch(tiny)
    args = (net.params(), net.buffers_dict(), net.spec, batch, dense_names(net.spec), 0.1, steps, order == "first")
    g_vec, loss_vec = meta_gradient(*args, groups=1, inner="gram")
    assert calls["local_update"] == 1
    assert calls["local_update_reverse"] == (1 if order == "second" else 0)
    g_loop, loss_loop = loop_meta_gradient(*args)
    torch.testing.assert_close(loss_vec, loss_loop, atol=1e-5, rtol=0)
    for k in g_vec:
        torch.testing.assert_close(g_vec[k], g_loop[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("first_order", [True, False])
def test_compiled_equals_the_batched_python_form(monkeypatch, calls, first_order):
    """Predictions and the gradients w.r.t. every input (weights, user part, support and query
    rows), against the same function batched in Python."""
    inputs, ys, ms = _block()
    pred_c, grads_c = _predict_and_grads(inputs, ys, ms, first_order)
    assert calls["local_update"] == 1
    monkeypatch.setenv("METAREC_NATIVE", "0")
    pred_p, grads_p = _predict_and_grads(inputs, ys, ms, first_order)
    assert calls["local_update"] == 1
    _assert_close_to_scale(pred_c, pred_p, "predictions")
    for i, (a, b) in enumerate(zip(grads_c, grads_p)):
        _assert_close_to_scale(a, b, f"gradient of input {i}")


def _kernel_both_ways(threads: int, seed: int = 1) -> list[torch.Tensor]:
    """The kernel's forward (saving the state) and reverse on one block, with `threads` threads."""
    inputs, ys, ms = _block(seed=seed)
    W, b, xs = [t.detach() for t in inputs[:3]], [t.detach() for t in inputs[3:6]], inputs[7].detach()
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(*xs.shape[:2], W[0].shape[0], generator=g)
    k_ss = xs @ xs.transpose(1, 2) + 1.0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        w_new, b_new, acc, saved = native.local_update(zs, k_ss, ys, ms, W, b, 0.05, 3, save=True)
        gW = [torch.randn(w.shape, generator=g) for w in w_new]
        gb = [torch.randn(v.shape, generator=g) for v in b_new]
        g_acc = torch.randn(acc.shape, generator=g)
        g_zs, g_k = native.local_update_reverse(saved, k_ss, ms.sum(1), g_acc, gW, gb, 0.05, 3)
    finally:
        torch.set_num_threads(before)
    return [*w_new, *b_new, acc, *gW, *gb, g_zs, g_k]


def test_the_kernel_does_not_depend_on_the_thread_count():
    """One task per thread, in a fixed order: the same bits with one thread or two."""
    for a, b in zip(_kernel_both_ways(1), _kernel_both_ways(2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first_order", [True, False])
def test_padded_values_change_nothing(calls, first_order):
    inputs, ys, ms = _block(seed=2)
    pred_a, grads_a = _predict_and_grads(inputs, ys, ms, first_order)
    g = torch.Generator().manual_seed(9)
    xs = inputs[7].detach()
    scrambled = torch.where(ms[..., None], xs, torch.randn(xs.shape, generator=g) * 50)
    other = [*inputs[:7], scrambled.requires_grad_(True), inputs[8]]
    ys_other = torch.where(ms, ys, torch.randn(ys.shape, generator=g) * 50)
    pred_b, grads_b = _predict_and_grads(other, ys_other, ms, first_order)
    assert calls["local_update"] == 2
    assert torch.equal(pred_a, pred_b)
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if i == 7:                                     # the support rows: padded rows differ, real ones agree
            a, b = a[ms], b[ms]
        assert torch.equal(a, b), i


def test_blocks_the_kernel_does_not_cover_take_the_batched_form(calls):
    inputs, ys, ms = _block(seed=3)
    W, (u, xs, xq) = inputs[:3], inputs[6:]
    holes = ms.clone()
    holes[0, 5] = False                               # real rows not first
    assert native.supports(W, xs, ms) and not native.supports(W, xs, holes)
    assert not native.supports([W[0], W[1]], xs, ms)
    assert not native.supports([w.double() for w in W], xs.double(), ms)
    narrow, _, _ = _block(seed=3, hidden=(24, 16))
    assert not native.supports(narrow[:3], xs, ms)
    assert not native.supports(W, xs[:, :0], ms[:, :0])                 # no support rows at all
    with torch.no_grad():
        gram_adapt_predict(W, inputs[3:6], (0, 1, 2), u, xs, ys, holes, xq, 0.05, 2, True)
        gram_adapt_predict(W, inputs[3:6], (1, 2), u, xs, ys, ms, xq, 0.05, 2, True)
    assert calls["local_update"] == 0


def test_default_groups_follow_the_kernel(monkeypatch):
    spec = NetworkSpec(user_cardinalities=(3,), item_cardinalities=(4,), multilabel_cardinalities=(),
                       embedding_dim=8, hidden=(64, 64))
    assert default_groups(spec) == 1 == default_groups(spec, dense_names(spec))
    assert default_groups(spec, dense_names(spec, [-1])) == 2          # the kernel adapts whole networks
    assert default_groups(NetworkSpec(**{**spec.to_dict(), "hidden": (6, 5)})) == 2
    monkeypatch.setenv("METAREC_NATIVE", "0")
    assert default_groups(spec) == 2
    assert MeLU().support_groups is None


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """An unloaded kernel and an empty cache directory for this test only."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_the_build_is_cached_under_a_key_and_leaves_no_temporary_files(fresh_state, monkeypatch):
    assert native.library() is not None
    built = sorted(p.name for p in fresh_state.iterdir())
    assert len(built) == 1 and built[0].startswith("gram_step-") and built[0].endswith(".so")
    stamp = (fresh_state / built[0]).stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert sorted(p.name for p in fresh_state.iterdir()) == built
    assert (fresh_state / built[0]).stat().st_mtime_ns == stamp


def test_no_compiler_warns_once_and_the_batched_form_runs(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_state / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="the compiled local update is unavailable"):
        assert native.library() is None
    assert native.library() is None                    # decided once per process
    assert list(fresh_state.iterdir()) == []
    inputs, ys, ms = _block(seed=4)
    pred, _ = _predict_and_grads(inputs, ys, ms, first_order=True)
    assert torch.isfinite(pred).all()


def test_a_failing_compile_names_the_source(fresh_state, monkeypatch):
    fake = fresh_state / "cc"                           # its version is not even UTF-8
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then printf 'fake \\377 1.0\\n'; exit 0; fi\n"
                    "echo 'error: no can do' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match=r"failed on gram_step\.c: error: no can do"):
        assert native.library() is None
    assert [p.name for p in fresh_state.iterdir()] == ["cc"]
    assert native.status().startswith("batched form (the kernel is unavailable: ")


def test_a_compiler_command_with_arguments(fresh_state, monkeypatch):
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{shutil.which('env')} {compiler}")
    assert native.library() is not None
    assert native.status().startswith("compiled (gram_step-")


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("METAREC_NATIVE", "off")
    assert not native.enabled() and native.library() is None
    assert native.status() == "batched form (METAREC_NATIVE turns the kernel off)"


def test_a_call_with_the_wrong_number_of_arguments_is_refused():
    with pytest.raises(TypeError, match=r"^metarec_gram_local_update takes 27 arguments, got 2$"):
        native._call("metarec_gram_local_update", 1, 2)


def test_second_order_takes_the_compiled_reverse_only_outside_torch_func(calls):
    """Under torch.func transforms the tensors are wrapped (no raw memory to hand to C): the
    batched form runs there, with the same result."""
    inputs, ys, ms = _block(seed=5)
    W, b, (u, xs, xq) = inputs[:3], inputs[3:6], inputs[6:]

    def loss(w0):
        return (gram_reverse.second_order_gram([w0, W[1], W[2]], b, u, xs, ys, ms, xq, 0.05, 3) ** 2).sum()

    g_func = torch.func.grad(loss)(W[0].detach())
    assert calls["local_update"] == 0
    (g_auto,) = torch.autograd.grad(loss(W[0]), [W[0]])
    assert calls["local_update"] == 1 and calls["local_update_reverse"] == 1
    torch.testing.assert_close(g_func, g_auto, atol=1e-5, rtol=1e-4)
