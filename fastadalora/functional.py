"""``adalora_linear``: the one functional entry point; it flattens the input and picks a backend.

Data flows one way: ``layers.AdaLoraLinear`` → here → ``backends.<name>.adapter_linear`` →
(for Triton) ``fastadalora.kernels``.
"""

from __future__ import annotations

import torch

from .backends import get_backend, resolve_backend


def adalora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   E: torch.Tensor, B: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """``x·Wᵀ + b + (dropout(x)·(A⊙(E·mask))ᵀ·Bᵀ)·scale`` for x of shape (..., in).

    ``weight`` is (out, in); ``scale`` is ``scaling / (ranknum + 1e-5)``; ``dropout_p`` 0 means
    no dropout.  Under ``torch.autocast`` the reference path runs, so autocast's casting rules
    apply to every GEMM exactly as for PEFT.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if A.shape[0] == 0:  # every triplet pruned away: the base layer alone
        y = torch.nn.functional.linear(x2d, weight, bias)
    else:
        if backend is None:
            backend = "reference" if torch.is_autocast_enabled(x.device.type) else resolve_backend(x)
        y = get_backend(backend).adapter_linear(x2d, weight, bias, A, E, B, scale, mask, dropout_p)
    return y.reshape(*lead, y.shape[-1])
