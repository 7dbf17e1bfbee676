"""What rank allocation, the orthogonal term and checkpoints need under ``torch.distributed``.

Nothing here runs unless a default process group with more than one rank is initialised; a
single process never imports this module's collectives.

DDP (``DistributedDataParallel`` over the ``AdaLoraModel`` or over its ``.model``).  Every rank
holds the whole adapter and DDP's averaged gradients, so every rank computes bit-identical
sensitivities, scores, thresholds and masks with no collective of the allocator's own.  That is
checked, not assumed: on the first allocation the ranks compare their adapter layouts, and at
every masking step (every ``deltaT`` steps, and the final mask) they compare bitwise checksums of
the EMAs, the scores and the new mask (one all-gather of 6 integers).  A mismatch raises
``RankMismatchError`` on every rank, before the models drift apart for good.

FSDP2 (``fully_shard`` on the blocks and the root, after ``get_adalora_model``).  Each adapter
Parameter is a ``DTensor`` sharded ``Shard(0)`` over the mesh: a rank holds whole rows of A
(whole triplets), some rows of B (a part of every column) and some entries of E.  The allocator
keeps the EMAs of its local elements only and computes, per triplet, the partial sums its shards
give (``ShardedLayout``); one all-gather of those ``3·R + 1`` numbers per allocation step (``R``
triplets over the model; ``+1``: the step, compared across ranks) gives every rank the same
scores, summed in the same order, so the threshold and the masks are identical everywhere.  No
gradient is ever gathered.  The all-gather runs every step before the final phase, masking or not,
because keeping or skipping a step whose gradients are not finite somewhere is a global decision.

The allocator's collectives go through a side group of its own (gloo, CPU tensors; created at
the first collective, by every rank), waited on with a timeout: a rank that does not call
``update_and_allocate`` makes the others fail with a clear error instead of hanging.

The orthogonal term and ``save_pretrained`` use the FSDP mesh itself (``orth.py``, ``gathered_adapters``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import zlib
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=10)


class RankMismatchError(RuntimeError):
    """The ranks disagree (adapter layout, step, scores or mask), or a rank did not take part in a collective."""


# --------------------------------------------------------------------------- detection
def active() -> bool:
    """A default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_dtensor(t) -> bool:
    """``t`` is a ``DTensor`` (without importing ``torch.distributed.tensor``: no module, no DTensor)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard, a view of its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def chunk_rows(n: int, parts: int, coord: int) -> tuple[int, int]:
    """``(start, length)`` of part ``coord`` of ``n`` rows split as ``torch.chunk`` does (``Shard(0)``)."""
    size = -(-n // parts) if n else 0
    start = min(coord * size, n)
    return start, max(min(size, n - start), 0)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How a set of DTensors is sharded: one mesh, ``Shard(0)`` on at most one mesh dimension.

    ``group`` is that mesh dimension's process group, ``parts`` its size and ``coord`` this rank's
    place in it; ``members`` are the global ranks of ``group`` in mesh order.  Replicate dims
    (HSDP) hold identical copies and need no communication here.
    """

    group: Any
    parts: int
    coord: int
    members: tuple[int, ...]
    key: tuple

    @staticmethod
    def of(tensors: Sequence[torch.Tensor], what: str) -> "ShardSpec":
        from torch.distributed.tensor import Replicate, Shard

        first = tensors[0]
        mesh, placements = first.device_mesh, tuple(first.placements)
        for t in tensors:
            if not is_dtensor(t) or t.device_mesh != mesh or tuple(t.placements) != placements:
                raise ValueError(
                    f"{what}: every adapter parameter must be sharded the same way (all DTensors on one mesh with "
                    f"the same placements); found {_describe(first)} and {_describe(t)}. Apply fully_shard to the "
                    "root module too (fully_shard(block) for each block, then fully_shard(model)).")
        dims = [d for d, p in enumerate(placements) if isinstance(p, Shard)]
        bad = [p for p in placements if not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0)]
        if bad or len(dims) > 1:
            raise NotImplementedError(
                f"{what}: adapter parameters placed {placements}; fastadalora supports Shard(0) on one mesh "
                "dimension (FSDP2's fully_shard, also HSDP) and Replicate elsewhere.")
        if not dims:
            rank = dist.get_rank()
            return ShardSpec(None, 1, 0, (rank,), (id(mesh), placements))
        group = mesh.get_group(dims[0])
        return ShardSpec(group, mesh.size(dims[0]), mesh.get_local_rank(dims[0]),
                         tuple(dist.get_process_group_ranks(group)), (id(mesh), placements))

    def rows(self, n: int, coord: int | None = None) -> tuple[int, int]:
        return chunk_rows(n, self.parts, self.coord if coord is None else coord)


