"""``AdaLoraLinear``: a drop-in AdaLoRA wrapper for ``nn.Linear`` and transformers' ``Conv1D``.

Public names follow PEFT's ``SVDLinear`` (``base_layer``, ``lora_A``, ``lora_E``, ``lora_B``,
``scaling``, ``ranknum``), so state dicts, optimizers and the allocator find tensors by the
names PEFT users already know.  ``ranknum`` is a plain float fixed at the initial rank, never a
Parameter (PEFT's can end up trainable).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import reference
from .functional import adalora_linear


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


class AdaLoraLinear(nn.Module):
    """``y = base(x) + (dropout(x)·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum+1e-5)``.

    Args:
        base_layer: the frozen ``nn.Linear`` (or ``Conv1D`` with ``fan_in_fan_out=True``).
        r: initial rank.  ``ranknum`` stays at this value when triplets are pruned or the
            layer is resized to a saved rank, as in PEFT.
        lora_alpha: ``scaling = lora_alpha`` (not alpha/r), or r when ``lora_alpha <= 0``.
        lora_dropout: dropout probability on the adapter branch's input (train mode only).
        fan_in_fan_out: True for ``Conv1D``, whose weight is stored (in, out).
        init_lora_weights: PEFT's init (E=0, A,B ~ N(0, 0.02)); False keeps ``randn``.
        name: the module's path in its model, used in error messages.

    ``_grad_sink`` (None unless the allocator's ``FlatAdapterStore`` set it) tells the backward
    where to write the adapter's gradients; see ``fastadalora.flat_store``.
    """

    _grad_sink = None

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 fan_in_fan_out: bool = False, init_lora_weights: bool = True, name: str | None = None) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
            if fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True but the base layer is nn.Linear; setting fan_in_fan_out=False")
                fan_in_fan_out = False
        elif _is_conv1d(base_layer):
            in_features, out_features = base_layer.weight.shape
            if not fan_in_fan_out:
                warnings.warn("fan_in_fan_out=False but the base layer is Conv1D; setting fan_in_fan_out=True")
                fan_in_fan_out = True
        else:
            raise TypeError(
                f"AdaLoraLinear({name or ''}): base layer must be torch.nn.Linear or transformers Conv1D, "
                f"got {type(base_layer).__name__}"
            )
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"AdaLoraLinear({name or ''}): r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"AdaLoraLinear({name or ''}): lora_dropout must be in [0, 1), got {lora_dropout}")

        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # the base is frozen: weight and bias
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.init_r = r
        self.lora_alpha = lora_alpha
        self.scaling = reference.scaling_of(r, lora_alpha)
        self.ranknum = float(r)
        self.lora_dropout = float(lora_dropout)
        self.name = name or ""
        self.merged = False
        self.disable_adapters = False

        # PEFT draws randn for A, E, B and ranknum before re-initialising; drawing the same
        # sequence keeps the RNG stream, and so the initial weights, identical to PEFT's.
        A = torch.randn(r, self.in_features)
        E = torch.randn(r, 1)
        B = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT's ranknum Parameter
        if init_lora_weights:
            reference.init_adapter_(A, E, B)
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        self.lora_A = nn.Parameter(A.to(device=weight.device, dtype=dtype))
        self.lora_E = nn.Parameter(E.to(device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(B.to(device=weight.device, dtype=dtype))

    # ------------------------------------------------------------------ properties
    @property
    def r(self) -> int:
        """The number of triplets held now (``init_r``, or fewer after ``resize_rank``)."""
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        """The one factor the fused paths multiply by: ``scaling / (ranknum + 1e-5)``."""
        return self.scaling / (self.ranknum + reference.RANKNUM_EPS)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def current_rank(self) -> int:
        """Triplets whose singular value is not masked to zero (reads E: a host sync)."""
        return int(torch.count_nonzero(self.lora_E.detach()))

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        where = f"AdaLoraLinear({self.name})" if self.name else "AdaLoraLinear"
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{where}: expected input of shape (..., {self.in_features}) (in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        if x.device != self.lora_A.device:
            raise RuntimeError(
                f"{where}: input is on {x.device} but the adapter (lora_A/lora_E/lora_B) is on "
                f"{self.lora_A.device}; move the input or call .to({x.device}) on the model"
            )
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{where}: input dtype {x.dtype} does not match the adapter dtype {self.lora_A.dtype}; "
                f"cast the input to {self.lora_A.dtype} or use torch.autocast"
            )
        if self.base_layer.weight.dtype != self.lora_A.dtype or self.base_layer.weight.device != self.lora_A.device:
            raise TypeError(
                f"{where}: base weight is {self.base_layer.weight.dtype} on {self.base_layer.weight.device} but the "
                f"adapter is {self.lora_A.dtype} on {self.lora_A.device}; move the whole AdaLoraLinear with .to()"
            )

    def _base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a transposed view for Conv1D."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x)
        self._check_input(x)
        p = self.lora_dropout if self.training else 0.0
        sink = self._grad_sink
        if sink is not None and torch.compiler.is_compiling():
            sink = None  # compiled graphs trace the plain path
        return adalora_linear(x, self._base_weight(), self.base_layer.bias, self.lora_A, self.lora_E, self.lora_B,
                              self.scale, None, p, grad_sink=sink)

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self) -> torch.Tensor:
        """``B·(A⊙E)·scaling/(ranknum+1e-5)`` in the base weight's layout."""
        return reference.delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum,
                                      self.fan_in_fan_out)

    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weight for zero-latency inference."""
        if self.merged:
            warnings.warn(f"AdaLoraLinear({self.name}) is already merged; nothing to do")
            return
        with torch.no_grad():
            merged = self.base_layer.weight + self.get_delta_weight()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"AdaLoraLinear({self.name}): NaN/inf in the merged weight; adapter is broken")
            self.base_layer.weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn(f"AdaLoraLinear({self.name}) is not merged; nothing to do")
            return
        with torch.no_grad():
            self.base_layer.weight.sub_(self.get_delta_weight())
        self.merged = False

    # ------------------------------------------------------------------ resize
    def resize_rank(self, keep) -> None:
        """Keep only the triplets where ``keep`` is True (PEFT's resize at load); ranknum is unchanged."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_A.device).reshape(-1)
        if keep.numel() != self.r:
            raise ValueError(f"AdaLoraLinear({self.name}): keep mask has {keep.numel()} entries, layer has r={self.r}")
        with torch.no_grad():
            for pname, sliced in (("lora_A", self.lora_A[keep]), ("lora_E", self.lora_E[keep]),
                                  ("lora_B", self.lora_B[:, keep])):
                old = getattr(self, pname)
                setattr(self, pname, nn.Parameter(sliced.clone(), requires_grad=old.requires_grad))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"current_rank={self.current_rank()}, init_r={self.init_r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, fan_in_fan_out={self.fan_in_fan_out}")
