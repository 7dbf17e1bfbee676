"""Launch settings of the adapter kernels: rank tiers, block sizes, dot operand types, token splits.

One helper per decision, so every launcher (and the ahead-of-time compile test) asks the same place:

* ``rank_tile(r)``: the padded rank tile, the smallest of ``RANK_TIERS`` >= r;
* ``kernel_config(kernel, r, cdt)``: tile sizes, warps and stages of one kernel (no autotuning: its
  first-call cost is high and its choice would have to be carried from forward to backward);
* ``dot_dtype(cdt)`` / ``fp32_precision()``: what ``tl.dot`` multiplies.  fp32 dots follow torch's own
  switch: ``torch.get_float32_matmul_precision() == "highest"`` (torch's default, i.e.
  ``torch.backends.cuda.matmul.allow_tf32 = False``) gives ``input_precision="ieee"`` (exact fp32
  products, no tensor cores), anything else gives ``"tf32"``, as cuBLAS does for torch's own matmuls;
* ``split_count(n_blocks, tiles, sms)``: how many programs share a reduction over tokens, so that a
  small N still gives the GPU two programs per SM (fixed-order fp32 partials: deterministic);
* ``aot_job(...)``: the signature, constexprs and divisibility attributes of one compile, the way the
  runtime specialises a launch on aligned, contiguous tensors (or, ``aligned=False``, on ragged ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import triton
import triton.language as tl

MAX_RANK = 256
# Padded rank tiles (tl.dot needs every dim >= 16).  Each tier is a set of kernel variants to compile,
# so powers of two only up to MAX_RANK.
RANK_TIERS = (16, 32, 64, 128, 256)
RANK_CHUNK = 64  # rank step of the kernels that reduce over the rank (the rank expand: expand, dx)
SPLIT_PROGRAMS_PER_SM = 2  # what split_count aims at
DESIGN_SMS = 132  # H100 SXM / H200: the design point of the splits (the launchers ask the device)

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
AOT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
             torch.int64: "i64"}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one adapter kernel for one (rank tier, compute dtype)."""

    BLOCK_N: int  # tokens
    BLOCK_K: int  # the feature dimension the kernel walks (in_features, or out_features for grad_g)
    BLOCK_R: int  # the padded rank, or the rank step of the rank expand
    num_warps: int
    num_stages: int


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rank_tile(r: int) -> int:
    """The padded rank tile: the smallest ``RANK_TIERS`` entry >= r."""
    assert 1 <= r <= MAX_RANK, f"rank must be in [1, {MAX_RANK}], got {r}"
    return next(t for t in RANK_TIERS if t >= r)


def precision_class(cdt: torch.dtype, ieee: bool) -> str:
    """``"16"`` (fp16/bf16 tensor cores), ``"tf32"`` or ``"ieee"`` (fp32 FMA): what sizes a tile."""
    if cdt != torch.float32:
        return "16"
    return "ieee" if ieee else "tf32"


