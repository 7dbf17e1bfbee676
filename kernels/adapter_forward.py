"""Forward of the fused adapter: the shrink and expand kernels, their launchers, the block sizes.

With ``e = E·mask`` (an r-vector) the adapter branch is ``y += (dropout(x)·Aᵀ)·diag(e)·Bᵀ·scale``.
The base ``y = x·Wᵀ + b`` is left to torch (cuBLAS); then two kernels finish the job:

* ``_shrink_kernel``  ``h = dropout(x)·Aᵀ`` (N×r, fp32), the whole padded rank in one tile, with
  the Philox dropout fused into the x load; its epilogue also writes ``s = h·e·scale`` (N×r fp32).
  ``h`` is what backward keeps; ``s`` is consumed by the expand and thrown away.
* ``_rank_expand_kernel``  ``out += left·right`` in place (launcher ``rank_expand_``); the expand
  ``y += s·Bᵀ`` is the only pass over the N×out output beyond the base GEMM's own.  The backward's
  ``dx += (dh·A)⊙keep/(1-p)`` is the same kernel with dropout.

Block sizes for every adapter kernel (forward and backward) come from ``kernel_config``.
Every kernel accumulates in fp32 and upcasts each tile to fp32 right after ``tl.load`` (the
interpreter mishandles bf16 arithmetic otherwise); tiles are cast to ``DOT_DTYPE`` just before
``tl.dot`` (see ``dot_dtype``).  Every load is masked: ragged N/in/out edges, padded rank lanes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dropout import keep_mask

MAX_RANK = 256
# Padded rank tiles: tl.dot needs every dim >= 16 (bf16 fails to compile below).  Three tiers, not
# every power of two: the shrink is memory-bound up to r ~ 256, so padding costs little, and each
# tier multiplies the kernel variants to compile (see tests/test_aot_compile.py).
RANK_TIERS = (16, 64, 256)
RANK_CHUNK = 64  # rank step of the kernels that reduce over the rank (expand, dx)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------- launch settings
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one adapter kernel for one (rank, dtype)."""

    BLOCK_N: int
    BLOCK_K: int  # along in_features
    BLOCK_OUT: int  # along out_features
    BLOCK_R: int  # the padded rank, or the rank step of a kernel that reduces over the rank
    num_warps: int
    num_stages: int


def rank_tile(r: int) -> int:
    """The padded rank tile: the smallest ``RANK_TIERS`` entry >= r."""
    assert 1 <= r <= MAX_RANK, f"rank must be in [1, {MAX_RANK}], got {r}"
    return next(t for t in RANK_TIERS if t >= r)


def kernel_config(r: int, dtype: torch.dtype, reduces_rank: bool = False) -> KernelConfig:
    """The one block-size helper (no autotuning: its first-call cost is high and its choice would
    have to be carried from forward to backward).

    * ``reduces_rank=False`` (shrink, grad_s, grad_a, grad_b): the whole padded rank is one tile
      dimension, so the other tile edge shrinks as the rank grows, keeping pipelined shared memory
      under sm_80's 163 KiB (``tests/test_aot_compile.py`` checks it; the fp32 h/dh tiles are
      pipelined through shared memory too, hence two stages for the wide tiles);
    * ``reduces_rank=True`` (the rank expand: expand, grad_x): 64×64 output tiles, rank stepped by ≤ 64.
    """
    assert dtype in _TL_DTYPES, f"unsupported dtype {dtype}"
    block_r = rank_tile(r)
    if reduces_rank:
        return KernelConfig(BLOCK_N=64, BLOCK_K=64, BLOCK_OUT=64, BLOCK_R=min(block_r, RANK_CHUNK),
                            num_warps=4, num_stages=3)
    wide = block_r >= 128
    return KernelConfig(
        BLOCK_N=64,
        BLOCK_K=32 if wide else 64,
        BLOCK_OUT=32 if wide else 64,
        BLOCK_R=block_r,
        num_warps=8 if block_r == MAX_RANK else 4,
        num_stages=2 if wide else 3,
    )


