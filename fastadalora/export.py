"""Beyond PEFT's AdaLoRA: physical rank compaction and the export to a plain LoRA adapter.

* ``compact_layers``: drop every masked triplet from its layer for good (FLOPs, memory and optimizer
  state follow the kept rank), slicing the optimizer's per-parameter state along;
* ``lora_checkpoint``: the adapter as a standard PEFT **LoRA** adapter (``LoraConfig`` +
  ``adapter_model.safetensors``) that any LoRA loader (PEFT, serving engines) reads:
  ``diag(E)·scaling/(ranknum+1e-5)`` is folded into ``lora_A`` and ``lora_alpha = r`` per module, so
  LoRA's ``ΔW = B·A·(alpha/r)`` is exactly the AdaLoRA ``ΔW``.

Both take plain data from ``AdaLoraModel`` (its layers, live masks and heads).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import peft_format


# --------------------------------------------------------------------------- compaction
def _inner_optimizer(optimizer):
    """accelerate's ``AcceleratedOptimizer`` (and similar wrappers) hold the torch optimizer in ``.optimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _sliced_state(state: dict, param: torch.Tensor, index: torch.Tensor, dim: int, where: str) -> dict:
    """One parameter's optimizer state with every tensor shaped like the parameter sliced along ``dim``."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            out[key] = value.index_select(dim, index.to(value.device)).clone()
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value  # Adam's `step`, SGD's scalars
        else:
            raise ValueError(f"compact_ranks: optimizer state {key!r} of {where} has shape {tuple(value.shape)}, "
                             f"neither the parameter's {tuple(param.shape)} nor a scalar: it cannot be sliced. "
                             "Compact before building the optimizer, or rebuild it afterwards.")
    return out


def compact_layers(layers: Mapping[str, nn.Module], masks: Mapping[str, list[bool] | None], optimizer=None) -> int:
    """Resize every layer to the triplets its mask keeps; returns how many triplets were dropped.

    With ``optimizer``, its param groups and per-parameter state move to the new, smaller Parameters
    (Adam/AdamW moments and step, SGD momentum).  Everything is planned and checked first: state
    that cannot be sliced raises before any layer or the optimizer changes.
    """
    opt = None if optimizer is None else _inner_optimizer(optimizer)
    plans = []  # (layer, keep list, per-parameter (old, index, dim))
    for path, layer in layers.items():
        keep = masks.get(path)
        if keep is None or all(keep):
            continue
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
        A, E, B = layer.adapter_params()
        plans.append((layer, keep, [(A, index, 0), (E, index, 0), (B, index, 1)]))
    new_states = {}
    if opt is not None:
        for layer, _, parts in plans:
            for (p, index, dim), name in zip(parts, ("lora_A", "lora_E", "lora_B")):
                if p in opt.state:
                    new_states[p] = _sliced_state(opt.state[p], p, index, dim, f"{layer.name}.{name}")
    # checked: apply
    dropped = 0
    for layer, keep, parts in plans:
        old = layer.adapter_params()
        layer.resize_rank(keep)
        dropped += len(keep) - sum(keep)
        if opt is not None:
            for p_old, p_new in zip(old, layer.adapter_params()):
                for group in opt.param_groups:
                    group["params"] = [p_new if q is p_old else q for q in group["params"]]
                if p_old in new_states:
                    opt.state[p_new] = new_states[p_old]
                    del opt.state[p_old]
    return dropped


# --------------------------------------------------------------------------- plain LoRA export
def lora_checkpoint(config, model: nn.Module, layers: Mapping[str, nn.Module], masks: Mapping[str, list[bool] | None],
                    heads: Mapping[str, nn.Module], uniform_rank: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, adapter_config)`` of the PEFT LoRA adapter equal to this AdaLoRA adapter.

    Per-module ranks go in ``rank_pattern``/``alpha_pattern``; with ``uniform_rank`` every module is
    zero-padded to the largest kept rank (one ``r`` for engines that need it: vLLM, SGLang, LoRAX).
    A module that kept no triplet is left out of ``target_modules``.
    """
    kept = {path: (layer.r if masks.get(path) is None else sum(masks[path])) for path, layer in layers.items()}
    live = {path: r for path, r in kept.items() if r > 0}
    if not live:
        raise ValueError("save_lora: every triplet of every layer is pruned; there is no LoRA adapter to write")
    top = max(live.values())
    tensors: dict[str, torch.Tensor] = {}
    for path, r in live.items():
        rank = top if uniform_rank else r
        for suffix, t in layers[path].lora_tensors(masks.get(path), rank).items():
            tensors[f"{peft_format.PREFIX}{path}.{suffix}"] = t
    for path, module in heads.items():
        for name, t in module.state_dict().items():
            tensors[f"{peft_format.PREFIX}{path}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    ranks = sorted(live.values())
    r = top if uniform_rank else max(set(ranks), key=ranks.count)  # the most common rank as the default
    pattern = {} if uniform_rank else {path: k for path, k in live.items() if k != r}
    base_cfg = getattr(model, "config", None)
    cfg = {
        "peft_type": "LORA",
        "task_type": peft_format._plain(config.task_type),
        "r": r,
        "lora_alpha": r,  # scaling = alpha / r = 1: the AdaLoRA scale is folded into lora_A
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(live),
        "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": any(layers[p].fan_in_fan_out for p in live),
        "bias": "none",
        "modules_to_save": sorted(heads) or None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": getattr(base_cfg, "name_or_path", None) or None,
        "revision": None,
    }
    return tensors, cfg
