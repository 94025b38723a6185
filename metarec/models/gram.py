"""MeLU's local update in closed form: hand-derived gradients and a Gram-matrix first layer.

Why: the local update runs `steps` times per task per meta-batch, and autograd-inside-vmap pays
for generic machinery there (per-task copies of the 64 x 256 first-layer weight, zero-padded
slice gradients, one kernel launch per tiny op). The decision layers are a plain ReLU MLP, so the
support-loss gradient can be written out by hand (a dozen matmuls per step), and the first layer
never needs to be materialised per task at all:

    an SGD step on W0 changes the pre-activation of any input row x by  -lr * sum_j delta_j (x_j . x),

where the sum runs over the support rows x_j and delta_j is the gradient at their pre-activations.
With the support Gram matrix K = X_s X_s^T (user columns and the bias folded in as u.u + 1) the
support pre-activations update as  Z_s <- Z_s - lr K delta,  and the query's as
Z_q <- Z_q - lr K_qs delta,  so a step costs S x S x H instead of 2 x S x D x H, and the
per-task weight copy disappears. Supports much longer than the input is wide keep the explicit
form (the accumulated update of the first layer's weights), which is cheaper there.

This is the same function as `network.inner_adapt` followed by `network.mlp` (the tests check it
against that and against a per-task autograd loop), written batched over tasks with ordinary
differentiable ops, so autograd can differentiate through it: exact second-order MAML. First order
detaches everything on the support side (the inner gradients are constants; the support state is
then updated in place) and keeps the query side live, exactly as first-order MAML prescribes.

Layers are adapted whole (weight and bias together); `network.adapted_layers` finds them.

Long query lists (catalogue scoring: thousands of candidates per user) take the query side the
other way round: the first layer's accumulated update is folded into the task's own item weights,
W_a - (X_s^T acc)^T (or W_a - acc_w), once per task, and every candidate then costs one product
with that folded weight instead of the shared product plus the Gram correction through [Q, S].
`fold_query` says when that is cheaper; ten-item training queries keep the Gram form, so training
is unchanged. Both are the same function (tests/test_melu.py checks them against each other).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

threshold_backward = torch.ops.aten.threshold_backward   # ReLU's backward: keep where the input was > 0

# Past this many support rows per item input column, the S x S Gram step costs more than
# updating the first layer's weights explicitly (2 x S x Da x H), so long supports (warm users)
# accumulate the weight update instead; the function is the same.
GRAM_WIDTH_FACTOR = 2


def fold_query(n_query: int, item_width: int, hidden: int) -> bool:
    """Whether the query side is cheaper with the first-layer update folded into per-task item
    weights: Q x Da x H0 multiply-adds, plus S x Da x H0 once per task to fold, against the shared
    Q x Da x H0 product plus the Gram correction's Q x (Da x S + S x H0). Per support row the
    fold costs Da x H0 and saves Q x (Da + H0), so it wins once Q (Da + H0) > Da H0: past about
    40 candidates at the default widths, never at a ten-item training query."""
    return n_query * (item_width + hidden) > item_width * hidden


def gram_adapt_predict(W: Sequence[Tensor], b: Sequence[Tensor], layers: tuple[int, ...], u: Tensor, xs: Tensor,
                       ys: Tensor, ms: Tensor, xq: Tensor, lr: float, steps: int, first_order: bool = False,
                       gram: bool | None = None) -> Tensor:
    """A batch of tasks: adapt `layers` with `steps` SGD steps on each task's masked support MSE,
    rate each task's query.

    W, b: the dense layers' shared weights and biases, input layer first. u [B, Du] user parts of
    the input, xs [B, S, Da] / xq [B, Q, Da] item parts, ys [B, S], ms [B, S] (bool mask). Returns
    the query predictions [B, Q]. Written batched (not vmapped): the adapted weights carry the task
    dimension in front, every product is one batched matmul, and the fused `baddbmm` forms keep a
    step under twenty kernels, whose count is what a step costs at these sizes. `gram`: the Gram form
    (True) or the accumulated weight update (False) for the first layer; None picks the cheaper.
    """
    sg = (lambda t: t.detach()) if first_order else (lambda t: t)
    n_dense = len(W)
    du = u.shape[-1]
    c = F.linear(u, W[0][:, :du], b[0])[:, None, :]                   # user columns + bias, [B, 1, H0]
    wa = W[0][:, du:]
    zs = sg(F.linear(xs, wa) + c)
    lowest = min(layers) if layers else n_dense
    if steps <= 0 or lowest >= n_dense:
        return _forward(F.linear(xq, wa) + c, W, b, n_dense)
    folded = 0 in layers and fold_query(xq.shape[-2], xq.shape[-1], wa.shape[0])
    zq = None if folded else F.linear(xq, wa) + c
    if gram is None:
        gram = xs.shape[-2] <= GRAM_WIDTH_FACTOR * max(xs.shape[-1], 1)
    ws, bs = [sg(w) for w in W], [sg(v) for v in b]
    # Nothing on the support side is differentiated (first order, or no gradient at all): update
    # the task's state in place instead of allocating and copying it every step.
    inplace = first_order or not torch.is_grad_enabled()
    if inplace:
        zs = zs.clone()
    if 0 in layers:
        us, xs_c = sg(u), sg(xs)
        uu = ((us * us).sum(-1) + 1.0)[:, None, None]                  # user columns and bias of x_j . x_r
        if gram:
            k_ss = torch.baddbmm(uu, xs_c, xs_c.transpose(1, 2))       # [B, S, S]
            acc = None                                                 # lr * sum of first-layer deltas
        else:                                                          # long support: accumulate the update
            acc_w = None                                               # lr * sum of delta^T xs, [B, H0, Da]
            acc_b = None                                               # lr * sum of delta row sums, [B, 1, H0]
    # d loss / d output = 2 / n_task * (out - y) on real rows, 0 on padding: one fused multiply-add
    scale = torch.where(ms, 2.0 / ms.sum(-1, keepdim=True).clamp(min=1).to(zs.dtype), zs.new_zeros(()))[..., None]
    target = -(ys.to(zs.dtype)[..., None] * scale)
    for step in range(int(steps)):
        last = step == int(steps) - 1                                  # the last update of zs reaches nothing
        acts = [zs.relu()]                                             # acts[k]: the input of layer k + 1
        for k in range(1, n_dense - 1):
            acts.append(_linear(acts[-1], ws[k], bs[k]).relu())
        out = _linear(acts[-1], ws[-1], bs[-1]) if n_dense > 1 else zs
        delta = torch.addcmul(target, out, scale)                      # [B, S, 1]
        for k in range(n_dense - 1, max(lowest, 1) - 1, -1):
            back = _backward(delta, ws[k]) if k > lowest else None
            if k in layers and inplace and ws[k].dim() == 3:           # SGD step fused with its gradient
                ws[k].baddbmm_(delta.transpose(1, 2), acts[k - 1], alpha=-lr)
                bs[k].sub_(delta.sum(1), alpha=lr)
            elif k in layers:                                          # (the first step makes the per-task copy)
                ws[k] = torch.baddbmm(ws[k], delta.transpose(1, 2), acts[k - 1], alpha=-lr)
                bs[k] = torch.add(bs[k], delta.sum(1), alpha=-lr)
            if back is not None:                                       # through the ReLU: keep where it was active
                delta = threshold_backward(back, acts[k - 1], 0.0)
        if 0 in layers and gram:                                       # delta is now at layer 0's output
            if not last:
                zs = zs.baddbmm_(k_ss, delta, alpha=-lr) if inplace else torch.baddbmm(zs, k_ss, delta, alpha=-lr)
            if acc is None:
                acc = lr * delta
            else:
                acc = acc.add_(delta, alpha=lr) if inplace else torch.add(acc, delta, alpha=lr)
        elif 0 in layers:
            g_w, g_b = torch.bmm(delta.transpose(1, 2), xs_c), delta.sum(1, keepdim=True)
            if not last:
                zs = zs - lr * torch.baddbmm(uu * g_b, xs_c, g_w.transpose(1, 2))
            acc_w = lr * g_w if acc_w is None else torch.add(acc_w, g_w, alpha=lr)
            acc_b = lr * g_b if acc_b is None else torch.add(acc_b, g_b, alpha=lr)
    if 0 in layers:
        uq = ((u * us).sum(-1) + 1.0)[:, None, None]
        if folded:   # the task's adapted item weights [B, Da, H0] and user-and-bias row [B, 1, H0]
            if gram:
                wq, cq = wa.t() - torch.bmm(xs_c.transpose(1, 2), acc), c - uq * acc.sum(1, keepdim=True)
            else:
                wq, cq = wa.t() - acc_w.transpose(1, 2), c - uq * acc_b
            zq = torch.baddbmm(cq, xq, wq)
        elif gram:
            zq = zq - torch.bmm(torch.baddbmm(uq, xq, xs_c.transpose(1, 2)), acc)
        else:
            zq = zq - torch.baddbmm(uq * acc_b, xq, acc_w.transpose(1, 2))
    return _query(zq, W, b, ws, bs, layers, first_order)


def _query(zq: Tensor, W: Sequence[Tensor], b: Sequence[Tensor], ws: list[Tensor], bs: list[Tensor],
           layers: tuple[int, ...], first_order: bool) -> Tensor:
    """The query ratings from layer 0's adapted pre-activation and the adapted weights `ws`, `bs`;
    under first order the live initial weights plus the (constant) adaptation shift."""
    n_dense = len(W)
    if first_order:
        ws = [W[k] + (ws[k] - W[k].detach()) if k in layers else W[k] for k in range(n_dense)]
        bs = [b[k] + (bs[k] - b[k].detach()) if k in layers else b[k] for k in range(n_dense)]
    return _forward(zq, ws, bs, n_dense)


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x [B, N, in] through a shared (w [out, in], b [out]) or per-task (w [B, out, in], b [B, out]) layer."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    return torch.baddbmm(b.unsqueeze(-2), x, w.transpose(1, 2))


def _backward(delta: Tensor, w: Tensor) -> Tensor:
    """delta [B, N, out] back through a shared or per-task weight: delta @ w. Through a per-task
    one-unit output layer (inner dimension 1) the product is an outer product, written as a
    broadcast multiply (exact, and cheaper than a degenerate batched matmul)."""
    if w.dim() == 2:
        return delta @ w
    return delta * w if delta.shape[-1] == 1 else torch.bmm(delta, w)


def _forward(z0: Tensor, W: list[Tensor], b: list[Tensor], n_dense: int) -> Tensor:
    """Layers 1.. of the MLP from layer 0's pre-activation [B, N, H0]: ratings [B, N]."""
    h = z0
    inplace = not torch.is_grad_enabled()   # each layer's input is a fresh tensor of this function's
    for k in range(1, n_dense):
        h = _linear(h.relu_() if inplace else h.relu(), W[k], b[k])
    return h.squeeze(-1)
