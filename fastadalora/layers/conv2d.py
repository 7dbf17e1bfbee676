"""``AdaLoraConv2d``: the SVD-form adapter over a frozen ``nn.Conv2d`` (PEFT 0.21's ``SVDConv2d`` maths).

``A`` is (r, in·kh·kw), ``B`` is (out, r); ``ΔW = (B·(A⊙E)·scaling/(ranknum+1e-5))`` reshaped to the
conv weight (out, in, kh, kw).  PEFT adds a second, full convolution ``conv(dropout(x), ΔW)`` to the base
output.  Here:

* **dropout 0** (or eval), fp32/fp64 base and adapters, no autocast: **one** convolution with the merged
  weight ``W0 + ΔW`` (built by one ``addmm``): one pass over the activations in forward and in backward
  instead of PEFT's two; A, E, B get their gradients through ΔW by autograd;
* **otherwise** (dropout in training, a half-precision base, autocast): the branch as
  two thin convolutions, ``conv(dropout(x), A as r kernels)`` then a 1×1 ``conv(·, B·diag(E)·scale)``:
  the same numbers as PEFT's ``conv(dropout(x), ΔW)`` (ΔW factors exactly) at r/out of its cost.
  x is read in the adapter dtype and the branch added into the base output with one rounding, as
  PEFT's ``result += ...``; the dropout mask is torch's (``F.dropout``), so under one seed it is PEFT's.

Stride, padding (also ``padding_mode``), dilation are the base layer's.  ``groups > 1`` is refused:
PEFT's ``SVDConv2d`` builds A as (r, in·kh·kw) and fails to reshape ΔW to a grouped weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import peft_math, targeting
from .base import AdapterLayer

# dtypes in which W0 + ΔW is formed for the one-convolution path: rounding the sum costs less than the convolution's
# own accumulation error.  In bf16/fp16 a small ΔW would round away against W0, so the branch stays separate there.
_MERGE_DTYPES = (torch.float32, torch.float64)


class AdaLoraConv2d(AdapterLayer):
    """AdaLoRA over an ``nn.Conv2d`` with ``groups=1`` (see the module docstring).

    Args:
        base_layer: the frozen ``nn.Conv2d``.
        r, lora_alpha, lora_dropout, init_lora_weights, name, adapter_dtype: see ``AdapterLayer``.
    """

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: bool = True, name: str | None = None,
                 adapter_dtype: torch.dtype | None = None) -> None:
        if targeting.layer_kind(base_layer) != "conv2d":
            raise TypeError(f"AdaLoraConv2d({name or ''}): base layer must be torch.nn.Conv2d, "
                            f"got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError(
                f"AdaLoraConv2d({name or ''}): groups={base_layer.groups} is not supported (only groups=1; PEFT 0.21's "
                "SVDConv2d cannot run a grouped convolution either). Exclude this module from target_modules.")
        in_features, out_features = targeting.features(base_layer)
        super().__init__(base_layer, in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights,
                         name, adapter_dtype)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        channels = self.base_layer.in_channels
        if x.dim() not in (3, 4) or x.shape[-3] != channels:
            raise ValueError(f"{self.where}: expected input of shape (N, {channels}, H, W) or ({channels}, H, W) "
                             f"(in_channels={channels}), got {tuple(x.shape)}")
        weight = self.base_layer.weight
        self._check_device(x, weight)
        self._check_dtype(x, weight)

    def _plain_conv(self) -> bool:
        """True when the base layer computes ``nn.Conv2d``'s own forward (so a merged weight can replace W0)."""
        return type(self.base_layer).forward is nn.Conv2d.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.branch_factors(x)
        if factors is None:
            return self.base_layer(x)
        A, E, B, scale = factors
        base = self.base_layer
        r = A.shape[0]
        p = self.lora_dropout if self.training else 0.0
        autocast = torch.is_autocast_enabled(x.device.type)
        merge = A.dtype == base.weight.dtype and A.dtype in _MERGE_DTYPES and not autocast and self._plain_conv()
        if p == 0.0 and merge:
            # one convolution: W0 + B·(A⊙E·scale), reshaped to the conv weight
            w0 = base.weight
            w = torch.addmm(w0.reshape(self.out_features, -1), B, A * (E * scale)).view_as(w0)
            return base._conv_forward(x, w, base.bias)
        result = base(x)
        kh, kw = base.kernel_size
        xd = x.to(A.dtype) if not autocast else x  # PEFT casts x to the adapter dtype (autocast casts the conv)
        if p > 0.0:
            xd = F.dropout(xd, p, training=True)
        h = base._conv_forward(xd, A.reshape(r, base.in_channels, kh, kw), None)  # (N, r, H', W')
        b = (B * (E.reshape(1, -1) * scale)).reshape(self.out_features, r, 1, 1)
        result.add_(F.conv2d(h, b))  # one rounding into the base dtype, as PEFT's `result += ...`
        return result

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self) -> torch.Tensor:
        """``B·(A⊙E)·scaling/(ranknum+1e-5)`` reshaped to the conv weight (out, in, kh, kw), PEFT's layout."""
        dw = peft_math.delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum)
        return dw.reshape(self.base_layer.weight.shape)

    def lora_tensors(self, keep: list[bool] | None, rank: int) -> dict[str, torch.Tensor]:
        """PEFT LoRA's ``Conv2d`` shapes: ``lora_A`` a (r, in, kh, kw) kernel, ``lora_B`` a (out, r, 1, 1) one."""
        A, _, B = self._kept_factors(keep, rank)
        kh, kw = self.base_layer.kernel_size
        return {"lora_A.weight": A.reshape(rank, self.base_layer.in_channels, kh, kw),
                "lora_B.weight": B.reshape(self.out_features, rank, 1, 1)}

    def extra_repr(self) -> str:
        base = self.base_layer
        return (f"{super().extra_repr()}, kernel_size={base.kernel_size}, stride={base.stride}, "
                f"padding={base.padding}, dilation={base.dilation}")
