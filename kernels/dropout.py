"""Seeded dropout: one Philox keep-mask helper shared by every kernel that sees ``dropout(x)``.

The mask is a pure function of ``(seed, row, col)``: element ``(n, k)`` of an ``(N, K)`` input is
kept when ``U(seed, n·K + k) >= p``, where ``U`` is ``tl.rand`` (Philox 4x32, 10 rounds).  The
offset is the element's *logical* row-major index, never its memory address, so the mask does not
depend on the input's strides, and the forward (shrink) and backward (dx, dA) kernels regenerate
exactly the same mask from the seed instead of storing it.  This is the law of
``fastadalora.reference.dropout_keep_mask`` (keep with probability ``1 - p``); kept values are
scaled by ``1/(1-p)`` by the callers, as ``nn.Dropout`` does.

Kernel, then launcher:

* ``keep_mask``            the ``@triton.jit`` helper called inside the adapter kernels;
* ``_keep_mask_kernel``    writes the mask to memory (for tests and debugging only);
* ``dropout_keep_mask``    its launcher.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p):
    """Boolean keep mask for the tile ``rows × cols`` (broadcastable int tensors) of an
    ``(·, n_cols)`` input: ``tl.rand(seed, rows·n_cols + cols) >= p``.  Offsets are int64 so
    inputs beyond 2³¹ elements get distinct numbers."""
    offsets = rows.to(tl.int64) * n_cols + cols
    return tl.rand(seed, offsets) >= p


@triton.jit
def _keep_mask_kernel(out_ptr, seed, N, K, p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[n, k] = keep_mask(seed, n, k, K, p)`` as uint8, for an (N, K) row-major buffer."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    keep = keep_mask(seed, rows[:, None], cols[None, :], K, p)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.uint8), mask=inside)


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str = "cuda",
                      block: int = 64) -> torch.Tensor:
    """The boolean keep mask the adapter kernels use for an input of ``shape`` (last dim = K).

    Leading dimensions are flattened, as the kernels see ``x.reshape(-1, K)``.
    """
    shape = tuple(int(s) for s in shape)
    assert len(shape) >= 1, "shape needs at least one dimension"
    assert 0 <= seed < 2**31, "the seed is passed as a 32-bit kernel argument"
    K = shape[-1]
    N = math.prod(shape[:-1])
    out = torch.empty((N, K), dtype=torch.uint8, device=device)
    if out.numel():
        grid = (triton.cdiv(N, block), triton.cdiv(K, block))
        _keep_mask_kernel[grid](out, seed, N, K, float(p), BLOCK_N=block, BLOCK_K=block)
    return out.bool().reshape(shape)
