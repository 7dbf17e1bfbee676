"""``FlatAdapterStore``: every adapter Parameter (and its gradient) as a slice of one flat buffer.

The allocator's work per optimizer step is elementwise over all adapter elements plus one
reduction per triplet.  Gathering 3·L parameters and 3·L gradients with ``torch.cat`` every step
costs more than the arithmetic itself, so the store lays them out once::

    P = [ A… | B… | E… ]        one buffer per model (single dtype and device)
    G = [ A… | B… | E… ]        the gradients, same layout

and re-points each Parameter at its slice (``param.data = P[off:off+n].view(shape)``: the
Parameter *objects* stay, so optimizers built before or after keep working).  Layers are ordered
by shape ``(r, in, out)`` (first appearance first, model order inside a group), so each group's
A slices form one ``(L_g·r, in)`` matrix, its B slices one ``(L_g, out, r)`` tensor and its E
slices one ``(L_g·r,)`` vector: the per-triplet means are one ``mean`` per distinct shape.

Gradients reach ``G`` without a copy: each layer gets a ``GradSink`` (``layer._grad_sink``), and
the backends' backward writes dA, dE, dB straight into fresh views of ``G`` when the parameter
has no gradient yet.  Autograd's ``AccumulateGrad`` then *steals* that view (a fresh tensor with
one reference, in the parameter's layout), so ``p.grad`` aliases ``G``; later micro-batches
accumulate in place into it.  A sink is only used when that is safe:

* the parameter is the one the store laid out, still at its slot of ``P``, with ``grad is None``;
* the engine is running ``.backward()`` and will accumulate into this parameter (not
  ``torch.autograd.grad``, whose results are handed to the caller and must not alias anything);
* the slot was not already handed out in the same backward (a layer applied twice);
* not while compiling (``torch.compile`` traces the plain path).

Whether it worked is checked, never assumed: ``params_current`` / ``grads_aligned`` compare
``data_ptr()``s with the slots (host ints, no tensor op), and the allocator falls back to a
gather when the gradients are elsewhere (hand-assigned, summed with another term such as the
orthogonal regulariser, ...) and re-flattens when the parameters moved (``.to()``, ``.half()``,
``load_state_dict(assign=True)``, a resize).

Caveat: a gradient written through a sink lives in ``G``.  After ``zero_grad(set_to_none=True)``
the next backward writes the same memory again, so a reference to an *old* ``p.grad`` kept across
``zero_grad`` sees the new values (clone it if it must survive).
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import nn

PARTS = ("lora_A", "lora_E", "lora_B")  # a layer's Parameters, in GradSink slot order
_SEGMENTS = ("lora_A", "lora_B", "lora_E")  # the flat layout's segment order
_data_ptr = torch.Tensor.data_ptr
_grad_of = operator.attrgetter("grad")
_shape_of = operator.attrgetter("shape")


def layer_shape(name: str, layer: nn.Module) -> tuple[int, int, int]:
    """``(r, in, out)`` of a layer's adapter, checking that lora_A, lora_E and lora_B agree."""
    A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
    r = A.shape[0] if A.dim() >= 1 else -1
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or E.numel() != r or E.dim() < 1 or E.shape[0] != r:
        raise ValueError(f"RankAllocator: layer {name!r} has inconsistent adapter shapes "
                         f"lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)}")
    return int(r), int(A.shape[1]), int(B.shape[0])


