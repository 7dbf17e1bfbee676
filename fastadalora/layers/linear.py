"""``AdaLoraLinear``: a drop-in AdaLoRA wrapper for ``nn.Linear`` and transformers' ``Conv1D``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import peft_math, targeting
from ..functional import adalora_linear
from .base import AdapterLayer


class AdaLoraLinear(AdapterLayer):
    """``y = base(x) + (dropout(x)·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum+1e-5)`` (PEFT's ``SVDLinear``).

    Args:
        base_layer: the frozen ``nn.Linear`` (or ``Conv1D`` with ``fan_in_fan_out=True``).
        r, lora_alpha, lora_dropout, init_lora_weights, name, adapter_dtype: see ``AdapterLayer``.
        fan_in_fan_out: True for ``Conv1D``, whose weight is stored (in, out); None (default) reads it
            from the base layer's type (a wrong value is corrected, with a warning).
    """

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 fan_in_fan_out: bool | None = None, init_lora_weights: bool = True, name: str | None = None,
                 adapter_dtype: torch.dtype | None = None) -> None:
        if targeting.layer_kind(base_layer) not in ("linear", "conv1d"):
            raise TypeError(
                f"AdaLoraLinear({name or ''}): base layer must be torch.nn.Linear or transformers Conv1D, "
                f"got {type(base_layer).__name__}"
            )
        conv1d = targeting.is_conv1d(base_layer)
        if fan_in_fan_out is not None and fan_in_fan_out != conv1d:
            warnings.warn(f"fan_in_fan_out={fan_in_fan_out} but the base layer is {type(base_layer).__name__}; "
                          f"setting fan_in_fan_out={conv1d}")
        in_features, out_features = targeting.features(base_layer)
        super().__init__(base_layer, in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights,
                         name, adapter_dtype)
        self.fan_in_fan_out = conv1d

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        self._check_features(x)
        weight = self.base_layer.weight
        self._check_device(x, weight)
        self._check_dtype(x, weight)

    def _base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a transposed view for Conv1D."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.branch_factors(x)
        if factors is None:
            return self.base_layer(x)
        A, E, B, scale = factors
        p = self.lora_dropout if self.training else 0.0
        return adalora_linear(x, self._base_weight(), self.base_layer.bias, A, E, B, scale, None, p)

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self) -> torch.Tensor:
        """``B·(A⊙E)·scaling/(ranknum+1e-5)`` in the base weight's layout."""
        return peft_math.delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum,
                                      self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fan_in_fan_out={self.fan_in_fan_out}"
