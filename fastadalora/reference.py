"""AdaLoRA as PEFT 0.21 computes it, stated plainly: the oracle for every test.

Nothing here is fast.  Every function uses ordinary differentiable torch ops in the
same order as PEFT, so a float64 run agrees with PEFT to rounding.  The fast paths
(``fastadalora.backends``) and the Triton kernels (``fastadalora.kernels``) are each
tested against the twin defined here:

=====================================  =====================================================
reference                              fast twin
=====================================  =====================================================
``adapter_linear``                     ``backends.torch_path`` / ``backends.triton_path``
``dropout_keep_mask``                  ``kernels.dropout`` (Triton), ``dropout`` (torch ops)
``sensitivity_update``                 ``kernels.sensitivity`` / ``allocator`` (CPU, foreach)
``triplet_scores``                     ``kernels.sensitivity`` / ``allocator``
``orth_reg``                           ``orth.orth_reg_loss``
=====================================  =====================================================
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .peft_math import RANKNUM_EPS, adapter_scale, budget_schedule, delta_weight, init_adapter_, scaling_of  # noqa: F401


# --------------------------------------------------------------------------- layer
def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    E: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    ranknum: float | None,
    mask: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``y = x·W0ᵀ + b + (dropout(x)·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum+1e-5)``.

    ``weight`` is (out, in) as in ``nn.Linear``.  ``E`` is (r, 1) or (r,).  ``mask`` is an
    optional (r,) multiplier on E.  ``keep`` is an optional boolean dropout keep-mask with
    x's shape; kept elements are scaled by 1/(1-p) as ``nn.Dropout`` does.  With
    ``ranknum=None``, ``scaling`` is taken as the whole factor ``scaling/(ranknum+1e-5)``.
    """
    if weight is None:  # the branch alone, in the adapter's dtype (a base that computes its own output)
        result = torch.zeros((), dtype=A.dtype, device=x.device)
    else:
        result = torch.nn.functional.linear(x, weight, bias)
    e = E.reshape(-1, 1)
    if mask is not None:
        e = e * mask.reshape(-1, 1).to(e.dtype)
    xd = x.to(A.dtype)  # PEFT casts the input to the adapter's dtype
    if keep is not None:
        xd = xd * keep.to(xd.dtype) / (1.0 - dropout_p)
    branch = (xd @ (A * e).T @ B.T) * scaling
    branch = branch if ranknum is None else branch / (ranknum + RANKNUM_EPS)
    return (result + branch).to(result.dtype)  # PEFT's in-place `result += ...`: one rounding to the base dtype


def dropout_keep_mask(shape: Sequence[int], p: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", *, seed: int | None = None) -> torch.Tensor:
    """The keep mask every backend's dropout follows, a pure function of ``(seed, row, column)``.

    For the input flattened to (N, K): ``u = mix(ρ(n) + γ(c // 2))`` with ``ρ(n) = mix(n ^ mix(seed ^
    0x2545F491))``, ``γ(j) = mix(j ^ mix(seed ^ 0x68E31DA4))`` and ``mix`` = lowbias32, all on uint32;
    element (n, c) is kept when the top (c even) or bottom (c odd) 16 bits of u reach
    ``min(65535, ⌊p·65536 + ½⌋)``.  Without ``seed`` one is drawn from ``generator`` (torch's default
    one when None) exactly as the fused backends draw theirs, so after the same ``torch.manual_seed``
    the masks agree.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    shape = tuple(int(s) for s in shape)
    n_rows, n_cols = math.prod(shape[:-1]), shape[-1]
    m32 = 0xFFFFFFFF

    def mul32(x, m):  # x·m mod 2^32 for int64 x in [0, 2^32), in 16-bit halves (no int64 overflow)
        return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & m32

    def mix(x):  # lowbias32
        x = x ^ (x >> 16)
        x = mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = mul32(x, 0x846CA68B)
        return x ^ (x >> 16)

    def salt(s):
        return int(mix(torch.tensor([(seed ^ s) & m32], dtype=torch.int64))[0])

    rows = mix(torch.arange(n_rows, dtype=torch.int64, device=device) ^ salt(0x2545F491))
    cols = torch.arange(n_cols, dtype=torch.int64, device=device)
    pairs = mix((cols // 2) ^ salt(0x68E31DA4))
    u = mix((rows[:, None] + pairs[None, :]) & m32)
    half = torch.where(cols % 2 == 0, u >> 16, u & 0xFFFF)
    return (half >= min(65535, int(p * 65536.0 + 0.5))).reshape(shape)


# --------------------------------------------------------------------------- allocator
def sensitivity_update(p: torch.Tensor, g: torch.Tensor, ipt_ema: torch.Tensor, unc_ema: torch.Tensor,
                       beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step: ``I=|p·g|``, ``Ī←β1·Ī+(1-β1)·I``, ``Ū←β2·Ū+(1-β2)·|I-Ī|`` (new Ī).

    Returns ``(Ī, Ū, s)`` with the element score ``s = Ī·Ū``.  Inputs are not modified.
    """
    ipt = (p * g).abs()
    ipt_ema = beta1 * ipt_ema + (1 - beta1) * ipt
    unc_ema = beta2 * unc_ema + (1 - beta2) * (ipt - ipt_ema).abs()
    return ipt_ema, unc_ema, ipt_ema * unc_ema


def triplet_scores(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """``S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`` for one layer, shape (r,).

    The bracket is PEFT's order of addition (``_combine_ipt``).
    """
    ab = torch.cat([score_A.mean(dim=1, keepdim=True), score_B.mean(dim=0).view(-1, 1)], dim=1).sum(dim=1)
    return score_E.reshape(-1) + ab


def mask_threshold(all_scores: torch.Tensor, init_bgt: int, budget: int) -> torch.Tensor:
    """``τ = kthvalue(S, k = B0 - b)``; triplets with ``S <= τ`` are pruned."""
    return torch.kthvalue(all_scores, k=init_bgt - budget)[0]


# --------------------------------------------------------------------------- regulariser
def orth_reg(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """PEFT's ``R = mean over all A and B of ‖G − I‖_F`` (``G = AAᵀ``, ``BᵀB``), unsquared.

    PEFT iterates ``named_parameters`` (A then B within each layer); pass them in that order
    for bit-level agreement.
    """
    total = 0
    n = 0
    for A, B in zip(As, Bs):
        for G in (A @ A.T, B.T @ B):
            eye = torch.eye(*G.size(), out=torch.empty_like(G))
            total = total + torch.norm(G - eye, p="fro")
            n += 1
    return total / n if n else torch.zeros(())


def fp_tolerance(dtype: torch.dtype, reduction_len: int, safety: float = 4.0) -> float:
    """A tolerance from the maths: ``safety · sqrt(K) · eps`` for a K-long fp32-accumulated dot.

    Inputs rounded to ``dtype`` carry a relative error of eps(dtype) each; an fp32 accumulation
    over K terms of random sign grows like sqrt(K)·eps32; we bound both with a worst-case factor.
    """
    eps_in = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.float32).eps if dtype != torch.float64 else torch.finfo(torch.float64).eps
    return safety * (eps_in + math.sqrt(reduction_len) * eps_acc)
