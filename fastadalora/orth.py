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

FSDP2-sharded parameters (``DTensor``, ``Shard(0)``; the term is computed after the blocks have
resharded) are handled on their local shards: a rank holds some rows of each A and some rows of
each B.  ``BᵀB`` is the sum of the ranks' partial Grams (r×r each); ``AAᵀ`` pairs rows held by
different ranks, so the A rows are gathered (r×in per layer: the parameter itself, never a
gradient).  One all-gather over the shard group per forward carries both; every rank then has the
same ``G − I`` and norms, and the backward is local (``2(G−I)·A`` restricted to the local rows,
``2B_local·(G−I)``).
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

_shape_of = operator.attrgetter("shape")
_DIST = torch.distributed.is_available()


def _plan(mats: Sequence[torch.Tensor], n_a: int, spec=None) -> list[tuple[bool, list[int], object]]:
    """Groups ``(is_B, input positions, shard)`` of matrices of one kind sharing a shape, dtype, device and
    sharding; ``shard`` is None or ``(spec, global shape)`` for a group of DTensors (``spec``: their
    ``distributed.ShardSpec``)."""
    from .distributed import is_dtensor

    groups: dict[tuple, list[int]] = {}
    for pos, t in enumerate(mats):
        if t.dim() != 2:
            raise ValueError(f"orth_reg_loss: expected 2-D lora_A/lora_B, got shape {tuple(t.shape)}")
        sharded = spec is not None and is_dtensor(t)
        groups.setdefault((pos >= n_a, tuple(t.shape), t.dtype, t.device, sharded), []).append(pos)
    return [(key[0], positions, (spec, key[1]) if key[4] else None) for key, positions in groups.items()]


def _sharded_grams(plan, mats) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{group: (X, G)}`` for the sharded groups, with one all-gather over the shard group.

    A groups: ``X`` is the gathered ``(g, r, in)`` and ``G = AAᵀ``; B groups: ``X`` the local
    ``(g, rows, r)`` and ``G = Σ_ranks B_kᵀB_k`` (summed in mesh order, the same on every rank).
    """
    from .distributed import all_gather_flat

    spec = next(shard[0] for _, _, shard in plan if shard is not None)
    local, pieces = {}, []
    for gi, (is_b, positions, shard) in enumerate(plan):
        if shard is None:
            continue
        X = torch.stack([mats[p] for p in positions])
        X = X.to(torch.promote_types(X.dtype, torch.float32))
        local[gi] = X
        if is_b:  # the partial Gram of this rank's rows of B
            pieces.append(torch.bmm(X.transpose(1, 2), X).reshape(-1))
        else:  # this rank's rows of A, padded to the chunk size (torch.chunk: ceil(r / parts))
            rows = -(-shard[1][0] // spec.parts)
            pad = X.new_zeros(X.shape[0], rows, X.shape[2])
            pad[:, :X.shape[1]] = X
            pieces.append(pad.reshape(-1))
    payload = torch.cat(pieces)
    gathered = payload.new_empty(spec.parts, payload.numel())
    all_gather_flat(gathered.view(-1), payload, spec.group)
    out, off = {}, 0
    for gi, X in local.items():
        is_b, _, (_, (d0, d1)) = plan[gi]
        g = X.shape[0]
        if is_b:
            n = g * d1 * d1
            G = gathered[:, off:off + n].reshape(spec.parts, g, d1, d1).sum(0)
            out[gi] = (X, G)
        else:
            rows = -(-d0 // spec.parts)
            n = g * rows * d1
            full = gathered[:, off:off + n].reshape(spec.parts, g, rows, d1).transpose(0, 1).reshape(g, -1, d1)
            full = full[:, :d0].contiguous()  # the chunks fill from the front: the first r rows are A
            out[gi] = (full, torch.bmm(full, full.transpose(1, 2)))
        off += n
    return out


class _OrthReg(torch.autograd.Function):
    """Forward and analytic backward of the whole regulariser; inputs are ``(plan, *As, *Bs)``."""

    @staticmethod
    def forward(ctx, plan, *mats):
        n = len(mats)
        norms, saved = [], []
        # fp32 (or wider) whatever the parameters' dtype or an enclosing autocast
        with torch.autocast(mats[0].device.type, enabled=False):
            sharded = _sharded_grams(plan, mats) if any(shard is not None for _, _, shard in plan) else {}
            for gi, (is_b, positions, _) in enumerate(plan):
                if gi in sharded:
                    X, D = sharded[gi]
                else:
                    X = torch.stack([mats[p] for p in positions])  # (g, r, in) for A, (g, out, r) for B
                    X = X.to(torch.promote_types(X.dtype, torch.float32))
                    D = torch.bmm(X.transpose(1, 2), X) if is_b else torch.bmm(X, X.transpose(1, 2))  # BᵀB or AAᵀ
                D.diagonal(dim1=1, dim2=2).sub_(1)  # G − I
                norms.append(torch.linalg.vector_norm(D, dim=(1, 2)))
                saved += [X, D]
            norms = torch.cat(norms) if len(norms) > 1 else norms[0]
        ctx.plan = plan
        ctx.n = n
        ctx.dtypes = [mats[positions[0]].dtype for _, positions, _ in plan]
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
            for gi, ((is_b, positions, shard), dtype) in enumerate(zip(ctx.plan, ctx.dtypes)):
                X, D = saved[2 * gi:2 * gi + 2]
                if shard is not None and not is_b:  # the local rows of 2(AAᵀ−I)·A, from the gathered A
                    start, length = shard[0].rows(shard[1][0])
                    D = D[:, start:start + length]
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
        self._sharded = False

    def __call__(self, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> torch.Tensor:
        mats = [*As, *Bs]
        if not mats:
            return torch.zeros(())
        key = (len(As), mats[0].dtype, mats[0].device, mats[-1].dtype, mats[-1].device)
        if (self._mats is None or len(mats) != len(self._mats) or key != self._key
                or not all(map(operator.is_, mats, self._mats))
                or list(map(_shape_of, mats)) != self._shapes):
            spec = None
            if _DIST and torch.distributed.is_initialized():
                from . import distributed

                dts = [t for t in mats if distributed.is_dtensor(t)]
                spec = distributed.ShardSpec.of(dts, "orth_reg_loss") if dts else None
            self._plan = _plan(mats, len(As), spec if spec is not None and spec.parts > 1 else None)
            self._sharded = spec is not None  # DTensors: the op runs on their local tensors (whole when replicated)
            self._mats, self._key, self._shapes = mats, key, list(map(_shape_of, mats))
        if self._sharded:  # FSDP2 shards: the op works on the local tensors (to_local carries the gradient back)
            from .distributed import local

            mats = [local(t) for t in mats]
        return _OrthReg.apply(self._plan, *mats)


def orth_reg_loss(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """PEFT's orthogonal regulariser: the mean of ``‖A·Aᵀ − I‖_F`` and ``‖Bᵀ·B − I‖_F`` over all layers.

    Pass the layers' ``lora_A`` and ``lora_B`` (same order); the result is a 0-d tensor that
    back-propagates into every one of them.  With no matrices it is ``tensor(0.)``.
    """
    return OrthRegularizer()(As, Bs)