def dot_dtype(dtype: torch.dtype):
    """The operand dtype for ``tl.dot``: the input dtype (tensor cores for fp16/bf16), except bf16
    under ``TRITON_INTERPRET=1``, whose ``tl.dot`` multiplies bf16's raw uint16 bit patterns
    (triton 3.8); there the dot runs in fp32, which only makes the CPU tests more exact."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return tl.float32
    return _TL_DTYPES[dtype]


def _check_2d(name: str, t: torch.Tensor, contiguous: bool = True, dtype: torch.dtype | None = None) -> None:
    assert t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}"
    assert not contiguous or t.is_contiguous(), f"{name} must be contiguous"
    assert dtype is None or t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"


# --------------------------------------------------------------------------- kernels
@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, e_ptr, h_ptr, s_ptr,
    N, K, R, stride_xn, stride_xk,
    seed, p, keep_scale, scale,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per BLOCK_N rows of x (N×K, any strides); A is (R, K) row-major; e is (R,)
    fp32.  Writes h = dropout(x)·Aᵀ and s = h·e·scale, both (N, R) row-major fp32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rank_ok = ranks < R
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xn
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_DROPOUT:  # zero the dropped elements here; the exact 1/(1-p) is applied to h below
            x = tl.where(keep_mask(seed, rows[:, None], cols[None, :], K, p), x, 0.0)
        a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :],
                      other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_R) tile of Aᵀ
        acc = tl.dot(x.to(DOT_DTYPE), a_t.to(DOT_DTYPE), acc, input_precision="ieee")
    if HAS_DROPOUT:
        acc = acc * keep_scale
    e = tl.load(e_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    out = rows[:, None].to(tl.int64) * R + ranks[None, :]
    inside = row_ok[:, None] & rank_ok[None, :]
    tl.store(h_ptr + out, acc, mask=inside)
    tl.store(s_ptr + out, acc * (e * scale)[None, :], mask=inside)


@triton.jit
def _rank_expand_kernel(
    left_ptr, right_ptr, out_ptr,
    N, K, R, stride_rr, stride_rk,
    seed, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per (BLOCK_N, BLOCK_K) tile of out (N×K row-major, in place):
    ``out += (left·right) [⊙ keep/(1-p)]``, left (N, R) fp32 contiguous, right (R, K) read through
    ``(stride_rr, stride_rk)``; the rank is reduced in BLOCK_R steps.

    The forward's expand is ``y += s·Bᵀ`` (right = Bᵀ: strides (1, R)); the backward's grad_x is
    ``dx += (dh·A) ⊙ keep/(1-p)`` (right = A: strides (K, 1)), with the keep mask of the shrink.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        left = tl.load(left_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :],
                       mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        right = tl.load(right_ptr + ranks[:, None] * stride_rr + cols[None, :] * stride_rk,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(left.to(DOT_DTYPE), right.to(DOT_DTYPE), acc, input_precision="ieee")
    if HAS_DROPOUT:
        acc = tl.where(keep_mask(seed, rows[:, None], cols[None, :], K, p), acc * keep_scale, 0.0)
    out_tile = out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
    inside = row_ok[:, None] & col_ok[None, :]
    out = tl.load(out_tile, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_tile, (out + acc).to(out_ptr.dtype.element_ty), mask=inside)


def rank_expand_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, seed: int = 0,
                 p: float = 0.0) -> torch.Tensor:
    """``out += (left·right) ⊙ keep/(1-p)`` in place (no mask when p = 0) and return out.

    out (N, K) contiguous; left (N, r) fp32 contiguous; right (r, K) in out's dtype, any strides
    (e.g. ``B.t()``).  The keep mask is the shrink kernel's for the same ``seed``.
    """
    _check_2d("out", out)
    _check_2d("left", left, dtype=torch.float32)
    _check_2d("right", right, contiguous=False, dtype=out.dtype)
    N, K = out.shape
    R = right.shape[0]
    assert right.shape[1] == K and left.shape == (N, R), "shape mismatch between out, left and right"
    assert 0.0 <= p < 1.0 and 0 <= seed < 2**31
    if N == 0 or K == 0:
        return out
    cfg = kernel_config(R, out.dtype, reduces_rank=True)
    grid = (triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(K, cfg.BLOCK_K))
    _rank_expand_kernel[grid](
        left, right, out, N, K, R, right.stride(0), right.stride(1),
        int(seed), float(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0.0, DOT_DTYPE=dot_dtype(out.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# --------------------------------------------------------------------------- launchers
def shrink(x: torch.Tensor, A: torch.Tensor, e: torch.Tensor, scale: float, seed: int = 0,
           p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, s)``: ``h = dropout(x)·Aᵀ`` and ``s = h·e·scale``, both (N, r) fp32.

    x (N, in) any strides; A (r, in) contiguous, x's dtype; e (r,) fp32 contiguous.
    ``p`` > 0 drops with the Philox mask of ``seed`` (see ``kernels.dropout``).
    """
    _check_2d("x", x, contiguous=False)
    _check_2d("A", A, dtype=x.dtype)
    assert e.dim() == 1 and e.is_contiguous() and e.dtype == torch.float32, "e must be a contiguous fp32 vector"
    N, K = x.shape
    R = A.shape[0]
    assert A.shape[1] == K and e.shape[0] == R, "shape mismatch between x, A and e"
    assert 0.0 <= p < 1.0 and 0 <= seed < 2**31
    h = torch.empty((N, R), dtype=torch.float32, device=x.device)
    s = torch.empty((N, R), dtype=torch.float32, device=x.device)
    if N == 0:
        return h, s
    cfg = kernel_config(R, x.dtype)
    grid = (triton.cdiv(N, cfg.BLOCK_N),)
    _shrink_kernel[grid](
        x, A, e, h, s, N, K, R, x.stride(0), x.stride(1),
        int(seed), float(p), 1.0 / (1.0 - p), float(scale),
        HAS_DROPOUT=p > 0.0, DOT_DTYPE=dot_dtype(x.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h, s


def expand_(y: torch.Tensor, s: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``y += s·Bᵀ`` in place and return y.  y (N, out) contiguous; s (N, r) fp32 contiguous;
    B (out, r) contiguous, y's dtype."""
    _check_2d("B", B, dtype=y.dtype)
    assert y.dim() == 2 and B.shape[0] == y.shape[1], "shape mismatch between y and B"
    return rank_expand_(y, s, B.t())
