"""Forward of the fused adapter: the shrink and rank-expand kernels and their launchers.

With ``es = E·mask·scale`` (an r-vector) the adapter branch is ``y += ((dropout(x)·Aᵀ)·diag(es))·Bᵀ``.
The base ``y = x·Wᵀ + b`` is left to torch (cuBLAS); then two kernels finish the job:

* ``_shrink_kernel``  ``h = dropout(x)·Aᵀ`` (N×r, fp32), the whole padded rank in one tile, the keep
  mask (``kernels.dropout``) fused into the x load.  ``h`` is what backward keeps.
* ``_rank_expand_kernel``  ``out += ((left·diag(es))·right) [⊙ keep/(1-p)]`` in place (launcher
  ``rank_expand_``): the forward's ``y += (h·es)·Bᵀ`` is the only pass over the N×out output beyond
  the base GEMM's own, and the backward's ``dx += ((gs·es)·A) ⊙ keep/(1-p)`` is the same kernel with
  the mask.  ``es`` is formed in the kernel from E and the mask.

Dtypes: x, y, dx have the base dtype (fp32/fp16/bf16); A, E, B the adapter dtype (often fp32 on a
16-bit base).  Both are loaded as they are (no host-side casts), upcast to fp32 at once, and rounded
to the compute dtype ``CDT`` just before ``tl.dot`` (``to_dot``); accumulation is fp32 and the
in-place epilogues round once into the output's dtype.  fp32 dots use ``PRECISION`` ("ieee" or
"tf32", from torch's matmul precision: see ``kernels._config``).  Every load is masked (ragged N/in/
out edges, padded rank lanes) and every offset that multiplies a stride is 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from .dropout import col_keys, keep_from_keys, keep_mask, row_keys, threshold16


# --------------------------------------------------------------------------- shared helpers
# The interpreter's fp32→bf16 cast truncates; the kernels round to nearest-even there by hand.
INTERPRETED = tl.constexpr(_config.interpreted())


@triton.jit
def _round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), still as fp32 (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dot(x, CDT: tl.constexpr, DOT: tl.constexpr):
    """fp32 ``x`` rounded to the compute dtype, as ``tl.dot`` will read it (``DOT``; under the
    interpreter a bf16 dot runs on the rounded values as fp32: ``_config.dot_dtype``)."""
    if CDT == DOT:
        if INTERPRETED and CDT == tl.bfloat16:
            x = _round_bf16(x)
        return x.to(DOT)
    else:
        return _round_bf16(x)


@triton.jit
def to_out(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded once into a stored dtype."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        x = _round_bf16(x)
    return x.to(DTYPE)


@triton.jit
def rank_scales(e_ptr, m_ptr, ranks, rank_ok, stride_e, has_mask, scale):
    """``es = E·mask·scale`` (fp32) for the rank lanes ``ranks``; no mask load when ``has_mask`` is 0."""
    e = tl.load(e_ptr + ranks.to(tl.int64) * stride_e, mask=rank_ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + ranks, mask=rank_ok & ((ranks * 0 + has_mask) != 0), other=1.0).to(tl.float32)
    return e * m * scale


# --------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["N", "R", "seed", "t16"])
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    N, K, R, stride_xn, stride_xk, stride_ar, stride_ak,
    seed, t16, keep_scale,
    CDT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per BLOCK_N rows: ``h = dropout(x)·Aᵀ`` (N, R) row-major fp32.  x (N, K) and A (R, K)
    any strides; ``t16`` > 0 drops with the keep mask of ``seed``, ``keep_scale`` = 1/(1-p)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rank_ok = ranks < R
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xn
    a_ranks = a_ptr + ranks[None, :].to(tl.int64) * stride_ar
    rk = row_keys(seed, rows)[:, None]  # the dropout row keys, once per program
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_xk, mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if t16 > 0:  # zero the dropped elements; the exact 1/(1-p) is applied to h below
            x = tl.where(keep_from_keys(rk, col_keys(seed, cols)[None, :], cols[None, :], t16), x, 0.0)
        a_t = tl.load(a_ranks + cols[:, None].to(tl.int64) * stride_ak, mask=col_ok[:, None] & rank_ok[None, :],
                      other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_R) tile of Aᵀ
        acc = tl.dot(to_dot(x, CDT, DOT), to_dot(a_t, CDT, DOT), acc, input_precision=PRECISION)
    out = rows[:, None].to(tl.int64) * R + ranks[None, :]
    tl.store(h_ptr + out, acc * keep_scale, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit(do_not_specialize=["N", "R", "has_mask", "seed", "t16"])
def _rank_expand_kernel(
    left_ptr, e_ptr, m_ptr, right_ptr, out_ptr,
    N, K, R, stride_rr, stride_rk, stride_e, has_mask, scale,
    seed, t16, keep_scale,
    CDT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per (BLOCK_N, BLOCK_K) tile of out (N×K row-major, in place):
    ``out += ((left·diag(es))·right) [⊙ keep·keep_scale]`` with ``es = E·mask·scale``; left (N, R)
    fp32 row-major; right (R, K) read through ``(stride_rr, stride_rk)``; the rank is reduced in
    BLOCK_R steps.  The forward's expand is ``y += (h·es)·Bᵀ`` (right = Bᵀ); the backward's grad_x is
    ``dx += ((gs·es)·A) ⊙ keep/(1-p)`` (right = A), with the keep mask of the shrink."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < K
    left_rows = left_ptr + rows[:, None].to(tl.int64) * R
    right_cols = right_ptr + cols[None, :].to(tl.int64) * stride_rk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        es = rank_scales(e_ptr, m_ptr, ranks, rank_ok, stride_e, has_mask, scale)
        left = tl.load(left_rows + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0) * es[None, :]
        right = tl.load(right_cols + ranks[:, None].to(tl.int64) * stride_rr,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(to_dot(left, CDT, DOT), to_dot(right, CDT, DOT), acc, input_precision=PRECISION)
    if t16 > 0:
        acc = tl.where(keep_mask(seed, rows[:, None], cols[None, :], t16), acc, 0.0)
    out_tile = out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
    inside = row_ok[:, None] & col_ok[None, :]
    out = tl.load(out_tile, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_tile, to_out(out + acc * keep_scale, out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------- launchers
def check_2d(name: str, t: torch.Tensor, contiguous: bool = False, dtype: torch.dtype | None = None) -> None:
    assert t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}"
    assert not contiguous or t.is_contiguous(), f"{name} must be contiguous"
    assert dtype is None or t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"


def check_rank_vectors(E: torch.Tensor, m: torch.Tensor | None, R: int) -> None:
    assert E.numel() == R and E.dim() in (1, 2), f"E must hold r={R} values, got shape {tuple(E.shape)}"
    assert m is None or (m.shape == (R,) and m.dtype == E.dtype and m.is_contiguous()), \
        "mask must be a contiguous (r,) vector of E's dtype"


def dropout_args(seed: int, p: float) -> tuple[int, int, float]:
    """``(seed, t16, keep_scale)`` as the kernels take them."""
    assert 0 <= seed < 2**31, "the seed is a 32-bit kernel argument"
    return int(seed), threshold16(p), 1.0 / (1.0 - p)


def _dot_args(cdt: torch.dtype) -> dict:
    return dict(CDT=_config.TL_DTYPES[cdt], DOT=_config.dot_dtype(cdt), PRECISION=_config.dot_precision(cdt))


def shrink(x: torch.Tensor, A: torch.Tensor, seed: int = 0, p: float = 0.0, cdt: torch.dtype | None = None,
           ) -> torch.Tensor:
    """``h = dropout(x)·Aᵀ`` (N, r) fp32.  x (N, in) and A (r, in) any strides and dtypes; the dot's
    operands are rounded to ``cdt`` (default A's dtype); ``p`` > 0 drops with the keep mask of ``seed``."""
    check_2d("x", x)
    check_2d("A", A)
    N, K = x.shape
    R = A.shape[0]
    assert A.shape[1] == K, "shape mismatch between x and A"
    cdt = A.dtype if cdt is None else cdt
    h = torch.empty((N, R), dtype=torch.float32, device=x.device)
    if N == 0:
        return h
    cfg = _config.kernel_config("shrink", R, cdt)
    _shrink_kernel[(triton.cdiv(N, cfg.BLOCK_N),)](
        x, A, h, N, K, R, x.stride(0), x.stride(1), A.stride(0), A.stride(1), *dropout_args(seed, p),
        **_dot_args(cdt), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h


def rank_expand_(out: torch.Tensor, left: torch.Tensor, E: torch.Tensor, m: torch.Tensor | None,
                 right: torch.Tensor, scale: float, seed: int = 0, p: float = 0.0,
                 cdt: torch.dtype | None = None) -> torch.Tensor:
    """``out += ((left·diag(E·m·scale))·right) ⊙ keep/(1-p)`` in place (no mask when p = 0); returns out.

    out (N, K) contiguous, any float dtype (rounded once); left (N, r) fp32 contiguous; right (r, K) any
    strides and dtype (e.g. ``B.t()``); E (r, 1) or (r,); m None or (r,) of E's dtype.  The dot's
    operands are rounded to ``cdt`` (default right's dtype).  The keep mask is the shrink's for ``seed``.
    """
    check_2d("out", out, contiguous=True)
    check_2d("left", left, contiguous=True, dtype=torch.float32)
    check_2d("right", right)
    N, K = out.shape
    R = right.shape[0]
    assert right.shape[1] == K and left.shape == (N, R), "shape mismatch between out, left and right"
    check_rank_vectors(E, m, R)
    if N == 0 or K == 0:
        return out
    cdt = right.dtype if cdt is None else cdt
    cfg = _config.kernel_config("expand", R, cdt)
    grid = (triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(K, cfg.BLOCK_K))
    _rank_expand_kernel[grid](
        left, E, E if m is None else m, right, out, N, K, R, right.stride(0), right.stride(1), E.stride(0),
        int(m is not None), float(scale), *dropout_args(seed, p),
        **_dot_args(cdt), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def expand_(y: torch.Tensor, h: torch.Tensor, E: torch.Tensor, m: torch.Tensor | None, B: torch.Tensor,
            scale: float, cdt: torch.dtype | None = None) -> torch.Tensor:
    """``y += (h·diag(E·m·scale))·Bᵀ`` in place and return y.  y (N, out) contiguous, the base dtype;
    h (N, r) fp32 contiguous; B (out, r) any strides, the adapter dtype."""
    check_2d("B", B)
    return rank_expand_(y, h, E, m, B.t(), scale, cdt=cdt)


# --------------------------------------------------------------------------- ahead-of-time compiles
def aot_configs() -> list[dict]:
    """Every compile the launchers above can produce for the ``_config.aot_plans()`` dtype plans."""
    jobs = []
    for (base, adapter, cdt, ieee), tier, aligned in _config.aot_plans():
        label = _config.plan_label((base, adapter, cdt, ieee), tier, aligned)
        dot = dict(CDT=_config.TL_DTYPES[cdt], DOT=_config.TL_DTYPES[cdt], PRECISION=_config.dot_precision(cdt, ieee))
        cfg = _config.kernel_config("shrink", tier, cdt, ieee)
        jobs.append(_config.aot_job(
            _shrink_kernel, label, {"x_ptr": base, "a_ptr": adapter, "h_ptr": torch.float32},
            {**dot, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": cfg.BLOCK_R},
            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, floats=("keep_scale",), aligned=aligned,
            unit_strides=("stride_xk", "stride_ak"), aligned_ints=("K", "stride_xn", "stride_ar")))
        cfg = _config.kernel_config("expand", tier, cdt, ieee)
        # the forward's expand (right = Bᵀ: unit stride along the rank) and the backward's dx (right = A)
        for what, unit, ints in (("expand", ("stride_rr", "stride_e"), ("K",)),
                                 ("grad_x", ("stride_rk", "stride_e"), ("K", "stride_rr"))):
            jobs.append(_config.aot_job(
                _rank_expand_kernel, f"{label},{what}",
                {"left_ptr": torch.float32, "e_ptr": adapter, "m_ptr": adapter, "right_ptr": adapter,
                 "out_ptr": base},
                {**dot, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": cfg.BLOCK_R},
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, floats=("scale", "keep_scale"),
                aligned=aligned, unit_strides=unit, aligned_ints=ints))
    return jobs
