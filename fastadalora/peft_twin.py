"""Pair a fastadalora model with PEFT 0.21's AdaLoRA on the same weights (demo, bench and tests).

PEFT is imported only when these functions run (it is a test/bench dependency, not a runtime one).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

LORA = ("lora_A", "lora_E", "lora_B")


def peft_config(config, **overrides):
    """A ``peft.AdaLoraConfig`` with the same fields as our ``config`` (``overrides`` win)."""
    import peft

    fields = {f.name for f in dataclasses.fields(peft.AdaLoraConfig)}
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name in fields and f.name not in ("peft_type", "rank_pattern")}
    kwargs.update(overrides)
    return peft.AdaLoraConfig(**kwargs)


def copy_layer_into_peft(layer: nn.Module, peft_layer: nn.Module, adapter_name: str = "default") -> None:
    """Copy our layer's A, E, B into PEFT's ``SVDLinear`` and freeze its ``ranknum`` (PEFT's can train)."""
    with torch.no_grad():
        for name, ours in zip(LORA, layer.adapter_params()):
            getattr(peft_layer, name)[adapter_name].copy_(ours)
    peft_layer.ranknum[adapter_name].requires_grad_(False)


def copy_adapters_into_peft(ours, peft_model, adapter_name: str = "default") -> None:
    """``copy_layer_into_peft`` for every adapter of an ``AdaLoraModel`` (same module paths)."""
    inner = peft_model.base_model.model
    for path, layer in ours.adapter_layers().items():
        copy_layer_into_peft(layer, inner.get_submodule(path), adapter_name)


def peft_twin(base: nn.Module, ours, **config_overrides):
    """PEFT's AdaLoRA on ``base`` (a copy of the model ``ours`` was built on) with ``ours``' adapter weights.

    ``config_overrides`` go to ``peft_config`` (e.g. ``task_type="SEQ_CLS"``: PEFT adds the
    orthogonal term only with a task type).
    """
    import peft

    twin = peft.get_peft_model(base, peft_config(ours.adalora_config, **config_overrides))
    copy_adapters_into_peft(ours, twin)
    return twin


def peft_masks(peft_model, paths, adapter_name: str = "default") -> dict[str, list[bool]]:
    """``{path: [E != 0]}`` of PEFT's adapters at ``paths`` (the live rank pattern, read from E)."""
    inner = peft_model.base_model.model
    return {p: (inner.get_submodule(p).lora_E[adapter_name].detach().reshape(-1) != 0).tolist() for p in paths}
