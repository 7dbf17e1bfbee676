"""AdaLoRA layers: ``AdapterLayer`` (what they share) and one class per base layer type."""

from .base import AdapterLayer
from .linear import AdaLoraLinear

__all__ = ["AdapterLayer", "AdaLoraLinear"]
