"""``adalora_linear``: the one functional entry point; it flattens the input and picks a backend.

Data flows one way: ``layers.AdaLoraLinear`` → here → ``backends.<name>.adapter_linear`` →
(for Triton) ``fastadalora.kernels``.
"""

from __future__ import annotations

import torch

from .backends import get_backend, resolve_backend


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device, or None when autocast is off there."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def adalora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   E: torch.Tensor, B: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """``x·Wᵀ + b + (dropout(x)·(A⊙(E·mask))ᵀ·Bᵀ)·scale`` for x of shape (..., in).

    ``weight=None`` (and ``bias=None``) gives the adapter branch alone, for a base layer that computes
    its own output (a quantized one): the caller adds the two.

    ``weight`` is (out, in) in x's dtype; ``A``, ``E``, ``B`` may be wider (fp32 adapters on a
    bf16/fp16 base): the branch then reads x in its own dtype, computes in the adapter dtype and is
    added into the base output with one rounding, as PEFT's ``SVDLinear``.  Under ``torch.autocast``
    the fused path runs as autocast runs PEFT's layer: the base GEMM and the adapter GEMMs take
    operands in the autocast dtype (fp32 accumulation), the output is in the autocast dtype, and
    the gradients reach the parameters in their own dtype.  ``scale`` is
    ``scaling / (ranknum + 1e-5)``; ``dropout_p`` 0 means no dropout.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if backend is None:
        backend = resolve_backend(x)
    if A.shape[0] == 0:  # every triplet pruned away: the base layer alone
        y = torch.nn.functional.linear(x2d, weight, bias) if weight is not None else x2d.new_zeros(
            (x2d.shape[0], B.shape[0]))
    elif backend == "reference":  # plain autograd: autocast applies to it as to PEFT's layer
        y = get_backend(backend).adapter_linear(x2d, weight, bias, A, E, B, scale, mask, dropout_p)
    else:
        cdt = autocast_dtype(x)
        if cdt is None:
            y = get_backend(backend).adapter_linear(x2d, weight, bias, A, E, B, scale, mask, dropout_p)
        else:  # autocast: cast what autocast would cast, then run the fused op with autocast off
            device_type = x.device.type
            x2d = x2d.to(cdt)  # the weight is cast by the backend, in forward and again in backward (not saved)
            bias = None if bias is None else bias.to(cdt)
            with torch.autocast(device_type, enabled=False):
                y = get_backend(backend).adapter_linear(x2d, weight, bias, A, E, B, scale, mask, dropout_p, cdt)
    return y.reshape(*lead, y.shape[-1])
