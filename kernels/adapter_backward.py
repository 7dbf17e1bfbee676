"""Backward of the fused adapter: the gs/dh/dE, dx, dA and dB kernels and their launchers.

Forward was ``y = x·Wᵀ + b + s·Bᵀ`` with ``h = dropout(x)·Aᵀ`` and ``s = h·e·scale`` (``e = E·mask``).
Given the output gradient g (N×out), backward saved only x, h (N×r fp32) and the dropout seed:

* ``_grad_s_kernel``  ``gs = g·B`` (N×r); epilogue ``dh = gs·e·scale`` (N×r fp32) and, per
  BLOCK_N rows, the partial sums ``Σ_n gs·h·scale·mask`` of dE into a (num_blocks, r) buffer that
  the launcher reduces afterwards in a fixed order: deterministic, no atomics;
* ``grad_x_``  ``dx += (dh·A) ⊙ keep/(1-p)``, in place into the base dx = g·W that torch
  computed first: ``adapter_forward``'s rank-expand kernel with the dropout mask;
* ``_grad_a_kernel``  ``dA = dhᵀ·dropout(x)``, the keep mask regenerated from the seed;
* ``_grad_b_kernel``  ``dB = gᵀ·s``, with s recomputed from h on load.

dA and dB reduce over N; when their output has too few tiles to fill the GPU, N is split over
``split`` programs writing fp32 partials, summed afterwards (also deterministic).  Block sizes come
from ``adapter_forward.kernel_config``; loads are upcast to fp32 at once, dot operands cast to
``DOT_DTYPE``, every load masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter_forward import _check_2d, dot_dtype, kernel_config, rank_expand_
from .dropout import keep_mask


# --------------------------------------------------------------------------- kernels
@triton.jit
def _grad_s_kernel(
    g_ptr, b_ptr, h_ptr, e_ptr, m_ptr, dh_ptr, de_part_ptr,
    N, OUT, R, stride_gn, stride_go, scale,
    DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per BLOCK_N rows.  g (N, OUT) any strides; B (OUT, R), h (N, R) fp32, e and m
    (R,) fp32, all contiguous.  Writes dh (N, R) fp32 and de_part[program, :R]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rank_ok = ranks < R
    g_rows = g_ptr + rows[:, None].to(tl.int64) * stride_gn
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for o0 in range(0, OUT, BLOCK_OUT):
        outs = o0 + tl.arange(0, BLOCK_OUT)
        out_ok = outs < OUT
        g = tl.load(g_rows + outs[None, :] * stride_go, mask=row_ok[:, None] & out_ok[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + outs[:, None] * R + ranks[None, :], mask=out_ok[:, None] & rank_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(g.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    e = tl.load(e_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    tile = rows[:, None].to(tl.int64) * R + ranks[None, :]
    inside = row_ok[:, None] & rank_ok[None, :]
    tl.store(dh_ptr + tile, acc * (e * scale)[None, :], mask=inside)
    h = tl.load(h_ptr + tile, mask=inside, other=0.0)
    partial = tl.sum(acc * h, axis=0) * (m * scale)
    tl.store(de_part_ptr + pid * R + ranks, partial, mask=rank_ok)


@triton.jit
def _grad_a_kernel(
    dh_ptr, x_ptr, da_part_ptr,
    N, K, R, stride_xn, stride_xk, rows_per_split,
    seed, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (k-block, split): da_part[split, :R, k-block] = Σ over its rows of dhᵀ·dropout(x)
    (fp32).  dh (N, R) fp32 contiguous; x (N, K) any strides; da_part (split, R, K) fp32."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    col_ok = cols < K
    rank_ok = ranks < R
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        dh_t = tl.load(dh_ptr + rows[None, :].to(tl.int64) * R + ranks[:, None],
                       mask=rank_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_N)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows[:, None], cols[None, :], K, p), x, 0.0)
        acc = tl.dot(dh_t.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision="ieee")
    if HAS_DROPOUT:
        acc = acc * keep_scale
    out = da_part_ptr + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :]
    tl.store(out, acc, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_b_kernel(
    g_ptr, h_ptr, e_ptr, db_part_ptr,
    N, OUT, R, stride_gn, stride_go, rows_per_split, scale,
    DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (out-block, split): db_part[split, out-block, :R] = Σ over its rows of gᵀ·(h·e·scale)
    (fp32).  g (N, OUT) any strides; h (N, R) fp32 and e (R,) fp32 contiguous."""
    outs = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    out_ok = outs < OUT
    rank_ok = ranks < R
    es = tl.load(e_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32) * scale
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_OUT, BLOCK_R), dtype=tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        g_t = tl.load(g_ptr + rows[None, :].to(tl.int64) * stride_gn + outs[:, None] * stride_go,
                      mask=out_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_OUT, BLOCK_N)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        s = h * es[None, :]
        acc = tl.dot(g_t.to(DOT_DTYPE), s.to(DOT_DTYPE), acc, input_precision="ieee")
    out = db_part_ptr + split.to(tl.int64) * OUT * R + outs[:, None] * R + ranks[None, :]
    tl.store(out, acc, mask=out_ok[:, None] & rank_ok[None, :])


