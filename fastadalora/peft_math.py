"""PEFT 0.21's AdaLoRA formulas that production code needs: scaling, init, delta weight, budget schedule.

Production (layers, allocator) and the oracle (``reference``) both call these, so the constants
and the schedule exist once.
"""

from __future__ import annotations

import torch

RANKNUM_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5)


def scaling_of(r: int, lora_alpha: float) -> float:
    """PEFT's ``scaling``: ``lora_alpha`` itself, or ``r`` when ``lora_alpha <= 0``."""
    return lora_alpha if lora_alpha > 0 else float(r)


def adapter_scale(scaling: float, ranknum: float) -> float:
    """The single factor the fused paths multiply by: ``scaling / (ranknum + 1e-5)``."""
    return scaling / (ranknum + RANKNUM_EPS)


def init_adapter_(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor) -> None:
    """PEFT's ``reset_lora_parameters``: E = 0, then A, then B ~ N(0, 0.02), in that order."""
    with torch.no_grad():
        torch.nn.init.zeros_(E)
        torch.nn.init.normal_(A, mean=0.0, std=0.02)
        torch.nn.init.normal_(B, mean=0.0, std=0.02)


def delta_weight(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float, ranknum: float,
                 fan_in_fan_out: bool = False) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: ``B·(A⊙E)·scaling/(ranknum+1e-5)``, transposed for Conv1D."""
    w = B @ (A * E.reshape(-1, 1))
    if fan_in_fan_out:
        w = w.T
    return w * scaling / (ranknum + RANKNUM_EPS)


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:
    """PEFT's cubic budget schedule: ``(budget, mask_now)`` at ``step``."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % deltaT == 0