def _describe(t) -> str:
    if is_dtensor(t):
        return f"DTensor{tuple(t.shape)} {tuple(t.placements)} on {t.device_mesh}"
    return f"a plain tensor {tuple(t.shape)}"


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False):
    """``out`` (``world·inp.numel()``) := every rank's ``inp``, rank order (``all_gather_single`` where torch
    has it, ``all_gather_into_tensor`` before)."""
    gather = dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=async_op)


# --------------------------------------------------------------------------- the side channel
class Channel:
    """The allocator's own collectives: a gloo group over every rank, CPU tensors, bounded waits."""

    def __init__(self, timeout: timedelta = DEFAULT_TIMEOUT, group=None) -> None:
        self.timeout = timeout
        self._group = group

    def _ensure_group(self, what: str):
        if self._group is None:
            try:
                self._group = dist.new_group(backend="gloo", timeout=self.timeout)
            except Exception as exc:  # DistStoreError: a rank never came
                raise RankMismatchError(
                    f"{what}: rank {dist.get_rank()} waited {self.timeout} for the other ranks to set up the "
                    f"allocator's process group ({exc}). Call update_and_allocate (and state_dict, save_pretrained on "
                    "a sharded model) on every rank.") from exc
        return self._group

    def all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``(world, *t.shape)`` CPU tensor of every rank's ``t`` (rank order)."""
        group = self._ensure_group(what)
        src = t.detach().to("cpu").contiguous()
        out = src.new_empty((dist.get_world_size(group),) + tuple(src.shape))
        try:
            all_gather_flat(out.view(-1), src.view(-1), group, async_op=True).wait(timeout=self.timeout)
        except RuntimeError as exc:
            raise RankMismatchError(
                f"{what}: rank {dist.get_rank()} waited {self.timeout} for the other ranks ({exc}). Every rank must "
                "call update_and_allocate at every optimizer step (and state_dict / save_pretrained of a sharded model "
                "together).") from exc
        return out


# --------------------------------------------------------------------------- checks
def layout_fingerprint(names: Sequence[str], shapes: Sequence[tuple[int, int, int]], sharded: bool,
                       parts: int) -> torch.Tensor:
    """Integers that differ when two ranks hold different adapters (crc32: stable across processes)."""
    crc_names = zlib.crc32("\n".join(names).encode())
    crc_shapes = zlib.crc32(repr([tuple(s) for s in shapes]).encode())
    return torch.tensor([len(names), sum(s[0] for s in shapes), sum(s[0] * (s[1] + s[2] + 1) for s in shapes),
                         crc_names, crc_shapes, int(sharded), parts], dtype=torch.int64)


def check_layout(channel: Channel, names, shapes, sharded: bool, parts: int) -> None:
    """Raise ``RankMismatchError`` on every rank unless all ranks hold the same adapter layout."""
    rows = channel.all_gather(layout_fingerprint(names, shapes, sharded, parts), "update_and_allocate")
    if bool((rows == rows[0]).all()):
        return
    desc = [f"rank {i}: {int(r[0])} adapters, {int(r[1])} triplets, {int(r[2])} elements"
            f"{', sharded' if int(r[5]) else ''}" for i, r in enumerate(rows)]
    raise RankMismatchError(
        "update_and_allocate: the ranks hold different adapter layouts (" + "; ".join(desc) + "). Build the same "
        "model with the same AdaLoraConfig on every rank before wrapping it in DDP / fully_shard.")


