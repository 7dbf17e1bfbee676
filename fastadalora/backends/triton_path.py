"""The Triton path: the fused adapter op as custom ops over ``fastadalora.kernels`` launchers.

The maths for the shared autograd skeleton (``backends._autograd``).  Per forward::

    y = x·Wᵀ + b                       torch (cuBLAS), the base layer
    h, s = shrink(x, A, e, scale)      kernel: h = dropout(x)·Aᵀ (N×r fp32), s = h·e·scale
    expand_(y, s, B)                   kernel: y += s·Bᵀ, in place

with ``e = E·mask``.  Saved for backward: x, h and the dropout seed (an int drawn from torch's
default CPU generator, so ``torch.manual_seed`` reproduces it), besides the parameters; the keep
mask is regenerated from the seed in backward, never stored.  Backward::

    dh, dE = grad_s(g, B, h, e, mask, scale)   kernel: gs = g·B, dh = gs·e·scale, dE partials
    dx = g·W ; grad_x_(dx, dh, A)              torch base dx, then kernel: dx += (dh·A)⊙keep/(1-p)
    dA = grad_a(dh, x)                         kernel: dhᵀ·dropout(x)
    dB = grad_b(g, h, e, scale)                kernel: gᵀ·s
    dW = gᵀ·x, db = Σ g                        torch, only when required

Each launcher is a ``torch.library.custom_op`` (namespace ``fastadalora``) with a fake
implementation, so ``torch.compile`` traces the op without graph breaks.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from ..kernels import adapter_backward as _bwd
from ..kernels import adapter_forward as _fwd
from ..kernels import dropout as _dropout
from ._autograd import adapter_function


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastadalora::shrink", mutates_args=())
def shrink(x: Tensor, A: Tensor, e: Tensor, scale: float, seed: int, p: float) -> tuple[Tensor, Tensor]:
    """``(h, s)`` = ``(dropout(x)·Aᵀ, h·e·scale)``, both (N, r) fp32."""
    return _fwd.shrink(x, A, e, scale, seed, p)


@shrink.register_fake
def _(x, A, e, scale, seed, p):
    shape = (x.shape[0], A.shape[0])
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("fastadalora::expand_", mutates_args=("y",))
def expand_(y: Tensor, s: Tensor, B: Tensor) -> None:
    """``y += s·Bᵀ`` in place."""
    _fwd.expand_(y, s, B)


@expand_.register_fake
def _(y, s, B):
    return None


@torch.library.custom_op("fastadalora::grad_s", mutates_args=())
def grad_s(g: Tensor, B: Tensor, h: Tensor, e: Tensor, m: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(dh, dE)``: ``(g·B)·e·scale`` (N, r) and ``Σ_n (g·B)·h·scale·m`` (r,), fp32."""
    return _bwd.grad_s(g, B, h, e, m, scale)


@grad_s.register_fake
def _(g, B, h, e, m, scale):
    return h.new_empty(h.shape, dtype=torch.float32), h.new_empty((h.shape[1],), dtype=torch.float32)


@torch.library.custom_op("fastadalora::grad_x_", mutates_args=("dx",))
def grad_x_(dx: Tensor, dh: Tensor, A: Tensor, seed: int, p: float) -> None:
    """``dx += (dh·A) ⊙ keep/(1-p)`` in place."""
    _bwd.grad_x_(dx, dh, A, seed, p)


@grad_x_.register_fake
def _(dx, dh, A, seed, p):
    return None


@torch.library.custom_op("fastadalora::grad_a", mutates_args=())
def grad_a(dh: Tensor, x: Tensor, seed: int, p: float) -> Tensor:
    """``dA = dhᵀ·dropout(x)`` (r, in) in x's dtype."""
    return _bwd.grad_a(dh, x, seed, p)


@grad_a.register_fake
def _(dh, x, seed, p):
    return x.new_empty((dh.shape[1], x.shape[1]))


@torch.library.custom_op("fastadalora::grad_b", mutates_args=())
def grad_b(g: Tensor, h: Tensor, e: Tensor, scale: float) -> Tensor:
    """``dB = gᵀ·(h·e·scale)`` (out, r) in g's dtype."""
    return _bwd.grad_b(g, h, e, scale)


@grad_b.register_fake
def _(g, h, e, scale):
    return g.new_empty((g.shape[1], h.shape[1]))


# --------------------------------------------------------------------------- maths for the skeleton

def _rank_vectors(E: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(e, m)``: ``e = E·mask`` and the mask itself (ones when None), contiguous fp32 (r,)."""
    e = E.reshape(-1).to(torch.float32)
    m = torch.ones_like(e) if mask is None else mask.reshape(-1).to(torch.float32)
    return (e * m).contiguous(), m.contiguous()


def keep_mask(x: Tensor, seed: int, p: float) -> Tensor:
    return _dropout.dropout_keep_mask(seed, x.shape, p, device=x.device)


def forward(x, weight, bias, A, E, B, mask, scale: float, seed: int, p: float, cdt: torch.dtype):
    A, B = A.to(cdt).contiguous(), B.to(cdt).contiguous()
    e, _ = _rank_vectors(E, mask)
    y = torch.nn.functional.linear(x, weight, bias).contiguous()
    h, s = shrink(x.to(cdt), A, e, scale, seed, p)
    if y.dtype == cdt:
        expand_(y, s, B)
    else:
        y.add_(torch.mm(s.to(cdt), B.t()))
    return y, h


def backward(g, x, h, weight, A, E, B, mask, scale: float, seed: int, p: float, needs, cdt: torch.dtype):
    need_x, need_A, need_E, need_B = needs
    Ac, Bc = A.to(cdt).contiguous(), B.to(cdt).contiguous()
    gc = g.to(cdt)
    e, m = _rank_vectors(E, mask)
    dx = dA = dE = dB = None
    if need_x or need_A or need_E:
        dh, dE_full = grad_s(gc, Bc, h, e, m, scale)
        if need_x:
            dx = torch.mm(g, weight).contiguous()
            if dx.dtype == cdt:
                grad_x_(dx, dh, Ac, seed, p)
            else:
                dxa = torch.zeros(dx.shape, dtype=cdt, device=dx.device)
                grad_x_(dxa, dh, Ac, seed, p)
                dx.add_(dxa)
        if need_A:
            dA = grad_a(dh, x.to(cdt), seed, p).to(A.dtype)
        if need_E:
            dE = dE_full.to(E.dtype).view_as(E)
    if need_B:
        dB = grad_b(gc, h, e, scale).to(B.dtype)
    return dx, dA, dE, dB


AdapterLinearFunction = adapter_function(sys.modules[__name__], "Triton")  # this module is the ops


def adapter_linear(x, weight, bias, A, E, B, scale: float, mask=None, dropout_p: float = 0.0, cdt=None):
    return AdapterLinearFunction.apply(x, weight, bias, A, E, B, mask, float(scale), float(dropout_p),
                                       A.dtype if cdt is None else cdt)