# --------------------------------------------------------------------------- launchers
def _split_count(n_blocks: int, tiles: int, device: torch.device) -> int:
    """How many programs share one output tile's N-reduction: enough to give the GPU about two
    programs per SM, at most one per BLOCK_N rows; 1 on CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, (2 * sms) // max(tiles, 1)))


def _row_splits(N: int, block_n: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """``(split, rows_per_split)`` for a reduction over N rows into ``tiles`` output tiles."""
    n_blocks = triton.cdiv(N, block_n)
    rows_per_split = triton.cdiv(n_blocks, _split_count(n_blocks, tiles, device)) * block_n
    return triton.cdiv(N, rows_per_split), rows_per_split


def grad_s(g: torch.Tensor, B: torch.Tensor, h: torch.Tensor, e: torch.Tensor, m: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dE)``: ``dh = (g·B)·e·scale`` (N, r) fp32 and ``dE = Σ_n (g·B)·h·scale·m`` (r,) fp32.

    g (N, out) any strides; B (out, r) contiguous, g's dtype; h (N, r), e, m (r,) fp32 contiguous.
    """
    _check_2d("g", g, contiguous=False)
    _check_2d("B", B, dtype=g.dtype)
    _check_2d("h", h, dtype=torch.float32)
    N, OUT = g.shape
    R = B.shape[1]
    assert B.shape[0] == OUT and h.shape == (N, R), "shape mismatch between g, B and h"
    for name, v in (("e", e), ("m", m)):
        assert v.shape == (R,) and v.is_contiguous() and v.dtype == torch.float32, f"{name} must be fp32 (r,)"
    dh = torch.empty((N, R), dtype=torch.float32, device=g.device)
    if N == 0:
        return dh, torch.zeros((R,), dtype=torch.float32, device=g.device)
    cfg = kernel_config(R, g.dtype)
    n_blocks = triton.cdiv(N, cfg.BLOCK_N)
    de_part = torch.empty((n_blocks, R), dtype=torch.float32, device=g.device)
    _grad_s_kernel[(n_blocks,)](
        g, B, h, e, m, dh, de_part, N, OUT, R, g.stride(0), g.stride(1), float(scale),
        DOT_DTYPE=dot_dtype(g.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_OUT=cfg.BLOCK_OUT, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dh, de_part.sum(0)  # fixed-shape reduction: deterministic


def grad_x_(dx: torch.Tensor, dh: torch.Tensor, A: torch.Tensor, seed: int = 0, p: float = 0.0) -> torch.Tensor:
    """``dx += (dh·A) ⊙ keep/(1-p)`` in place and return dx.  dx (N, in) contiguous; dh (N, r)
    fp32 contiguous; A (r, in) contiguous, dx's dtype."""
    _check_2d("A", A, dtype=dx.dtype)
    return rank_expand_(dx, dh, A, seed, p)


def grad_a(dh: torch.Tensor, x: torch.Tensor, seed: int = 0, p: float = 0.0) -> torch.Tensor:
    """``dA = dhᵀ·dropout(x)`` (r, in) in x's dtype.  dh (N, r) fp32 contiguous; x (N, in) any
    strides; the keep mask is regenerated from ``seed`` exactly as the shrink kernel drew it."""
    _check_2d("dh", dh, dtype=torch.float32)
    _check_2d("x", x, contiguous=False)
    N, K = x.shape
    R = dh.shape[1]
    assert dh.shape[0] == N, "shape mismatch between dh and x"
    assert 0.0 <= p < 1.0 and 0 <= seed < 2**31
    if N == 0:
        return torch.zeros((R, K), dtype=x.dtype, device=x.device)
    cfg = kernel_config(R, x.dtype)
    k_blocks = triton.cdiv(K, cfg.BLOCK_K)
    split, rows_per_split = _row_splits(N, cfg.BLOCK_N, k_blocks, x.device)
    part = torch.empty((split * R, K), dtype=torch.float32, device=x.device)  # (split, R, K)
    _grad_a_kernel[(k_blocks, split)](
        dh, x, part, N, K, R, x.stride(0), x.stride(1), rows_per_split,
        int(seed), float(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0.0, DOT_DTYPE=dot_dtype(x.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        part = part.view(split, R, K).sum(0)
    return part.to(x.dtype)


def grad_b(g: torch.Tensor, h: torch.Tensor, e: torch.Tensor, scale: float) -> torch.Tensor:
    """``dB = gᵀ·(h·e·scale)`` (out, r) in g's dtype.  g (N, out) any strides; h (N, r) and
    e (r,) fp32 contiguous."""
    _check_2d("g", g, contiguous=False)
    _check_2d("h", h, dtype=torch.float32)
    N, OUT = g.shape
    R = h.shape[1]
    assert h.shape[0] == N and e.shape == (R,) and e.is_contiguous() and e.dtype == torch.float32
    if N == 0:
        return torch.zeros((OUT, R), dtype=g.dtype, device=g.device)
    cfg = kernel_config(R, g.dtype)
    o_blocks = triton.cdiv(OUT, cfg.BLOCK_OUT)
    split, rows_per_split = _row_splits(N, cfg.BLOCK_N, o_blocks, g.device)
    part = torch.empty((split * OUT, R), dtype=torch.float32, device=g.device)  # (split, OUT, R)
    _grad_b_kernel[(o_blocks, split)](
        g, h, e, part, N, OUT, R, g.stride(0), g.stride(1), rows_per_split, float(scale),
        DOT_DTYPE=dot_dtype(g.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_OUT=cfg.BLOCK_OUT, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        part = part.view(split, OUT, R).sum(0)
    return part.to(g.dtype)
