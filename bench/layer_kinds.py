"""Benchmark cases for the layer kinds beyond Linear: Conv2d and bitsandbytes 4-bit bases, against PEFT 0.21.

Same conventions as ``bench/cases.py``: both sides on identical weights and inputs, timed interleaved
(``harness.interleaved``), medians, rows as dicts (ratio < 1: fastadalora is faster).

* ``conv2d_case``     an ``AdaLoraConv2d`` vs PEFT's ``SVDConv2d`` (and PEFT LoRA's ``Conv2d`` at r = init_r),
                      forward+backward, with and without dropout, plus the bare frozen ``nn.Conv2d``;
* ``quantized_case``  an ``AdaLoraLinear4bit`` vs PEFT's ``SVDLinear4bit`` on one quantized weight,
                      forward+backward (fp32 adapters, as ``get_peft_model`` makes them), plus the bare base.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastadalora.peft_twin import copy_layer_into_peft

from .harness import interleaved, ratio

LORA_ALPHA = 8


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _peft_fp32(peft_layer, dtype=torch.float32) -> None:
    """PEFT's adapter Parameters in ``dtype`` (what ``get_peft_model(autocast_adapter_dtype=True)`` leaves)."""
    for name in ("lora_A", "lora_E", "lora_B"):
        p = getattr(peft_layer, name)["default"]
        p.data = p.data.to(dtype)


def _full(layer, x, gy):
    """One forward+backward of ``layer`` (input gradient and adapter gradients)."""
    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(gy)
    return run


def _row(case: str, mode: str, shape: str, dtype: str, device, t: dict, note: str = "") -> dict:
    over_ours, over_peft = t["ours"] - t["bare"], t["peft_adalora"] - t["bare"]
    row = {"case": case, "mode": mode, "shape": shape, "dtype": dtype, "device": device.type, "unit": "s",
           "ours": t["ours"], "peft_adalora": t["peft_adalora"], "bare": t["bare"],
           "ratio_vs_adalora": ratio(t["ours"], t["peft_adalora"]),
           "overhead_ours": over_ours, "overhead_peft": over_peft,
           "overhead_ratio": ratio(over_ours, over_peft) if over_peft > 0 else float("nan"), "note": note}
    if "peft_lora" in t:
        row.update(peft_lora=t["peft_lora"], ratio_vs_lora=ratio(t["ours"], t["peft_lora"]),
                   overhead_lora=t["peft_lora"] - t["bare"])
    return row


