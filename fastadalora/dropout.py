"""The dropout keep-mask law of the CPU path: a pure function of ``(seed, shape)``.

Every fused backend regenerates the mask from the seed in backward instead of storing it; the
Triton kernels use ``fastadalora.kernels.dropout``.  Kept elements are scaled by ``1/(1-p)``, as
``nn.Dropout`` does.
"""

from __future__ import annotations

from typing import Sequence

import torch


def keep_mask(shape: Sequence[int], seed: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean keep mask (keep with probability ``1 - p``) for an input of ``shape``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(tuple(shape), dtype=torch.float32, device=device).bernoulli_(1.0 - p, generator=gen).bool()


def keep_scale(shape: Sequence[int], seed: int, p: float, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``keep/(1-p)`` as a tensor of ``dtype``: the factor ``dropout(x) = x · keep_scale``."""
    return keep_mask(shape, seed, p, device).to(dtype).mul_(1.0 / (1.0 - p))
