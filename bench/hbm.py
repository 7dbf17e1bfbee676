"""ANALYSIS, not measurement: the memory traffic (HBM bytes) each path moves per layer call.

``hbm_bytes(n, d_in, d_out, r, elt, adapter_elt=None)`` counts the reads and writes of one adapted
linear layer for N tokens: activations (x, y, g, dx) at ``elt`` bytes per element (the base dtype), the
adapter's parameters at ``adapter_elt`` (default ``elt``; PEFT makes them fp32 on a 16-bit base), and
fastadalora's intermediates (h, gs and every split partial) at fp32, 4 bytes.  Weights are counted once
per kernel that reads them.  Every kernel is assumed to read its operands and write its result once
(ideal tiling: re-reads of a tile from L2 are not counted, e.g. h by each out tile of grad_g).

**fastadalora, fused Triton path** (``kernels/adapter_forward.py``, ``kernels/adapter_backward.py``)::

    forward
      base GEMM        read x, W, write y                                    (cuBLAS)
      shrink           read x + A, write h (N·r fp32)                        h = dropout(x)·Aᵀ
      expand           read h + B + E, read and write y                      y += (h·es)·Bᵀ in place
    backward
      base dx GEMM     read g + W, write dx                                  (cuBLAS)
      grad_g, r ≤ 64   read g + B + h once, write T gs partials (T·N·r, one per out tile),
                       S P partials (S·out·r) and S·T dE partials            one pass over g
        gs reduce      T > 1: read T·N·r, write gs (N·r)
      grad_g, r > 64   gs = g·B by the shrink kernel (read g + B, write gs), then the P pass
                       (read g again, h, write the partials): two passes are cheaper than T·N·r partials
      grad_x           read gs + A + E, read and write dx                     dx += (gs·es)·A ⊙ keep
      grad_a           read gs + E, read x, write S_a dA partials (S_a·r·in)   dA = (gs·es)ᵀ·dropout(x)
      final reduce     read the dA, P and dE partials, write dA, dB, dE

  The split counts T = ⌈out/BLOCK_K⌉ and S, S_a (token splits for two programs per SM, 132 SMs) come
  from ``fastadalora.kernels._config``, the rules the launchers use.  With dropout nothing changes:
  the keep mask is regenerated from a seed inside the kernels.

**PEFT 0.21 ``SVDLinear``, eager** (``x = x.to(A.dtype)``; ``result += (dropout(x) @ (A*E).T @ B.T) *
scaling / (ranknum+1e-5)``; activations of the branch at ``adapter_elt``)::

    forward
      base             read x, W, write y
      cast             adapter dtype ≠ base: read x, write x' (N·in)
      dropout          p > 0: read x', write x'' (N·in) and its mask (N·in bytes); p = 0: Identity
      x''·(A⊙E)ᵀ       read x'', write t1 (N·r)
      t1·Bᵀ            read t1, write t2 (N·out)
      · scaling        read t2, write t3 (N·out)
      / (ranknum+eps)  read t3, write t4 (N·out)
      result +=        read y, read t4, write y
    backward (autograd)
      div, mul         read and write N·out each
      t1·Bᵀ            grad t1 = g·B (read N·out), dB = gᵀ·t1 (read N·out)
      x''·(A⊙E)ᵀ       dx'' = gt1·(A⊙E) (write N·in), d(A⊙E) = gt1ᵀ·x'' (read N·in)
      dropout          p > 0: read dx'', mask, write N·in
      cast             adapter dtype ≠ base: read N·in, write N·in (base dtype)
      dx accumulate    base dx (write N·in) + adapter dx: read both, write one

**PEFT LoRA** (``lora_B(lora_A(dropout(x))) * scaling``) saves the ``/ ranknum`` pass: one fewer
N·out read+write each way.
"""

from __future__ import annotations

import math

FP32 = 4
SMS = 132  # the design point (H100 SXM / H200)


def fastadalora_splits(n: int, d_in: int, d_out: int, r: int, elt: int, adapter_elt: int) -> dict[str, int]:
    """``T`` (grad_g's out tiles), ``S`` (its token splits), ``S_a`` (grad_a's) and whether grad_g reads g
    once, for a layer on the design GPU, as the launchers pick them."""
    import torch

    from fastadalora.kernels import _config
    from fastadalora.kernels.adapter_backward import ONE_PASS_MAX_TIER

    cdt = {2: torch.bfloat16, 4: torch.float32}[adapter_elt]
    g_cfg = _config.kernel_config("grad_g", r, cdt, ieee=True)
    a_cfg = _config.kernel_config("grad_a", r, cdt, ieee=True)
    T = math.ceil(d_out / g_cfg.BLOCK_K)
    S = _config.split_count(math.ceil(n / g_cfg.BLOCK_N), T, SMS)
    k_tiles = math.ceil(d_in / a_cfg.BLOCK_K)
    S_a = _config.split_count(math.ceil(n / a_cfg.BLOCK_N), k_tiles, SMS)
    return {"T": T, "S": S, "S_a": S_a, "one_pass": int(_config.rank_tile(r) <= ONE_PASS_MAX_TIER)}


