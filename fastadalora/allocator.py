"""``RankAllocator``: AdaLoRA's budget schedule, sensitivity state, triplet scores and masks.

Semantics are PEFT 0.21's ``AdaLoraModel.update_and_allocate`` (see ``reference`` for the maths):

* ``t <  T - tfinal``: update the sensitivity EMAs, then mask E to the scheduled budget when the
  schedule says so (``t > tinit`` and ``t % deltaT == 0``);
* ``t == T - tfinal``: no EMA update; mask to the final budget, keep that pattern for good and
  reset the EMAs;
* ``t >  T - tfinal``: re-zero E from the kept pattern every step.

The work is a constant number of torch ops however many layers there are (it grows only with the
number of distinct adapter shapes), with no host sync.  A ``FlatAdapterStore`` lays every adapter
Parameter out in one flat buffer ``P`` (``[A… | B… | E…]``, layers grouped by shape) and the
backends' backward writes the gradients into a twin buffer ``G``, so on the fast path nothing is
gathered: ``|P·G|``, the EMAs (two flat buffers) and ``s = Ī·Ū`` are one op each over everything,
the per-triplet means one ``mean`` per distinct shape (CPU) or fused into the Triton sensitivity
kernel (CUDA), the threshold one ``kthvalue`` and the mask one ``masked_fill_`` on the E segment
of ``P``.  Every step first checks (host ints only) that the parameters and gradients are where the
layout says; gradients found elsewhere are gathered (one ``_foreach_copy_``), parameters found
moved or replaced are laid out again.  ``rank_pattern`` (a host list of bools) is only built when
read.

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
from .flat_store import FlatAdapterStore, layer_shape

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
    def _build(self, keep_state: bool) -> None:
        model_shapes = [layer_shape(n, m) for n, m in self.named_layers]  # validates before anything moves
        saved = None
        if keep_state and model_shapes == getattr(self, "_model_shapes", None):
            # the flat layout is a function of the shapes: the state carries over as is
            saved = (self._ipt, self._unc, self._keep, self._final_keep, self.init_bgt)
        params = [getattr(m, part) for _, m in self.named_layers for part in _PARTS]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"RankAllocator: all adapter parameters must be on one device, found {devices}")
        store = FlatAdapterStore(self.named_layers)
        self._store = store
        self._model_shapes = model_shapes
        self._shapes = store.shapes  # flat (grouped) order
        self._params = store.params  # the flat layout [A… | B… | E…], grouped by shape
        self._param_names = store.names
        L = len(model_shapes)
        self._As, self._Bs, self._Es = self._params[:L], self._params[L:2 * L], self._params[2 * L:]
        self.ranks = [s[0] for s in model_shapes]  # model order
        self.n_triplets = sum(self.ranks)
        self.init_bgt = self.n_triplets
        self.target_bgt = self.target_r * L
        if not self._params:
            self._device, self._dtype = torch.device("cpu"), torch.get_default_dtype()
        else:
            self._device = devices.pop()
            self._dtype = functools.reduce(torch.promote_types, [p.dtype for p in self._params])
        self._probe = (self._params[0].device, self._params[0].dtype) if self._params else None
        self._n_a, self._n_b = store.n_a, store.n_b
        n = store.n
        self._ipt = torch.zeros(n, dtype=self._dtype, device=self._device)
        self._unc = torch.zeros(n, dtype=self._dtype, device=self._device)
        self._work: torch.Tensor | None = None  # scratch: |p·g|, then s = Ī·Ū
        self._means: torch.Tensor | None = None  # scratch: per-triplet means of s over A rows | B columns
        self._canon: dict[str, torch.Tensor | None] = {}  # model-order <-> flat-order indices, built when needed
        self._keep: torch.Tensor | None = None  # the latest mask, one flag per triplet (flat order)
        self._final_keep: torch.Tensor | None = None  # the pattern fixed at t == T - tfinal
        self._table: torch.Tensor | None = None  # Triton triplet table, built on first use
        if saved is not None:  # same layout: keep the state, on the parameters' device and dtype
            ipt, unc, keep, final_keep, self.init_bgt = saved
            self._ipt.copy_(ipt)
            self._unc.copy_(unc)
            self._keep = None if keep is None else keep.to(self._device)
            self._final_keep = None if final_keep is None else final_keep.to(self._device)

    def refresh(self) -> None:
        """Re-read the layers' parameters (after a layer's Parameters were replaced, moved or cast).

        With unchanged shapes the state is kept; otherwise (e.g. resized to a saved rank) the
        budget is re-read from the new ranks and the EMAs and masks start afresh.  The parameters
        are laid out into a fresh flat buffer.  ``update_and_allocate`` calls this by itself when
        it finds the parameters replaced or moved.
        """
        self._build(keep_state=True)

    def orth_groups(self):
        """Stacked views of the A and B matrices in the flat buffer, per shape group, for
        ``orth.orth_reg_loss`` (no stack copy); None when the parameters are not there (any more)."""
        store = self._store
        return store.orth_groups() if store.flat and store.params_current() else None

    def _current(self) -> bool:
        """The layout still describes the layers' parameters (host-side checks only)."""
        if not self._store.params_current():
            return False
        if self._store.flat:
            return True
        p0 = self._params[0]
        return (p0.device, p0.dtype) == self._probe

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
        if not self._current():  # parameters replaced, moved or cast since the layout was built
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
                    self._apply_keep(keep)

    def _use_triton(self) -> bool:
        return (self._dtype in (torch.float32, torch.float16, torch.bfloat16)
                and resolve_backend(self._params[0]) == "triton")

    def _flat_grads(self) -> torch.Tensor:
        """The gradients in the flat layout: the store's ``G`` itself when they are there, else gathered."""
        store = self._store
        aligned = store.grads_aligned()
        if aligned is None:
            name, p = store.missing_grad()
            raise RuntimeError(
                f"RankAllocator.update_and_allocate: {name} has no gradient. Call it after optimizer.step() "
                "and before optimizer.zero_grad() (zero_grad(set_to_none=True) drops the gradients the "
                "sensitivity needs), and make sure every adapter parameter takes part in the loss."
                + ("" if p.requires_grad else f" ({name} has requires_grad=False.)")
            )
        if aligned and store.G.dtype == self._dtype:
            return store.G
        return store.gather_grads(self._dtype)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p_flat, g_flat)``; views of the store's buffers when the fast path applies (do not modify)."""
        g_flat = self._flat_grads()
        return self._store.gather_params(self._dtype), g_flat

    def _triton_table(self) -> torch.Tensor:
        if self._table is None:
            from .kernels.sensitivity import triplet_table

            self._table = triplet_table(self._shapes, self._device)
        return self._table

    def _scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._work is None:
            self._work = torch.empty_like(self._ipt)
            self._means = torch.empty(2 * self.n_triplets, dtype=self._dtype, device=self._device)
        return self._work, self._means

    def _update_scores(self) -> torch.Tensor:
        """Update Ī, Ū in place from the current p and p.grad; return the (R,) triplet scores."""
        p_flat, g_flat = self._gather()
        if self._use_triton():
            from .kernels.sensitivity import sensitivity_scores

            return sensitivity_scores(p_flat, g_flat, self._ipt, self._unc, self._triton_table(),
                                      self.beta1, self.beta2, update=True)
        work, _ = self._scratch()
        ipt = torch.mul(p_flat, g_flat, out=work).abs_()  # I = |p·g|
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
        """``S = s_E + (mean_j s_A + mean_k s_B)`` for every triplet: one ``mean`` per distinct shape and part."""
        R = self.n_triplets
        work, means = self._scratch()
        s = torch.mul(self._ipt, self._unc, out=work)
        self._store.triplet_means(s, means)
        return s[self._n_a + self._n_b:].add_(means[:R].add_(means[R:]))

    def _mask_to_budget(self, scores: torch.Tensor, budget: int) -> None:
        k = min(max(self.init_bgt - int(budget), 0), self.n_triplets)
        if k == 0:  # PEFT's kthvalue would crash; pruning nothing is the budget's meaning
            keep = torch.ones(self.n_triplets, dtype=torch.bool, device=scores.device)
        else:
            threshold = torch.kthvalue(scores, k).values
            keep = scores > threshold
        self._keep = keep
        self._apply_keep(keep)

    def _apply_keep(self, keep: torch.Tensor) -> None:
        """Zero every E entry whose flag is False: one ``masked_fill_`` on the flat E segment."""
        if self._store.flat:
            self._store.e_segment().masked_fill_(keep.logical_not(), 0)
        else:
            mask_from_pattern(self._Es, keep)

    # ------------------------------------------------------------------ model order
    def _canonical(self, kind: str) -> torch.Tensor | None:
        """Positions in the flat layout of the model-order entries (``"elements"`` or ``"triplets"``)."""
        if kind not in self._canon:
            pieces = (self._store.canonical_element_index() if kind == "elements"
                      else self._store.canonical_triplet_index())
            self._canon[kind] = None if pieces is None else torch.cat(pieces).to(self._device)
        return self._canon[kind]

    def _to_model_order(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        idx = self._canonical(kind)
        return t.detach().clone() if idx is None else t.detach()[idx.to(t.device)]

    def _from_model_order(self, dst: torch.Tensor, src: torch.Tensor, kind: str) -> torch.Tensor:
        idx = self._canonical(kind)
        src = src.to(device=dst.device, dtype=dst.dtype)
        if idx is None:
            return dst.copy_(src)
        return dst.index_copy_(0, idx.to(dst.device), src)

    # ------------------------------------------------------------------ patterns
    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{"<path>.lora_E": [kept?] * r}`` from the latest mask; None before the first one (a host sync)."""
        if self._keep is None:
            return None
        flags = self._keep.tolist()
        return {f"{name}.lora_E": [bool(f) for f in flags[t0:t0 + r]]
                for (name, _), r, t0 in zip(self.named_layers, self.ranks, self._store.triplet_start)}

    def set_rank_pattern(self, rank_pattern: dict[str, list[bool]], final: bool = True) -> None:
        """Adopt a saved pattern (keys ``"<path>.lora_E"``) as the latest mask and, if ``final``, the fixed one."""
        flags = [False] * self.n_triplets  # flat order
        for (name, _), r, t0 in zip(self.named_layers, self.ranks, self._store.triplet_start):
            key = f"{name}.lora_E"
            if key not in rank_pattern:
                raise KeyError(f"RankAllocator.set_rank_pattern: no entry {key!r} in the rank pattern")
            entry = [bool(f) for f in torch.as_tensor(rank_pattern[key]).reshape(-1).tolist()]
            if len(entry) != r:
                raise ValueError(f"RankAllocator.set_rank_pattern: {key!r} has {len(entry)} flags, layer has r={r}")
            flags[t0:t0 + r] = entry
        keep = torch.tensor(flags, dtype=torch.bool, device=self._device)
        self._keep = keep
        if final:
            self._final_keep = keep

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: EMAs, masks, step, and the layout they belong to.

        The EMAs and masks are saved in model order (``[A_0…A_{L-1} | B… | E…]``, triplets layer by
        layer), whatever the flat layout, as fresh tensors.
        """
        return {
            "names": [n for n, _ in self.named_layers],
            "ranks": list(self.ranks),
            "init_bgt": self.init_bgt,
            "last_step": self.last_step,
            "ipt": self._to_model_order(self._ipt, "elements"),
            "unc": self._to_model_order(self._unc, "elements"),
            "keep": None if self._keep is None else self._to_model_order(self._keep, "triplets"),
            "final_keep": None if self._final_keep is None else self._to_model_order(self._final_keep, "triplets"),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        names = [n for n, _ in self.named_layers]
        if list(sd["names"]) != names or list(sd["ranks"]) != self.ranks:
            raise ValueError(
                "RankAllocator.load_state_dict: the saved state is for layers/ranks "
                f"{list(zip(sd['names'], sd['ranks']))}, this allocator has {list(zip(names, self.ranks))}"
            )
        with torch.no_grad():
            self._from_model_order(self._ipt, sd["ipt"], "elements")
            self._from_model_order(self._unc, sd["unc"], "elements")
        self.init_bgt = int(sd.get("init_bgt", self.init_bgt))
        self.last_step = sd.get("last_step")

        def _mask(t):
            if t is None:
                return None
            return self._from_model_order(torch.empty(self.n_triplets, dtype=torch.bool, device=self._device),
                                          t.reshape(-1), "triplets")

        self._keep = _mask(sd.get("keep"))
        self._final_keep = _mask(sd.get("final_keep"))
