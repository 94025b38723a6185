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
against that and against a per-task autograd loop), written with ordinary differentiable ops, so
the outer gradient differentiates through it: exact second-order MAML. First order detaches
everything on the support side (the inner gradients are constants) and keeps the query side live,
exactly as first-order MAML prescribes.

Layers are adapted whole (weight and bias together); `network.adapted_layers` finds them.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

# Past this many support rows per item input column, the S x S Gram step costs more than
# updating the first layer's weights explicitly (2 x S x Da x H), so long supports (warm users)
# accumulate the weight update instead; the function is the same.
GRAM_WIDTH_FACTOR = 2


def gram_adapt_predict(W: Sequence[Tensor], b: Sequence[Tensor], layers: tuple[int, ...], u: Tensor, xs: Tensor,
                       ys: Tensor, ms: Tensor, xq: Tensor, lr: float, steps: int, first_order: bool = False,
                       gram: bool | None = None) -> Tensor:
    """One task: adapt `layers` with `steps` SGD steps on the masked support MSE, rate the query.

    W, b: the dense layers' weights and biases, input layer first. u [Du] user part of the input,
    xs [S, Da] / xq [Q, Da] item parts, ys [S], ms [S] (bool mask). Returns the query predictions
    [Q]. Written for one task; vmap it over the tasks of a batch. `gram`: the Gram form (True) or
    the accumulated weight update (False) for the first layer; None picks the cheaper by width.
    """
    sg = (lambda t: t.detach()) if first_order else (lambda t: t)
    n_dense = len(W)
    du = u.shape[-1]
    c = W[0][:, :du] @ u + b[0]                                        # user columns + bias, [H0]
    wa = W[0][:, du:]
    zq = xq @ wa.T + c
    zs = sg(xs @ wa.T + c)
    lowest = min(layers) if layers else n_dense
    if steps <= 0 or lowest >= n_dense:
        return _forward(zq, W, b, n_dense)
    if gram is None:
        gram = xs.shape[-2] <= GRAM_WIDTH_FACTOR * max(xs.shape[-1], 1)
    if 0 in layers:
        us, xs_c = sg(u), sg(xs)
        uu = us @ us + 1.0                                             # user columns and bias of x_j . x_r
        if gram:
            k_ss = xs_c @ xs_c.T + uu
            acc = None                                                 # lr * sum of first-layer deltas
        else:                                                          # long support: accumulate the update
            acc_w = None                                               # lr * sum of delta^T xs, [H0, Da]
            acc_b = None                                               # lr * sum of delta row sums, [H0]
    ws = [sg(w) for w in W]
    bs = [sg(v) for v in b]
    n = ms.sum().clamp(min=1).to(zs.dtype)
    for _ in range(int(steps)):
        # forward on the support rows; acts[k] is the input of layer k + 1
        acts = [zs.relu()]
        for k in range(1, n_dense - 1):
            acts.append((acts[-1] @ ws[k].T + bs[k]).relu())
        out = (acts[-1] @ ws[-1].T + bs[-1]).squeeze(-1) if n_dense > 1 else zs.squeeze(-1)
        diff = (out - ys.to(out.dtype)).where(ms, out.new_zeros(()))
        delta = (2.0 / n * diff).unsqueeze(-1)                         # d loss / d output pre-activation
        grads: dict[int, tuple[Tensor, Tensor]] = {}
        for k in range(n_dense - 1, max(lowest, 1) - 1, -1):
            if k in layers:
                grads[k] = (delta.T @ acts[k - 1], delta.sum(0))
            if k > lowest:                                             # ReLU derivative: sign(relu(z)) is 1 or 0
                delta = (delta @ ws[k]) * acts[k - 1].sign()
        if 0 in layers and gram:                                       # delta is now at layer 0's output
            zs = zs - lr * (k_ss @ delta)
            acc = lr * delta if acc is None else acc + lr * delta
        elif 0 in layers:
            g_w, g_b = delta.T @ xs_c, delta.sum(0)
            zs = zs - lr * (xs_c @ g_w.T + uu * g_b)
            acc_w = lr * g_w if acc_w is None else acc_w + lr * g_w
            acc_b = lr * g_b if acc_b is None else acc_b + lr * g_b
        for k, (gw, gb) in grads.items():
            ws[k] = ws[k] - lr * gw
            bs[k] = bs[k] - lr * gb
    if 0 in layers and gram:
        zq = zq - (xq @ xs_c.T + (u @ us + 1.0)) @ acc
    elif 0 in layers:
        zq = zq - xq @ acc_w.T - (u @ us + 1.0) * acc_b
    # query weights: the adapted ones; first order: the live initial weights plus a constant shift
    if first_order:
        ws = [W[k] + (ws[k] - W[k].detach()) if k in layers else W[k] for k in range(n_dense)]
        bs = [b[k] + (bs[k] - b[k].detach()) if k in layers else b[k] for k in range(n_dense)]
    return _forward(zq, ws, bs, n_dense)


def _forward(z0: Tensor, W: list[Tensor], b: list[Tensor], n_dense: int) -> Tensor:
    """Layers 1.. of the MLP from layer 0's pre-activation."""
    h = z0
    for k in range(1, n_dense):
        h = h.relu() @ W[k].T + b[k]
    return h.squeeze(-1)
