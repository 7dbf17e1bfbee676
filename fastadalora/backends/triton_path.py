"""The Triton path: the fused adapter op as two custom ops over ``fastadalora.kernels`` launchers.

The maths for the shared autograd skeleton (``backends._autograd``), with ``es = E·mask·scale``::

    forward                                      fastadalora::adapter_forward
      y = x·Wᵀ + b                                 torch (cuBLAS), the base layer, base dtype
      h = dropout(x)·Aᵀ                            shrink kernel: N×r fp32, saved for backward
      y += (h·diag(es))·Bᵀ                         rank-expand kernel, in place, one rounding
    backward                                     fastadalora::adapter_backward
      dx = g·W                                     torch, then in place:
      gs = g·B, P = gᵀ·h, dE partials              one pass over g (grad_g kernel)
      dx += ((gs·diag(es))·A) ⊙ keep/(1-p)          rank-expand kernel with the mask
      dA = (gs·diag(es))ᵀ·dropout(x)                grad_a kernel (token-split partials)
      dA, dB = P·diag(es), dE = Σ B⊙P·scale·mask    one reduce kernel, into the parameters' dtypes

The kernels read x/g in the base dtype and A, E, B in the adapter dtype as they are (no host-side
casts or copies) and round the dots' operands to ``cdt`` inside; fp32 dots follow
``torch.get_float32_matmul_precision()`` ("highest": exact fp32, else TF32; see ``kernels._config``).
The dropout keep mask is regenerated from the seed (drawn by the skeleton from torch's default CPU
generator, so ``torch.manual_seed`` reproduces it), never stored.

Each op is a ``torch.library.custom_op`` (namespace ``fastadalora``) with a fake implementation, so
``torch.compile`` traces it without graph breaks.  Gradients that are not needed come back empty.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from ..kernels import adapter_backward as _bwd
from ..kernels import adapter_forward as _fwd
from ..kernels import dropout as _dropout
from ._autograd import adapter_function

_EMPTY = (0,)


# --------------------------------------------------------------------------- custom ops
def _adapter_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, E: Tensor, m: Optional[Tensor],
                    B: Tensor, scale: float, seed: int, p: float, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(y, h)``: ``y = x·Wᵀ + b + (h·diag(E·m·scale))·Bᵀ`` in x's dtype and ``h = dropout(x)·Aᵀ`` fp32.

    ``weight`` None: ``y`` is the branch alone, in ``cdt`` (expanded into zeros: one rounding)."""
    y = torch.nn.functional.linear(x, weight, bias) if weight is not None else x.new_zeros((x.shape[0], B.shape[0]),
                                                                                            dtype=cdt)
    h = _fwd.shrink(x, A, seed, p, cdt)
    _fwd.expand_(y, h, E, m, B, scale, cdt)
    return y, h


adapter_forward = torch.library.custom_op("fastadalora::adapter_forward", mutates_args=())(_adapter_forward)


@adapter_forward.register_fake
def _(x, weight, bias, A, E, m, B, scale, seed, p, cdt):
    y = x.new_empty((x.shape[0], B.shape[0]), dtype=x.dtype if weight is not None else cdt)
    return y, x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32)


def _adapter_backward(g: Tensor, x: Tensor, h: Tensor, weight: Optional[Tensor], A: Tensor, E: Tensor, m: Optional[Tensor],
                     B: Tensor, scale: float, seed: int, p: float, cdt: torch.dtype, need_x: bool, need_A: bool,
                     need_E: bool, need_B: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dA, dE, dB)`` for the output gradient g; an unneeded one is an empty tensor."""
    dx = None if not need_x else torch.mm(g, weight) if weight is not None else x.new_zeros(x.shape)
    dA, dE, dB = _bwd.backward(g, x, h, A, E, m, B, scale, seed, p, cdt, dx, need_A, need_E, need_B)
    return tuple(t if t is not None else ref.new_empty(_EMPTY) for t, ref in ((dx, x), (dA, A), (dE, E), (dB, B)))


adapter_backward = torch.library.custom_op("fastadalora::adapter_backward", mutates_args=())(_adapter_backward)


@adapter_backward.register_fake
def _(g, x, h, weight, A, E, m, B, scale, seed, p, cdt, need_x, need_A, need_E, need_B):
    return tuple(ref.new_empty(ref.shape if need else _EMPTY)
                 for ref, need in ((x, need_x), (A, need_A), (E, need_E), (B, need_B)))


# --------------------------------------------------------------------------- maths for the skeleton
def _mask_vector(E: Tensor, mask: Tensor | None) -> Tensor | None:
    """The rank mask as the kernels read it: (r,) contiguous in E's dtype (as the reference multiplies)."""
    return None if mask is None else mask.reshape(-1).to(E.dtype).contiguous()


def keep_mask(x: Tensor, seed: int, p: float) -> Tensor:
    return _dropout.dropout_keep_mask(seed, x.shape, p, device=x.device)


def forward(x, weight, bias, A, E, B, mask, scale: float, seed: int, p: float, cdt: torch.dtype):
    return adapter_forward(x, weight, bias, A, E, _mask_vector(E, mask), B, scale, seed, p, cdt)


def backward(g, x, h, weight, A, E, B, mask, scale: float, seed: int, p: float, needs, cdt: torch.dtype):
    need_x, need_A, need_E, need_B = (bool(n) for n in needs)
    grads = adapter_backward(g, x, h, weight, A, E, _mask_vector(E, mask), B, scale, seed, p, cdt,
                             need_x, need_A, need_E, need_B)
    return tuple(t if need else None for t, need in zip(grads, (need_x, need_A, need_E, need_B)))


AdapterLinearFunction = adapter_function(sys.modules[__name__], "Triton")  # this module is the ops


def adapter_linear(x, weight, bias, A, E, B, scale: float, mask=None, dropout_p: float = 0.0, cdt=None):
    return AdapterLinearFunction.apply(x, weight, bias, A, E, B, mask, float(scale), float(dropout_p),
                                       A.dtype if cdt is None else cdt)
