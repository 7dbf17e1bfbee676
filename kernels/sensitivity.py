"""The allocator's sensitivity pass: EMA update, element scores and triplet scores in one launch.

Twin in ``fastadalora.reference``: ``sensitivity_update`` (Ī, Ū, s) and ``triplet_scores`` (S).

Every adapter tensor of the model lives in ONE flat buffer (the allocator gathers parameters and
gradients with one ``torch.cat`` each), laid out as::

    [ A_0 | A_1 | ... | A_{L-1} | B_0 | ... | B_{L-1} | E_0 | ... | E_{L-1} ]   (each row-major)

A triplet i of layer l owns exactly row i of A_l, element i of E_l and column i of B_l, so the
elements partition into triplets.  The kernel runs one program per triplet: it updates Ī and Ū
for the triplet's elements, forms ``s = Ī·Ū`` and reduces it into
``S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`` with an fp32 accumulator.  Every element is
touched by exactly one program and every sum is a plain in-register reduction, so the result is
deterministic (no atomics) and needs no second launch.

Where each triplet's elements are is read from an int64 table, one row per triplet
(``triplet_table`` builds it)::

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
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, s_ptr, idx, m, beta1, omb1, beta2, omb2,
                    UPDATE: tl.constexpr, WRITE_S: tl.constexpr):
    """Ī, Ū (updated in place when UPDATE) and s = Ī·Ū for the elements ``idx`` (masked by ``m``).

    The state is re-read after rounding to its storage dtype, so ``s`` (and Ū's use of the new Ī)
    are those of the stored values, as in PEFT, which computes in the parameter dtype.
    """
    # upcast right after the load: fp32 maths for fp16/bf16 storage
    ipt_bar = tl.load(ipt_ptr + idx, mask=m, other=0.0).to(tl.float32)
    unc_bar = tl.load(unc_ptr + idx, mask=m, other=0.0).to(tl.float32)
    if UPDATE:
        p = tl.load(p_ptr + idx, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=m, other=0.0).to(tl.float32)
        ipt = tl.abs(p * g).to(ipt_ptr.dtype.element_ty).to(tl.float32)
        ipt_bar = (beta1 * ipt_bar + omb1 * ipt).to(ipt_ptr.dtype.element_ty)
        tl.store(ipt_ptr + idx, ipt_bar, mask=m)
        ipt_bar = ipt_bar.to(tl.float32)
        unc_bar = (beta2 * unc_bar + omb2 * tl.abs(ipt - ipt_bar)).to(unc_ptr.dtype.element_ty)
        tl.store(unc_ptr + idx, unc_bar, mask=m)
        unc_bar = unc_bar.to(tl.float32)
    s = ipt_bar * unc_bar
    if WRITE_S:
        tl.store(s_ptr + idx, s.to(s_ptr.dtype.element_ty), mask=m)
    return tl.where(m, s, 0.0)


@triton.jit
def _sensitivity_kernel(
    p_ptr,  # flat parameters (post-step), layout above; read only when UPDATE
    g_ptr,  # flat gradients, same layout; read only when UPDATE
    ipt_ptr,  # flat Ī, updated in place when UPDATE
    unc_ptr,  # flat Ū, updated in place when UPDATE
    s_ptr,  # flat element scores Ī·Ū, written when WRITE_S (any buffer otherwise)
    score_ptr,  # (R,) fp32 triplet scores S, written
    meta_ptr,  # (R, 6) int64 triplet table
    beta1, omb1, beta2, omb2,  # β1, 1-β1, β2, 1-β2 (fp32)
    UPDATE: tl.constexpr,  # False: scores from the stored state only (the phase-switch mask)
    WRITE_S: tl.constexpr,
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
        m = offs < a_len
        acc_a += _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, s_ptr, a_off + offs, m,
                                 beta1, omb1, beta2, omb2, UPDATE, WRITE_S)
    # column i of B: stride r
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, b_len, BLOCK):
        offs = start + lanes
        m = offs < b_len
        acc_b += _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, s_ptr, b_off + offs * b_stride, m,
                                 beta1, omb1, beta2, omb2, UPDATE, WRITE_S)
    # E_i: one element (lane 0)
    s_e = _element_scores(p_ptr, g_ptr, ipt_ptr, unc_ptr, s_ptr, e_off + lanes, lanes < 1,
                          beta1, omb1, beta2, omb2, UPDATE, WRITE_S)

    mean_a = tl.sum(acc_a, axis=0) / a_len.to(tl.float32)
    mean_b = tl.sum(acc_b, axis=0) / b_len.to(tl.float32)
    tl.store(score_ptr + t, tl.sum(s_e, axis=0) + (mean_a + mean_b))


# --------------------------------------------------------------------------- host launchers
def triplet_table(shapes: Sequence[tuple[int, int, int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """The (R, 6) int64 table for layers of ``(r, in, out)`` in the flat ``[A…|B…|E…]`` layout."""
    n_a = sum(r * i for r, i, _ in shapes)
    n_b = sum(r * o for r, _, o in shapes)
    rows = []
    a_start, b_start, e_start = 0, n_a, n_a + n_b
    for r, fan_in, fan_out in shapes:
        for i in range(r):
            rows.append((a_start + i * fan_in, fan_in, e_start + i, b_start + i, fan_out, r))
        a_start += r * fan_in
        b_start += r * fan_out
        e_start += r
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, META_COLS)
    return table.to(device)


def sensitivity_scores(p_flat: torch.Tensor | None, g_flat: torch.Tensor | None, ipt: torch.Tensor,
                       unc: torch.Tensor, table: torch.Tensor, beta1: float, beta2: float, *, update: bool = True,
                       element_scores: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: update ``ipt``/``unc`` in place (when ``update``) and return the (R,) fp32 triplet scores.

    ``p_flat``/``g_flat``/``ipt``/``unc`` are flat, contiguous and of one dtype (fp32, fp16 or
    bf16); ``p_flat``/``g_flat`` may be None when ``update`` is False.  ``element_scores``, if
    given (fp32, flat), receives ``s = Ī·Ū`` for every element.
    """
    if ipt.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sensitivity kernel: unsupported dtype {ipt.dtype}; expected one of {SUPPORTED_DTYPES}")
    if update:
        if p_flat is None or g_flat is None:
            raise ValueError("sensitivity kernel: update=True needs p_flat and g_flat")
        if not (p_flat.dtype == g_flat.dtype == ipt.dtype == unc.dtype):
            raise TypeError("sensitivity kernel: p, g, Ī and Ū must share a dtype, got "
                            f"{p_flat.dtype}, {g_flat.dtype}, {ipt.dtype}, {unc.dtype}")
        if not (p_flat.numel() == g_flat.numel() == ipt.numel() == unc.numel()):
            raise ValueError("sensitivity kernel: flat buffers differ in length")
    else:
        p_flat, g_flat = ipt, unc  # never read
    n_triplets = table.shape[0]
    scores = torch.empty(n_triplets, dtype=torch.float32, device=ipt.device)
    if n_triplets == 0:
        return scores
    write_s = element_scores is not None
    s_buf = element_scores if write_s else scores
    _sensitivity_kernel[(n_triplets,)](
        p_flat, g_flat, ipt, unc, s_buf, scores, table,
        float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
        UPDATE=update, WRITE_S=write_s, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return scores


# --------------------------------------------------------------------------- AOT configs
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_configs() -> list[tuple[object, dict, dict]]:
    """Every ``(fn, signature, constexprs)`` this module can launch, for ahead-of-time compile tests."""
    configs = []
    for dtype in SUPPORTED_DTYPES:
        ty = _TL_DTYPES[dtype]
        for update in (True, False):
            for write_s in (False, True):
                signature = {
                    "p_ptr": f"*{ty}", "g_ptr": f"*{ty}", "ipt_ptr": f"*{ty}", "unc_ptr": f"*{ty}",
                    "s_ptr": "*fp32",
                    "score_ptr": "*fp32", "meta_ptr": "*i64",
                    "beta1": "fp32", "omb1": "fp32", "beta2": "fp32", "omb2": "fp32",
                    "UPDATE": "constexpr", "WRITE_S": "constexpr", "BLOCK": "constexpr",
                }
                constexprs = {"UPDATE": update, "WRITE_S": write_s, "BLOCK": BLOCK}
                configs.append((_sensitivity_kernel, signature, constexprs))
    return configs
