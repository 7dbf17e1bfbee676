"""AdaLoRA over bitsandbytes' quantized linears: ``AdaLoraLinear4bit`` (nf4/fp4) and ``AdaLoraLinear8bitLt``.

The base output is bitsandbytes' own (its 4-bit / int8 matmul); the adapter branch is ours, fused
(``functional.adalora_linear`` with ``weight=None``: one N×r intermediate saved, the dropout mask
regenerated from a seed, ``diag(E)·scale`` folded into the intermediate)::

    y = base(x) + (dropout(x)·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum+1e-5)

The branch reads x in its own dtype and computes in the adapter dtype (fp32 adapters on a bf16/fp16
compute dtype, as PEFT's ``SVDLinear4bit``/``SVDLinear8bitLt`` under ``get_peft_model``) and is added
to the base output out of place (bitsandbytes' outputs may be views its backward forbids writing
into); the sum has the base output's dtype.  PEFT's 8-bit layer returns fp32 for a half-precision
input; ours keeps the input's dtype.

Merging (PEFT's AdaLoRA bnb layers cannot merge at all):

* 8-bit: dequantize, add ΔW, quantize again, as PEFT LoRA's ``Linear8bitLt`` does; the merged layer
  carries the int8 rounding of ``W0 + ΔW`` (half a step of the row's absmax/127 per weight; a warning
  says so).  The original int8 weight is kept while merged, so ``unmerge`` restores it exactly.
* 4-bit: refused.  Re-quantizing ``W0 + ΔW`` to 4 bits moves the outputs by more than the adapter
  itself adds (``tests/test_quantized.py`` measures it), so a merged 4-bit model would be further from
  the adapted one than the plain base is.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import peft_math, targeting
from ..functional import adalora_linear
from .base import AdapterLayer


class _QuantizedLinear(AdapterLayer):
    """What the 4-bit and 8-bit layers share: construction, the forward, the delta weight."""

    kind = ""  # targeting.layer_kind of the base
    base_name = ""  # in error messages

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: bool = True, name: str | None = None,
                 adapter_dtype: torch.dtype | None = None) -> None:
        if targeting.layer_kind(base_layer) != self.kind:
            raise TypeError(f"{type(self).__name__}({name or ''}): base layer must be {self.base_name}, "
                            f"got {type(base_layer).__name__}")
        in_features, out_features = targeting.features(base_layer)
        compute = getattr(base_layer, "compute_dtype", None)  # Linear4bit: the dtype its matmul runs in
        if adapter_dtype is None and isinstance(compute, torch.dtype) and compute.is_floating_point:
            adapter_dtype = compute  # as PEFT's layer; get_adalora_model passes fp32 for a half-precision one
        super().__init__(base_layer, in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights,
                         name, adapter_dtype)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        self._check_features(x)
        self._check_device(x)
        if not x.dtype.is_floating_point:
            raise TypeError(f"{self.where}: expected a floating-point input, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.branch_factors(x)
        if factors is None:
            return self.base_layer(x)
        A, E, B, scale = factors
        result = self.base_layer(x)
        p = self.lora_dropout if self.training else 0.0
        branch = adalora_linear(x, None, None, A, E, B, scale, None, p)
        return (result + branch).to(result.dtype)

    # ------------------------------------------------------------------ weights
    def get_delta_weight(self) -> torch.Tensor:
        """``B·(A⊙E)·scaling/(ranknum+1e-5)``, (out, in)."""
        return peft_math.delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight dequantized, (out, in) (subclasses)."""
        raise NotImplementedError


