"""Seeded dropout: the counter-based keep-mask law, as ``@triton.jit`` helpers shared by every kernel that
sees ``dropout(x)``.

The keep decision of element ``(n, c)`` (row n of the flattened ``(N, K)`` input, column c) is a pure
function of ``(seed, n, c)``: its logical coordinates, never its memory address, so the mask does not
depend on strides, and the forward (shrink) and backward (dx, dA) kernels regenerate it from the seed
instead of storing it.  One 32-bit hash decides a pair of columns (2j, 2j+1).  On uint32, wrapping::

    mix(x)   = lowbias32: x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15; x *= 0x846CA68B; x ^= x>>16
    ρ(n)     = mix(n ^ mix(seed ^ ROW_SALT))         one per row          (hoisted out of column loops)
    γ(j)     = mix(j ^ mix(seed ^ COL_SALT))         one per column pair  (hoisted out of row loops)
    u        = mix(ρ(n) + γ(c >> 1))
    keep     ⟺ (c even ? u >> 16 : u & 0xFFFF) >= t16,   t16 = min(65535, ⌊p·65536 + ½⌋)

Per element that is half of one add, three xor-shifts and two multiplies, then a compare and a select:
about 10 SASS instructions with the row and column hashes amortised over a vectorised tile (the
compiler shares the hash of a column pair held by one thread; ``tests/test_aot_compile.py`` reports the
count).  The law is restated by ``fastadalora.reference.dropout_keep_mask`` (the oracle) and implemented
in torch ops by ``fastadalora.dropout`` (the CPU path); the three agree bit for bit.  Kept values are
scaled by ``1/(1-p)`` by the callers, as ``nn.Dropout`` does.

Kernel helpers, then the mask-writing kernel (tests, debugging, the GPU check) and its launcher:

* ``row_keys`` / ``col_keys`` / ``keep_from_keys``: the law in three steps, so kernels hoist the keys;
* ``keep_mask``: the three at once;
* ``_keep_mask_kernel`` / ``dropout_keep_mask``: the mask written to memory.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..dropout import COL_SALT as _COL_SALT
from ..dropout import ROW_SALT as _ROW_SALT
from ..dropout import threshold16  # noqa: F401  (the one threshold rule, shared with the CPU twin)

# the law's constants live with its CPU twin (fastadalora.dropout); lowbias32's multipliers are literals
ROW_SALT = tl.constexpr(_ROW_SALT)  # the two salts separate the row and column hashes of one seed
COL_SALT = tl.constexpr(_COL_SALT)
MASK_BLOCK = 64  # tile edge of the mask-writing kernel


# --------------------------------------------------------------------------- kernel helpers
@triton.jit
def _mix32(x):
    """lowbias32 (Wellons' hash prospector): a full-avalanche bijection of uint32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def row_keys(seed, rows):
    """``ρ(n)`` for an int tensor of row indices (uint32)."""
    salt = _mix32(seed.to(tl.uint32) ^ ROW_SALT)
    return _mix32(rows.to(tl.uint32) ^ salt)


@triton.jit
def col_keys(seed, cols):
    """``γ(c >> 1)`` for an int tensor of column indices (uint32): one key per column pair."""
    salt = _mix32(seed.to(tl.uint32) ^ COL_SALT)
    return _mix32((cols >> 1).to(tl.uint32) ^ salt)


@triton.jit
def keep_from_keys(rk, ck, cols, t16):
    """The keep decisions from broadcastable row keys, column keys and column indices (for the parity)."""
    u = _mix32(rk + ck)
    half = tl.where((cols & 1) == 0, u >> 16, u & 0xFFFF)
    return half >= t16.to(tl.uint32)


@triton.jit
def keep_mask(seed, rows, cols, t16):
    """Boolean keep mask of the tile ``rows × cols`` (``rows`` shaped (BN, 1), ``cols`` (1, BK))."""
    return keep_from_keys(row_keys(seed, rows), col_keys(seed, cols), cols, t16)


# --------------------------------------------------------------------------- mask-writing kernel
@triton.jit(do_not_specialize=["seed", "t16", "row0"])
def _keep_mask_kernel(out_ptr, seed, N, K, row0, t16, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[n, k] = keep(seed, row0 + n, k)`` as uint8, for an (N, K) row-major buffer."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    keep = keep_mask(seed, row0 + rows[:, None], cols[None, :], t16)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.uint8), mask=inside)


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str = "cuda",
                      row_start: int = 0) -> torch.Tensor:
    """The boolean keep mask the adapter kernels use for an input of ``shape`` (last dim = K).

    Leading dimensions are flattened, as the kernels see ``x.reshape(-1, K)``; ``row_start`` offsets the
    row index (to look at a window of a larger input).
    """
    shape = tuple(int(s) for s in shape)
    assert len(shape) >= 1, "shape needs at least one dimension"
    assert 0 <= seed < 2**31, "the seed is passed as a 32-bit kernel argument"
    K = shape[-1]
    N = math.prod(shape[:-1])
    assert 0 <= row_start and row_start + N < 2**31, "row indices are 32-bit"
    out = torch.empty((N, K), dtype=torch.uint8, device=device)
    if out.numel():
        grid = (triton.cdiv(N, MASK_BLOCK), triton.cdiv(K, MASK_BLOCK))
        _keep_mask_kernel[grid](out, seed, N, K, row_start, threshold16(p), BLOCK_N=MASK_BLOCK, BLOCK_K=MASK_BLOCK)
    return out.bool().reshape(shape)


def aot_configs() -> list[dict]:
    """The mask-writing kernel's compile, for ahead-of-time compile tests."""
    from . import _config

    return [_config.aot_job(_keep_mask_kernel, f"BLOCK={MASK_BLOCK}", {"out_ptr": torch.uint8},
                            {"BLOCK_N": MASK_BLOCK, "BLOCK_K": MASK_BLOCK}, {"num_warps": 4}, aligned_ints=("K",))]
