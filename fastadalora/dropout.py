"""The dropout keep-mask law in torch ops (the CPU path's twin of ``fastadalora.kernels.dropout``).

The keep decision of element ``(n, c)`` of the flattened ``(N, K)`` input is a pure function of
``(seed, n, c)`` (see ``kernels/dropout.py`` for the law: a row hash ρ(n) and a column-pair hash
γ(c >> 1), added and mixed into one 32-bit u; the even column of the pair is kept when u's top 16 bits
reach ``threshold16(p)``, the odd one when its bottom 16 bits do).  Every backend regenerates the mask
from the seed in backward instead of storing it, and all three (reference, torch, Triton) agree bit
for bit.  Kept elements are scaled by ``1/(1-p)``, as ``nn.Dropout`` does.

uint32 arithmetic is done in int32 tensors, whose multiplication and addition wrap the same way; a
logical right shift is an arithmetic one masked.  On CPU the work runs block by block over ~32K
elements, so its passes stay in cache (several times faster than one pass per op over a large input,
and than ``bernoulli_``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

M1, M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
ROW_SALT, COL_SALT = 0x2545F491, 0x68E31DA4
_MASK32 = 0xFFFFFFFF
_CHUNK = 32768  # elements per block on CPU


def threshold16(p: float) -> int:
    """The 16-bit drop threshold: ``min(65535, ⌊p·65536 + ½⌋)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(65535, int(p * 65536.0 + 0.5))


def _i32(v: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _mix32_int(x: int) -> int:
    """lowbias32 on a Python int (for the per-seed salts)."""
    x ^= x >> 16
    x = (x * M1) & _MASK32
    x ^= x >> 15
    x = (x * M2) & _MASK32
    return x ^ (x >> 16)


def _mix32_int64(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of uint32 values (the 1-D row and column hashes)."""
    x = x ^ (x >> 16)
    x = (x * M1) & _MASK32  # < 2^63: exact
    x = x ^ (x >> 15)
    x = ((x * (M2 & 0xFFFF)) + (((x * (M2 >> 16)) & 0xFFFF) << 16)) & _MASK32  # x·M2 mod 2^32 without overflow
    return x ^ (x >> 16)


def _keys(start: int, count: int, seed: int, salt: int, device) -> torch.Tensor:
    """``mix(i ^ mix(seed ^ salt))`` for ``i`` in ``[start, start + count)``, as int32 bit patterns."""
    s = _mix32_int((int(seed) ^ salt) & _MASK32)
    i = torch.arange(start, start + count, dtype=torch.int64, device=device)
    k = _mix32_int64(i ^ s)
    return torch.where(k >= 1 << 31, k - (1 << 32), k).to(torch.int32)


def _keep_into(out: torch.Tensor, rho: torch.Tensor, gamma: torch.Tensor, t16: int,
               v: torch.Tensor, t: torch.Tensor) -> None:
    """``out`` (bool, (n, K)) = keep decisions from the int32 row keys ``rho`` (n, 1) and pair keys
    ``gamma`` (1, ⌈K/2⌉); ``v``, ``t`` are int32 work buffers of shape (n, ⌈K/2⌉)."""
    torch.add(rho, gamma, out=v)  # u = mix(ρ + γ), in place in v
    for shift, low in ((16, 0xFFFF), (15, 0x1FFFF)):
        torch.bitwise_right_shift(v, shift, out=t)
        v.bitwise_xor_(t.bitwise_and_(low))
        v.mul_(M1 if shift == 16 else _i32(M2))
    # the odd column of each pair: the bottom half of u = (v ^ v >>> 16) & 0xFFFF
    n_odd = out.shape[1] // 2
    torch.bitwise_right_shift(v[:, :n_odd], 16, out=t[:, :n_odd])
    t[:, :n_odd].bitwise_xor_(v[:, :n_odd]).bitwise_and_(0xFFFF)
    torch.ge(t[:, :n_odd], t16, out=out[:, 1::2])
    # the even column: the top half of u (= that of v), compared as signed after flipping the sign bit
    torch.ge(v.bitwise_xor_(-(1 << 31)), (t16 << 16) - (1 << 31), out=out[:, 0::2])


def _fill(out: torch.Tensor, seed: int, p: float, row_start: int, scale: float | None) -> None:
    """Write the keep mask (``scale`` None, bool ``out``) or ``keep·scale`` into ``out`` of shape (N, K)."""
    N, K = out.shape
    if out.numel() == 0:
        return
    t16 = threshold16(p)
    pairs = (K + 1) // 2
    rho = _keys(row_start, N, seed, ROW_SALT, out.device).view(N, 1)
    gamma = _keys(0, pairs, seed, COL_SALT, out.device).view(1, pairs)
    rows = N if out.device.type != "cpu" else max(1, _CHUNK // K)  # on CPU: blocks that stay in cache
    rows = min(rows, N)
    v = torch.empty((rows, pairs), dtype=torch.int32, device=out.device)
    t = torch.empty_like(v)
    keep = torch.empty((rows, K), dtype=torch.bool, device=out.device) if scale is not None else None
    factor = None if scale is None else torch.tensor(scale, dtype=out.dtype)  # bool · 0-dim: out's dtype
    for r0 in range(0, N, rows):
        n = min(N, r0 + rows) - r0
        if scale is None:
            _keep_into(out[r0:r0 + n], rho[r0:r0 + n], gamma, t16, v[:n], t[:n])
        else:
            _keep_into(keep[:n], rho[r0:r0 + n], gamma, t16, v[:n], t[:n])
            torch.mul(keep[:n], factor, out=out[r0:r0 + n])


def keep_mask(shape: Sequence[int], seed: int, p: float, device: torch.device | str = "cpu",
              row_start: int = 0) -> torch.Tensor:
    """The boolean keep mask for an input of ``shape`` (leading dimensions flattened into rows;
    ``row_start`` offsets the row index)."""
    shape = tuple(int(s) for s in shape)
    out = torch.empty((math.prod(shape[:-1]), shape[-1]), dtype=torch.bool, device=device)
    _fill(out, seed, p, row_start, None)
    return out.view(shape)


def keep_scale(shape: Sequence[int], seed: int, p: float, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``keep/(1-p)`` as a tensor of ``dtype``: the factor ``dropout(x) = x · keep_scale``."""
    shape = tuple(int(s) for s in shape)
    out = torch.empty((math.prod(shape[:-1]), shape[-1]), dtype=dtype, device=device)
    _fill(out, seed, p, 0, 1.0 / (1.0 - p))
    return out.view(shape)