class AdaLoraLinear4bit(_QuantizedLinear):
    """AdaLoRA over a bitsandbytes ``Linear4bit`` (nf4 or fp4); PEFT's ``SVDLinear4bit``.

    Args: see ``AdapterLayer``; the adapter dtype defaults to the base's ``compute_dtype`` (fp32 when unset).
    """

    kind = "linear4bit"
    base_name = "bitsandbytes Linear4bit"

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        self._unpack_cpu_format()
        weight = self.base_layer.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def _unpack_cpu_format(self) -> None:
        """bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs at its first no-grad eval forward; undo that
        (as its own ``state_dict`` does) so that the standard dequantization reads it."""
        weight = self.base_layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)

    def check_can_merge(self) -> None:
        """Refused: re-quantizing ``W0 + ΔW`` to 4 bits moves the outputs by more than the adapter adds."""
        raise NotImplementedError(
            f"{self.where}: merging into a 4-bit base is not supported (PEFT's AdaLoRA cannot either): re-quantizing "
            "W0 + ΔW to 4 bits moves the outputs by more than the adapter itself adds (measured: 1.3x its "
            "contribution when |ΔW| is 5% of |W0|, nf4 and fp4). To merge, load the base model in 16/32-bit, load "
            "the adapter onto it with AdaLoraModel.from_pretrained and call merge_and_unload() there.")

    def merged_weight(self) -> torch.Tensor:
        """Refused (``check_can_merge``)."""
        self.check_can_merge()

    def merge(self, safe_merge: bool = False) -> None:
        """Refused (``check_can_merge``)."""
        self.check_can_merge()

    def unmerge(self) -> None:
        warnings.warn(f"{self.where} is not merged; nothing to do")

    def extra_repr(self) -> str:
        quant_type = getattr(self.base_layer.weight, "quant_type", None)
        return f"{super().extra_repr()}, quant_type={quant_type}, compute_dtype={self.base_layer.compute_dtype}"


class AdaLoraLinear8bitLt(_QuantizedLinear):
    """AdaLoRA over a bitsandbytes ``Linear8bitLt`` (int8 weights); PEFT's ``SVDLinear8bitLt``.

    Args: see ``AdapterLayer``; the adapter dtype defaults to fp32 (the base stores int8).
    """

    kind = "linear8bit"
    base_name = "bitsandbytes Linear8bitLt"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._unmerged: tuple = ()  # while merged: what unmerge puts back (a tuple: not a registered Parameter)

    def _scb(self) -> torch.Tensor:
        """The per-row scales: on the weight before the first forward, on the layer state after it."""
        state, weight = self.base_layer.state, self.base_layer.weight
        scb = state.SCB if state.SCB is not None else getattr(weight, "SCB", None)
        if scb is None:
            raise RuntimeError(f"{self.where}: the Linear8bitLt weight is not quantized (move the base layer to its "
                               "device first)")
        return scb

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.base_layer.weight
        if weight.has_fp16_weights:
            return weight.data.clone()
        return bnb.functional.int8_vectorwise_dequant(weight.data, self._scb().to(weight.device))

    def merged_weight(self) -> torch.Tensor:
        """The dequantized base weight plus ΔW, (out, in) fp32 (nothing is changed)."""
        with torch.no_grad():
            w = self.dequantized_weight().float()
            return w + self.get_delta_weight().to(device=w.device, dtype=w.dtype)

    def merge(self, safe_merge: bool = False) -> None:
        """Fold ΔW into the int8 base weight: dequantize, add, quantize again (PEFT LoRA's 8-bit merge).

        The sum is rounded to the int8 grid (a warning says so); ``unmerge`` restores the original weight exactly.
        """
        import bitsandbytes as bnb

        if self.merged:
            warnings.warn(f"{self.where} is already merged; nothing to do")
            return
        self.check_can_merge()
        if self.active_adapter != self.adapter_name:
            raise ValueError(f"{self.where}: merging is for the trainable adapter {self.adapter_name!r}; the active "
                             f"one is {self.active_adapter!r} (set_adapter({self.adapter_name!r}) first)")
        base = self.base_layer
        with torch.no_grad():
            merged = self.merged_weight()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"{self.where}: NaN/inf in the merged weight; adapter is broken")
            old = base.weight
            self._unmerged = (old, base.state.CB, base.state.SCB)
            new = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
            base.weight = new.to(old.device)  # quantizes
            base.state.reset_grads()  # CB/SCB: the next forward takes the new weight's (bitsandbytes' init_8bit_state)
        warnings.warn(f"{self.where}: merging into an int8 base re-quantizes W0 + ΔW; the merged outputs differ from "
                      "the adapted ones by that rounding")
        self.merged = True

    def unmerge(self) -> None:
        """Put the original int8 weight back (exactly: it was kept while merged)."""
        if not self.merged:
            warnings.warn(f"{self.where} is not merged; nothing to do")
            return
        weight, cb, scb = self._unmerged
        self.base_layer.weight = weight
        self.base_layer.state.CB, self.base_layer.state.SCB = cb, scb
        self._unmerged = ()
        self.merged = False

    def extra_repr(self) -> str:
        state = self.base_layer.state
        return f"{super().extra_repr()}, threshold={state.threshold}, has_fp16_weights={state.has_fp16_weights}"