# (kernel, precision class) -> {tier: (BLOCK_N, BLOCK_K, BLOCK_R or None for the tier, warps, stages)}.
# Chosen so that every configuration compiles for sm_80 and sm_90 without register spills and within
# shared memory (tests/test_aot_compile.py); fp32 FMA dots ("ieee") hold their operands in registers,
# hence the smaller tiles.
_TABLE: dict[tuple[str, str], dict[int, tuple[int, int, int | None, int, int]]] = {
    # h = dropout(x)·Aᵀ: x tiles (BLOCK_N × BLOCK_K), the whole rank in one accumulator
    ("shrink", "16"): {16: (64, 128, None, 4, 3), 32: (64, 128, None, 4, 3), 64: (64, 64, None, 4, 3),
                       128: (64, 32, None, 8, 3), 256: (64, 32, None, 8, 2)},
    ("shrink", "tf32"): {16: (64, 64, None, 4, 3), 32: (64, 64, None, 4, 3), 64: (64, 64, None, 4, 3),
                         128: (64, 32, None, 8, 3), 256: (64, 32, None, 8, 2)},
    ("shrink", "ieee"): {16: (64, 32, None, 4, 2), 32: (64, 32, None, 4, 2), 64: (32, 32, None, 4, 2),
                         128: (32, 16, None, 8, 2), 256: (16, 16, None, 4, 2)},
    # out += (left·es)·right [⊙ keep]: 64×64 output tiles, the rank stepped by <= 64
    ("expand", "16"): {t: (64, 64, min(t, RANK_CHUNK), 4, 3) for t in RANK_TIERS},
    ("expand", "tf32"): {t: (64, 64, min(t, RANK_CHUNK), 4, 3) for t in RANK_TIERS},
    ("expand", "ieee"): {t: (64, 64, min(t, 32), 8, 2) for t in RANK_TIERS},
    # one pass over g: g tiles (BLOCK_N × BLOCK_K over out), gs and P = gᵀ·h both the whole rank; above
    # tier 64 only P (gs is the shrink kernel's, see adapter_backward.grad_g).  A wide BLOCK_K keeps the
    # gs partials' traffic (2r/BLOCK_K of g's) low.
    ("grad_g", "16"): {16: (64, 256, None, 8, 3), 32: (64, 128, None, 8, 3), 64: (32, 128, None, 8, 2),
                       128: (32, 64, None, 8, 2), 256: (32, 32, None, 8, 2)},
    ("grad_g", "tf32"): {16: (64, 128, None, 8, 2), 32: (64, 128, None, 8, 2), 64: (32, 128, None, 8, 2),
                         128: (32, 64, None, 8, 2), 256: (32, 32, None, 8, 2)},
    ("grad_g", "ieee"): {16: (32, 64, None, 4, 2), 32: (16, 64, None, 4, 2), 64: (16, 64, None, 8, 2),
                         128: (16, 32, None, 8, 2), 256: (16, 16, None, 8, 2)},
    # dA = (gs·es)ᵀ·dropout(x): x tiles (BLOCK_N × BLOCK_K), reduced over the BLOCK_N tokens
    ("grad_a", "16"): {16: (64, 128, None, 4, 3), 32: (64, 128, None, 4, 3), 64: (64, 64, None, 4, 3),
                       128: (64, 64, None, 8, 3), 256: (32, 64, None, 8, 2)},
    ("grad_a", "tf32"): {16: (64, 64, None, 4, 3), 32: (64, 64, None, 4, 3), 64: (64, 64, None, 4, 3),
                         128: (32, 64, None, 8, 2), 256: (32, 32, None, 8, 2)},
    ("grad_a", "ieee"): {16: (32, 32, None, 4, 2), 32: (32, 32, None, 4, 2), 64: (32, 32, None, 4, 2),
                         128: (16, 32, None, 8, 2), 256: (16, 16, None, 8, 2)},
}
KERNELS = ("shrink", "expand", "grad_g", "grad_a")


def kernel_config(kernel: str, r: int, cdt: torch.dtype, ieee: bool | None = None) -> KernelConfig:
    """Block sizes of ``kernel`` (one of ``KERNELS``) for rank ``r`` and compute dtype ``cdt``;
    ``ieee`` defaults to torch's current fp32 matmul precision."""
    assert cdt in TL_DTYPES, f"unsupported compute dtype {cdt}"
    tier = rank_tile(r)
    ieee = fp32_precision() == "ieee" if ieee is None else ieee
    bn, bk, br, warps, stages = _TABLE[(kernel, precision_class(cdt, ieee))][tier]
    return KernelConfig(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=tier if br is None else br, num_warps=warps,
                        num_stages=stages)


def dot_dtype(cdt: torch.dtype):
    """The operand dtype handed to ``tl.dot``: ``cdt``, except bf16 under ``TRITON_INTERPRET=1``, whose
    ``tl.dot`` multiplies bf16's raw bit patterns; there the operands are rounded to bf16 and the dot
    runs on their fp32 values (the same products, summed in fp32)."""
    if cdt == torch.bfloat16 and interpreted():
        return tl.float32
    return TL_DTYPES[cdt]


def dot_precision(cdt: torch.dtype, ieee: bool | None = None) -> str:
    """``input_precision`` of the dots for compute dtype ``cdt``: for fp32 ``"ieee"`` or ``"tf32"`` as
    torch's matmul precision says (or ``ieee`` when given); 16-bit dots ignore it (always ``"tf32"``,
    so that one compile serves every precision setting)."""
    if cdt != torch.float32:
        return "tf32"
    if ieee is None:
        return fp32_precision()
    return "ieee" if ieee else "tf32"


