"""AdaLoRA's orthogonal regulariser as one autograd op for the whole model.

``R = mean over every A and B of ‖G − I‖_F`` with ``G = A·Aᵀ`` for A and ``G = Bᵀ·B`` for B
(PEFT's ``AdaLoraModel.forward``; twin: ``reference.orth_reg``).  The norm is not squared and
masked triplets are included.  It is computed in fp32 (fp64 for fp64 parameters), also for
fp16/bf16 parameters and under ``torch.autocast``; the loss is fp32 and the gradients have the
parameters' dtypes.

The A matrices are grouped by shape, and so are the B matrices; each group is stacked (one copy)
and handled with one ``bmm``, so the op count follows the number of distinct shapes, not the
number of layers.  The backward is analytic, ``2(AAᵀ−I)·A/‖AAᵀ−I‖`` and ``2B·(BᵀB−I)/‖BᵀB−I‖``,
zero where the norm is 0, one ``bmm`` per group.  Each parameter's gradient is a slice of its
group's result (in the parameter's own layout).  In a training step autograd adds it to the
layer's own gradient of that parameter, so each ``p.grad`` is a tensor of its own; only where the
term is a parameter's sole gradient does ``p.grad`` stay a slice of that step's group result.
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

_shape_of = operator.attrgetter("shape")


def _plan(mats: Sequence[torch.Tensor], n_a: int) -> list[tuple[bool, list[int]]]:
    """Groups ``(is_B, input positions)`` of matrices of one kind sharing a shape, dtype and device."""
    groups: dict[tuple, list[int]] = {}
    for pos, t in enumerate(mats):
        if t.dim() != 2:
            raise ValueError(f"orth_reg_loss: expected 2-D lora_A/lora_B, got shape {tuple(t.shape)}")
        groups.setdefault((pos >= n_a, tuple(t.shape), t.dtype, t.device), []).append(pos)
    return [(key[0], positions) for key, positions in groups.items()]


class _OrthReg(torch.autograd.Function):
    """Forward and analytic backward of the whole regulariser; inputs are ``(plan, *As, *Bs)``."""

    @staticmethod
    def forward(ctx, plan, *mats):
        n = len(mats)
        norms, saved = [], []
        # fp32 (or wider) whatever the parameters' dtype or an enclosing autocast
        with torch.autocast(mats[0].device.type, enabled=False):
            for is_b, positions in plan:
                X = torch.stack([mats[p] for p in positions])  # (g, r, in) for A, (g, out, r) for B
                X = X.to(torch.promote_types(X.dtype, torch.float32))
                D = torch.bmm(X.transpose(1, 2), X) if is_b else torch.bmm(X, X.transpose(1, 2))  # BᵀB or AAᵀ
                D.diagonal(dim1=1, dim2=2).sub_(1)  # G − I
                norms.append(torch.linalg.vector_norm(D, dim=(1, 2)))
                saved += [X, D]
            norms = torch.cat(norms) if len(norms) > 1 else norms[0]
        ctx.plan = plan
        ctx.n = n
        ctx.dtypes = [mats[positions[0]].dtype for _, positions in plan]
        ctx.save_for_backward(norms, *saved)
        return norms.sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        norms, *saved = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None] * ctx.n
        with torch.autocast(norms.device.type, enabled=False):
            # 2(G−I)A/‖G−I‖ or 2B(G−I)/‖G−I‖, times grad/n; 0 where ‖G−I‖ = 0 (G = I exactly: a minimum)
            coeff = torch.where(norms > 0, (2.0 / ctx.n) * grad_out.to(norms.dtype) / norms, 0.0)
            first = 0
            for gi, ((is_b, positions), dtype) in enumerate(zip(ctx.plan, ctx.dtypes)):
                X, D = saved[2 * gi:2 * gi + 2]
                gX = torch.bmm(X, D) if is_b else torch.bmm(D, X)
                gX = gX.mul_(coeff[first:first + len(positions)].view(-1, 1, 1)).to(dtype)
                first += len(positions)
                for p, g in zip(positions, gX.unbind(0)):
                    grads[p] = g
        return (None, *grads)


class OrthRegularizer:
    """``orth_reg_loss`` that keeps its grouping plan between calls (re-planned when the matrices change)."""

    def __init__(self) -> None:
        self._mats: list[torch.Tensor] | None = None
        self._key: tuple = ()
        self._plan: list = []

    def __call__(self, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> torch.Tensor:
        mats = [*As, *Bs]
        if not mats:
            return torch.zeros(())
        key = (len(As), mats[0].dtype, mats[0].device, mats[-1].dtype, mats[-1].device)
        if (self._mats is None or len(mats) != len(self._mats) or key != self._key
                or not all(map(operator.is_, mats, self._mats))
                or list(map(_shape_of, mats)) != self._shapes):
            self._plan = _plan(mats, len(As))
            self._mats, self._key, self._shapes = mats, key, list(map(_shape_of, mats))
        return _OrthReg.apply(self._plan, *mats)


def orth_reg_loss(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """PEFT's orthogonal regulariser: the mean of ``‖A·Aᵀ − I‖_F`` and ``‖Bᵀ·B − I‖_F`` over all layers.

    Pass the layers' ``lora_A`` and ``lora_B`` (same order); the result is a 0-d tensor that
    back-propagates into every one of them.  With no matrices it is ``tensor(0.)``.
    """
    return OrthRegularizer()(As, Bs)
