"""Backward of the fused adapter: one pass over g, the dx and dA kernels, the partial sums, the launchers.

Forward was ``y = x·Wᵀ + b + (h·diag(es))·Bᵀ`` with ``h = dropout(x)·Aᵀ`` and ``es = E·mask·scale``.
Given the output gradient g (N×out), backward saved only x, h (N×r fp32) and the dropout seed::

    gs = g·B                          (N×r)  the gradient reaching h·diag(es), before es
    P  = gᵀ·h                         (out×r)
    dB = P·diag(es)                   dE = scale·mask·Σ_o B⊙P  (= Σ_n gs⊙h·scale·mask)
    dx += ((gs·diag(es))·A) ⊙ keep/(1-p)          dA = (gs·diag(es))ᵀ·dropout(x)

* ``_grad_g_kernel``  reads g once.  Program (t, s) takes out tile t (BLOCK_K columns of g) and token
  split s: it writes the partial ``gs`` of tile t for its tokens (``gs_part[t]``; all of gs when there
  is one tile), ``P``'s partial over its tokens (``p_part[s]``) and the dE partial ``Σ_o B⊙P`` of its
  rectangle.  Splitting both ways keeps the grid at two programs per SM at small N.  The gs partials
  cost ``2r/BLOCK_K`` of g's traffic, so above rank tier ``ONE_PASS_MAX_TIER`` (64) gs comes instead
  from the shrink kernel over whole rows (``g·(Bᵀ)ᵀ``, a second read of g) and this kernel forms only
  P and the dE partials.
* ``_rank_expand_kernel`` (``adapter_forward``)  ``dx += ((gs·es)·A) ⊙ keep/(1-p)`` in place into the
  base dx = g·W that torch computed first.
* ``_grad_a_kernel``  ``dA``'s partial over a token split, the keep mask regenerated from the seed.
* ``_reduce_kernel``  sums partials in a fixed order (deterministic, no atomics), up to three jobs in
  one launch: after grad_g the gs tiles (when there are several); at the end dA, dB (times es) and
  dE (times scale·mask), cast to the parameters' dtypes.

Launches per backward: grad_g, [reduce gs | the gs shrink], dx, dA, reduce = 4 or 5 kernels (besides
torch's g·W; ``tests/test_launch_count.py``).
Block sizes and splits come from ``kernels._config``; dtypes are handled as in ``adapter_forward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config, adapter_forward
from .adapter_forward import (_dot_args, check_2d, check_rank_vectors, dropout_args, rank_expand_, rank_scales,
                              to_dot, to_out)
from .dropout import col_keys, keep_from_keys, row_keys

REDUCE_BLOCK = 1024  # elements per program of the partial sums
ONE_PASS_MAX_TIER = 64  # grad_g reads g once up to this rank tier (see grad_g)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _split_rows(s, n_blocks, n_splits, N, BLOCK_N: tl.constexpr):
    """Token range ``[start, end)`` of split ``s``: whole blocks, as even as possible, none empty."""
    start = (s * n_blocks // n_splits) * BLOCK_N
    end = tl.minimum(((s + 1) * n_blocks // n_splits) * BLOCK_N, N)
    return start, end


@triton.jit(do_not_specialize=["N", "R", "n_blocks", "n_splits"])
def _grad_g_kernel(
    g_ptr, b_ptr, h_ptr, gs_ptr, p_ptr, de_ptr,
    N, OUT, R, stride_gn, stride_go, stride_bo, stride_br, n_blocks, n_splits,
    WRITE_GS: tl.constexpr, CDT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (t, s): out tile t of BLOCK_K columns, token split s of ``n_splits``.  g (N, OUT) and B
    (OUT, R) any strides; h (N, R) fp32 row-major.  Writes, fp32 row-major:
    ``gs_part[t, n, :] = g[n, tile]·B[tile, :]`` (T, N, R) for its tokens n (when WRITE_GS),
    ``p_part[s, o, :] = Σ_n g[n, o]·h[n, :]`` (S, OUT, R) for its columns o,
    ``de_part[s·T + t, :] = Σ_o B[o, :]·p_part[s, o, :]`` (S·T, R)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    outs = t * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    out_ok = outs < OUT
    rank_ok = ranks < R
    b_tile = b_ptr + outs[:, None].to(tl.int64) * stride_bo + ranks[None, :].to(tl.int64) * stride_br
    b_ok = out_ok[:, None] & rank_ok[None, :]
    b_dot = to_dot(tl.load(b_tile, mask=b_ok, other=0.0).to(tl.float32), CDT, DOT)  # (BLOCK_K, BLOCK_R)
    g_cols = g_ptr + outs[None, :].to(tl.int64) * stride_go
    gs_tile = gs_ptr + t.to(tl.int64) * N * R
    row_start, row_end = _split_rows(s, n_blocks, n_splits, N, BLOCK_N)
    acc_p = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        g = tl.load(g_cols + rows[:, None].to(tl.int64) * stride_gn, mask=row_ok[:, None] & out_ok[None, :],
                    other=0.0).to(tl.float32)
        g_dot = to_dot(g, CDT, DOT)
        nr = rows[:, None].to(tl.int64) * R + ranks[None, :]
        inside = row_ok[:, None] & rank_ok[None, :]
        if WRITE_GS:
            tl.store(gs_tile + nr, tl.dot(g_dot, b_dot, input_precision=PRECISION), mask=inside)
        h = tl.load(h_ptr + nr, mask=inside, other=0.0)
        acc_p = tl.dot(tl.trans(g_dot), to_dot(h, CDT, DOT), acc_p, input_precision=PRECISION)
    out_rows = (s * OUT + outs[:, None]).to(tl.int64) * R + ranks[None, :]  # s·OUT + o < 2^31: an index
    tl.store(p_ptr + out_rows, acc_p, mask=out_ok[:, None] & rank_ok[None, :])
    b = tl.load(b_tile, mask=b_ok, other=0.0).to(tl.float32)  # read again: cheaper than keeping it live
    de = tl.sum(b * acc_p, axis=0)
    tl.store(de_ptr + (s * tl.num_programs(0) + t) * R + ranks, de, mask=rank_ok)


@triton.jit(do_not_specialize=["N", "R", "has_mask", "n_blocks", "n_splits", "seed", "t16"])
def _grad_a_kernel(
    gs_ptr, e_ptr, m_ptr, x_ptr, part_ptr,
    N, K, R, stride_xn, stride_xk, stride_e, has_mask, n_blocks, n_splits, scale,
    seed, t16, keep_scale,
    CDT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (k-tile, split s): ``part[s, :R, tile] = Σ_n (gs·es)[n, :]ᵀ·dropout(x)[n, tile]`` over the
    split's tokens, times ``keep_scale``; gs (N, R) fp32 row-major, x (N, K) any strides, part (S, R, K)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    s = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    col_ok = cols < K
    rank_ok = ranks < R
    es = rank_scales(e_ptr, m_ptr, ranks, rank_ok, stride_e, has_mask, scale)
    ck = col_keys(seed, cols)[None, :]  # the dropout column keys, once per program
    x_cols = x_ptr + cols[None, :].to(tl.int64) * stride_xk
    row_start, row_end = _split_rows(s, n_blocks, n_splits, N, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        dh = tl.load(gs_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :],
                     mask=row_ok[:, None] & rank_ok[None, :], other=0.0) * es[None, :]
        x = tl.load(x_cols + rows[:, None].to(tl.int64) * stride_xn, mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if t16 > 0:
            x = tl.where(keep_from_keys(row_keys(seed, rows)[:, None], ck, cols[None, :], t16), x, 0.0)
        acc = tl.dot(tl.trans(to_dot(dh, CDT, DOT)), to_dot(x, CDT, DOT), acc, input_precision=PRECISION)
    out = part_ptr + (s * R + ranks[:, None]).to(tl.int64) * K + cols[None, :]
    tl.store(out, acc * keep_scale, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_parts(part_ptr, out_ptr, length, parts, block, mode, e_ptr, m_ptr, R, stride_e, has_mask, scale,
               BLOCK: tl.constexpr):
    """``out[i] = f(i) · Σ_s part[s·length + i]`` for the BLOCK elements of ``block``, s in order;
    ``f`` = 1 (mode 0), ``E[i % R]·m[i % R]·scale`` (mode 1) or ``m[i]·scale`` (mode 2)."""
    idx = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < length
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    src = part_ptr + idx
    for _ in range(0, parts):
        acc += tl.load(src, mask=ok, other=0.0)
        src += length  # pointer steps: 64-bit however many parts
    if mode == 1:
        acc *= rank_scales(e_ptr, m_ptr, idx % R, ok, stride_e, has_mask, scale)
    elif mode == 2:
        acc *= tl.load(m_ptr + idx, mask=ok & ((idx * 0 + has_mask) != 0), other=1.0).to(tl.float32) * scale
    tl.store(out_ptr + idx, to_out(acc, out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["a_len", "a_parts", "a_progs", "b_len", "b_parts", "b_progs", "c_len", "c_parts", "R",
                               "has_mask"])
def _reduce_kernel(
    a_part, a_out, a_len, a_parts, a_progs,
    b_part, b_out, b_len, b_parts, b_progs,
    c_part, c_out, c_len, c_parts,
    e_ptr, m_ptr, R, stride_e, has_mask, scale,
    BLOCK: tl.constexpr,
):
    """Three fixed-order partial sums in one launch, one BLOCK of one job per program:
    ``a_out = Σ a_part`` (dA, or gs in place), ``b_out = es·Σ b_part`` (dB), ``c_out = m·scale·Σ c_part``
    (dE, one program).  A job with no programs (``*_progs`` 0, ``c_len`` 0) is skipped."""
    pid = tl.program_id(0)
    if pid < a_progs:
        _sum_parts(a_part, a_out, a_len, a_parts, pid, 0, e_ptr, m_ptr, R, stride_e, has_mask, scale, BLOCK)
    elif pid < a_progs + b_progs:
        _sum_parts(b_part, b_out, b_len, b_parts, pid - a_progs, 1, e_ptr, m_ptr, R, stride_e, has_mask, scale,
                   BLOCK)
    else:
        _sum_parts(c_part, c_out, c_len, c_parts, pid - a_progs - b_progs, 2, e_ptr, m_ptr, R, stride_e, has_mask,
                   scale, BLOCK)


# --------------------------------------------------------------------------- launchers
def grad_g(g: torch.Tensor, B: torch.Tensor, h: torch.Tensor, cdt: torch.dtype | None = None,
           sms: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gs, p_part, de_part)`` with ``gs = g·B`` (N, r) fp32, ``p_part`` (S, out, r) fp32 partials of
    ``gᵀ·h`` over token splits and ``de_part`` (S·T, r) fp32 partials of ``Σ_o B⊙P``.

    Up to rank tier ``ONE_PASS_MAX_TIER`` one kernel reads g once for all three; gs then comes in T
    partials (one per out tile, summed by ``reduce_`` when T > 1), whose traffic is ``2r/BLOCK_K`` times
    g's.  Above it those partials would cost more than reading g twice, so gs is the shrink kernel's
    ``g·(Bᵀ)ᵀ`` over whole rows and the grad_g kernel only forms P and the dE partials.

    g (N, out) and B (out, r) any strides and dtypes; h (N, r) fp32 contiguous; ``cdt`` (default B's
    dtype) is what the dots round to; ``sms`` overrides the device's SM count (tests)."""
    check_2d("g", g)
    check_2d("B", B)
    check_2d("h", h, contiguous=True, dtype=torch.float32)
    N, OUT = g.shape
    R = B.shape[1]
    assert B.shape[0] == OUT and h.shape == (N, R), "shape mismatch between g, B and h"
    cdt = B.dtype if cdt is None else cdt
    cfg = _config.kernel_config("grad_g", R, cdt)
    one_pass = _config.rank_tile(R) <= ONE_PASS_MAX_TIER
    T = triton.cdiv(OUT, cfg.BLOCK_K)
    n_blocks = triton.cdiv(N, cfg.BLOCK_N)
    S = _config.split_count(n_blocks, T, _config.sm_count(g.device) if sms is None else sms)
    p_part = torch.empty((S, OUT, R), dtype=torch.float32, device=g.device)
    de_part = torch.empty((S * T, R), dtype=torch.float32, device=g.device)
    if N == 0:
        return torch.empty((0, R), dtype=torch.float32, device=g.device), p_part.zero_(), de_part.zero_()
    if one_pass:
        gs_part = torch.empty((T, N, R), dtype=torch.float32, device=g.device)
    else:  # gs = g·B over whole rows (the shrink kernel with A = Bᵀ)
        gs_part = adapter_forward.shrink(g, B.t(), cdt=cdt)[None]
    _grad_g_kernel[(T, S)](
        g, B, h, gs_part, p_part, de_part, N, OUT, R, g.stride(0), g.stride(1), B.stride(0), B.stride(1),
        n_blocks, S, WRITE_GS=one_pass, **_dot_args(cdt), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        BLOCK_R=cfg.BLOCK_R, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if one_pass and T > 1:
        reduce_(a=(gs_part, gs_part[0]))
    return gs_part[0], p_part, de_part


def grad_x_(dx: torch.Tensor, gs: torch.Tensor, E: torch.Tensor, m: torch.Tensor | None, A: torch.Tensor,
            scale: float, seed: int = 0, p: float = 0.0, cdt: torch.dtype | None = None) -> torch.Tensor:
    """``dx += ((gs·diag(E·m·scale))·A) ⊙ keep/(1-p)`` in place and return dx.  dx (N, in) contiguous,
    any dtype; gs (N, r) fp32 contiguous; A (r, in) any strides and dtype."""
    return rank_expand_(dx, gs, E, m, A, scale, seed, p, cdt)


def grad_a(gs: torch.Tensor, E: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor, scale: float,
           seed: int = 0, p: float = 0.0, cdt: torch.dtype | None = None, sms: int | None = None) -> torch.Tensor:
    """``(S, r, in)`` fp32 partials over token splits of ``dA = (gs·diag(E·m·scale))ᵀ·dropout(x)``; their
    sum (``reduce_``) is dA.  gs (N, r) fp32 contiguous; x (N, in) any strides and dtype; the keep mask
    is regenerated from ``seed`` exactly as the shrink kernel drew it."""
    check_2d("gs", gs, contiguous=True, dtype=torch.float32)
    check_2d("x", x)
    N, K = x.shape
    R = gs.shape[1]
    assert gs.shape[0] == N, "shape mismatch between gs and x"
    check_rank_vectors(E, m, R)
    cdt = E.dtype if cdt is None else cdt
    cfg = _config.kernel_config("grad_a", R, cdt)
    k_tiles = triton.cdiv(K, cfg.BLOCK_K)
    n_blocks = triton.cdiv(N, cfg.BLOCK_N)
    S = _config.split_count(n_blocks, k_tiles, _config.sm_count(x.device) if sms is None else sms)
    part = torch.empty((S, R, K), dtype=torch.float32, device=x.device)
    if N == 0 or K == 0:
        return part.zero_()
    _grad_a_kernel[(k_tiles, S)](
        gs, E, E if m is None else m, x, part, N, K, R, x.stride(0), x.stride(1), E.stride(0), int(m is not None),
        n_blocks, S, float(scale), *dropout_args(seed, p),
        **_dot_args(cdt), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=cfg.BLOCK_R,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


def reduce_(a: tuple[torch.Tensor, torch.Tensor] | None = None, b: tuple[torch.Tensor, torch.Tensor] | None = None,
            c: tuple[torch.Tensor, torch.Tensor] | None = None, E: torch.Tensor | None = None,
            m: torch.Tensor | None = None, scale: float = 1.0) -> None:
    """One launch summing fp32 partials ``(part (S, ...), out)`` in a fixed order into ``out`` (any
    float dtype, contiguous, the shape of one part): ``a`` plainly, ``b`` times ``E·m·scale`` along its
    last dimension (dB), ``c`` times ``m·scale`` (dE: parts of shape (r,)).  ``out`` may be ``part[0]``."""
    present = [j for j in (a, b, c) if j is not None]
    assert present, "nothing to reduce"
    for part, out in present:
        assert part.dtype == torch.float32 and part.is_contiguous() and out.is_contiguous()
        assert out.numel() == part[0].numel(), "out must have the shape of one part"
    filler = present[0]

    def job(j):  # (part, out, length, parts, programs); an absent job borrows real pointers, runs nothing
        if j is None:
            return filler[0], filler[1], 0, 0, 0
        part, out = j
        return part, out, out.numel(), part.shape[0], triton.cdiv(out.numel(), REDUCE_BLOCK)

    a_part, a_out, a_len, a_parts, a_progs = job(a)
    b_part, b_out, b_len, b_parts, b_progs = job(b)
    c_part, c_out, c_len, c_parts, _ = job(c)
    assert b is None or E is not None, "dB needs E"
    assert c_len <= REDUCE_BLOCK, "dE is one program"
    R = 1 if E is None else E.numel()
    e = filler[0] if E is None else E
    progs = a_progs + b_progs + int(c is not None)
    if progs == 0 or (a_len + b_len + c_len) == 0:
        return
    _reduce_kernel[(progs,)](
        a_part, a_out, a_len, a_parts, a_progs, b_part, b_out, b_len, b_parts, b_progs,
        c_part, c_out, c_len, c_parts, e, e if m is None else m, R, 1 if E is None else E.stride(0),
        int(m is not None), float(scale), BLOCK=REDUCE_BLOCK, num_warps=4,
    )


def backward(g: torch.Tensor, x: torch.Tensor, h: torch.Tensor, A: torch.Tensor, E: torch.Tensor,
             m: torch.Tensor | None, B: torch.Tensor, scale: float, seed: int, p: float, cdt: torch.dtype,
             dx: torch.Tensor | None, need_A: bool, need_E: bool, need_B: bool,
             sms: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The adapter's backward: adds the adapter's part into ``dx`` (the base ``g·W``, when given) and
    returns ``(dA, dE, dB)`` in the parameters' dtypes (None where not needed).

    g (N, out) any strides, the base dtype; x (N, in) any strides; h (N, r) fp32; A, E (r, 1), B the
    adapter; m None or (r,) of E's dtype; ``cdt`` is what the dots round to."""
    N, R = h.shape
    if N == 0:
        zeros = [torch.zeros_like(t) if need else None for t, need in ((A, need_A), (E, need_E), (B, need_B))]
        return zeros[0], zeros[1], zeros[2]
    gs, p_part, de_part = grad_g(g, B, h, cdt, sms)
    if dx is not None:
        grad_x_(dx, gs, E, m, A, scale, seed, p, cdt)
    dA = torch.empty_like(A, memory_format=torch.contiguous_format) if need_A else None
    dB = torch.empty_like(B, memory_format=torch.contiguous_format) if need_B else None
    dE = torch.empty_like(E, memory_format=torch.contiguous_format) if need_E else None
    jobs = {}
    if need_A:
        jobs["a"] = (grad_a(gs, E, m, x, scale, seed, p, cdt, sms), dA)
    if need_B:
        jobs["b"] = (p_part, dB)
    if need_E:
        jobs["c"] = (de_part, dE)
    if jobs:
        reduce_(**jobs, E=E, m=m, scale=scale)
    return dA, dE, dB


# --------------------------------------------------------------------------- ahead-of-time compiles
def aot_configs() -> list[dict]:
    """Every compile the launchers above can produce for the ``_config.aot_plans()`` dtype plans (the dx
    kernel is ``adapter_forward``'s)."""
    jobs = []
    for (base, adapter, cdt, ieee), tier, aligned in _config.aot_plans():
        label = _config.plan_label((base, adapter, cdt, ieee), tier, aligned)
        dot = dict(CDT=_config.TL_DTYPES[cdt], DOT=_config.TL_DTYPES[cdt], PRECISION=_config.dot_precision(cdt, ieee))
        cfg = _config.kernel_config("grad_g", tier, cdt, ieee)
        one_pass = tier <= ONE_PASS_MAX_TIER
        jobs.append(_config.aot_job(
            _grad_g_kernel, label,
            {"g_ptr": base, "b_ptr": adapter, "h_ptr": torch.float32, "gs_ptr": torch.float32,
             "p_ptr": torch.float32, "de_ptr": torch.float32},
            {**dot, "WRITE_GS": one_pass, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": cfg.BLOCK_R},
            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, aligned=aligned,
            unit_strides=("stride_go", "stride_br"), aligned_ints=("OUT", "stride_gn")))
        if not one_pass:  # gs = g·B by the shrink kernel, reading B through Bᵀ's strides
            cfg = _config.kernel_config("shrink", tier, cdt, ieee)
            jobs.append(_config.aot_job(
                adapter_forward._shrink_kernel, f"{label},gs",
                {"x_ptr": base, "a_ptr": adapter, "h_ptr": torch.float32},
                {**dot, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": cfg.BLOCK_R},
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, floats=("keep_scale",),
                aligned=aligned, unit_strides=("stride_xk", "stride_ar"), aligned_ints=("K", "stride_xn")))
        cfg = _config.kernel_config("grad_a", tier, cdt, ieee)
        jobs.append(_config.aot_job(
            _grad_a_kernel, label,
            {"gs_ptr": torch.float32, "e_ptr": adapter, "m_ptr": adapter, "x_ptr": base, "part_ptr": torch.float32},
            {**dot, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": cfg.BLOCK_R},
            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, floats=("scale", "keep_scale"),
            aligned=aligned, unit_strides=("stride_xk", "stride_e"), aligned_ints=("K", "stride_xn")))
    for adapter in (torch.float32, torch.bfloat16, torch.float16):  # the partial sums: the output dtypes
        jobs.append(_config.aot_job(
            _reduce_kernel, f"out={_config.AOT_NAMES[adapter]}",
            {"a_part": torch.float32, "a_out": adapter, "b_part": torch.float32, "b_out": adapter,
             "c_part": torch.float32, "c_out": adapter, "e_ptr": adapter, "m_ptr": adapter},
            {"BLOCK": REDUCE_BLOCK}, {"num_warps": 4}, floats=("scale",), unit_strides=("stride_e",)))
    return jobs