def fp32_precision() -> str:
    """``"ieee"`` when torch's fp32 matmuls are exact (``get_float32_matmul_precision() == "highest"``,
    the default), else ``"tf32"``."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA: the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(n_blocks: int, tiles: int, sms: int) -> int:
    """How many programs share the token reduction of each of ``tiles`` output tiles, the tokens being
    ``n_blocks`` blocks: enough for ``SPLIT_PROGRAMS_PER_SM`` programs per SM, at most one per block."""
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, max(tiles, 1))
    return max(1, min(n_blocks, want))


def row_splits(n: int, block_n: int, tiles: int, sms: int) -> tuple[int, int]:
    """``(split, rows_per_split)`` for a reduction over ``n`` tokens into ``tiles`` output tiles: every
    split but the last gets the same whole number of blocks, and no split is empty."""
    n_blocks = triton.cdiv(n, block_n)
    rows_per_split = triton.cdiv(n_blocks, split_count(n_blocks, tiles, sms)) * block_n
    return triton.cdiv(n, rows_per_split), rows_per_split


# --------------------------------------------------------------------------- ahead-of-time compiles
_DIV16 = [["tt.divisibility", 16]]


def aot_job(fn, label: str, pointers: dict[str, torch.dtype], constexprs: dict, options: dict, *,
            floats: Iterable[str] = (), aligned: bool = True, unit_strides: Iterable[str] = (),
            aligned_ints: Iterable[str] = ()) -> dict:
    """One ahead-of-time compile of ``fn``, specialised as the runtime would: with ``aligned``, pointers
    and ``aligned_ints`` divisible by 16 and ``unit_strides`` equal to 1 (constexpr); otherwise nothing
    is known.  Every argument not named is an i32 scalar."""
    floats, unit_strides, aligned_ints = set(floats), set(unit_strides), set(aligned_ints)
    signature, attrs, cx = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            signature[name] = "constexpr"
        elif aligned and name in unit_strides:
            signature[name], cx[name] = "constexpr", 1
        elif name in pointers:
            signature[name] = "*" + AOT_NAMES.get(pointers[name], str(pointers[name]))
            if aligned:
                attrs[(i,)] = _DIV16
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if aligned and name in aligned_ints:
                attrs[(i,)] = _DIV16
    return dict(fn=fn, label=label, signature=signature, constexprs=cx, attrs=attrs, options=options)


# dtype plans compiled ahead of time: (base, adapter, compute, ieee).  The first three are each
# precision class's most demanding case (fp32 adapter tiles with a 16-bit dot hold the most shared
# memory) and are compiled at every rank tier; the others at one tier, to show they compile too.
FULL_PLANS = [(torch.float32, torch.float32, torch.float32, True),
              (torch.float32, torch.float32, torch.float32, False),
              (torch.bfloat16, torch.float32, torch.bfloat16, False)]
EXTRA_PLANS = [(torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
               (torch.float16, torch.float16, torch.float16, False),
               (torch.float16, torch.float32, torch.float16, False),
               (torch.bfloat16, torch.float32, torch.float32, True),
               (torch.bfloat16, torch.float32, torch.float32, False)]
EXTRA_TIER = 64


def aot_plans() -> list[tuple[tuple, int, bool]]:
    """``(plan, tier, aligned)`` for every compile: the full plans at every tier, aligned; the extra
    plans at ``EXTRA_TIER``; the full plans unaligned at the widest tier."""
    jobs = [(plan, tier, True) for plan in FULL_PLANS for tier in RANK_TIERS]
    jobs += [(plan, EXTRA_TIER, True) for plan in EXTRA_PLANS]
    jobs += [(plan, RANK_TIERS[-1], False) for plan in FULL_PLANS]
    return jobs


def plan_label(plan: tuple, tier: int, aligned: bool) -> str:
    base, adapter, cdt, ieee = plan
    prec = "" if cdt != torch.float32 else ("-ieee" if ieee else "-tf32")
    return (f"x={AOT_NAMES[base]},w={AOT_NAMES[adapter]},dot={AOT_NAMES[cdt]}{prec},r{tier}"
            + ("" if aligned else ",ragged"))
