"""flush_denormals: the networks train with denormals flushed, which leaves Adam's weights unchanged."""

from __future__ import annotations

import pytest
import torch

from metarec.models.melu import MeLU
from metarec.models.training import flush_denormals

TINY = 1e-39            # a float32 denormal (the smallest normal float32 is 1.18e-38)


def _flushed() -> bool:
    return float(torch.tensor([TINY], dtype=torch.float32)[0] * 1.0) == 0.0


supported = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")


@supported
def test_flushes_inside_and_restores_after_even_on_error():
    assert not _flushed()
    with flush_denormals():
        assert _flushed()
    assert not _flushed()
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("boom")
    assert not _flushed()


def _adamw_run(flush: bool, steps: int = 800) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamW as MeLU runs it (fused, weight decay) on a table whose odd rows get a gradient once
    and never again, like embedding rows that later batches do not touch."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 8, generator=gen) * 0.05)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True)
    grads = torch.randn(steps, 64, 8, generator=gen) * 1e-3
    grads[1:, 1::2] = 0.0
    ctx = flush_denormals() if flush else torch.autograd.grad_mode.no_grad()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # flushing is per thread; the models train on one
    try:
        with ctx:
            for g in grads:
                p.grad = g.clone()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return p.detach().clone(), opt.state[p]["exp_avg"].clone()


@supported
def test_adam_weights_are_byte_identical_with_and_without_flushing():
    plain_w, plain_m = _adamw_run(flush=False)
    flush_w, flush_m = _adamw_run(flush=True)
    untouched = plain_m[1::2]
    # Without flushing the untouched rows' first moments have decayed into denormals...
    denormal = (untouched != 0) & (untouched.abs() < torch.finfo(torch.float32).tiny)
    assert bool(denormal.any())
    # ...with flushing they are zero, and the weights do not differ in a single bit.
    assert bool((flush_m[1::2][denormal] == 0).all())
    assert torch.equal(plain_w, flush_w)
    assert plain_w.numpy().tobytes() == flush_w.numpy().tobytes()


@supported
def test_network_models_fit_with_denormals_flushed(monkeypatch):
    seen = []

    def fake_fit(self, train, val, encoder):
        seen.append(_flushed())
        return self

    monkeypatch.setattr(MeLU, "_fit", fake_fit)
    MeLU(device="cpu").fit(None)
    assert seen == [True]
    assert not _flushed()


@supported
def test_leaves_a_flush_that_was_already_on_as_it_found_it():
    torch.set_flush_denormal(True)
    try:
        with flush_denormals():
            assert _flushed()
        assert _flushed()
    finally:
        torch.set_flush_denormal(False)
