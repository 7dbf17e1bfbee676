"""AdaLoRA layers: ``AdapterLayer`` (what they share) and one class per kind of base layer."""

from __future__ import annotations

import importlib

from .base import AdapterLayer, InferenceAdapter
from .linear import AdaLoraLinear

# kind of base layer (``targeting.layer_kind``) -> "module:class" of its adapter layer, imported when needed
_CLASSES = {
    "linear": "linear:AdaLoraLinear",
    "conv1d": "linear:AdaLoraLinear",
    "embedding": "embedding:AdaLoraEmbedding",
    "conv2d": "conv2d:AdaLoraConv2d",
    "linear4bit": "quantized:AdaLoraLinear4bit",
    "linear8bit": "quantized:AdaLoraLinear8bitLt",
}


def adapter_class(kind: str) -> type[AdapterLayer]:
    """The ``AdapterLayer`` subclass for a base layer of ``kind``."""
    module, _, name = _CLASSES[kind].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["AdapterLayer", "AdaLoraLinear", "InferenceAdapter", "adapter_class"]