class GradSink:
    """One layer's three gradient slots in a store's ``G`` (slot order ``PARTS``: A, E, B).

    ``claim(ctx, needs)`` is called by a backend's backward; it returns, per slot, a fresh view of
    ``G`` to write that gradient into, or None (then the backward returns a fresh tensor as usual).
    """

    __slots__ = ("params", "templates", "shapes", "ptrs", "tasks")

    def __init__(self, params: Sequence[torch.Tensor], templates: Sequence[torch.Tensor]) -> None:
        self.params = tuple(params)
        self.templates = tuple(templates)  # views of G shaped like the params; handed out as .view(shape)
        self.shapes = tuple(p.shape for p in params)
        self.ptrs = tuple(p.data_ptr() for p in params)
        self.tasks = [None, None, None]  # graph task that last took each slot

    def claim(self, ctx, needs: Sequence[bool]) -> list:
        out = [None, None, None]
        if torch.compiler.is_compiling():
            return out
        task = torch._C._current_graph_task_id()
        params = self.params
        for node, _ in ctx.next_functions:
            var = getattr(node, "variable", None)  # AccumulateGrad nodes only: the leaf itself
            if var is None:
                continue
            for i in range(3):
                if var is params[i]:
                    break
            else:
                continue
            if (not needs[i] or out[i] is not None or var.grad is not None or self.tasks[i] == task
                    or var.data_ptr() != self.ptrs[i] or var.shape != self.shapes[i]):
                continue
            try:
                if not torch._C._will_engine_execute_node(node):
                    continue  # .backward(inputs=...) that leaves this parameter out
            except RuntimeError:
                continue  # torch.autograd.grad(): the gradient goes to the caller, it must not alias G
            self.tasks[i] = task
            tmpl = self.templates[i]
            out[i] = tmpl.view(tmpl.shape)  # a fresh tensor object: AccumulateGrad can steal it
        return out