def bits_checksum(t: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 that changes with any bit of ``t`` (position-weighted sum of its words, wrapping)."""
    words = t.detach().contiguous().view(-1)
    words = words.view(torch.int64) if words.element_size() == 8 else words.view(torch.int32).to(torch.int64) \
        if words.element_size() == 4 else words.to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64)
    return (words * weights).sum()


def check_replicas(channel: Channel, step: int, budget: int, scores: torch.Tensor, keep: torch.Tensor,
                   state: Sequence[torch.Tensor] = ()) -> None:
    """DDP: the ranks hold bit-identical EMAs (``state``) and scores and the same mask at this masking step,
    or all raise."""
    sums = torch.stack([bits_checksum(scores), bits_checksum(keep.to(torch.int64)),
                        *(bits_checksum(t) for t in state)]).cpu()
    rows = channel.all_gather(torch.cat([torch.tensor([step, budget], dtype=torch.int64), sums]),
                              "update_and_allocate")
    if bool((rows == rows[0]).all()):
        return
    desc = "; ".join(f"rank {i}: step {int(r[0])}, budget {int(r[1])}, checksums of scores, mask, EMAs "
                     f"{[int(v) for v in r[2:]]}" for i, r in enumerate(rows))
    if not bool((rows[:, 0] == rows[0, 0]).all()):
        raise RankMismatchError(f"update_and_allocate: the ranks are at different steps ({desc}); call it on every "
                                "rank with the same global_step.")
    raise RankMismatchError(
        f"update_and_allocate at step {step}: the ranks' sensitivity EMAs or scores differ ({desc}), so their rank "
        "patterns would drift apart. Under DDP the gradients must be synchronised when it is called: not on a "
        "no_sync() micro-batch, every adapter parameter inside the DDP module, the same weights on every rank.")


# --------------------------------------------------------------------------- the sharded layout
class ShardedLayout:
    """This rank's part of the allocator's ``FlatLayout``, for adapters sharded ``Shard(0)`` (FSDP2).

    It offers the interface of ``FlatLayout`` the allocator's step uses (``n``, ``chunks``,
    ``chunk_views``, ``chunk_sums_``, ``combine_sums_``, ``triplet_scores``) over the *local* shards:
    the state buffers hold this rank's elements only, in flat order, chunk by chunk.  A chunk's
    tensors share a global shape, so their shards share a local shape: still one ``cat`` per chunk.

    Per triplet the score needs ``s_E``, the row mean of ``s_A`` and the column mean of ``s_B``.
    This rank writes into the ``3·R`` work vector what its shards hold: whole rows of A (its
    triplets' row means), partial column sums of B (every triplet of the layer), its entries of E;
    zeros elsewhere.  ``combine_sums_`` all-gathers the vector (with the step), sums the ranks'
    rows in mesh order and adds the parts as ``FlatLayout`` does.
    """

    def __init__(self, layout, spec: ShardSpec, channel: Channel) -> None:
        self.layout, self.spec, self.channel = layout, spec, channel
        self.step = -1
        self.n_triplets = layout.n_triplets
        self._chunks, self._info = [], []
        off = 0
        t0 = 0
        L = len(layout)
        for seg in range(3):
            t0 = 0
            for r, fi, fo, first, count in layout.groups:
                k = seg * L + first
                rows, cols = layout.tensor_shapes[k]
                start, length = spec.rows(rows)
                self._chunks.append((k, count, off, length))
                self._info.append((seg, count, r, (fi, fo, 1)[seg], t0, start, length, cols))
                off += count * length * cols
                t0 += r * count
        self.n = off
        self._keep_index: torch.Tensor | None = None
        self._positions: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.layout)

    # ------------------------------------------------------------------ the FlatLayout interface
    def chunks(self) -> list[tuple[int, int, int, int]]:
        return self._chunks

    def chunk_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[off:off + count * rows * info[7]].view(count * rows, info[7])
                for (_, count, off, rows), info in zip(self._chunks, self._info)]

    def chunk_sums_(self, c: int, ipt: torch.Tensor, unc: torch.Tensor, work: torch.Tensor) -> None:
        """Chunk ``c``'s local share of the triplet scores into ``work`` (zeroed at ``c == 0``)."""
        if c == 0:
            work.zero_()
        part, count, r, width, t0, start, length, _ = self._info[c]
        R = self.n_triplets
        whole = work[part * R + t0:part * R + t0 + count * r].view(count, r)
        if part == 2:  # E: entries start..start+length
            whole[:, start:start + length] = (ipt * unc).view(count, length)
            return
        s = ipt * unc  # one chunk: it stays in cache (as FlatLayout.chunk_sums_)
        if part == 0:  # A: whole rows start..start+length of each layer's A, a mean per row
            whole[:, start:start + length] = torch.mean(s, 1).view(count, length)
        else:  # B: rows start..start+length of every column: partial sums over the layer's `out` rows
            torch.div(s.view(count, length, r).sum(1), width, out=whole)

    def combine_sums_(self, work: torch.Tensor) -> torch.Tensor:
        """All ranks' partial sums added (mesh order, the same on every rank), then ``FlatLayout``'s combine."""
        R = self.n_triplets
        payload = torch.cat([work[:3 * R], work.new_full((1,), float(self.step))])
        rows = self.channel.all_gather(payload, "update_and_allocate")
        steps = rows[:, -1]
        if not bool((steps == steps[0]).all()):
            raise RankMismatchError(
                "update_and_allocate: the ranks are at different steps ("
                + ", ".join(f"rank {i}: {int(s)}" for i, s in enumerate(steps.tolist())) + "); call it on every rank "
                "at every optimizer step with the same global_step.")
        mine = rows[list(self.spec.members), :3 * R] if len(self.spec.members) < rows.shape[0] else rows[:, :3 * R]
        work[:3 * R].copy_(mine.sum(0))
        return self.layout.combine_sums_(work)

    def triplet_scores(self, ipt: torch.Tensor, unc: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        for c, (i, u) in enumerate(zip(self.chunk_views(ipt), self.chunk_views(unc))):
            self.chunk_sums_(c, i, u, work)
        return self.combine_sums_(work)

    # ------------------------------------------------------------------ local tensors
    @staticmethod
    def locals(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The local shards (views of FSDP's storage) of DTensors."""
        try:
            return [t if t is None else t.to_local() for t in tensors]
        except AttributeError:  # a plain tensor among the DTensors
            raise RuntimeError(
                "update_and_allocate: some adapter parameters are sharded DTensors and some are FSDP's unsharded "
                "tensors (after an eval forward the root module stays unsharded until its next backward). Call it "
                "after backward and optimizer.step(), or call model.reshard() first.") from None

    def local_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """This rank's flags of a flat-order keep mask, in the order of its local E entries."""
        if self._keep_index is None or self._keep_index.device != keep.device:
            idx, t0 = [], 0
            for part, count, r, _, t0, start, length, _ in self._info:
                if part == 2:
                    for layer in range(count):
                        base = t0 + layer * r + start
                        idx.append(torch.arange(base, base + length))
            self._keep_index = torch.cat(idx).to(keep.device) if idx else torch.zeros(0, dtype=torch.long)
        return keep[self._keep_index]

    def positions(self, coord: int | None = None) -> torch.Tensor:
        """Flat (global) positions of the local elements of the rank at ``coord`` (default: this one)."""
        coord = self.spec.coord if coord is None else coord
        if coord not in self._positions:
            pieces = []
            for (k, count, _, _), info in zip(self._chunks, self._info):
                cols = info[7]
                for i in range(count):
                    rows = self.layout.tensor_shapes[k + i][0]
                    start, length = self.spec.rows(rows, coord)
                    base = self.layout.offsets[k + i] + start * cols
                    pieces.append(torch.arange(base, base + length * cols))
            self._positions[coord] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        return self._positions[coord]

    def local_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a whole flat-order buffer (a fresh tensor)."""
        return flat[self.positions().to(flat.device)]

    def gather_flat(self, mine: torch.Tensor) -> torch.Tensor:
        """The whole flat-order buffer from every rank's local buffer ``mine`` (one all-gather, padded)."""
        sizes = [self.positions(c).numel() for c in range(self.spec.parts)]
        pad = max(sizes)
        buf = mine.new_zeros(pad)
        buf[:mine.numel()] = mine
        rows = self.channel.all_gather(buf, "allocator.state_dict (a collective on a sharded model)")
        out = torch.empty(self.layout.n, dtype=mine.dtype)
        members = list(self.spec.members) if len(self.spec.members) < rows.shape[0] else list(range(rows.shape[0]))
        for coord, (rank, size) in enumerate(zip(members, sizes)):
            out[self.positions(coord)] = rows[rank, :size]
        return out.to(mine.device)


# --------------------------------------------------------------------------- the allocator's hook
class AllocatorSync:
    """Per allocator: the side channel, the settings, and what has been checked."""

    def __init__(self, timeout: timedelta = DEFAULT_TIMEOUT, check_replicas: bool = True, group=None) -> None:
        self.channel = Channel(timeout, group)
        self.check_replicas = check_replicas
        self._checked_layout = None

    def join(self, allocator, params: Sequence[torch.Tensor], check: bool) -> None:
        """Called with the flat-order Parameters: enter sharded mode when they are DTensors; on the first
        allocation of a layout (``check``), compare it across ranks."""
        sharded = is_dtensor(params[0])
        shard = allocator._shard
        if sharded and (shard is None or shard.layout is not allocator.layout
                        or shard.spec.key != (id(params[0].device_mesh), tuple(params[0].placements))):
            spec = ShardSpec.of(params, "update_and_allocate")
            allocator._enter_sharded(ShardedLayout(allocator.layout, spec, self.channel))
        elif not sharded and shard is not None:
            raise RuntimeError(
                "update_and_allocate: the adapter parameters were sharded (DTensors) and are now plain tensors; call "
                "it outside FSDP's unshard() / summon contexts, on the sharded parameters.")
        if check and self._checked_layout is not allocator.layout:
            if not sharded and any(is_dtensor(p) for p in params):
                ShardSpec.of(params, "update_and_allocate")  # raises: a mix of DTensors and plain tensors
            names = [n for n, _ in allocator.named_layers]
            parts = allocator._shard.spec.parts if allocator._shard is not None else 1
            check_layout(self.channel, names, allocator.layout.model_shapes, allocator._shard is not None, parts)
            self._checked_layout = allocator.layout


def channel_of(allocator) -> Channel:
    """The allocator's side channel (made on first use); a fresh one when there is no allocator."""
    if allocator is None:
        return Channel()
    if allocator._sync is None:
        allocator._sync = AllocatorSync()
    return allocator._sync.channel


def configure(model, *, timeout: timedelta | float | None = None, check_replicas: bool | None = None,
              group=None, enabled: bool | None = None) -> None:
    """Settings of the allocator's distributed behaviour (call on every rank; all optional).

    Args:
        model: an ``AdaLoraModel`` (or a wrapper whose ``.module`` is one) or a ``RankAllocator``.
        timeout: how long a rank waits for the others in the allocator's collectives (default 10 min);
            seconds or a ``timedelta``.
        check_replicas: DDP only: compare a fingerprint of the scores and mask across ranks at every
            masking step (default True; one all-gather of 4 numbers every ``deltaT`` steps).
        group: a gloo process group over all ranks to use instead of creating one.
        enabled: False makes every rank allocate on its own, with no collective and no check (for
            independent per-rank runs that happen to share a process group).
    """
    allocator = _allocator_of(model)
    sync = allocator._sync if isinstance(allocator._sync, AllocatorSync) else AllocatorSync()
    if timeout is not None:
        sync.channel.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if check_replicas is not None:
        sync.check_replicas = bool(check_replicas)
    if group is not None:
        sync.channel._group = group
    allocator._sync = sync
    if enabled is not None:
        allocator.distributed_enabled = bool(enabled)


def _allocator_of(model):
    from .allocator import RankAllocator

    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, RankAllocator):
            return model
        alloc = model.__dict__.get("allocator") if hasattr(model, "__dict__") else None
        if isinstance(alloc, RankAllocator):
            return alloc
        model = getattr(model, "module", None)
    raise TypeError("fastadalora.distributed.configure: expected an AdaLoraModel (or DDP(AdaLoraModel)) or a "
                    "RankAllocator")


# --------------------------------------------------------------------------- checkpoints
def has_sharded(model, layers, heads) -> bool:
    """Whether any adapter or head tensor is a DTensor (``save_pretrained`` is then a collective).

    FSDP2 modules are resharded first (``FSDPModule.reshard``, a no-op when they are): after an eval
    forward the root's parameters stay unsharded, and its state-dict hook would reshard them midway.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        for module in model.modules():
            if isinstance(module, fsdp.FSDPModule):
                module.reshard()
    return any(is_dtensor(t) for module in [*layers.values(), *heads.values()]
               for t in [*module.parameters(), *module.buffers()])


@contextlib.contextmanager
def gathered_adapters(layers, heads, channel: Channel):
    """Within the block, the adapters' and heads' DTensor Parameters and buffers are replaced by their full
    tensors (detached copies, one all-gather each over the FSDP mesh, adapter-sized; the base weights stay
    sharded), so the single-process writer saves them unchanged; the sharded ones are put back after.

    Every rank must enter it (a bounded rendezvous first: a rank-0-only call fails clearly instead of
    hanging in the first all-gather).
    """
    channel.all_gather(torch.zeros(1), "save_pretrained on a sharded model (a collective: call it on every rank; "
                       "is_main_process / rank 0 decides who writes)")
    swapped = []
    try:
        with torch.no_grad():
            for module in [*layers.values(), *heads.values()]:
                for sub in module.modules():  # the Parameter dicts themselves, as FSDP2 swaps them
                    for store in (sub._parameters, sub._buffers):
                        for name, t in list(store.items()):
                            if t is not None and is_dtensor(t):
                                swapped.append((store, name, t))
                                store[name] = t.full_tensor().detach()
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


def deepspeed_error(name: str, p: torch.Tensor) -> str | None:
    """The error to raise when a DeepSpeed ZeRO engine keeps ``p``'s gradient (or ``p`` itself) out of reach; None
    when DeepSpeed is not in use."""
    if "deepspeed" not in sys.modules:
        return None
    zero3 = hasattr(p, "ds_id")
    return (
        f"RankAllocator.update_and_allocate: {name} has "
        + ("been partitioned by DeepSpeed ZeRO-3" if zero3 else "no gradient, and DeepSpeed is in use")
        + ". A DeepSpeed ZeRO engine (stages 1-3) keeps the gradients in its own partitioned buffers (p.grad is None) "
        "and frees them inside engine.step(), before update_and_allocate runs; its fp32 master weights would also "
        "undo the masking of lora_E. AdaLoRA needs each adapter parameter's full gradient after backward and before "
        "the step (deepspeed.utils.safe_get_full_grad) and its full value after it. fastadalora supports "
        "DistributedDataParallel and FSDP2 (fully_shard; TrainingArguments(fsdp=..., fsdp_config={'version': 2})) "
        "for multi-GPU AdaLoRA.")


def write_rank() -> bool:
    """Whether this process writes shared files: rank 0 of the default group (or no process group)."""
    return not active() or dist.get_rank() == 0
