"""``RankAllocator``: AdaLoRA's budget schedule, sensitivity state, triplet scores and masks.

Semantics are PEFT 0.21's ``AdaLoraModel.update_and_allocate`` (see ``reference`` for the maths):

* ``t <  T - tfinal``: update the sensitivity EMAs, then mask E to the scheduled budget when the
  schedule says so (``t > tinit`` and ``t % deltaT == 0``);
* ``t == T - tfinal``: no EMA update; mask to the final budget, keep that pattern for good and
  reset the EMAs;
* ``t >  T - tfinal``: re-zero E from the kept pattern every step.

The work is a constant number of torch ops however many layers there are, with no host sync:
parameters and gradients are gathered into one flat buffer each (``[A… | B… | E…]``), the EMAs
live in two flat buffers, the per-triplet means are one ``index_add_`` (CPU) or are fused into the
Triton sensitivity kernel (CUDA), the threshold is one ``kthvalue`` and E is rewritten with one
``torch._foreach_copy_``.  ``rank_pattern`` (a host list of bools) is only built when read.

Differences from PEFT, on purpose: the initial budget is the sum of the layers' current ranks (so
a model resized to a saved rank pattern resumes instead of crashing), ``k = 0`` prunes nothing
instead of crashing in ``kthvalue``, and the rank-pattern keys carry no adapter name.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn

from . import reference
from .backends import resolve_backend

_PARTS = ("lora_A", "lora_B", "lora_E")


def mask_from_pattern(Es: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero, in place, every E entry whose flat ``keep`` flag is False (PEFT's ``masked_fill_``).

    ``keep`` is a bool tensor with one flag per triplet over all layers, in the order of ``Es``.
    Three ops whatever the number of layers: cat, where, ``_foreach_copy_`` (through split views).
    """
    if not Es:
        return
    with torch.no_grad():
        flat = torch.cat(list(Es))
        kept = torch.where(keep.view(flat.shape), flat, 0)
        torch._foreach_copy_(list(Es), list(kept.split([e.shape[0] for e in Es])))


