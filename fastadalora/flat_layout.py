"""``FlatLayout``: where each adapter element lives in the allocator's flat buffers.

The allocator's work per optimizer step is elementwise over every adapter element plus one
reduction per triplet, so it keeps its state (the sensitivity EMAs and a scratch buffer) as flat
fp32 vectors laid out as::

    [ A… | B… | E… ]        each layer's lora_A (r×in), lora_B (out×r), lora_E (r), row-major

Layers are ordered by shape ``(r, in, out)`` (first appearance first, model order inside a group),
so each group's A slices form one ``(L_g·r, in)`` matrix, its B slices one ``(L_g, out, r)`` tensor
and its E slices one ``(L_g·r,)`` vector: the per-triplet means are one ``mean`` per distinct shape.
A triplet i of layer l owns row i of A_l, column i of B_l and element i of E_l, so the elements
partition into triplets.

This class is pure arithmetic over shapes: it never touches a Parameter.  The allocator reads the
parameters and gradients where torch keeps them and copies them into views this layout hands out.
"""

from __future__ import annotations

from typing import Sequence

import torch

SEGMENTS = ("lora_A", "lora_B", "lora_E")  # the flat layout's segment order


class FlatLayout:
    """The flat layout of adapters of shapes ``(r, in, out)`` given in model order.

    Attributes (flat, grouped order unless said otherwise):
        order: model indices of the layers, grouped by shape.
        shapes: ``(r, in, out)`` per layer in that order; ``model_shapes`` in model order.
        groups: ``(r, in, out, first layer, count)`` per distinct shape.
        offsets: element offset of each of the ``3·L`` tensors ``[A… | B… | E…]``.
        n_a, n_b, n: sizes of the A and B segments and of the whole buffer.
        n_triplets: total rank; ``triplet_start[i]``: first triplet of model layer i.
    """

    def __init__(self, model_shapes: Sequence[tuple[int, int, int]]) -> None:
        self.model_shapes = [tuple(int(v) for v in s) for s in model_shapes]
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
        self.tensor_shapes = ([(r, i) for r, i, _ in self.shapes] + [(o, r) for r, _, o in self.shapes]
                              + [(r, 1) for r, _, _ in self.shapes])
        self.offsets, off = [], 0
        for shape in self.tensor_shapes:
            self.offsets.append(off)
            off += shape[0] * shape[1]
        self.n = off
        self.n_a = sum(r * i for r, i, _ in self.shapes)
        self.n_b = sum(r * o for r, _, o in self.shapes)
        self.n_triplets = sum(s[0] for s in self.shapes)
        self.triplet_start = [0] * len(self.order)
        t = 0
        for pos, i in enumerate(self.order):
            self.triplet_start[i] = t
            t += self.shapes[pos][0]
        L = len(self.order)
        self._chunks = [(seg * L + first, count, self.offsets[seg * L + first],
                         self.tensor_shapes[seg * L + first][0])
                        for seg in range(3) for _, _, _, first, count in self.groups]
        # per chunk: (part 0/1/2 = A/B/E, tensors, r, in or out, first triplet)
        self._chunk_info = [(seg, count, r, (fi, fo, 1)[seg], sum(g[0] * g[4] for g in self.groups[:gi]))
                            for seg in range(3) for gi, (r, fi, fo, first, count) in enumerate(self.groups)]

    def __len__(self) -> int:
        return len(self.order)

    # ------------------------------------------------------------------ tensors in flat order
    def flat_order(self, per_layer: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """``[A… | B… | E…]`` in flat order, from per-layer ``(A, E, B)`` given in model order."""
        layers = [per_layer[i] for i in self.order]
        return [t[0] for t in layers] + [t[2] for t in layers] + [t[1] for t in layers]

    def names(self, model_names: Sequence[str]) -> list[str]:
        """``"<path>.lora_X"`` of each tensor in flat order."""
        ordered = [model_names[i] for i in self.order]
        return [f"{name}.{part}" for part in SEGMENTS for name in ordered]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like each of the ``3·L`` tensors, in flat order."""
        return [flat[off:off + r * c].view(r, c) for off, (r, c) in zip(self.offsets, self.tensor_shapes)]

    def chunks(self) -> list[tuple[int, int, int, int]]:
        """The flat buffer as consecutive chunks, one per segment and shape group, in flat order:
        ``(first tensor, count, flat offset, rows per tensor)``.

        The tensors of one chunk share a shape, so ``torch.cat`` of them along dim 0 is exactly the
        chunk (``gather``): one op per chunk, whatever the number of layers.  A chunk is also a unit
        of work small enough to stay in cache across several elementwise passes.
        """
        return self._chunks

    def chunk_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat``, one per chunk, shaped ``(count·rows, cols)`` (what ``gather`` writes into)."""
        views = []
        for k, count, off, rows in self._chunks:
            cols = self.tensor_shapes[k][1]
            views.append(flat[off:off + count * rows * cols].view(count * rows, cols))
        return views

    def gather(self, tensors: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (flat order) into the chunks ``views`` (``chunk_views``): one ``cat`` per chunk."""
        for (k, count, _, _), view in zip(self._chunks, views):
            torch.cat(tensors[k:k + count], 0, out=view)

    def e_segment(self, flat: torch.Tensor) -> torch.Tensor:
        """The per-triplet (E) segment of a flat buffer."""
        return flat[self.n_a + self.n_b:]

    # ------------------------------------------------------------------ per-triplet reductions
    def chunk_sums_(self, c: int, ipt: torch.Tensor, unc: torch.Tensor, work: torch.Tensor) -> None:
        """Chunk ``c``'s share of the triplet scores, from its views ``ipt``/``unc`` (``chunk_views``).

        ``s = ipt·unc`` (PEFT's element score); for an A chunk its row means, for a B chunk its column
        means, for the E chunk ``s`` itself.  They go to ``work`` (``3·R``: A | B | E parts).
        """
        part, count, r, width, t0 = self._chunk_info[c]
        R = self.n_triplets
        dst = work[part * R + t0:part * R + t0 + count * r]
        if part == 2:  # E: (count·r, 1)
            torch.mul(ipt, unc, out=dst.view(-1, 1))
            return
        s = ipt * unc  # one chunk: it stays in cache
        if part == 0:  # A: (count·r, in), a mean per row
            torch.mean(s, 1, out=dst)
        else:  # B: (count·out, r), a mean per column of each layer's (out, r)
            torch.mean(s.view(count, width, r), 1, out=dst.view(count, r))

    def combine_sums_(self, work: torch.Tensor) -> torch.Tensor:
        """``S = s_E + (mean_A + mean_B)`` (PEFT's order of addition) from ``work`` after every ``chunk_sums_``."""
        R = self.n_triplets
        return work[2 * R:3 * R].add_(work[:R].add_(work[R:2 * R]))

    def triplet_scores(self, ipt: torch.Tensor, unc: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """``S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`` with ``s = ipt·unc``, for every triplet
        (flat ``ipt``/``unc``; ``work`` of ``3·R``).  Returns a view of ``work``."""
        for c, (i, u) in enumerate(zip(self.chunk_views(ipt), self.chunk_views(unc))):
            self.chunk_sums_(c, i, u, work)
        return self.combine_sums_(work)

    def triplet_table(self) -> list[tuple[int, int, int, int, int, int]]:
        """Per triplet ``(a_off, a_len, e_off, b_off, b_len, b_stride)``: where its elements are."""
        rows = []
        a_start, b_start, e_start = 0, self.n_a, self.n_a + self.n_b
        for r, fan_in, fan_out in self.shapes:
            for i in range(r):
                rows.append((a_start + i * fan_in, fan_in, e_start + i, b_start + i, fan_out, r))
            a_start += r * fan_in
            b_start += r * fan_out
            e_start += r
        return rows

    # ------------------------------------------------------------------ model order
    def canonical_element_index(self) -> torch.Tensor | None:
        """Flat positions of the model-order layout ``[A_0…A_L | B… | E…]`` (None: identical)."""
        if self.identity_order:
            return None
        L = len(self.order)
        pos_of = {i: pos for pos, i in enumerate(self.order)}
        pieces = []
        for seg in range(3):
            for i in range(L):
                k = seg * L + pos_of[i]
                r, c = self.tensor_shapes[k]
                pieces.append(torch.arange(self.offsets[k], self.offsets[k] + r * c))
        return torch.cat(pieces)

    def canonical_triplet_index(self) -> torch.Tensor | None:
        """Flat positions of the model-order triplets (None: identical)."""
        if self.identity_order:
            return None
        return torch.cat([torch.arange(self.triplet_start[i], self.triplet_start[i] + r)
                          for i, (r, _, _) in enumerate(self.model_shapes)])
