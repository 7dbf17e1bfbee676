"""The one autograd skeleton of the fused adapter op; each backend supplies only its maths.

A backend hands ``adapter_function(ops)`` an object with three functions::

    ops.forward(x, weight, bias, A, E, B, mask, scale, seed, p, cdt) -> (y, h)
    ops.backward(g, x, h, weight, A, E, B, mask, scale, seed, p, needs, cdt) -> (dx, dA, dE, dB)
    ops.keep_mask(x, seed, p) -> bool tensor shaped like x

Precision contract (what PEFT's ``SVDLinear`` computes):

* ``weight`` None (and ``bias`` None) means "the branch alone": ``y`` is the adapter output, in
  ``cdt``, and the caller adds it to a base output it computed itself (a quantized base layer), so
  the sum is rounded once.
* ``x`` and ``bias`` have the base dtype; ``weight`` has it too, or is wider (an fp32 base under
  autocast): the skeleton then casts it to x's dtype for the base GEMM in forward and again in
  backward, and saves the weight itself, so no cast copy of the frozen weight lives from forward to
  backward (``nn.Linear`` under autocast keeps one per layer); ``A``, ``E``, ``B`` have the adapter dtype
  (fp32 on a bf16/fp16 base by default); ``cdt`` is the dtype of the adapter GEMMs' operands:
  the adapter dtype, or the autocast dtype under ``torch.autocast``.  Accumulation is fp32 (or
  wider).
* ``y`` has the base dtype: the base output plus the adapter branch, added with one rounding.
* ``h = dropout(x)·Aᵀ`` (N×r) is the one intermediate saved for backward, in ``cdt`` or wider.
* ``dx`` has x's dtype; ``dA``, ``dE``, ``dB`` have the parameters' dtypes.

The dropout keep-mask is regenerated from ``seed`` (drawn here, from torch's default generator)
and never stored.  ``needs`` = (dx, dA, dE, dB) flags; a gradient not needed is None.  The base
layer's own gradients (normally frozen, so never computed) are the skeleton's::

    dW = gᵀ·x,  db = Σ_n g

Second order (``backward(create_graph=True)``): the fast backward treats ``h`` as a constant, which
would give wrong second derivatives.  Under ``create_graph`` the skeleton instead differentiates the
formula itself with plain torch ops (the same keep-mask), so every backend's double backward is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import draw_dropout_seed


def _as_base(weight, x):
    """The base weight in x's dtype (a cast copy only when it is wider: an fp32 base under autocast)."""
    return weight if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)


def _forward(ops, ctx, x, weight, bias, A, E, B, mask, scale: float, dropout_p: float, cdt: torch.dtype):
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    y, h = ops.forward(x, _as_base(weight, x), bias, A, E, B, mask, scale, seed, dropout_p, cdt)
    ctx.save_for_backward(x, h, weight, A, E, B, mask)
    ctx.ops, ctx.seed, ctx.scale, ctx.dropout_p, ctx.has_bias, ctx.cdt = ops, seed, scale, dropout_p, bias is not None, cdt
    return y


def _backward(ctx, g):
    x, h, weight, A, E, B, mask = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_E, need_B = ctx.needs_input_grad[:6]
    if torch.is_grad_enabled():  # backward(create_graph=True): a differentiable backward
        return (*_grads_of_formula(ctx, g, x, weight, A, E, B, mask), None, None, None, None)
    dx, dA, dE, dB = ctx.ops.backward(g, x, h, _as_base(weight, x) if need_x else weight, A, E, B, mask, ctx.scale,
                                      ctx.seed, ctx.dropout_p,
                                      (need_x, need_A, need_E, need_B), ctx.cdt)
    dW = torch.mm(g.t(), x) if need_w else None
    db = g.sum(0) if need_b and ctx.has_bias else None
    return dx, dW, db, dA, dE, dB, None, None, None, None


def _grads_of_formula(ctx, g, x, weight, A, E, B, mask):
    """``(dx, dW, db, dA, dE, dB)`` with a graph, by differentiating ``y`` written in torch ops."""
    needs = ctx.needs_input_grad[:6]
    saved = {0: x, 1: weight, 3: A, 4: E, 5: B}
    wanted = [i for i in saved if needs[i]]
    out = [None] * 6
    cdt = ctx.cdt
    with torch.enable_grad():  # x, W, A, E, B keep their own history through saved_tensors
        xd = x.to(cdt)
        if ctx.dropout_p > 0.0:
            xd = xd * ctx.ops.keep_mask(x, ctx.seed, ctx.dropout_p).to(cdt) / (1.0 - ctx.dropout_p)
        e = E.reshape(-1) if mask is None else E.reshape(-1) * mask.to(E.dtype)
        branch = ((xd @ A.to(cdt).t()) * e.to(cdt)) @ B.to(cdt).t() * ctx.scale
        y = branch if weight is None else F.linear(x, _as_base(weight, x)) + branch.to(x.dtype)
        grads = torch.autograd.grad(y, [saved[i] for i in wanted], g, create_graph=True, allow_unused=True) \
            if wanted else ()
        if needs[2] and ctx.has_bias:
            out[2] = g.sum(0)
    for i, gi in zip(wanted, grads):
        out[i] = gi
    return out


def adapter_function(ops, name: str) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` running ``ops``' maths in the shared skeleton.

    ``apply(x, weight, bias, A, E, B, mask, scale, dropout_p, cdt)``.
    """

    class AdapterLinearFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, A, E, B, mask, scale: float, dropout_p: float, cdt: torch.dtype):
            return _forward(ops, ctx, x, weight, bias, A, E, B, mask, scale, dropout_p, cdt)

        @staticmethod
        def backward(ctx, g):
            return _backward(ctx, g)

    AdapterLinearFunction.__name__ = AdapterLinearFunction.__qualname__ = f"{name}AdapterLinearFunction"
    return AdapterLinearFunction
