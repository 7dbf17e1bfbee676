"""AdaLoRA's orthogonal regulariser as one autograd op for the whole model.

``R = mean over every A and B of ‖G − I‖_F`` with ``G = A·Aᵀ`` for A and ``G = Bᵀ·B`` for B
(PEFT's ``AdaLoraModel.forward``; twin: ``reference.orth_reg``).  The norm is not squared and
masked triplets are included.

The A matrices are grouped by shape, and so are the B matrices; each group is stacked and handled
with one ``bmm``, so the op count follows the number of distinct shapes, not the number of layers.
The backward is analytic, ``2(AAᵀ−I)·A/‖AAᵀ−I‖`` and ``2B·(BᵀB−I)/‖BᵀB−I‖``, zero where the norm is
0, and each gradient is a contiguous slice in its parameter's layout (no copy to accumulate it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable


def _plan(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> list[tuple[bool, list[int]]]:
    """Groups ``(is_B, input positions)`` of matrices of one kind sharing a shape, dtype and device."""
    groups: dict[tuple, list[int]] = {}
    for pos, (t, is_b) in enumerate([(a, False) for a in As] + [(b, True) for b in Bs]):
        if t.dim() != 2:
            raise ValueError(f"orth_reg_loss: expected 2-D lora_A/lora_B, got shape {tuple(t.shape)}")
        groups.setdefault((is_b, tuple(t.shape), t.dtype, t.device), []).append(pos)
    return [(key[0], positions) for key, positions in groups.items()]


class _OrthReg(torch.autograd.Function):
    """Forward and analytic backward of the whole regulariser; inputs are ``(plan, stacks, *As, *Bs)``.

    ``stacks`` (or None) holds, per group of ``plan``, a tensor already laid out as the group's
    stack (a view of the flat parameter buffer, see ``flat_store``): then nothing is copied.
    """

    @staticmethod
    def forward(ctx, plan, stacks, *mats):
        n = len(mats)
        norms, saved = [], []
        for gi, (is_b, positions) in enumerate(plan):
            # (g, r, in) for A, (g, out, r) for B
            X = stacks[gi] if stacks is not None else torch.stack([mats[p] for p in positions])
            D = torch.bmm(X.transpose(1, 2), X) if is_b else torch.bmm(X, X.transpose(1, 2))  # BᵀB or AAᵀ
            D.diagonal(dim1=1, dim2=2).sub_(1)  # G − I
            norm = torch.linalg.vector_norm(D, dim=(1, 2))
            norms.append(norm)
            saved += [X, D, norm]
        ctx.plan = plan
        ctx.n = n
        ctx.save_for_backward(*saved)
        total = torch.cat(norms).sum() if len(norms) > 1 else norms[0].sum()
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None] * ctx.n
        for gi, (is_b, positions) in enumerate(ctx.plan):
            X, D, norm = saved[3 * gi:3 * gi + 3]
            # 2(G−I)A/‖G−I‖ or 2B(G−I)/‖G−I‖, times grad/n; 0 where ‖G−I‖ = 0 (G = I exactly: a minimum).
            # Computed in each parameter's own layout so the gradients are contiguous slices.
            coeff = torch.where(norm > 0, (2.0 / ctx.n) * grad_out / norm, 0.0).to(X.dtype)
            gX = (torch.bmm(X, D) if is_b else torch.bmm(D, X)).mul_(coeff.view(-1, 1, 1))
            for p, g in zip(positions, gX.unbind(0)):
                grads[p] = g
        return (None, None, *grads)


def orth_reg_loss(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], groups=None) -> torch.Tensor:
    """PEFT's orthogonal regulariser: the mean of ``‖A·Aᵀ − I‖_F`` and ``‖Bᵀ·B − I‖_F`` over all layers.

    Pass the layers' ``lora_A`` and ``lora_B`` (same order); the result is a 0-d tensor that
    back-propagates into every one of them.  With no matrices it is ``tensor(0.)``.  ``groups``
    (optional, ``FlatAdapterStore.orth_groups()``) gives ``(is_B, positions, stacked view)`` per
    shape group when the matrices already live stacked in one buffer.
    """
    As, Bs = list(As), list(Bs)
    if not As and not Bs:
        return torch.zeros(())
    if groups is None:
        return _OrthReg.apply(_plan(As, Bs), None, *As, *Bs)
    plan = [(is_b, positions) for is_b, positions, _ in groups]
    return _OrthReg.apply(plan, [stacked for _, _, stacked in groups], *As, *Bs)
