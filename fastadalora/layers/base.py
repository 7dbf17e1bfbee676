"""``AdapterLayer``: what every AdaLoRA layer shares, whatever its base layer.

Public names follow PEFT's ``SVDLinear`` (``base_layer``, ``lora_A``, ``lora_E``, ``lora_B``,
``scaling``, ``ranknum``), so state dicts, optimizers and the allocator find tensors by the names
PEFT users already know.  The three adapter tensors are ordinary, separate ``nn.Parameter``s.
``ranknum`` is a plain float fixed at the initial rank, never a Parameter.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import peft_math


class _Triplets:
    """What an adapter's ``lora_A`` / ``scaling`` / ``ranknum`` give: its rank and its one scale factor."""

    @property
    def r(self) -> int:
        """The number of triplets held now (``init_r``, or fewer after ``resize_rank``)."""
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        """The one factor the fused paths multiply by: ``scaling / (ranknum + 1e-5)``."""
        return peft_math.adapter_scale(self.scaling, self.ranknum)


class InferenceAdapter(_Triplets, nn.Module):
    """A further, frozen adapter of a layer, loaded for inference (``AdaLoraModel.load_adapter``)."""

    def __init__(self, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float, ranknum: float,
                 init_r: int, held_positions: list[int], fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(A, requires_grad=False)
        self.lora_E = nn.Parameter(E, requires_grad=False)
        self.lora_B = nn.Parameter(B, requires_grad=False)
        self.scaling, self.ranknum, self.init_r = scaling, float(ranknum), int(init_r)
        self.held_positions = list(held_positions)

    def adapter_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_E, self.lora_B


class AdapterLayer(_Triplets, nn.Module):
    """The SVD-form adapter ``P·diag(Λ)·Q`` over a frozen base layer (subclasses supply the forward).

    Args:
        base_layer: the frozen base module (its parameters are frozen here).
        in_features, out_features: the adapter's ``lora_A`` is (r, in), ``lora_B`` is (out, r).
        r: initial rank.  ``ranknum`` stays at this value when triplets are pruned or the layer is
            resized to a saved rank, as in PEFT.
        lora_alpha: ``scaling = lora_alpha`` (not alpha/r), or r when ``lora_alpha <= 0``.
        lora_dropout: dropout probability on the adapter branch's input (train mode only).
        init_lora_weights: PEFT's init (E=0, A,B ~ N(0, 0.02)); False keeps ``randn``.
        name: the module's path in its model, used in error messages.
        adapter_dtype: dtype of the adapter Parameters (None: the base weight's floating dtype).
    """

    fan_in_fan_out = False  # the base weight is stored (in, out) (transformers Conv1D)

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, lora_alpha: float,
                 lora_dropout: float, init_lora_weights: bool, name: str | None,
                 adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{type(self).__name__}({name or ''}): r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{type(self).__name__}({name or ''}): lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # the base is frozen: weight and bias
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.init_r = r
        self.lora_alpha = lora_alpha
        self.scaling = peft_math.scaling_of(r, lora_alpha)
        self.ranknum = float(r)
        self.lora_dropout = float(lora_dropout)
        self.name = name or ""
        self.merged = False
        self.disable_adapters = False
        self.adapter_name = "default"  # the trainable adapter's name (lora_A, lora_E, lora_B)
        self.active_adapter = "default"  # the one the forward uses: this, or an InferenceAdapter's name
        # which of the init_r triplets the layer holds (all, until resize_rank drops some)
        self.held_positions: list[int] = list(range(r))

        # PEFT draws randn for A, E, B and ranknum before re-initialising; drawing the same
        # sequence keeps the RNG stream, and so the initial weights, identical to PEFT's.
        A = torch.randn(r, self.in_features)
        E = torch.randn(r, 1)
        B = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT's ranknum Parameter
        if init_lora_weights:
            peft_math.init_adapter_(A, E, B)
        weight = self.base_weight_param()
        if adapter_dtype is None:
            adapter_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Parameter(A.to(device=weight.device, dtype=adapter_dtype))
        self.lora_E = nn.Parameter(E.to(device=weight.device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(B.to(device=weight.device, dtype=adapter_dtype))

    # ------------------------------------------------------------------ the base layer
    def base_weight_param(self) -> torch.Tensor:
        """The base layer's weight Parameter, as stored."""
        return self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setattr__(self, name: str, value) -> None:
        # `layer.weight = ...` / `layer.bias = ...` go to the base layer: transformers' tie_weights() assigns
        # the input embedding to an (adapted) output layer's `.weight`
        if name in ("weight", "bias") and "base_layer" in self._modules:
            setattr(self._modules["base_layer"], name, value)
            return
        super().__setattr__(name, value)

    @property
    def where(self) -> str:
        """The layer as error messages name it."""
        return f"{type(self).__name__}({self.name})" if self.name else type(self).__name__

    # ------------------------------------------------------------------ the adapter
    def adapter_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_E, lora_B)``, read straight from the Parameter dict (the allocator's hot path)."""
        params = self._parameters
        return params["lora_A"], params["lora_E"], params["lora_B"]

    # ------------------------------------------------------------------ several adapters (inference)
    def add_inference_adapter(self, name: str, adapter: InferenceAdapter) -> None:
        """Hold a further, frozen adapter under ``name`` (``AdaLoraModel.load_adapter``)."""
        if "inference_adapters" not in self._modules:
            self.inference_adapters = nn.ModuleDict()
        self.inference_adapters[name] = adapter

    def delete_inference_adapter(self, name: str) -> None:
        if "inference_adapters" in self._modules and name in self.inference_adapters:
            del self.inference_adapters[name]
        if self.active_adapter == name:
            self.active_adapter = self.adapter_name

    def inference_adapter(self, name: str) -> InferenceAdapter | None:
        adapters = self._modules.get("inference_adapters")
        return None if adapters is None or name not in adapters else adapters[name]

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
        """``(A, E, B, scale)`` of the active adapter, or None when this layer holds no adapter of that name."""
        if self.active_adapter == self.adapter_name:
            return (*self.adapter_params(), self.scale)
        extra = self.inference_adapter(self.active_adapter)
        return None if extra is None else (*extra.adapter_params(), extra.scale)

    def _check_features(self, x: torch.Tensor) -> None:
        """x shaped (..., in_features), or an error with the expected shape."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.where}: expected input of shape (..., {self.in_features}) (in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )

    def _check_device(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """x (and the base ``weight``, when given) on the adapter's device, or an error naming all three."""
        if x.device != self.lora_A.device or (weight is not None and weight.device != self.lora_A.device):
            base = "" if weight is None else f", the base weight on {weight.device}"
            raise RuntimeError(
                f"{self.where}: input is on {x.device}{base} and the adapter (lora_A/lora_E/lora_B) is on "
                f"{self.lora_A.device}; move the input or call .to({x.device}) on the model"
            )

    def _check_dtype(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """x in the base weight's dtype, unless autocast casts both."""
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.where}: input dtype {x.dtype} does not match the base layer's dtype {weight.dtype} (the adapter is "
                f"{self.lora_A.dtype}); cast the input to {weight.dtype} or use torch.autocast"
            )

    def branch_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
        """``(A, E, B, scale)`` for this forward, after checking ``x`` (``_check_input``); None when the
        base layer alone answers: adapters disabled or merged, no such adapter here, or every triplet pruned."""
        if self.base_only():
            return None
        A, E, B, scale = self.active_factors()
        if A.shape[0] == 0:
            return None
        self._check_input(x)
        return A, E, B, scale

    def current_rank(self) -> int:
        """Triplets whose singular value is not masked to zero (reads E: a host sync)."""
        return int(torch.count_nonzero(self.lora_E.detach()))

    def resize_rank(self, keep) -> None:
        """Keep only the triplets where ``keep`` is True (PEFT's resize at load); ranknum is unchanged."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_A.device).reshape(-1)
        if keep.numel() != self.r:
            raise ValueError(f"{self.where}: keep mask has {keep.numel()} entries, layer has r={self.r}")
        flags = keep.tolist()
        with torch.no_grad():
            for pname, sliced in (("lora_A", self.lora_A[keep]), ("lora_E", self.lora_E[keep]),
                                  ("lora_B", self.lora_B[:, keep])):
                old = getattr(self, pname)
                setattr(self, pname, nn.Parameter(sliced.clone(), requires_grad=old.requires_grad))
        self.held_positions = [pos for pos, k in zip(self.held_positions, flags) if k]

    def load_adapter_(self, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor) -> None:
        """Copy saved tensors (shapes already checked) into the adapter Parameters."""
        with torch.no_grad():
            for p, t in zip(self.adapter_params(), (A, E, B)):
                p.copy_(t.reshape(p.shape))

    def lora_tensors(self, keep: list[bool] | None, rank: int) -> dict[str, torch.Tensor]:
        """This adapter as PEFT LoRA tensors (key suffix -> tensor) with ``scaling = 1``.

        ``diag(E)·scaling/(ranknum+1e-5)`` is folded into A, the triplets ``keep`` drops are left out,
        and the factors are zero-padded to ``rank``: ``ΔW = B_lora·A_lora`` is this layer's ``ΔW``.
        Subclasses whose LoRA layer stores other shapes or names (Embedding, Conv2d) override it.
        """
        A, E, B = self._kept_factors(keep, rank)
        return {"lora_A.weight": A, "lora_B.weight": B}

    def _kept_factors(self, keep: list[bool] | None, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A·diag(E)·scale, E, B)`` over the kept triplets, zero-padded to ``rank``, fresh CPU tensors."""
        A, E, B = (t.detach() for t in self.adapter_params())
        if keep is not None:
            m = torch.tensor(keep, dtype=torch.bool, device=A.device)
            A, E, B = A[m], E[m], B[:, m]
        A = A * (E.reshape(-1, 1) * self.scale)
        pad = rank - A.shape[0]
        if pad < 0:
            raise ValueError(f"{self.where}: {A.shape[0]} kept triplets do not fit rank {rank}")
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        return A.to("cpu").contiguous(), E.to("cpu"), B.to("cpu").contiguous()

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self) -> torch.Tensor:
        """``ΔW`` in the base weight's layout (subclasses)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, as a new tensor (nothing is changed)."""
        weight = self.base_weight_param()
        with torch.no_grad():
            return weight + self.get_delta_weight().to(weight.dtype)

    def check_can_merge(self) -> None:
        """Raise if this layer kind cannot merge (a 4-bit base); a model asks every layer before it merges any."""

    def merge(self, safe_merge: bool = False) -> None:
        """Fold the (trainable) adapter into the base weight for zero-latency inference."""
        self.check_can_merge()
        if self.active_adapter != self.adapter_name:
            raise ValueError(f"{self.where}: merging is for the trainable adapter {self.adapter_name!r}; the active "
                             f"one is {self.active_adapter!r} (set_adapter({self.adapter_name!r}) first)")
        if self.merged:
            warnings.warn(f"{self.where} is already merged; nothing to do")
            return
        merged = self.merged_weight()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"{self.where}: NaN/inf in the merged weight; adapter is broken")
        with torch.no_grad():
            self.base_weight_param().copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn(f"{self.where} is not merged; nothing to do")
            return
        weight = self.base_weight_param()
        with torch.no_grad():
            weight.sub_(self.get_delta_weight().to(weight.dtype))
        self.merged = False

    def base_only(self) -> bool:
        """Whether the forward is the base layer's alone: adapters disabled (unmerging first, as PEFT), merged,
        or the active adapter absent from this layer."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.disable_adapters or self.merged or (
            self.active_adapter != self.adapter_name and self.inference_adapter(self.active_adapter) is None)

    def extra_repr(self) -> str:
        # no current_rank here: it reads E (a host sync per layer, and impossible on meta)
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"init_r={self.init_r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}")
