"""``AdaLoraEmbedding``: the SVD-form adapter over a frozen ``nn.Embedding``.

PEFT 0.21's AdaLoRA has no embedding layer (it raises on an ``nn.Embedding`` target); this one follows
PEFT LoRA's ``Embedding`` for everything embedding-specific and AdaLoRA for the adapter itself, so the
allocator and the orthogonal term treat it like any other layer (``adapter_params()``)::

    y = W0[x] + (Aᵀ[x] · diag(E) · Bᵀ) · scaling/(ranknum+1e-5)        A (r, num_embeddings), B (dim, r)

* ``Aᵀ[x]`` is looked up with the base embedding's ``padding_idx``, ``max_norm``, ``norm_type`` and
  ``scale_grad_by_freq``, as PEFT LoRA's ``Embedding`` looks up ``lora_embedding_A``: ``padding_idx``
  keeps that column of A out of the gradient, and ``max_norm`` renormalises the looked-up columns of A
  in place.  A's ``padding_idx`` column is zeroed at init, so the padding vector stays the base's
  (PEFT LoRA gets that from its zero-initialised A; AdaLoRA's A starts random).
* ``sparse=True`` of the base is not passed on: the adapter gradients stay dense (the allocator reads them).
* No dropout: PEFT LoRA's ``Embedding`` builds a dropout module and never applies it.
* A base layer with a scalar ``embed_scale`` (Gemma-style scaled embeddings) scales the branch too.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import peft_math, targeting
from .base import AdapterLayer


class AdaLoraEmbedding(AdapterLayer):
    """AdaLoRA over an ``nn.Embedding`` (see the module docstring for the maths).

    Args:
        base_layer: the frozen ``nn.Embedding``.
        r, lora_alpha, init_lora_weights, name, adapter_dtype: see ``AdapterLayer``.
        lora_dropout: accepted for a uniform constructor, not applied (a warning when > 0).
    """

    def __init__(self, base_layer: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: bool = True, name: str | None = None,
                 adapter_dtype: torch.dtype | None = None) -> None:
        if targeting.layer_kind(base_layer) != "embedding":
            raise TypeError(f"AdaLoraEmbedding({name or ''}): base layer must be torch.nn.Embedding, "
                            f"got {type(base_layer).__name__}")
        num_embeddings, embedding_dim = targeting.features(base_layer)
        super().__init__(base_layer, num_embeddings, embedding_dim, r, lora_alpha, lora_dropout, init_lora_weights,
                         name, adapter_dtype)
        if lora_dropout > 0.0:
            warnings.warn(f"{self.where}: lora_dropout={lora_dropout} is not applied to an embedding adapter "
                          "(PEFT LoRA's Embedding does not apply it either)")
        pad = base_layer.padding_idx
        if pad is not None:
            with torch.no_grad():
                self.lora_A[:, pad] = 0  # keeps the padding vector the base's (no gradient reaches it)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{self.where}: expected integer indices (int64 or int32), got {x.dtype}")
        weight = self.base_layer.weight
        self._check_device(x, weight)

    def _embed_scale(self) -> torch.Tensor | float | None:
        """The base layer's scalar ``embed_scale`` (PEFT's ``_get_embed_scale``), or None."""
        es = getattr(self.base_layer, "embed_scale", None)
        if isinstance(es, (int, float)) and not isinstance(es, bool):
            return float(es)
        if isinstance(es, torch.Tensor) and es.numel() == 1:
            return es.reshape(())
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.branch_factors(x)
        if factors is None:
            return self.base_layer(x)
        A, E, B, scale = factors
        result = self.base_layer(x)
        base = self.base_layer
        # Aᵀ[x]: (..., r), looked up as the base layer looks up its own rows
        h = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)
        e = E.reshape(-1) * scale
        es = self._embed_scale()
        if es is not None:
            e = e * (es.to(e.dtype) if isinstance(es, torch.Tensor) else es)
        s = (h * e).reshape(-1, A.shape[0])  # N×r: diag(E)·scale folded in
        out = result.reshape(-1, self.out_features)
        autocast = torch.is_autocast_enabled(x.device.type)
        if result.requires_grad or out.data_ptr() != result.data_ptr():  # not safe to write into: add a copy
            branch = torch.mm(s, B.t())
            return (out + branch).to(result.dtype).reshape(result.shape)
        if out.dtype == s.dtype and not autocast:
            out.addmm_(s, B.t())  # y += s·Bᵀ, fused, no N×dim temporary
        else:
            out.add_(torch.mm(s, B.t()))  # wider (or autocast) branch, added with one rounding
        return result

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self) -> torch.Tensor:
        """``(B·(A⊙E))ᵀ·scaling/(ranknum+1e-5)`` in the embedding's (num_embeddings, embedding_dim) layout."""
        return peft_math.delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum,
                                      fan_in_fan_out=True)

    def lora_tensors(self, keep: list[bool] | None, rank: int) -> dict[str, torch.Tensor]:
        """PEFT LoRA's ``Embedding`` names and shapes: ``lora_embedding_A`` (r, num), ``lora_embedding_B`` (dim, r)."""
        A, _, B = self._kept_factors(keep, rank)
        return {"lora_embedding_A": A, "lora_embedding_B": B}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding_idx={self.base_layer.padding_idx}"
