"""ANALYSIS, not measurement: the memory traffic (HBM bytes) each path moves per layer call.

``hbm_bytes(n, d_in, d_out, r, elt)`` counts the reads and writes of activations (the N-sized
tensors) for one adapted linear layer, N tokens, ``elt`` bytes per element.  Weights (W: in×out,
A, B: r×(in+out)) are counted once per GEMM that reads them.  Every GEMM is assumed to read its
operands and write its result exactly once (ideal tiling; real GEMMs may re-read tiles from L2).

**fastadalora, fused Triton path** (``kernels/adapter_forward.py``, ``kernels/adapter_backward.py``)::

    forward
      base GEMM        read x (N·in) + W (in·out), write y (N·out)              (cuBLAS)
      shrink           read x (N·in) + A (r·in), write h and s (2·N·r)          h = x·Aᵀ, s = h·E·scale
      expand           read s (N·r) + B (out·r), read y (N·out), write y (N·out)  y += s·Bᵀ in place
    backward
      base dx GEMM     read gy (N·out) + W, write dx (N·in)                     (cuBLAS)
      grad_s           read gy (N·out) + B, read h, write dh (2·N·r)            dh = (gy·B)·E·scale, dE partials
      grad_x           read dh (N·r) + A, read+write dx (2·N·in)                dx += dh·A in place
      grad_a           read dh (N·r), read x (N·in)                             dA = dhᵀ·x
      grad_b           read gy (N·out), read h (N·r)                            dB = gyᵀ·(h·E·scale)

  → adapter-only extra per forward ≈ N·in + 2·N·out + 3·N·r; per backward ≈ 2·N·out + 3·N·in + 5·N·r.
    With dropout nothing changes: the keep-mask is regenerated from a seed inside the kernels.

**PEFT 0.21 ``SVDLinear``, eager** (``result += (dropout(x) @ (A*E).T @ B.T) * scaling / (ranknum+1e-5)``)::

    forward
      base             read x, W, write y (N·out)
      dropout          p > 0: read x, write x' (N·in) and its mask (N·in bytes); p = 0: Identity
      x'·(A⊙E)ᵀ        read x' (N·in), write t1 (N·r)
      t1·Bᵀ            read t1, write t2 (N·out)
      · scaling        read t2, write t3 (N·out)
      / (ranknum+eps)  read t3, write t4 (N·out)
      result +=        read y, read t4, write y (3·N·out)
    backward (autograd)
      div, mul         read+write N·out each (4·N·out)
      t1·Bᵀ            grad t1 = g·B (read N·out), dB = gᵀ·t1 (read N·out)
      x'·(A⊙E)ᵀ        dx' = gt1·(A⊙E) (write N·in), d(A⊙E) = gt1ᵀ·x' (read N·in)
      dropout          p > 0: read dx', mask, write (2·N·in + mask)
      dx accumulate    base dx (write N·in) + adapter dx: read both, write one (3·N·in)

  → about 7–8 passes over N×out in each direction, and 2–5 over N×in.

**PEFT LoRA** (``lora_B(lora_A(dropout(x))) * scaling``) saves the ``/ ranknum`` pass: one fewer
N·out read+write each way.
"""

from __future__ import annotations


def hbm_bytes(n: int, d_in: int, d_out: int, r: int, elt: int, dropout: bool = False) -> dict[str, dict[str, int]]:
    """``{path: {"forward": bytes, "backward": bytes}}`` for ``bare``, ``fastadalora``, ``peft_adalora``
    and ``peft_lora``: analytic estimates (see the module docstring for every term)."""
    x, y, h = n * d_in, n * d_out, n * r
    w, ab = d_in * d_out, r * (d_in + d_out)
    mask = n * d_in if dropout else 0  # one byte per element (bool)
    drop_f = 2 * x if dropout else 0
    drop_b = 2 * x if dropout else 0

    bare_f = x + w + y
    bare_b = y + w + x  # dx = gy·W (the base weight is frozen: no dW)

    # shrink, expand | grad_s, grad_x, grad_a, grad_b (see the docstring); dropout adds no traffic
    ours_f = bare_f + (x + r * d_in + 2 * h) + (h + r * d_out + 2 * y)
    ours_b = bare_b + (y + r * d_out + 2 * h) + (h + r * d_in + 2 * x) + (h + x) + (y + h)

    peft_f = bare_f + drop_f + (x + h) + (h + y) + 2 * y + 2 * y + 3 * y + ab
    peft_b = bare_b + 4 * y + 2 * y + h + x + x + drop_b + 3 * x + ab
    lora_f = peft_f - 2 * y
    lora_b = peft_b - 2 * y
    return {
        "bare": {"forward": bare_f * elt, "backward": bare_b * elt},
        "fastadalora": {"forward": ours_f * elt, "backward": ours_b * elt},
        "peft_adalora": {"forward": peft_f * elt + mask, "backward": peft_b * elt + mask},
        "peft_lora": {"forward": lora_f * elt + mask, "backward": lora_b * elt + mask},
    }


def format_hbm(n: int, d_in: int, d_out: int, r: int, elt: int) -> str:
    """A small markdown table of :func:`hbm_bytes`, headed as analysis."""
    b = hbm_bytes(n, d_in, d_out, r, elt)
    lines = [f"Analytic HBM traffic (ANALYSIS, not measured) for N={n}, {d_in}->{d_out}, r={r}, {elt} B/element:",
             "", "| path | forward MB | backward MB | adapter extra fwd+bwd MB (over bare) |", "|---|---|---|---|"]
    base = b["bare"]["forward"] + b["bare"]["backward"]
    for path, v in b.items():
        extra = v["forward"] + v["backward"] - base
        lines.append(f"| {path} | {v['forward'] / 1e6:.1f} | {v['backward'] / 1e6:.1f} | {extra / 1e6:.1f} |")
    return "\n".join(lines)
