"""``RankAllocator``: AdaLoRA's budget schedule, sensitivity state, triplet scores and masks.

Semantics are PEFT 0.21's ``AdaLoraModel.update_and_allocate`` (maths in ``reference``):

* ``t <  T - tfinal``: update the sensitivity EMAs, then mask E to the scheduled budget when the
  schedule says so (``t > tinit`` and ``t % deltaT == 0``);
* ``t == T - tfinal``: no EMA update; mask to the final budget, keep that pattern for good and
  reset the EMAs;
* ``t >  T - tfinal``: re-zero E from the kept pattern every step.

The allocator reads the adapter Parameters and their gradients where torch keeps them (ordinary,
separate Parameters) and writes only E and its own state.  Its state is flat fp32 whatever the
parameter dtype (fp64 when the parameters are fp64, so a float64 run equals PEFT's to rounding;
``FlatLayout``: ``[A… | B… | E…]``, layers grouped by shape), so a step is a constant number of torch
ops however many layers there are (it grows only with the number of distinct adapter shapes),
with one host read per step:

    P ← p, G ← g     one ``cat`` per chunk (a shape group's A, B or E part) into flat scratch buffers
    Ī', Ū', S        a few ops per chunk (CPU: each chunk's passes stay in cache) or one Triton launch
                     (CUDA), written to the spare state buffers
    finite(S)?       the one host read: a non-finite gradient makes its triplet's score non-finite; then
                     the step keeps the old EMAs and masks, and warns once
    τ, mask          one ``kthvalue``; E is zeroed where ``S <= τ`` (cat, where, ``_foreach_copy_``)

``rank_pattern`` (a host list of bools) is only built when read.

Under ``torch.distributed`` (``distributed.py``): with DDP every rank computes the same step (checked
at masking steps); with FSDP2-sharded adapters the state holds this rank's elements only and the
per-triplet partial sums are all-gathered once per step.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from . import peft_math
from .backends import resolve_backend
from .flat_layout import FlatLayout

_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")
_DIST = torch.distributed.is_available()
_STATE_KEYS = ("names", "ranks", "init_bgt", "last_step", "ipt", "unc", "keep", "final_keep")


def adapter_shape(name: str, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor) -> tuple[int, int, int]:
    """``(r, in, out)`` of one adapter, checking that lora_A, lora_E and lora_B agree."""
    r = A.shape[0] if A.dim() >= 1 else -1
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or E.numel() != r or E.dim() < 1 or E.shape[0] != r:
        raise ValueError(f"RankAllocator: layer {name!r} has inconsistent adapter shapes "
                         f"lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)}")
    return int(r), int(A.shape[1]), int(B.shape[0])


def _state_dtype(param_dtypes) -> torch.dtype:
    """The allocator's state precision: fp32, or fp64 when any parameter is fp64."""
    return torch.float64 if torch.float64 in set(param_dtypes) else torch.float32


def mask_from_pattern(Es: Sequence[torch.Tensor], keep: torch.Tensor, scratch=None) -> None:
    """Zero, in place, every E entry whose flat ``keep`` flag is False (PEFT's ``masked_fill_``).

    ``Es`` are (r, 1) tensors and ``keep`` is a bool tensor with one flag per triplet over all of them,
    in order.  Three ops whatever the number of layers: cat, where, ``_foreach_copy_``.  ``scratch``
    (from ``mask_scratch``) reuses buffers and views across calls.
    """
    if not Es:
        return
    flat, kept, views = scratch if scratch is not None else mask_scratch(Es)
    with torch.no_grad():
        torch.cat(list(Es), 0, out=flat)
        torch.where(keep.view(flat.shape), flat, torch.zeros((), dtype=flat.dtype, device=flat.device), out=kept)
        torch._foreach_copy_(list(Es), views)