# ============================================================================ Conv2d
def setup_conv2d(batch: int, channels: int, size: int, r: int, kernel: int, dropout: float, device: torch.device,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Bare ``nn.Conv2d``, ``AdaLoraConv2d``, PEFT ``SVDConv2d`` and PEFT LoRA ``Conv2d`` on one weight (train mode)."""
    import peft
    from peft.tuners.adalora.layer import SVDConv2d

    from fastadalora.layers.conv2d import AdaLoraConv2d

    torch.manual_seed(seed)
    base = nn.Conv2d(channels, channels, kernel, padding=kernel // 2).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    ours = AdaLoraConv2d(copy.deepcopy(base), r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout)
    with torch.no_grad():
        ours.lora_E.normal_()  # as after some training (E = 0 at init)
    cfg = peft.AdaLoraConfig(total_step=1000, init_r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout)
    theirs = SVDConv2d(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=LORA_ALPHA)
    _peft_fp32(theirs, ours.lora_A.dtype)
    copy_layer_into_peft(ours, theirs)
    holder = nn.Sequential()
    holder.add_module("conv", copy.deepcopy(base))
    lora = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                                                       target_modules=["conv"])).base_model.model.conv
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.02)  # non-zero B: the work of a trained adapter
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    layers = {"bare": base, "ours": ours, "peft_adalora": theirs, "peft_lora": lora}
    for m in layers.values():
        m.train()
    return {**layers, "x": x, "gy": gy}


def conv2d_case(batch: int, channels: int, size: int, r: int, device: torch.device, kernel: int = 3,
                dropout: float = 0.0, repeats: int = 10, warmup: int = 2) -> list[dict]:
    """Forward+backward of a Conv2d adapter (input grad and adapter grads) vs PEFT's ``SVDConv2d``."""
    s = setup_conv2d(batch, channels, size, r, kernel, dropout, device)
    fns = {name: _full(s[name], s["x"], s["gy"]) for name in ("bare", "ours", "peft_adalora", "peft_lora")}
    t = interleaved(fns, device, repeats=repeats, warmup=warmup)
    note = "one conv with W0+ΔW" if dropout == 0.0 else "base conv + two thin convs (r channels)"
    return [_row("conv2d", f"fwd+bwd, dropout {dropout:g}",
                 f"N={batch} {channels}->{channels} {kernel}x{kernel} {size}x{size} r={r}", "float32", device, t, note)]


# ============================================================================ bitsandbytes 4-bit
def linear4bit_from(lin: nn.Linear, quant_type: str, compute_dtype: torch.dtype, device: torch.device):
    """A bitsandbytes ``Linear4bit`` holding ``lin``'s weight, quantized on ``device``."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type=quant_type)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to(device)


def setup_quantized(n: int, d_in: int, d_out: int, r: int, quant_type: str, compute_dtype: torch.dtype,
                    dropout: float, device: torch.device, seed: int = 0) -> dict:
    """Bare ``Linear4bit``, ``AdaLoraLinear4bit`` and PEFT ``SVDLinear4bit`` on copies of one quantized weight."""
    import peft
    from peft.tuners.adalora.bnb import SVDLinear4bit

    from fastadalora.layers.quantized import AdaLoraLinear4bit

    torch.manual_seed(seed)
    base = linear4bit_from(nn.Linear(d_in, d_out), quant_type, compute_dtype, device)
    ours = AdaLoraLinear4bit(copy.deepcopy(base), r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                             adapter_dtype=torch.float32)
    with torch.no_grad():
        ours.lora_E.normal_()
    cfg = peft.AdaLoraConfig(total_step=1000, init_r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout)
    theirs = SVDLinear4bit(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=LORA_ALPHA)
    _peft_fp32(theirs)
    copy_layer_into_peft(ours, theirs)
    x = torch.randn(n, d_in, device=device, dtype=compute_dtype, requires_grad=True)
    gy = torch.randn(n, d_out, device=device, dtype=compute_dtype)
    layers = {"bare": base, "ours": ours, "peft_adalora": theirs}
    for m in layers.values():
        m.train()
    return {**layers, "x": x, "gy": gy}


def quantized_case(n: int, d_in: int, d_out: int, r: int, device: torch.device, quant_type: str = "nf4",
                   compute_dtype: torch.dtype = torch.float32, dropout: float = 0.0, repeats: int = 10,
                   warmup: int = 2) -> list[dict]:
    """Forward+backward of an AdaLoRA layer on a bitsandbytes 4-bit base vs PEFT's ``SVDLinear4bit``."""
    s = setup_quantized(n, d_in, d_out, r, quant_type, compute_dtype, dropout, device)
    fns = {name: _full(s[name], s["x"], s["gy"]) for name in ("bare", "ours", "peft_adalora")}
    t = interleaved(fns, device, repeats=repeats, warmup=warmup)
    return [_row("linear4bit", f"fwd+bwd, dropout {dropout:g}", f"N={n} {d_in}->{d_out} r={r} {quant_type}",
                 f"{_dtype_name(compute_dtype)} compute, fp32 adapters", device, t)]


# ============================================================================ plan
def plan(device: torch.device, quick: bool = False) -> list[tuple[str, dict]]:
    """``(case function name, kwargs)`` for this file's cases (``bench.cases.plan`` appends them)."""
    if quick:
        return [
            ("conv2d_case", dict(batch=2, channels=8, size=8, r=4, dropout=0.0, repeats=2, warmup=1)),
            ("conv2d_case", dict(batch=2, channels=8, size=8, r=4, dropout=0.1, repeats=2, warmup=1)),
            ("quantized_case", dict(n=64, d_in=64, d_out=64, r=4, repeats=2, warmup=1)),
        ]
    cases = [("conv2d_case", dict(batch=32, channels=64, size=32, r=12, dropout=p, repeats=10)) for p in (0.0, 0.1)]
    cases += [("quantized_case", dict(n=2048, d_in=1024, d_out=1024, r=12, quant_type="nf4", repeats=10)),
              ("quantized_case", dict(n=2048, d_in=1024, d_out=1024, r=12, quant_type="nf4",
                                      compute_dtype=torch.bfloat16, repeats=10))]
    if device.type == "cuda":
        cases += [("quantized_case", dict(n=8192, d_in=4096, d_out=4096, r=16, quant_type="nf4",
                                          compute_dtype=torch.bfloat16, dropout=0.05, repeats=30, warmup=5))]
    return cases


CASES = {"conv2d_case": conv2d_case, "quantized_case": quantized_case}
