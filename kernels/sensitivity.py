"""The allocator's sensitivity pass: EMA update, element scores and triplet scores in one launch.

Twin in ``fastadalora.reference``: ``sensitivity_update`` (Ī, Ū, s) and ``triplet_scores`` (S).

The allocator keeps its state in flat fp32 buffers (``fastadalora.flat_layout``: ``[A… | B… | E…]``,
each tensor row-major) and, before the launch, gathers the post-step parameters p and their gradients
g into two flat fp32 buffers of the same layout.  One program scores a block of up to ``BLOCK_R``
consecutive triplets of one layer: it reads that block's rows of A (``nr × in``, contiguous) and the
matching columns of every row of B (``out × nr`` tiles of row-major B: each row's ``nr`` values are
contiguous, so the reads are coalesced, unlike a column gathered with stride r), updates Ī and Ū for
every element (reading the old state and writing the new one to separate buffers, so the caller can
keep the old one when the step turns out non-finite), forms ``s = Ī·Ū`` and reduces it into
``S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`` with fp32 accumulators.  Every element is touched
by exactly one program and every sum is an in-register reduction in a fixed order, so the result is
deterministic (no atomics) and needs no second launch.

The launch table has one int64 row per triplet (``table_tensor``, built from
``FlatLayout.triplet_table``'s rows ``a_off, a_len, e_off, b_off, b_len, b_stride``)::

    a_off, in, e_off, b_off, out, r, nr

where ``nr`` is the block's size on the first triplet of each block and 0 elsewhere: program t scores
triplets ``t … t+nr-1``, and the programs of the other triplets return at once.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

META_COLS = 7  # a_off, in, e_off, b_off, out, r, nr
BLOCK_R = 16  # triplets per program
BLOCK_L = 64  # elements along in (A) or out (B) per loop step
NUM_WARPS = 4


# --------------------------------------------------------------------------- kernels
@triton.jit
def _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr, idx, m, beta1, omb1, beta2, omb2,
                    UPDATE: tl.constexpr):
    """Ī, Ū (written to the ``*_out`` buffers when UPDATE) and s = Ī·Ū for the elements ``idx``."""
    ipt_bar = tl.load(ipt_ptr + idx, mask=m, other=0.0)
    unc_bar = tl.load(unc_ptr + idx, mask=m, other=0.0)
    if UPDATE:
        ipt = tl.abs(tl.load(p_ptr + idx, mask=m, other=0.0) * tl.load(g_ptr + idx, mask=m, other=0.0))
        ipt_bar = beta1 * ipt_bar + omb1 * ipt
        unc_bar = beta2 * unc_bar + omb2 * tl.abs(ipt - ipt_bar)
        tl.store(ipt_out_ptr + idx, ipt_bar, mask=m)
        tl.store(unc_out_ptr + idx, unc_bar, mask=m)
    return tl.where(m, ipt_bar * unc_bar, 0.0)


@triton.jit
def _sensitivity_kernel(
    p_ptr,  # flat post-step parameters (fp32), read only when UPDATE
    g_ptr,  # flat gradients (fp32), read only when UPDATE
    ipt_ptr,  # flat Ī (fp32), read
    unc_ptr,  # flat Ū (fp32), read
    ipt_out_ptr,  # flat new Ī, written when UPDATE (may equal ipt_ptr)
    unc_out_ptr,  # flat new Ū, written when UPDATE (may equal unc_ptr)
    score_ptr,  # (T,) fp32 triplet scores S, written
    meta_ptr,  # (T, 7) int64 launch table
    beta1, omb1, beta2, omb2,  # β1, 1-β1, β2, 1-β2 (fp32)
    UPDATE: tl.constexpr,  # False: scores from the stored state only (the phase-switch mask)
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    t = tl.program_id(0)
    row = meta_ptr + t * 7
    nr = tl.load(row + 6)
    if nr > 0:
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < nr
        lanes = tl.arange(0, BLOCK_L)
        # each field is read where it is used: fewer values live across the loops

        # A: the block's nr rows, contiguous (nr × in)
        n_in = tl.load(row + 1)
        a_rows = tl.load(row + 0) + ranks[:, None].to(tl.int64) * n_in
        acc_a = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
        for start in range(0, n_in, BLOCK_L):
            cols = start + lanes
            acc_a += _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr,
                                     a_rows + cols[None, :], rank_ok[:, None] & (cols < n_in)[None, :],
                                     beta1, omb1, beta2, omb2, UPDATE)
        mean_a = tl.sum(acc_a, axis=1) / n_in.to(tl.float32)
        # B: rows of row-major B (out × r), the block's nr columns of each
        n_out = tl.load(row + 4)
        b_cols = tl.load(row + 3) + ranks[None, :]
        r = tl.load(row + 5)
        acc_b = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
        for start in range(0, n_out, BLOCK_L):
            outs = start + lanes
            acc_b += _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr,
                                     b_cols + outs[:, None].to(tl.int64) * r,
                                     (outs < n_out)[:, None] & rank_ok[None, :], beta1, omb1, beta2, omb2, UPDATE)
        mean_b = tl.sum(acc_b, axis=0) / n_out.to(tl.float32)
        # E: the block's nr values
        s_e = _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr, tl.load(row + 2) + ranks,
                              rank_ok, beta1, omb1, beta2, omb2, UPDATE)
        tl.store(score_ptr + t + ranks, s_e + (mean_a + mean_b), mask=rank_ok)


# --------------------------------------------------------------------------- host launcher
def table_tensor(rows: Sequence[tuple[int, ...]], device: torch.device | str = "cpu") -> torch.Tensor:
    """The (T, 7) int64 launch table from ``FlatLayout.triplet_table()`` rows (one per triplet, each
    layer's r triplets consecutive, ``b_stride`` = r)."""
    out, pos = [], 0
    rows = [tuple(int(v) for v in row) for row in rows]
    while pos < len(rows):
        r = rows[pos][5]
        for i in range(r):
            a_off, a_len, e_off, b_off, b_len, b_stride = rows[pos + i]
            assert b_stride == r and b_off == rows[pos][3] + i, "rows must come a layer at a time"
            nr = min(BLOCK_R, r - i) if i % BLOCK_R == 0 else 0
            out.append((a_off, a_len, e_off, b_off, b_len, r, nr))
        pos += r
    return torch.tensor(out, dtype=torch.int64).reshape(-1, META_COLS).to(device)


def sensitivity_scores(p: torch.Tensor | None, g: torch.Tensor | None, ipt: torch.Tensor, unc: torch.Tensor,
                       table: torch.Tensor, beta1: float, beta2: float, *, ipt_out: torch.Tensor | None = None,
                       unc_out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: the (T,) fp32 triplet scores, updating the EMAs first when ``p`` and ``g`` are given.

    ``p``, ``g``, ``ipt``, ``unc`` are flat contiguous fp32 of one length; with ``p``/``g`` the new Ī/Ū
    go to ``ipt_out``/``unc_out`` (default: in place).  Without them the scores come from the stored state.
    """
    if (p is None) != (g is None):
        raise ValueError("sensitivity kernel: pass both p and g (an update) or neither (scores only)")
    for name, t in (("p", p), ("g", g), ("ipt", ipt), ("unc", unc), ("ipt_out", ipt_out), ("unc_out", unc_out)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != ipt.numel()):
            raise TypeError(f"sensitivity kernel: {name} must be a contiguous fp32 buffer of {ipt.numel()} "
                            f"elements, got {t.dtype} with {t.numel()}")
    update = p is not None
    ipt_out = ipt if ipt_out is None else ipt_out
    unc_out = unc if unc_out is None else unc_out
    n_triplets = table.shape[0]
    scores = torch.empty(n_triplets, dtype=torch.float32, device=ipt.device)
    if n_triplets == 0:
        return scores
    _sensitivity_kernel[(n_triplets,)](
        p if update else ipt, g if update else ipt, ipt, unc, ipt_out, unc_out, scores, table,
        float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
        UPDATE=update, BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, num_warps=NUM_WARPS,
    )
    return scores


# --------------------------------------------------------------------------- AOT configs
def aot_configs() -> list[dict]:
    """Every compile of this module's kernel, for ahead-of-time compile tests."""
    from ._config import aot_job

    fp32 = {name: torch.float32 for name in ("p_ptr", "g_ptr", "ipt_ptr", "unc_ptr", "ipt_out_ptr", "unc_out_ptr",
                                              "score_ptr")}
    return [aot_job(_sensitivity_kernel, f"UPDATE={update}", {**fp32, "meta_ptr": torch.int64},
                    {"UPDATE": update, "BLOCK_R": BLOCK_R, "BLOCK_L": BLOCK_L}, {"num_warps": NUM_WARPS},
                    floats=("beta1", "omb1", "beta2", "omb2"))
            for update in (True, False)]