def mask_scratch(Es: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Buffers for ``mask_from_pattern`` over tensors shaped like ``Es``."""
    n = sum(e.shape[0] for e in Es)
    flat = torch.empty(n, 1, dtype=Es[0].dtype, device=Es[0].device)
    kept = torch.empty_like(flat)
    return flat, kept, list(kept.split([e.shape[0] for e in Es]))


class RankAllocator:
    """Sensitivity-based rank allocation for a list of AdaLoRA layers.

    Args:
        named_layers: ``(module path, layer)`` pairs; each layer's ``adapter_params()`` gives its
            ``lora_A`` (r×in), ``lora_E`` (r×1) and ``lora_B`` (out×r).  The path names the rank
            pattern entry ``"<path>.lora_E"`` and appears in error messages.
        init_r: the initial rank per layer (informational: the initial budget is read from the
            layers' current shapes).
        target_r: the average final rank; the final budget is ``target_r × L``.
        tinit, tfinal, total_step, deltaT: PEFT's schedule (see ``peft_math.budget_schedule``).
        beta1, beta2: EMA factors of the sensitivity and of its uncertainty, in (0, 1).

    Call ``update_and_allocate(step)`` once per optimizer step, after ``optimizer.step()`` and
    before ``zero_grad()``, with increasing steps.
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
        self.tinit, self.tfinal, self.deltaT = int(tinit), int(tfinal), int(deltaT)
        self.total_step = None if total_step is None else int(total_step)  # None until the caller sets it
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.last_step: int | None = None
        self._warned_nonfinite = False
        self.distributed_enabled = True  # False: no collective even under torch.distributed (distributed.configure)
        self._sync = None  # distributed.AllocatorSync, made at the first step under a process group
        self._shard = None  # distributed.ShardedLayout while the adapters are FSDP2-sharded DTensors
        self._build(keep_state=False)

    # ------------------------------------------------------------------ layout and state
    def _layer_params(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [layer.adapter_params() for _, layer in self.named_layers]

    def _build(self, keep_state: bool) -> None:
        per_layer = self._layer_params()
        model_shapes = [adapter_shape(n, *t) for (n, _), t in zip(self.named_layers, per_layer)]
        devices = {p.device for t in per_layer for p in t}
        if len(devices) > 1:
            raise ValueError(f"RankAllocator: all adapter parameters must be on one device, found {devices}")
        device = devices.pop() if devices else torch.device("cpu")
        dtype = _state_dtype(p.dtype for t in per_layer for p in t)
        same = keep_state and model_shapes == self.layout.model_shapes
        saved = (self._ipt, self._unc, self._keep, self._final_keep, self.init_bgt) if same else None
        shard = self._shard if same else None  # a sharded state stays local (same layout, same shards)

        self.layout = FlatLayout(model_shapes)
        self._shard = None if shard is None else type(shard)(self.layout, shard.spec, shard.channel)
        self._tensor_shapes = [torch.Size(s) for s in self.layout.tensor_shapes]
        self.ranks = [s[0] for s in model_shapes]  # model order
        self.n_triplets = self.layout.n_triplets
        self.init_bgt = self.n_triplets
        self.target_bgt = self.target_r * len(model_shapes)
        self._param_names = self.layout.names([n for n, _ in self.named_layers])
        self._allocate_state(device, dtype)
        self._keep: torch.Tensor | None = None  # the latest mask, one flag per triplet (flat order)
        self._final_keep: torch.Tensor | None = None  # the pattern fixed at t == T - tfinal
        self._param_dtype: torch.dtype | None = None  # the one dtype of all adapter parameters, when checked
        if saved is not None:  # same layout: the state carries over
            ipt, unc, keep, final_keep, self.init_bgt = saved
            if ipt.device.type != "meta":
                self._ipt.copy_(ipt)
                self._unc.copy_(unc)
                self._keep = None if keep is None else keep.to(device)
                self._final_keep = None if final_keep is None else final_keep.to(device)

    @property
    def _lay(self):
        """The layout the step runs over: the whole ``FlatLayout``, or this rank's ``ShardedLayout``."""
        return self.layout if self._shard is None else self._shard

    def _enter_sharded(self, shard) -> None:
        """The adapters became sharded (``fully_shard`` after the model was built): keep this rank's part
        of the EMAs (the masks are per triplet, the same on every rank, and stay as they are)."""
        ipt, unc = shard.local_of(self._ipt), shard.local_of(self._unc)
        self._shard = shard
        self._allocate_state(self._device, self._dtype)
        self._ipt.copy_(ipt)
        self._unc.copy_(unc)

    def _allocate_state(self, device: torch.device, dtype: torch.dtype) -> None:
        n = self._lay.n
        self._device, self._dtype = device, dtype
        self._ipt, self._unc = torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device)
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # the next Ī, Ū (double buffer)
        self._scratch_bufs: tuple | None = None  # flat P (then |p·g|) and G, per-triplet work
        self._chunk_cache: dict[int, list[torch.Tensor]] = {}  # chunk views of the persistent flat buffers
        self._chunk_bufs: tuple | None = None  # two buffers of the largest chunk's size (CPU)
        self._mask_scratch: tuple | None = None  # buffers of mask_from_pattern
        self._canon: dict[str, torch.Tensor | None] = {}  # model-order <-> flat-order indices, built when needed
        self._table: torch.Tensor | None = None  # Triton triplet table, built on first use

    def _follow(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the state to the parameters' device and precision (after ``model.to(...)`` or ``to_empty``)."""
        if (device, dtype) == (self._device, self._dtype):
            return
        was_meta = self._device.type == "meta"
        ipt, unc, keep, final_keep = self._ipt, self._unc, self._keep, self._final_keep
        self._allocate_state(device, dtype)
        if was_meta:  # a model built on meta: nothing was ever computed, start from zeros
            self._keep = self._final_keep = None
            return
        self._ipt.copy_(ipt)
        self._unc.copy_(unc)
        self._keep = None if keep is None else keep.to(device)
        self._final_keep = None if final_keep is None else final_keep.to(device)

    def refresh(self) -> None:
        """Re-read the layers' parameters (after a layer's Parameters were replaced, moved or resized).

        With unchanged shapes the state is kept; otherwise (e.g. resized to a saved rank) the budget
        is re-read from the new ranks and the EMAs and masks start afresh.  ``update_and_allocate``
        calls this by itself when it finds the shapes changed.
        """
        self._build(keep_state=True)

    def reset(self) -> None:
        """Start the schedule over: zero EMAs, no masks, no last step (the weights are not touched)."""
        self._ipt.zero_()
        self._unc.zero_()
        self._keep = self._final_keep = None
        self.last_step = None

    def _current_params(self) -> list[torch.Tensor]:
        """The adapter Parameters in flat order, re-read from the layers; the layout follows them
        (new shapes: a fresh layout; another device or precision: the state moves)."""
        params = self.layout.flat_order(self._layer_params())
        if list(map(_shape_of, params)) != self._tensor_shapes:
            if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitioned the Parameters in place
                from .distributed import deepspeed_error

                raise RuntimeError(deepspeed_error(self._param_names[0], params[0]))
            self.refresh()
            params = self.layout.flat_order(self._layer_params())
        if params:
            dtypes = {params[0].dtype, params[-1].dtype}  # E last: the usual mixed case is E alone
            if len(dtypes) > 1 or params[0].dtype != self._param_dtype:
                dtypes = set(map(_dtype_of, params))
                self._param_dtype = params[0].dtype if len(dtypes) == 1 else None
            self._follow(params[0].device, _state_dtype(dtypes))
            self._distributed(params, check=False)
        return params

    def _distributed(self, params: list[torch.Tensor], check: bool):
        """Under a process group of more than one rank, the ``distributed.AllocatorSync`` (sharded mode for
        DTensors; with ``check``, the first step of a layout compares it across ranks); else None."""
        if not (_DIST and self.distributed_enabled and torch.distributed.is_initialized()):
            return None
        from . import distributed

        if not distributed.active():
            return None
        if self._sync is None:
            self._sync = distributed.AllocatorSync()
        self._sync.join(self, params, check)
        return self._sync

    # ------------------------------------------------------------------ schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``, PEFT's cubic schedule."""
        return peft_math.budget_schedule(step, self.init_bgt, self.target_bgt, self.tinit, self.tfinal,
                                         self.total_step, self.deltaT)

    # ------------------------------------------------------------------ the step
    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(global_step)``: EMAs, budget, masks."""
        step = int(global_step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"RankAllocator.update_and_allocate: step {step} comes after step {self.last_step}; each optimizer "
                "step must be allocated once, with increasing steps (is update_and_allocate called both by hand and "
                "by AdaLoraCallback?). To start the schedule over, call allocator.reset().")
        if self.total_step is None:
            raise ValueError("RankAllocator.update_and_allocate: total_step is None; set it before the first step "
                             "(AdaLoraModel.set_total_step, or AdaLoraConfig(total_step=...)).")
        switch = self.total_step - self.tfinal
        params = self._current_params()
        if not params:
            self.last_step = step
            return
        sync = self._distributed(params, check=True)
        if self._shard is not None:
            self._shard.step = step
        with torch.no_grad():
            if step < switch:
                scores = self._update_scores(params, step)
                if scores is not None:
                    budget, mask_now = self.budget_schedule(step)
                    if mask_now:
                        self._mask_to_budget(params, scores, budget)
                        self._check_replicas(sync, step, budget, scores)
            elif step == switch:
                budget, _ = self.budget_schedule(step)
                scores = self._scores_only()
                self._mask_to_budget(params, scores, budget)
                self._check_replicas(sync, step, budget, scores)
                self._final_keep = self._keep
                self._ipt.zero_()
                self._unc.zero_()
            else:
                keep = self._final_keep if self._final_keep is not None else self._keep
                if keep is not None:  # no pattern yet (e.g. a model resized to its kept ranks): nothing to mask
                    self._apply_keep(params, keep)
        self.last_step = step

    def _check_replicas(self, sync, step: int, budget: int, scores: torch.Tensor) -> None:
        """DDP: every rank computed the same scores and mask (``distributed.check_replicas``); sharded
        ranks share the gathered scores by construction."""
        if sync is not None and self._shard is None and sync.check_replicas:
            from . import distributed

            distributed.check_replicas(sync.channel, step, budget, scores, self._keep, (self._ipt, self._unc))

    def _use_triton(self, p: torch.Tensor) -> bool:
        return self._shard is None and self._dtype == torch.float32 and resolve_backend(p) == "triton"

    def _scratch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, G, per-triplet work)`` (P and G full-size only for the Triton path), made on first use."""
        if self._scratch_bufs is None:
            full = (self.layout.n,) if self._use_triton(self._ipt) else (0,)
            P, G = self._ipt.new_empty(full), self._ipt.new_empty(full)
            work = torch.empty(3 * self.n_triplets, dtype=self._dtype, device=self._device)
            self._scratch_bufs = (P, G, work)
        return self._scratch_bufs

    def _chunks_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``FlatLayout.chunk_views`` of one of the allocator's persistent flat buffers (cached)."""
        views = self._chunk_cache.get(id(flat))
        if views is None or views[0].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            views = self._chunk_cache[id(flat)] = self._lay.chunk_views(flat)
        return views

    def _spare_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._spare is None:
            self._spare = (torch.empty_like(self._ipt), torch.empty_like(self._unc))
        return self._spare

    def _grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            # a layer pruned to rank 0 (a checkpoint) has empty parameters that take no part in the loss
            grads = [p if g is None and p.numel() == 0 else g for p, g in zip(params, grads)]
        if any(g is None for g in grads):
            name, p = next((n, p) for n, p, g in zip(self._param_names, params, grads) if g is None)
            from .distributed import deepspeed_error

            hidden = deepspeed_error(name, p)
            if hidden is not None:
                raise RuntimeError(hidden)
            merged = [n for n, layer in self.named_layers if getattr(layer, "merged", False)]
            raise RuntimeError(
                f"RankAllocator.update_and_allocate: {name} has no gradient. Call it after optimizer.step() "
                "and before optimizer.zero_grad() (zero_grad(set_to_none=True) drops the gradients the "
                "sensitivity needs), and make sure every adapter parameter takes part in the loss."
                + ("" if p.requires_grad else f" ({name} has requires_grad=False.)")
                + (f" {merged[0]} is merged (merge_adapter()): its forward uses the merged weight, which gives "
                   "the adapter no gradient; call unmerge_adapter() before training." if merged else "")
            )
        return grads

    def _update_scores(self, params: list[torch.Tensor], step: int) -> torch.Tensor | None:
        """New Ī, Ū (into the spare state buffers) from the current p and p.grad, and the (R,) triplet
        scores; None, with the state kept, when some gradient is not finite."""
        grads = self._grads(params)
        ipt_new, unc_new = self._spare_state()
        if self._use_triton(params[0]):
            from .kernels.sensitivity import sensitivity_scores

            P, G, _ = self._scratch()
            self.layout.gather(params, self._chunks_of(P))
            self.layout.gather(grads, self._chunks_of(G))
            scores = sensitivity_scores(P, G, self._ipt, self._unc, self._triton_table(), self.beta1, self.beta2,
                                        ipt_out=ipt_new, unc_out=unc_new)
        else:  # chunk by chunk through two chunk-sized buffers, so that each chunk's passes run in cache
            lay = self._lay
            if self._shard is not None:  # this rank's shards (views of FSDP's storage)
                params, grads = lay.locals(params), lay.locals(grads)
            p_buf, g_buf = self._chunk_scratch()
            w1, w2 = 1 - self.beta1, 1 - self.beta2
            chunks = zip(lay.chunks(), self._chunks_of(self._ipt), self._chunks_of(self._unc),
                         self._chunks_of(ipt_new), self._chunks_of(unc_new))
            _, _, work = self._scratch()
            for c, ((k, count, _, _), ipt, unc, ipt2, unc2) in enumerate(chunks):
                p_, g_ = p_buf[:ipt.numel()].view(ipt.shape), g_buf[:ipt.numel()].view(ipt.shape)
                torch.cat(params[k:k + count], 0, out=p_)
                torch.cat(grads[k:k + count], 0, out=g_)
                I = p_.mul_(g_).abs_()  # I = |p·g|
                torch.lerp(ipt, I, w1, out=ipt2)  # Ī' = β1·Ī + (1-β1)·I
                torch.lerp(unc, I.sub_(ipt2).abs_(), w2, out=unc2)  # Ū' = β2·Ū + (1-β2)·|I - Ī'|
                lay.chunk_sums_(c, ipt2, unc2, work)  # while the chunk is in cache
            scores = lay.combine_sums_(work)
        if not bool(torch.isfinite(scores).all()):  # the one host read of the step
            self._warn_nonfinite(params, step)
            return None
        self._spare, self._ipt, self._unc = (self._ipt, self._unc), ipt_new, unc_new
        return scores

    def _chunk_scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._chunk_bufs is None:
            n = max(count * rows * self.layout.tensor_shapes[k][1] for k, count, _, rows in self._lay.chunks())
            self._chunk_bufs = (torch.empty(n, dtype=self._dtype, device=self._device),
                                torch.empty(n, dtype=self._dtype, device=self._device))
        return self._chunk_bufs

    def _warn_nonfinite(self, params: list[torch.Tensor], step: int) -> None:
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        def first_nonfinite(tensors):
            tensors = tensors if self._shard is None else self._shard.locals(tensors)
            return next((n for n, t in zip(self._param_names, tensors) if not bool(torch.isfinite(t).all())), None)

        name = first_nonfinite([p.grad for p in params])
        if name is not None:
            what = f"non-finite gradients (first: {name})"
        elif (name := first_nonfinite(params)) is not None:
            what = (f"a non-finite parameter ({name} itself, after the optimizer step: e.g. fp16 parameters "
                    "trained without fp32 master weights)")
        else:
            what = "non-finite gradients (on a shard another rank holds)"
        warnings.warn(
            f"RankAllocator.update_and_allocate: step {step} has {what}; the sensitivity EMAs and the masks were "
            "left unchanged for this step (an fp16 GradScaler skips such steps too). This warning is shown once.",
            RuntimeWarning, stacklevel=3)

    def _scores_only(self) -> torch.Tensor:
        if self._use_triton(self._ipt):
            from .kernels.sensitivity import sensitivity_scores

            return sensitivity_scores(None, None, self._ipt, self._unc, self._triton_table(), self.beta1, self.beta2)
        return self._triplet_scores_torch(self._ipt, self._unc)

    def _triton_table(self) -> torch.Tensor:
        if self._table is None:
            from .kernels.sensitivity import table_tensor

            self._table = table_tensor(self.layout.triplet_table(), self._device)
        return self._table

    def _triplet_scores_torch(self, ipt: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
        """``S = s_E + (mean_j s_A + mean_k s_B)`` for every triplet, ``s = Ī·Ū`` (``FlatLayout.triplet_scores``)."""
        _, _, work = self._scratch()
        return self._lay.triplet_scores(ipt, unc, work)

    def _mask_to_budget(self, params: list[torch.Tensor], scores: torch.Tensor, budget: int) -> None:
        k = min(max(self.init_bgt - int(budget), 0), self.n_triplets)
        if k == 0:  # PEFT's kthvalue would crash; pruning nothing is the budget's meaning
            keep = torch.ones(self.n_triplets, dtype=torch.bool, device=scores.device)
        else:
            threshold = torch.kthvalue(scores, k).values
            keep = scores.le(threshold).logical_not_()  # PEFT prunes S <= τ; a NaN score never prunes
        self._keep = keep
        self._apply_keep(params, keep)

    def _apply_keep(self, params: list[torch.Tensor], keep: torch.Tensor) -> None:
        """Zero every E entry whose flag is False (the E tensors are the last ``L`` in flat order)."""
        Es = params[2 * len(self.layout):]
        if self._shard is not None:  # this rank's entries of E and their flags
            Es, keep = self._shard.locals(Es), self._shard.local_keep(keep)
        if self._mask_scratch is None or self._mask_scratch[0].dtype != Es[0].dtype:
            self._mask_scratch = mask_scratch(Es)
        mask_from_pattern(Es, keep, self._mask_scratch)

    # ------------------------------------------------------------------ model order
    def _canonical(self, kind: str) -> torch.Tensor | None:
        """Positions in the flat layout of the model-order entries (``"elements"`` or ``"triplets"``)."""
        if kind not in self._canon:
            idx = (self.layout.canonical_element_index() if kind == "elements"
                   else self.layout.canonical_triplet_index())
            self._canon[kind] = None if idx is None else idx.to(self._device)
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
    def final_pattern_fixed(self) -> bool:
        """Whether the final phase's pattern is fixed (reached ``total_step - tfinal``, or set with ``final=True``)."""
        return self._final_keep is not None

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{"<path>.lora_E": [kept?] * r}`` from the latest mask; None before the first one (a host sync)."""
        if self._keep is None:
            return None
        flags = self._keep.tolist()
        return {f"{name}.lora_E": [bool(f) for f in flags[t0:t0 + r]]
                for (name, _), r, t0 in zip(self.named_layers, self.ranks, self.layout.triplet_start)}

    def set_rank_pattern(self, rank_pattern: dict[str, list[bool]], final: bool = True) -> None:
        """Adopt a saved pattern (keys ``"<path>.lora_E"``) as the latest mask and, if ``final``, the fixed one."""
        flags = [False] * self.n_triplets  # flat order
        for (name, _), r, t0 in zip(self.named_layers, self.ranks, self.layout.triplet_start):
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
        layer), whatever the flat layout, as fresh fp32 / bool tensors.  With sharded adapters the
        EMAs are gathered from every rank first (a collective: call it on every rank), so the state
        is the same whether it was saved sharded or not.
        """
        ipt, unc = self._ipt, self._unc
        if self._shard is not None:
            ipt, unc = self._shard.gather_flat(ipt), self._shard.gather_flat(unc)
        return {
            "names": [n for n, _ in self.named_layers],
            "ranks": list(self.ranks),
            "init_bgt": self.init_bgt,
            "last_step": self.last_step,
            "ipt": self._to_model_order(ipt, "elements"),
            "unc": self._to_model_order(unc, "elements"),
            "keep": None if self._keep is None else self._to_model_order(self._keep, "triplets"),
            "final_keep": None if self._final_keep is None else self._to_model_order(self._final_keep, "triplets"),
        }

    def _validated(self, sd) -> dict[str, Any]:
        """``sd`` checked key by key (nothing is written here); raises ``ValueError`` naming the key."""
        where = "RankAllocator.load_state_dict"
        if not isinstance(sd, dict):
            raise ValueError(f"{where}: expected a dict, got {type(sd).__name__}")
        missing = [k for k in _STATE_KEYS if k not in sd]
        unknown = sorted(set(sd) - set(_STATE_KEYS))
        if missing or unknown:
            raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
        names = [n for n, _ in self.named_layers]
        if list(sd["names"]) != names or list(sd["ranks"]) != self.ranks:
            raise ValueError(
                f"{where}: 'names'/'ranks' say the saved state is for layers/ranks "
                f"{list(zip(sd['names'], sd['ranks']))}, this allocator has {list(zip(names, self.ranks))}"
            )

        def _int(key, lo, hi, allow_none=False):
            v = sd[key]
            if v is None and allow_none:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{where}: {key!r} must be an int in [{lo}, {hi}]"
                                 f"{' or None' if allow_none else ''}, got {v!r}")
            return v

        out = {"init_bgt": _int("init_bgt", 0, 2**62), "last_step": _int("last_step", 0, 2**62, allow_none=True)}
        for key, n in (("ipt", self.layout.n), ("unc", self.layout.n)):
            t = sd[key]
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != (n,):
                desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
                raise ValueError(f"{where}: {key!r} must be a floating tensor of shape ({n},), got {desc}")
            if t.device.type != "meta" and not bool((torch.isfinite(t) & (t >= 0)).all()):
                raise ValueError(f"{where}: {key!r} holds negative or non-finite values; an EMA of |p·g| is >= 0")
            out[key] = t
        for key in ("keep", "final_keep"):
            t = sd[key]
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.bool
                                  or tuple(t.shape) != (self.n_triplets,)):
                desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
                raise ValueError(f"{where}: {key!r} must be None or a bool tensor of shape ({self.n_triplets},), "
                                 f"got {desc}")
            out[key] = t
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Adopt a ``state_dict()``: every key is validated first; on error nothing changes."""
        checked = self._validated(sd)
        params = self._current_params()  # the state follows the parameters' device first
        del params
        n = self.layout.n
        ipt, unc = self._ipt.new_empty(n), self._unc.new_empty(n)
        with torch.no_grad():
            self._from_model_order(ipt, checked["ipt"], "elements")
            self._from_model_order(unc, checked["unc"], "elements")
            if self._shard is not None:  # the whole state was saved; this rank keeps its elements
                ipt, unc = self._shard.local_of(ipt), self._shard.local_of(unc)

        def _mask(t):
            if t is None:
                return None
            return self._from_model_order(torch.empty(self.n_triplets, dtype=torch.bool, device=self._device),
                                          t, "triplets")

        keep, final_keep = _mask(checked["keep"]), _mask(checked["final_keep"])
        self._ipt, self._unc, self._keep, self._final_keep = ipt, unc, keep, final_keep
        self._spare = None
        self.init_bgt = checked["init_bgt"]
        self.last_step = checked["last_step"]
