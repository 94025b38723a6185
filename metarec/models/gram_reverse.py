"""Exact second-order MAML through the closed-form local update, with a hand-written reverse pass.

Why: differentiating `gram.gram_adapt_predict` with autograd records a few hundred nodes per
meta-batch (every step's forward, its hand-derived gradient and the SGD update), and the engine's
per-node work and gradient accumulation cost nearly as much as the matrix products. The
function is a fixed composition (a ReLU MLP's forward, its backward, an SGD step, T times, then the
query forward), so its reverse can be written once: the adjoints of the state (support
pre-activations of layer 0, per-task weights and biases of layers 1..) are carried backwards
through the T steps, each step's reverse touching the saved activations and deltas of that step.
It covers the configuration training uses (every dense layer adapted, first layer in Gram form);
anything else stays on autograd. The tests check it against autograd on `gram_adapt_predict`,
against the per-task loop and against finite differences.

Notation (one task; everything carries the task dimension B in front): zs the support
pre-activations of layer 0, a_k = relu(z_k) (a_0 = relu(zs)), e_k the loss gradient at layer k's
pre-activation, W_k / b_k the task's layer-k weights at the current step, K the support Gram
matrix, acc = lr * sum over steps of e_0. A step is

    e_{n-1} = (out - y) * scale;  back_k = e_k W_k;  e_{k-1} = back_k * [a_{k-1} > 0]
    W_k <- W_k - lr e_k^T a_{k-1};  b_k <- b_k - lr sum_rows e_k;  zs <- zs - lr K e_0

and the query pre-activation of layer 0 is zq0 - Kq acc.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from metarec.models import native

threshold_backward = torch.ops.aten.threshold_backward


def _tr(t: Tensor) -> Tensor:
    return t.transpose(1, 2)


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b; an outer product (inner dimension 1, as through the output layer) as a
    broadcast multiply, which is exact and several times faster than a degenerate matmul."""
    if a.shape[-1] == 1 and b.dim() == 3:
        return a * b
    return torch.bmm(a, b)


def _forward_pass(n: int, lr: float, steps: int, du: int, compiled: bool, tensors: Sequence[Tensor]) -> tuple:
    """The local update and the query forward (no autograd): (predictions [B, Q], K, Kq, acc,
    scale, query activations, adapted weights W_1.., the state of every step for the reverse pass:
    per step in Python, or as `native.local_update`'s seven arrays when `compiled`)."""
    W, b = list(tensors[:n]), list(tensors[n:2 * n])
    u, xs, xq, ys, ms = tensors[2 * n:]
    w0u, wa = W[0][:, :du], W[0][:, du:]
    c = (u @ w0u.T + b[0])[:, None, :]
    zq0 = xq @ wa.T + c
    zs = xs @ wa.T + c
    uu = ((u * u).sum(-1) + 1.0)[:, None, None]
    k_ss = torch.baddbmm(uu, xs, _tr(xs))
    scale = torch.where(ms, 2.0 / ms.sum(-1, keepdim=True).clamp(min=1).to(zs.dtype), zs.new_zeros(()))[..., None]
    if compiled:
        w_new, b_new, acc, saved = native.local_update(zs, k_ss, ys, ms, W, b, lr, steps, save=True)
        ws, bs = [None, *w_new], [None, *b_new]
    else:
        ws, bs, acc, saved = _support_loop(W, b, zs, k_ss, ys, scale, lr, steps)
    k_qs = torch.baddbmm(uu, xq, _tr(xs))
    zq = torch.baddbmm(zq0, k_qs, acc, alpha=-1.0)
    h, q_acts = zq, []
    for k in range(1, n):
        q_acts.append(h.relu())
        h = torch.baddbmm(bs[k][:, None, :], q_acts[-1], _tr(ws[k]))
    return (h.squeeze(-1), k_ss, k_qs, acc, scale, *q_acts, *ws[1:], *saved)