class RankAllocator:
    """Sensitivity-based rank allocation for a list of AdaLoRA layers.

    Args:
        named_layers: ``(module path, layer)`` pairs; each layer has ``lora_A`` (r×in),
            ``lora_E`` (r×1) and ``lora_B`` (out×r) Parameters.  The path names the rank pattern
            entry ``"<path>.lora_E"`` and appears in error messages.
        init_r: the initial rank per layer (informational: the initial budget is read from the
            layers' current shapes).
        target_r: the average final rank; the final budget is ``target_r × L``.
        tinit, tfinal, total_step, deltaT: PEFT's schedule (see ``reference.budget_schedule``).
        beta1, beta2: EMA factors of the sensitivity and of its uncertainty, in (0, 1).

    Call ``update_and_allocate(step)`` once per optimizer step, after ``optimizer.step()`` and
    before ``zero_grad()``.
    """

    def __init__(self, named_layers: list[tuple[str, nn.Module]], init_r: int, target_r: int, tinit: int,
                 tfinal: int, total_step: int, deltaT: int, beta1: float, beta2: float) -> None:
        if not 0.0 < beta1 < 1.0 or not 0.0 < beta2 < 1.0:
            raise ValueError(f"RankAllocator: beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        if int(deltaT) < 1:
            raise ValueError(f"RankAllocator: deltaT must be >= 1, got {deltaT}")
        self.named_layers = [(str(n), m) for n, m in named_layers]
        self.init_r = int(init_r)
        self.target_r = int(target_r)
        self.tinit, self.tfinal, self.total_step, self.deltaT = int(tinit), int(tfinal), int(total_step), int(deltaT)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.last_step: int | None = None
        self._build(keep_state=False)

    # ------------------------------------------------------------------ layout
    def _collect(self):
        As, Bs, Es, shapes = [], [], [], []
        for name, layer in self.named_layers:
            A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
            r = A.shape[0]
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or E.numel() != r or E.shape[0] != r:
                raise ValueError(f"RankAllocator: layer {name!r} has inconsistent adapter shapes "
                                 f"lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)}")
            As.append(A)
            Bs.append(B)
            Es.append(E)
            shapes.append((int(r), int(A.shape[1]), int(B.shape[0])))
        return As, Bs, Es, shapes

    def _build(self, keep_state: bool) -> None:
        As, Bs, Es, shapes = self._collect()
        saved = None
        if keep_state and shapes == getattr(self, "_shapes", None):
            saved = (self._ipt, self._unc, self._keep, self._final_keep, self.init_bgt)
        self._As, self._Bs, self._Es = As, Bs, Es
        self._params = As + Bs + Es  # the flat layout [A… | B… | E…]
        names = [n for n, _ in self.named_layers]
        self._param_names = ([f"{n}.lora_A" for n in names] + [f"{n}.lora_B" for n in names]
                             + [f"{n}.lora_E" for n in names])
        self._shapes = shapes
        self.ranks = [s[0] for s in shapes]
        self.n_triplets = sum(self.ranks)
        self.init_bgt = self.n_triplets
        self.target_bgt = self.target_r * len(shapes)
        if not self._params:
            self._device, self._dtype = torch.device("cpu"), torch.get_default_dtype()
        else:
            devices = {p.device for p in self._params}
            if len(devices) > 1:
                raise ValueError(f"RankAllocator: all adapter parameters must be on one device, found {devices}")
            self._device = devices.pop()
            self._dtype = functools.reduce(torch.promote_types, [p.dtype for p in self._params])
        self._probe = (self._params[0].device, self._params[0].dtype) if self._params else None
        self._n_a = sum(r * i for r, i, _ in shapes)
        self._n_b = sum(r * o for r, _, o in shapes)
        n = self._n_a + self._n_b + self.n_triplets
        self._ipt = torch.zeros(n, dtype=self._dtype, device=self._device)
        self._unc = torch.zeros(n, dtype=self._dtype, device=self._device)
        self._keep: torch.Tensor | None = None  # the latest mask, one flag per triplet
        self._final_keep: torch.Tensor | None = None  # the pattern fixed at t == T - tfinal
        # CPU path: A/B element -> bucket (A part of triplet i: i, B part: R + i), and the counts
        R = self.n_triplets
        idx, cnt, t0 = [], [], 0
        for r, fan_in, _ in shapes:
            idx.append((t0 + torch.arange(r)).repeat_interleave(fan_in))
            cnt.append(torch.full((r,), float(fan_in), dtype=torch.float64))
            t0 += r
        t0 = 0
        for r, _, fan_out in shapes:
            idx.append((R + t0 + torch.arange(r)).repeat(fan_out))
            t0 += r
        for r, _, fan_out in shapes:
            cnt.append(torch.full((r,), float(fan_out), dtype=torch.float64))
        self._bucket = (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).to(self._device)
        self._counts = (torch.cat(cnt) if cnt else torch.zeros(0, dtype=torch.float64)).to(self._device, self._dtype)
        self._table: torch.Tensor | None = None  # Triton triplet table, built on first use
        if saved is not None:  # same layout: keep the state, on the parameters' device and dtype
            ipt, unc, keep, final_keep, self.init_bgt = saved
            self._ipt.copy_(ipt)
            self._unc.copy_(unc)
            self._keep = None if keep is None else keep.to(self._device)
            self._final_keep = None if final_keep is None else final_keep.to(self._device)

    def refresh(self) -> None:
        """Re-read the layers' parameters (after a layer's Parameters were replaced).

        With unchanged shapes the state is kept; otherwise (e.g. resized to a saved rank) the
        budget is re-read from the new ranks and the EMAs and masks start afresh.
        """
        self._build(keep_state=True)

    # ------------------------------------------------------------------ schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``, PEFT's cubic schedule."""
        return reference.budget_schedule(step, self.init_bgt, self.target_bgt, self.tinit, self.tfinal,
                                         self.total_step, self.deltaT)

    # ------------------------------------------------------------------ the step
    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(global_step)``: EMAs, budget, masks."""
        step = int(global_step)
        switch = self.total_step - self.tfinal
        self.last_step = step
        if not self._params:
            return
        p0 = self._params[0]
        if (p0.device, p0.dtype) != self._probe:  # the model was moved or cast after we were built
            self.refresh()
        with torch.no_grad():
            if step < switch:
                scores = self._update_scores()
                budget, mask_now = self.budget_schedule(step)
                if mask_now:
                    self._mask_to_budget(scores, budget)
            elif step == switch:
                budget, _ = self.budget_schedule(step)
                self._mask_to_budget(self._scores_only(), budget)
                self._final_keep = self._keep
                self._ipt.zero_()
                self._unc.zero_()
            else:
                keep = self._final_keep if self._final_keep is not None else self._keep
                if keep is not None:  # no pattern yet (e.g. a model resized to its kept ranks): nothing to mask
                    mask_from_pattern(self._Es, keep)

    def _use_triton(self) -> bool:
        return (self._dtype in (torch.float32, torch.float16, torch.bfloat16)
                and resolve_backend(self._params[0]) == "triton")

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        grads = [p.grad for p in self._params]
        for name, p, g in zip(self._param_names, self._params, grads):
            if g is None:
                raise RuntimeError(
                    f"RankAllocator.update_and_allocate: {name} has no gradient. Call it after optimizer.step() "
                    "and before optimizer.zero_grad() (zero_grad(set_to_none=True) drops the gradients the "
                    "sensitivity needs), and make sure every adapter parameter takes part in the loss."
                    + ("" if p.requires_grad else f" ({name} has requires_grad=False.)")
                )
        p_flat = torch.cat([p.reshape(-1) for p in self._params]).to(self._dtype)
        g_flat = torch.cat([g.reshape(-1) for g in grads]).to(self._dtype)
        return p_flat, g_flat

    def _triton_table(self) -> torch.Tensor:
        if self._table is None:
            from .kernels.sensitivity import triplet_table

            self._table = triplet_table(self._shapes, self._device)
        return self._table

    def _update_scores(self) -> torch.Tensor:
        """Update Ī, Ū in place from the current p and p.grad; return the (R,) triplet scores."""
        p_flat, g_flat = self._gather()
        if self._use_triton():
            from .kernels.sensitivity import sensitivity_scores

            return sensitivity_scores(p_flat, g_flat, self._ipt, self._unc, self._triton_table(),
                                      self.beta1, self.beta2, update=True)
        ipt = p_flat.mul_(g_flat).abs_()  # I = |p·g|  (p_flat is our own copy)
        self._ipt.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
        self._unc.mul_(self.beta2).add_(ipt.sub_(self._ipt).abs_(), alpha=1 - self.beta2)
        return self._triplet_scores_torch()

    def _scores_only(self) -> torch.Tensor:
        if self._use_triton():
            from .kernels.sensitivity import sensitivity_scores

            return sensitivity_scores(None, None, self._ipt, self._unc, self._triton_table(),
                                      self.beta1, self.beta2, update=False)
        return self._triplet_scores_torch()

    def _triplet_scores_torch(self) -> torch.Tensor:
        """``S = s_E + (mean_j s_A + mean_k s_B)`` for every triplet at once (one index_add_)."""
        R = self.n_triplets
        s = self._ipt * self._unc
        n_ab = self._n_a + self._n_b
        sums = torch.zeros(2 * R, dtype=s.dtype, device=s.device).index_add_(0, self._bucket, s[:n_ab])
        means = sums.div_(self._counts)
        return s[n_ab:].add_(means[:R].add_(means[R:]))

    def _mask_to_budget(self, scores: torch.Tensor, budget: int) -> None:
        k = min(max(self.init_bgt - int(budget), 0), self.n_triplets)
        if k == 0:  # PEFT's kthvalue would crash; pruning nothing is the budget's meaning
            keep = torch.ones(self.n_triplets, dtype=torch.bool, device=scores.device)
        else:
            threshold = torch.kthvalue(scores, k).values
            keep = scores > threshold
        self._keep = keep
        mask_from_pattern(self._Es, keep)

    # ------------------------------------------------------------------ patterns
    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{"<path>.lora_E": [kept?] * r}`` from the latest mask; None before the first one (a host sync)."""
        if self._keep is None:
            return None
        flags = self._keep.tolist()
        pattern, start = {}, 0
        for (name, _), r in zip(self.named_layers, self.ranks):
            pattern[f"{name}.lora_E"] = [bool(f) for f in flags[start:start + r]]
            start += r
        return pattern

    def set_rank_pattern(self, rank_pattern: dict[str, list[bool]], final: bool = True) -> None:
        """Adopt a saved pattern (keys ``"<path>.lora_E"``) as the latest mask and, if ``final``, the fixed one."""
        flags = []
        for (name, _), r in zip(self.named_layers, self.ranks):
            key = f"{name}.lora_E"
            if key not in rank_pattern:
                raise KeyError(f"RankAllocator.set_rank_pattern: no entry {key!r} in the rank pattern")
            entry = [bool(f) for f in torch.as_tensor(rank_pattern[key]).reshape(-1).tolist()]
            if len(entry) != r:
                raise ValueError(f"RankAllocator.set_rank_pattern: {key!r} has {len(entry)} flags, layer has r={r}")
            flags.extend(entry)
        keep = torch.tensor(flags, dtype=torch.bool, device=self._device)
        self._keep = keep
        if final:
            self._final_keep = keep

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: EMAs, masks, step, and the layout they belong to."""
        return {
            "names": [n for n, _ in self.named_layers],
            "ranks": list(self.ranks),
            "init_bgt": self.init_bgt,
            "last_step": self.last_step,
            "ipt": self._ipt.detach().clone(),
            "unc": self._unc.detach().clone(),
            "keep": None if self._keep is None else self._keep.clone(),
            "final_keep": None if self._final_keep is None else self._final_keep.clone(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        names = [n for n, _ in self.named_layers]
        if list(sd["names"]) != names or list(sd["ranks"]) != self.ranks:
            raise ValueError(
                "RankAllocator.load_state_dict: the saved state is for layers/ranks "
                f"{list(zip(sd['names'], sd['ranks']))}, this allocator has {list(zip(names, self.ranks))}"
            )
        with torch.no_grad():
            self._ipt.copy_(sd["ipt"])
            self._unc.copy_(sd["unc"])
        self.init_bgt = int(sd.get("init_bgt", self.init_bgt))
        self.last_step = sd.get("last_step")

        def _mask(t):
            return None if t is None else t.to(device=self._device, dtype=torch.bool).clone()

        self._keep = _mask(sd.get("keep"))
        self._final_keep = _mask(sd.get("final_keep"))
