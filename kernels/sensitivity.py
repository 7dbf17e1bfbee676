"""The allocator's sensitivity pass: EMA update, element scores and triplet scores in one launch.

Twin in ``fastadalora.reference``: ``sensitivity_update`` (Ī, Ū, s) and ``triplet_scores`` (S).

The allocator keeps its state in flat fp32 buffers (``fastadalora.flat_layout``) and, before the
launch, gathers the post-step parameters p and their gradients g into two flat fp32 buffers of
the same layout.  The kernel runs one program per triplet: it updates Ī and Ū for the triplet's
elements (reading the old state, writing the new state to separate buffers, so the caller can
keep the old one when the step turns out non-finite), forms ``s = Ī·Ū`` and reduces it into
``S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`` with an fp32 accumulator.  Every element is
touched by exactly one program and every sum is a plain in-register reduction, so the result is
deterministic (no atomics) and needs no second launch.

Where each triplet's elements are is read from an int64 table, one row per triplet, built by
``FlatLayout.triplet_table``::

    a_off, a_len, e_off, b_off, b_len, b_stride
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

META_COLS = 6  # a_off, a_len, e_off, b_off, b_len, b_stride
BLOCK = 256  # elements per loop step; one config (no autotune), 4 warps
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
    score_ptr,  # (R,) fp32 triplet scores S, written
    meta_ptr,  # (R, 6) int64 triplet table
    beta1, omb1, beta2, omb2,  # β1, 1-β1, β2, 1-β2 (fp32)
    UPDATE: tl.constexpr,  # False: scores from the stored state only (the phase-switch mask)
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    row = meta_ptr + t * 6
    a_off = tl.load(row + 0)
    a_len = tl.load(row + 1)
    e_off = tl.load(row + 2)
    b_off = tl.load(row + 3)
    b_len = tl.load(row + 4)
    b_stride = tl.load(row + 5)
    lanes = tl.arange(0, BLOCK)

    # row i of A: contiguous
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, a_len, BLOCK):
        offs = start + lanes
        acc_a += _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr, a_off + offs, offs < a_len,
                                 beta1, omb1, beta2, omb2, UPDATE)
    # column i of B: stride r
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, b_len, BLOCK):
        offs = start + lanes
        acc_b += _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr, b_off + offs * b_stride,
                                 offs < b_len, beta1, omb1, beta2, omb2, UPDATE)
    # E_i: one element (lane 0)
    s_e = _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, ipt_out_ptr, unc_out_ptr, e_off + lanes, lanes < 1,
                          beta1, omb1, beta2, omb2, UPDATE)

    mean_a = tl.sum(acc_a, axis=0) / a_len.to(tl.float32)
    mean_b = tl.sum(acc_b, axis=0) / b_len.to(tl.float32)
    tl.store(score_ptr + t, tl.sum(s_e, axis=0) + (mean_a + mean_b))


# --------------------------------------------------------------------------- host launcher
def table_tensor(rows: Sequence[tuple[int, ...]], device: torch.device | str = "cpu") -> torch.Tensor:
    """The (R, 6) int64 triplet table from ``FlatLayout.triplet_table()`` rows."""
    return torch.tensor(list(rows), dtype=torch.int64).reshape(-1, META_COLS).to(device)


def sensitivity_scores(p: torch.Tensor | None, g: torch.Tensor | None, ipt: torch.Tensor, unc: torch.Tensor, table: torch.Tensor,
                       beta1: float, beta2: float, *, ipt_out: torch.Tensor | None = None,
                       unc_out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: the (R,) fp32 triplet scores, updating the EMAs first when ``p`` and ``g`` are given.

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
        UPDATE=update, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return scores


# --------------------------------------------------------------------------- AOT configs
def aot_configs() -> list[tuple[object, dict, dict]]:
    """Every ``(fn, signature, constexprs)`` this module can launch, for ahead-of-time compile tests."""
    configs = []
    for update in (True, False):
        signature = {
            "p_ptr": "*fp32", "g_ptr": "*fp32", "ipt_ptr": "*fp32", "unc_ptr": "*fp32", "ipt_out_ptr": "*fp32", "unc_out_ptr": "*fp32",
            "score_ptr": "*fp32", "meta_ptr": "*i64",
            "beta1": "fp32", "omb1": "fp32", "beta2": "fp32", "omb2": "fp32",
            "UPDATE": "constexpr", "BLOCK": "constexpr",
        }
        configs.append((_sensitivity_kernel, signature, {"UPDATE": update, "BLOCK": BLOCK}))
    return configs