def _support_loop(W: Sequence[Tensor], b: Sequence[Tensor], zs: Tensor, k_ss: Tensor, ys: Tensor, scale: Tensor,
                  lr: float, steps: int) -> tuple[list, list, Tensor, list[Tensor]]:
    """The local update, batched in Python: (adapted weights [None, W_1..], biases [None, b_1..],
    acc, each step's state for the reverse pass). `native.local_update` is the compiled equivalent."""
    n, B = len(W), zs.shape[0]
    ws = [None] + [W[k].expand(B, *W[k].shape).contiguous() for k in range(1, n)]
    bs = [None] + [b[k].expand(B, *b[k].shape).contiguous() for k in range(1, n)]
    target = -(ys.to(zs.dtype)[..., None] * scale)
    acc = torch.zeros_like(zs)
    saved: list[Tensor] = []                           # per step: zs, a_1..a_{n-2}, e_0..e_{n-1}, W_1..W_{n-1}
    for t in range(steps):
        acts = [zs.relu()]
        for k in range(1, n - 1):
            acts.append(torch.baddbmm(bs[k][:, None, :], acts[-1], _tr(ws[k])).relu())
        out = torch.baddbmm(bs[-1][:, None, :], acts[-1], _tr(ws[-1])) if n > 1 else zs
        e = [None] * n
        e[n - 1] = torch.addcmul(target, out, scale)
        old = list(ws)
        for k in range(n - 1, 0, -1):
            back = bmm(e[k], ws[k])
            ws[k] = torch.baddbmm(ws[k], _tr(e[k]), acts[k - 1], alpha=-lr)
            bs[k] = torch.add(bs[k], e[k].sum(1), alpha=-lr)
            e[k - 1] = threshold_backward(back, acts[k - 1], 0.0)
        saved += [zs, *acts[1:], *e, *old[1:]]
        if t < steps - 1:                               # the last update of zs reaches nothing
            zs = torch.baddbmm(zs, k_ss, e[0], alpha=-lr)
        acc.add_(e[0], alpha=lr)
    return ws, bs, acc, saved


class _SecondOrderGram(torch.autograd.Function):
    """Inputs: n, lr, steps, du, compiled (whether `native` runs the support loop both ways), then
    W_0..W_{n-1}, b_0..b_{n-1}, u, xs, xq, ys, ms.
    Outputs: the query predictions [B, Q], then the tensors the reverse pass needs (not
    differentiable; returned rather than stashed so that torch.func transforms can follow)."""

    @staticmethod
    def forward(n: int, lr: float, steps: int, du: int, compiled: bool, *tensors: Tensor):
        return _forward_pass(n, lr, steps, du, compiled, tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        n, lr, steps, du, compiled = inputs[:5]
        ctx.n, ctx.lr, ctx.steps, ctx.du, ctx.compiled = n, lr, steps, du, compiled
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)            # no zero tensors for the many non-differentiable outputs
        ctx.save_for_backward(*inputs[5:5 + 2 * n + 3], *output[1:])

    @staticmethod
    def backward(ctx, g_pred: Tensor | None, *_unused):
        n, lr, steps, du = ctx.n, ctx.lr, ctx.steps, ctx.du
        st = list(ctx.saved_tensors)
        if g_pred is None:                          # the predictions did not reach the loss
            g_pred = torch.zeros_like(st[2 * n + 2][..., 0])
        W = st[:n]
        u, xs, xq = st[2 * n:2 * n + 3]
        rest = st[2 * n + 3:]
        k_ss, k_qs, acc, scale = rest[:4]
        q_acts = rest[4:4 + n - 1]
        w_final = [None, *rest[4 + n - 1:4 + 2 * (n - 1)]]
        saved = rest[4 + 2 * (n - 1):]
        gW: list[Tensor | None] = [None] * n          # adjoints of the per-task weights / biases
        gb: list[Tensor | None] = [None] * n
        # query forward, layers n-1 .. 1, with the adapted weights
        g = g_pred.unsqueeze(-1)
        for k in range(n - 1, 0, -1):
            gW[k] = torch.bmm(_tr(g), q_acts[k - 1])
            gb[k] = g.sum(1)
            g = threshold_backward(bmm(g, w_final[k]), q_acts[k - 1], 0.0)
        g_zq0 = g                                                        # [B, Q, H0]
        g_kqs = -torch.bmm(g, _tr(acc))                                  # zq = zq0 - Kq acc
        g_acc = -torch.bmm(_tr(k_qs), g)
        g_xq = torch.bmm(g_kqs, xs)
        g_xs = torch.bmm(_tr(g_kqs), xq)
        g_uu = g_kqs.sum((1, 2))
        g_acc.mul_(lr)                              # acc = sum of lr * e_0: every step's e_0 gets lr * g_acc
        if ctx.compiled:
            counts = (scale[..., 0] != 0).sum(1)
            g_zs, g_k = native.local_update_reverse(saved, k_ss, counts, g_acc, gW[1:], gb[1:], lr, steps)
        else:
            g_zs, g_k = _reverse_steps(saved, k_ss, scale, g_acc, gW, gb, lr, steps)
        # K = xs xs^T + uu ; zs_0 = xs wa^T + c ; zq0 = xq wa^T + c
        g_ksym = g_k + _tr(g_k)
        g_xs.baddbmm_(g_ksym, xs)
        g_uu = g_uu + g_k.sum((1, 2))
        w0u, wa = W[0][:, :du], W[0][:, du:]
        g_xs = g_xs + g_zs @ wa
        g_xq = g_xq + g_zq0 @ wa
        H0, Da = wa.shape
        g_wa = g_zs.reshape(-1, H0).T @ xs.reshape(-1, Da) + g_zq0.reshape(-1, H0).T @ xq.reshape(-1, Da)
        g_c = g_zs.sum(1) + g_zq0.sum(1)
        g_u = g_c @ w0u + 2.0 * u * g_uu[:, None]
        grads_w = [torch.cat([g_c.T @ u, g_wa], dim=1)] + [gW[k].sum(0) for k in range(1, n)]
        grads_b = [g_c.sum(0)] + [gb[k].sum(0) for k in range(1, n)]
        return (None, None, None, None, None, *grads_w, *grads_b, g_u, g_xs, g_xq, None, None)


