"""fastadalora: AdaLoRA with fused Triton kernels, a fast CPU path and PEFT 0.21 semantics.

Switching from PEFT::

    model = fastadalora.get_adalora_model(model, fastadalora.AdaLoraConfig(total_step=1000, ...))
    ...
    optimizer.step(); model.update_and_allocate(step); optimizer.zero_grad()
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first use, so `import fastadalora`
# stays cheap and never imports Triton on a CPU-only install).
_EXPORTS = {
    "AdaLoraLinear": "layers",
    "adalora_linear": "functional",
    "use_backend": "backends",
    "resolve_backend": "backends",
    "AdaLoraConfig": "config",
    "AdaLoraModel": "model",
    "get_adalora_model": "model",
    "get_peft_model": "model",
    "get_peft_model_state_dict": "model",
    "set_peft_model_state_dict": "model",
    "RankAllocator": "allocator",
    "orth_reg_loss": "orth",
    "AdaLoraCallback": "integrations",
    "RankMismatchError": "distributed",
    "create_loraplus_optimizer": "optim",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastadalora' has no attribute {name!r}")