def _fastadalora(n, d_in, d_out, r, elt, a_elt) -> tuple[dict[str, int], dict[str, int]]:
    """Forward and backward bytes of the Triton path, term by term."""
    x, y, w = n * d_in * elt, n * d_out * elt, d_in * d_out * elt
    A, B, E = r * d_in * a_elt, r * d_out * a_elt, r * a_elt
    h = n * r * FP32  # h and gs, fp32
    sp = fastadalora_splits(n, d_in, d_out, r, elt, a_elt)
    T, S, S_a = sp["T"], sp["S"], sp["S_a"]
    fwd = {"base GEMM": x + w + y, "shrink": x + A + h, "expand": h + B + E + 2 * y}
    bwd = {"base dx GEMM": y + w + x}
    p_parts, de_parts = S * d_out * r * FP32, S * T * r * FP32
    if sp["one_pass"]:
        bwd["grad_g (one pass)"] = y + B + h + T * h + p_parts + de_parts  # g, B, h; gs, P, dE partials
        if T > 1:
            bwd["gs reduce"] = T * h + h
    else:
        bwd["gs (shrink kernel)"] = y + B + h
        bwd["grad_g (P pass)"] = y + B + h + p_parts + de_parts
    bwd["grad_x"] = h + A + E + 2 * x
    bwd["grad_a"] = h + E + x + S_a * r * d_in * FP32
    bwd["final reduce"] = S_a * r * d_in * FP32 + p_parts + de_parts + A + B + E
    return fwd, bwd


def hbm_bytes(n: int, d_in: int, d_out: int, r: int, elt: int, dropout: bool = False,
              adapter_elt: int | None = None) -> dict[str, dict[str, int]]:
    """``{path: {"forward": bytes, "backward": bytes}}`` for ``bare``, ``fastadalora``, ``peft_adalora``
    and ``peft_lora``: analytic estimates (see the module docstring for every term)."""
    a_elt = elt if adapter_elt is None else adapter_elt
    x, y, w = n * d_in * elt, n * d_out * elt, d_in * d_out * elt
    ab = r * (d_in + d_out) * a_elt
    xa, ya, ha = n * d_in * a_elt, n * d_out * a_elt, n * r * a_elt  # PEFT's branch activations
    mask = n * d_in if dropout else 0  # one byte per element (bool)
    cast_f = x + xa if a_elt != elt else 0
    cast_b = xa + x if a_elt != elt else 0
    drop_f = 2 * xa if dropout else 0
    drop_b = 2 * xa if dropout else 0

    bare_f = x + w + y
    bare_b = y + w + x  # dx = g·W (the base weight is frozen: no dW)
    ours_f, ours_b = (sum(terms.values()) for terms in _fastadalora(n, d_in, d_out, r, elt, a_elt))

    peft_f = bare_f + cast_f + drop_f + (xa + ha) + (ha + ya) + 2 * ya + 2 * ya + (y + ya + y) + ab
    peft_b = bare_b + 4 * ya + 2 * ya + ha + xa + xa + drop_b + cast_b + 3 * x + ab
    lora_f = peft_f - 2 * ya
    lora_b = peft_b - 2 * ya
    return {
        "bare": {"forward": bare_f, "backward": bare_b},
        "fastadalora": {"forward": ours_f, "backward": ours_b},
        "peft_adalora": {"forward": peft_f + mask, "backward": peft_b + mask},
        "peft_lora": {"forward": lora_f + mask, "backward": lora_b + mask},
    }


def fastadalora_terms(n: int, d_in: int, d_out: int, r: int, elt: int,
                      adapter_elt: int | None = None) -> dict[str, dict[str, int]]:
    """The Triton path's bytes per kernel: ``{"forward": {kernel: bytes}, "backward": {...}}``."""
    fwd, bwd = _fastadalora(n, d_in, d_out, r, elt, elt if adapter_elt is None else adapter_elt)
    return {"forward": fwd, "backward": bwd}


def format_hbm(n: int, d_in: int, d_out: int, r: int, elt: int, adapter_elt: int | None = None) -> str:
    """A small markdown table of :func:`hbm_bytes`, headed as analysis."""
    b = hbm_bytes(n, d_in, d_out, r, elt, adapter_elt=adapter_elt)
    a = elt if adapter_elt is None else adapter_elt
    lines = [f"Analytic HBM traffic (ANALYSIS, not measured) for N={n}, {d_in}->{d_out}, r={r}, {elt} B/element "
             f"(adapter {a} B, intermediates fp32):",
             "", "| path | forward MB | backward MB | adapter extra fwd+bwd MB (over bare) |", "|---|---|---|---|"]
    base = b["bare"]["forward"] + b["bare"]["backward"]
    for path, v in b.items():
        extra = v["forward"] + v["backward"] - base
        lines.append(f"| {path} | {v['forward'] / 1e6:.1f} | {v['backward'] / 1e6:.1f} | {extra / 1e6:.1f} |")
    return "\n".join(lines)