def _reverse_steps(saved: Sequence[Tensor], k_ss: Tensor, scale: Tensor, g_acc: Tensor, gW: list, gb: list,
                   lr: float, steps: int) -> tuple[Tensor, Tensor]:
    """The support loop reversed, batched in Python: carries the adjoints gW, gb (in place) back
    through every step; returns the adjoints of the initial zs and of K."""
    n = len(gW)
    per_step = 1 + (n - 2 if n > 1 else 0) + n + (n - 1)
    g_zs = torch.zeros_like(g_acc)
    g_k = torch.zeros_like(k_ss)
    for t in range(steps - 1, -1, -1):
        block = saved[t * per_step:(t + 1) * per_step]
        zs_t = block[0]
        acts = [zs_t.relu(), *block[1:1 + max(n - 2, 0)]]
        e = block[1 + max(n - 2, 0):1 + max(n - 2, 0) + n]
        w_t = [None, *block[1 + max(n - 2, 0) + n:]]
        # zs' = zs - lr K e_0 ; acc += lr e_0
        if t == steps - 1:                          # the last step's zs' reaches nothing: its adjoint is 0
            g_e = g_acc.clone()
        else:
            g_e = torch.baddbmm(g_acc, k_ss, g_zs, alpha=-lr)
            g_k.baddbmm_(g_zs, _tr(e[0]), alpha=-lr)
        g_a: list[Tensor | None] = [None] * n
        for k in range(1, n):                                        # the delta chain, reversed
            g_back = threshold_backward(g_e, acts[k - 1], 0.0)
            g_ek = torch.bmm(g_back, _tr(w_t[k]))
            # through the SGD update of W_k and b_k, with the adjoints of their updated values
            g_ek.baddbmm_(acts[k - 1], _tr(gW[k]), alpha=-lr).sub_(gb[k][:, None, :], alpha=lr)
            g_a[k - 1] = bmm(e[k], gW[k])                               # times -lr, below
            gW[k].baddbmm_(_tr(e[k]), g_back)
            g_e = g_ek
        g = g_e * scale                                              # e_{n-1} = (out - y) * scale
        for k in range(n - 1, 0, -1):                                # the support forward, reversed
            gW[k].baddbmm_(_tr(g), acts[k - 1])
            gb[k].add_(g.sum(1))
            g_h = bmm(g, w_t[k])
            if g_a[k - 1] is not None:
                g_h.add_(g_a[k - 1], alpha=-lr)
            g = threshold_backward(g_h, acts[k - 1], 0.0)
        g_zs.add_(g)
    return g_zs, g_k


def second_order_gram(W: Sequence[Tensor], b: Sequence[Tensor], u: Tensor, xs: Tensor, ys: Tensor, ms: Tensor,
                      xq: Tensor, lr: float, steps: int) -> Tensor:
    """Query predictions [B, Q] after `steps` SGD steps on every dense layer, first layer in Gram
    form, differentiable (exactly, second order) through the hand-written reverse above."""
    n = len(W)
    compiled = int(steps) > 0 and native.supports(W, xs, ms)
    out = _SecondOrderGram.apply(n, float(lr), int(steps), int(u.shape[-1]), compiled, *W, *b, u, xs, xq, ys, ms)
    return out[0]