class FlatAdapterStore:
    """The flat layout of a list of ``(name, layer)`` adapters, and (if possible) the flat buffers.

    Attributes (all in the flat, grouped order):
        order: model indices of the layers, grouped by shape.
        shapes: ``(r, in, out)`` per layer in that order; ``model_shapes`` in model order.
        params, names: the 3·L Parameters ``[A… | B… | E…]`` and their ``"<path>.lora_X"`` names.
        offsets: element offset of each param in the flat layout; ``n_a``, ``n_b``, ``n``: sizes.
        groups: ``(r, in, out, first layer, count)`` per distinct shape.
        flat: True when the Parameters were moved into ``P`` (one floating dtype, one device);
            then ``P``, ``G`` (gradients) exist and each layer has a ``_grad_sink``.
    """

    def __init__(self, named_layers: Sequence[tuple[str, nn.Module]], *, materialize: bool = True) -> None:
        self.named_layers = list(named_layers)
        self.model_shapes = [layer_shape(n, m) for n, m in self.named_layers]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, s in enumerate(self.model_shapes):
            groups.setdefault(s, []).append(i)
        self.order = [i for members in groups.values() for i in members]
        self.shapes = [self.model_shapes[i] for i in self.order]
        self.groups, first = [], 0
        for (r, fi, fo), members in groups.items():
            self.groups.append((r, fi, fo, first, len(members)))
            first += len(members)
        self.identity_order = self.order == list(range(len(self.order)))

        layers = [self.named_layers[i] for i in self.order]
        self.params, self.names, self._owners = [], [], []
        for part in _SEGMENTS:
            for name, layer in layers:
                self.params.append(getattr(layer, part))
                self.names.append(f"{name}.{part}")
                self._owners.append((layer, part))
        # identity checks read the modules' Parameter dicts directly (getattr on a Module is slow)
        self._fast_owners = all(part in getattr(layer, "_parameters", {}) for layer, part in self._owners)
        self._owner_dicts = [layer._parameters for layer, _ in self._owners] if self._fast_owners else []
        self._owner_keys = [part for _, part in self._owners]
        self.offsets, off = [], 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.n = off
        self.n_a = sum(r * i for r, i, _ in self.shapes)
        self.n_b = sum(r * o for r, _, o in self.shapes)
        self.n_triplets = sum(s[0] for s in self.shapes)
        # triplet start of each layer in the flat order, indexed by model position
        self.triplet_start = [0] * len(self.order)
        t = 0
        for pos, i in enumerate(self.order):
            self.triplet_start[i] = t
            t += self.shapes[pos][0]

        self.flat = False
        self.P = self.G = None
        self._p_ptrs: list[int] = []
        self._g_ptrs: list[int] = []
        self._g_views: list[torch.Tensor] = []
        self._orth_groups: list | None = None
        if materialize and self.params:
            dtypes = {p.dtype for p in self.params}
            devices = {p.device for p in self.params}
            distinct = len({id(p) for p in self.params}) == len(self.params)  # no Parameter shared by two slots
            if distinct and len(dtypes) == 1 and len(devices) == 1 and next(iter(dtypes)).is_floating_point:
                self._materialize(dtypes.pop(), devices.pop())
        if not self.flat:
            for _, layer in self.named_layers:
                if getattr(layer, "_grad_sink", None) is not None:
                    layer._grad_sink = None

    # ------------------------------------------------------------------ building
    def _materialize(self, dtype: torch.dtype, device: torch.device) -> None:
        P = torch.empty(self.n, dtype=dtype, device=device)
        G = torch.zeros(self.n, dtype=dtype, device=device)
        g_views = []
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                view = P[off:off + p.numel()].view(p.shape)
                view.copy_(p.detach())
                p.data = view
                gv = G[off:off + p.numel()].view(p.shape)
                g_views.append(gv)
                g = p.grad
                if g is not None and g.shape == p.shape and g.dtype == dtype and g.device == device:
                    gv.copy_(g)  # keep an existing gradient, now in G
                    p.grad = gv.view(p.shape)
        self.P, self.G, self._g_views = P, G, g_views
        self._p_ptrs = [p.data_ptr() for p in self.params]
        self._shapes = [p.shape for p in self.params]
        self._g_ptrs = [g.data_ptr() for g in g_views]
        self.flat = True
        L = len(self.order)
        for pos, i in enumerate(self.order):
            _, layer = self.named_layers[i]
            idx = [pos, 2 * L + pos, L + pos]  # A, E, B in the flat param list
            layer._grad_sink = GradSink([self.params[k] for k in idx], [g_views[k] for k in idx])

    # ------------------------------------------------------------------ checks (host only)
    def params_current(self) -> bool:
        """The layers still hold the Parameters laid out here and, if flat, those still live in ``P``."""
        try:
            if self._fast_owners:
                owned = list(map(operator.getitem, self._owner_dicts, self._owner_keys))
            else:
                owned = [getattr(layer, part) for layer, part in self._owners]
        except (KeyError, AttributeError):
            return False
        if not all(map(operator.is_, owned, self.params)):
            return False
        return not self.flat or (list(map(_data_ptr, self.params)) == self._p_ptrs
                                 and list(map(_shape_of, self.params)) == self._shapes)

    def grads_aligned(self) -> bool | None:
        """True when every ``p.grad`` is its slot of ``G``; None when some gradient is missing."""
        grads = list(map(_grad_of, self.params))
        try:
            ptrs = list(map(_data_ptr, grads))
        except TypeError:  # a None
            return None
        return self.flat and ptrs == self._g_ptrs

    def missing_grad(self) -> tuple[str, torch.Tensor] | None:
        for name, p in zip(self.names, self.params):
            if p.grad is None:
                return name, p
        return None

    # ------------------------------------------------------------------ flat data
    def gather_params(self, dtype: torch.dtype) -> torch.Tensor:
        """The parameters as one flat tensor of ``dtype`` (a view of ``P`` when flat and of that dtype)."""
        if self.flat and self.P.dtype == dtype:
            return self.P
        return torch.cat([p.detach().reshape(-1) for p in self.params]).to(dtype)

    def gather_grads(self, dtype: torch.dtype) -> torch.Tensor:
        """The gradients (all present, some not aligned with ``G``) as one flat tensor of ``dtype``.

        Flat stores copy each gradient found elsewhere into its own slot of ``G`` (one
        ``_foreach_copy_`` over just those) and return ``G``: a slot whose parameter's gradient lives
        elsewhere is referenced by no current gradient, only possibly by an old one (the caveat in
        the module docstring).
        """
        grads = list(map(_grad_of, self.params))
        # (autograd keeps every p.grad at its parameter's shape, dtype and device: with the params in
        # P, the grads fit the G slots)
        if self.flat and self.G.dtype == dtype:
            ptrs = list(map(_data_ptr, grads))
            moved = [k for k, (ptr, slot) in enumerate(zip(ptrs, self._g_ptrs)) if ptr != slot]
            g_storage = self.G.untyped_storage().data_ptr()
            if all(grads[k].untyped_storage().data_ptr() != g_storage for k in moved):  # no G-to-G shuffle
                torch._foreach_copy_([self._g_views[k] for k in moved], [grads[k] for k in moved])
                return self.G
        return torch.cat([g.reshape(-1) for g in grads]).to(dtype)

    def orth_groups(self) -> list[tuple[bool, list[int], torch.Tensor]]:
        """``(is_B, positions, stacked)`` per shape group, for ``orth.orth_reg_loss`` (flat stores only).

        ``stacked`` is the group's A matrices as one ``(count, r, in)`` view of ``P``, or its B
        matrices as one ``(count, out, r)`` view: the stack the regulariser needs, without a copy.
        ``positions`` index ``As + Bs`` with both lists in model order.
        """
        if self._orth_groups is None:
            L = len(self.order)
            groups, a0, b0 = [], 0, self.n_a
            for r, fan_in, fan_out, first, count in self.groups:
                members = self.order[first:first + count]
                groups.append((False, members, self.P[a0:a0 + count * r * fan_in].view(count, r, fan_in)))
                groups.append((True, [L + i for i in members],
                               self.P[b0:b0 + count * r * fan_out].view(count, fan_out, r)))
                a0, b0 = a0 + count * r * fan_in, b0 + count * r * fan_out
            self._orth_groups = groups
        return self._orth_groups

    def e_segment(self) -> torch.Tensor:
        """The flat E entries (one per triplet) as a view of ``P`` (flat stores only)."""
        return self.P[self.n_a + self.n_b:]

    def triplet_means(self, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[:R]`` = per-triplet mean of ``s`` over A rows, ``out[R:]`` over B columns.

        ``s`` is flat in this layout; one ``mean(out=)`` per distinct shape and segment.
        """
        R = self.n_triplets
        a0, b0, t0 = 0, self.n_a, 0
        for r, fan_in, fan_out, _, count in self.groups:
            na, nb, nt = count * r * fan_in, count * r * fan_out, count * r
            torch.mean(s[a0:a0 + na].view(nt, fan_in), 1, out=out[t0:t0 + nt])
            torch.mean(s[b0:b0 + nb].view(count, fan_out, r), 1, out=out[R + t0:R + t0 + nt].view(count, r))
            a0, b0, t0 = a0 + na, b0 + nb, t0 + nt
        return out

    # ------------------------------------------------------------------ model order
    def canonical_element_index(self) -> list[torch.Tensor] | None:
        """Index pieces mapping the model-order layout ``[A_0…A_L | B… | E…]`` to this one (None: identical)."""
        if self.identity_order:
            return None
        L = len(self.order)
        pos_of = {i: pos for pos, i in enumerate(self.order)}
        pieces = []
        for seg in range(3):
            for i in range(L):
                k = seg * L + pos_of[i]
                pieces.append(torch.arange(self.offsets[k], self.offsets[k] + self.params[k].numel()))
        return pieces

    def canonical_triplet_index(self) -> list[torch.Tensor] | None:
        """Index pieces mapping model-order triplets to this layout's (None: identical)."""
        if self.identity_order:
            return None
        return [torch.arange(self.triplet_start[i], self.triplet_start[i] + r)
                for i, (r, _, _) in enumerate(self.model_shapes)]
