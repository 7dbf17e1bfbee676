"""LoRA+ (Hayou et al., 2024): a larger learning rate for B than for A.

Grouping follows PEFT's ``create_loraplus_optimizer`` so a user's runs carry over: ``lora_B``
and 1-D trainable parameters get ``lr · loraplus_lr_ratio`` (1-D ones and LayerNorm weights
without weight decay), everything else (``lora_A``, ``lora_E``, saved heads) gets ``lr``.
Unlike PEFT, a ``weight_decay`` keyword is honoured rather than silently dropped.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _NORM_TYPES) or "bias" in p_name or "norm" in type(module).__name__.lower():
                names.add(full)
    return names


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> Optimizer:
    """Build ``optimizer_cls`` over the trainable parameters of ``model`` in LoRA+ groups.

    ``loraplus_weight_decay`` (PEFT's name) or ``weight_decay`` sets the decay of the decayed
    groups; ``lr`` is A's learning rate and ``lr · loraplus_lr_ratio`` is B's.
    """
    if loraplus_lr_ratio < 1:
        raise ValueError(f"loraplus_lr_ratio should be >= 1 (ηB/ηA), got {loraplus_lr_ratio}")
    weight_decay = kwargs.pop("loraplus_weight_decay", kwargs.pop("weight_decay", 0.0))
    kwargs.pop("weight_decay", None)
    no_decay = _no_decay_names(model)
    group_a, group_b, group_b_no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            (group_b_no_decay if name in no_decay else group_b).append(param)
        else:
            group_a.append(param)
    groups = [
        {"params": group_a, "weight_decay": weight_decay, "lr": lr},
        {"params": group_b, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls([g for g in groups if g["params"]], lr=lr, **kwargs)
