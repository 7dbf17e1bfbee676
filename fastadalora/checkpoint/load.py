"""Loading, step one: read a checkpoint and validate it against a base model without touching it.

``plan_load`` returns a ``CheckpointPlan``: the config to build the adapters with, and per layer
the triplets to keep and the tensors to copy in.  ``AdaLoraModel.from_pretrained`` applies it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .. import targeting
from .files import read_checkpoint
from .peft_format import (CONFIG_NAME, LORA, PREFIX, WEIGHTS_NAME, CheckpointError, CheckpointNotFoundError,
                          config_from_dict,
                          normalise_rank_pattern, split_keys)


@dataclasses.dataclass
class LayerPlan:
    path: str
    keep: list[bool] | None  # over init_r; None: all kept
    tensors: dict[str, torch.Tensor]  # lora_A, lora_E, lora_B, shaped for the kept rank


@dataclasses.dataclass
class CheckpointPlan:
    config: object  # AdaLoraConfig
    layers: list[LayerPlan]
    head_tensors: dict[tuple[str, str], torch.Tensor]  # (module path, tensor name) -> tensor
    bias_tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name in the adapted model


def plan_load(model: nn.Module, pretrained_path: str | os.PathLike, adapter_types: tuple = (),
              config=None) -> CheckpointPlan:
    """Read ``pretrained_path`` and check every key and shape against ``model``; change nothing.

    ``config`` (an ``AdaLoraConfig``) replaces the one in the directory, as PEFT's ``config=`` does
    (the saved ``rank_pattern`` still says which triplets the tensors hold).

    Raises ``CheckpointError`` (a ``ValueError``; ``CheckpointNotFoundError``, also a
    ``FileNotFoundError``, for a missing directory or file) naming the file and the problem.  ``adapter_types``: layer classes whose presence means "already adapted".
    """
    directory = Path(pretrained_path)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"from_pretrained: {directory} is not a directory (only local adapters load)")
    config_file, weights_file = str(directory / CONFIG_NAME), str(directory / WEIGHTS_NAME)
    if adapter_types and any(isinstance(m, adapter_types) for m in model.modules()):
        raise CheckpointError("from_pretrained: the model already holds AdaLoRA adapters; pass a fresh base model")
    raw, tensors = read_checkpoint(directory)
    module_names = [n for n, _ in model.named_modules() if n]
    if config is None:
        config = config_from_dict(raw, config_file, module_names)
    rank_pattern = normalise_rank_pattern(raw.get("rank_pattern"), config_file)
    lora, other = split_keys(tensors, weights_file)

    modules = dict(model.named_modules())
    try:
        targeted = {path for path, _ in targeting.find_targets(model, config, adapter_types)}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: the adapter config does not fit the model: {exc}") from exc
    unknown = sorted(p for p in lora if p not in modules)
    if unknown:
        raise CheckpointError(f"{weights_file}: adapters for modules the model does not have: {unknown}")
    not_targeted = sorted(p for p in lora if p not in targeted)
    if not_targeted:
        raise CheckpointError(
            f"{weights_file}: adapters for modules that target_modules={config.target_modules!r} in {config_file} "
            f"does not select: {not_targeted}")
    missing = sorted(p for p in targeted if p not in lora)
    if missing:
        raise CheckpointError(f"{weights_file}: no adapter weights for targeted modules {missing}")
    if rank_pattern is not None:
        extra = sorted(p for p in rank_pattern if p not in lora)
        if extra:
            raise CheckpointError(f"{config_file}: rank_pattern names modules without adapter weights: {extra}")

    init_r = config.init_r
    layers = []
    for path in sorted(lora):
        parts = lora[path]
        absent = [n for n in LORA if n not in parts]
        if absent:
            raise CheckpointError(f"{weights_file}: module {path!r} lacks {absent}")
        in_f, out_f = targeting.features(modules[path])
        keep = rank_pattern.get(path) if rank_pattern is not None else None
        if keep is not None and len(keep) != init_r:
            raise CheckpointError(
                f"{config_file}: rank_pattern['{path}.lora_E'] has {len(keep)} entries, init_r is {init_r}")
        r = sum(keep) if keep is not None else init_r
        expect = {"lora_A": (r, in_f), "lora_E": (r, 1), "lora_B": (out_f, r)}
        for name in LORA:
            t = parts[name]
            if tuple(t.shape) != expect[name]:
                why = f"rank_pattern keeps {r} of init_r={init_r}" if keep is not None else f"init_r={init_r}"
                raise CheckpointError(
                    f"{weights_file}: {PREFIX}{path}.{name} has shape {tuple(t.shape)}, expected {expect[name]} "
                    f"(module {path}: in_features={in_f}, out_features={out_f}; {why})")
            if not t.dtype.is_floating_point:
                raise CheckpointError(f"{weights_file}: {PREFIX}{path}.{name} has dtype {t.dtype}, not floating")
        layers.append(LayerPlan(path, keep, dict(parts)))

    heads = targeting.find_heads(model, config.head_modules())
    head_tensors: dict[tuple[str, str], torch.Tensor] = {}
    bias_tensors: dict[str, torch.Tensor] = {}
    for rel, t in other.items():
        owner = next((p for p in heads if rel.startswith(p + ".")), None)
        bias = _bias_of(model, targeted, config.bias, rel) if owner is None else None
        if bias is not None:  # PEFT's bias="all" / "lora_only" saves these
            if tuple(bias.shape) != tuple(t.shape):
                raise CheckpointError(f"{weights_file}: {PREFIX}{rel} has shape {tuple(t.shape)}, the model's is "
                                      f"{tuple(bias.shape)}")
            bias_tensors[rel] = t
            continue
        if owner is None:
            raise CheckpointError(
                f"{weights_file}: unexpected key {PREFIX}{rel}: neither an adapter tensor nor a tensor of "
                f"modules_to_save={list(config.head_modules())}")
        sd = heads[owner].state_dict()
        name = rel[len(owner) + 1:]
        if name not in sd:
            raise CheckpointError(f"{weights_file}: {PREFIX}{rel}: module {owner!r} has no tensor {name!r}")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{weights_file}: {PREFIX}{rel} has shape {tuple(t.shape)}, the model's is "
                                  f"{tuple(sd[name].shape)}")
        head_tensors[(owner, name)] = t
    for owner, module in heads.items():
        absent = [n for n in module.state_dict() if (owner, n) not in head_tensors]
        if absent:
            raise CheckpointError(f"{weights_file}: no weights for {absent} of module {owner!r}, which "
                                  f"modules_to_save={list(config.head_modules())} in {config_file} names")
    return CheckpointPlan(config, layers, head_tensors, bias_tensors)


def _bias_of(model: nn.Module, targeted: set[str], bias: str, rel: str) -> torch.Tensor | None:
    """The base model's bias a saved key ``rel`` names under PEFT's ``bias`` setting (None: not one).

    Keys are those of the adapted model: ``<path>.base_layer.bias`` for an adapted layer, ``<path>.bias``
    for any other module (``bias="all"`` only).
    """
    if bias == "none" or not (rel == "bias" or rel.endswith(".bias")):
        return None
    path = rel[: -len(".bias")] if rel != "bias" else ""
    if path.endswith(".base_layer") and path[: -len(".base_layer")] in targeted:
        path = path[: -len(".base_layer")]
    elif bias != "all" or path in targeted:
        return None
    try:
        return model.get_parameter(f"{path}.bias" if path else "bias")
    except AttributeError:
        return None


def plan_inference_adapter(layers: dict[str, nn.Module], pretrained_path: str | os.PathLike) -> CheckpointPlan:
    """Read a further adapter for layers that already carry one (``AdaLoraModel.load_adapter``); change nothing.

    Its adapted modules must be among ``layers`` (it may adapt fewer) and it may carry no
    ``modules_to_save`` weights (the heads are trained in place by the model's trainable adapter).
    """
    directory = Path(pretrained_path)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"load_adapter: {directory} is not a directory (only local adapters load)")
    config_file, weights_file = str(directory / CONFIG_NAME), str(directory / WEIGHTS_NAME)
    raw, tensors = read_checkpoint(directory)
    config = config_from_dict({**raw, "modules_to_save": None}, config_file)
    rank_pattern = normalise_rank_pattern(raw.get("rank_pattern"), config_file)
    lora, other = split_keys(tensors, weights_file)
    if other:
        raise CheckpointError(f"{weights_file}: holds weights of modules_to_save ({sorted(other)[:3]} ...); a second "
                              "adapter can only add AdaLoRA layers, the heads are trained by the model's own adapter")
    outside = sorted(p for p in lora if p not in layers)
    if outside:
        raise CheckpointError(f"{weights_file}: adapters for modules that carry no AdaLoRA layer in this model: "
                              f"{outside}; load_adapter adds adapters to the adapted layers only")
    plans = []
    for path in sorted(lora):
        parts, layer = lora[path], layers[path]
        absent = [n for n in LORA if n not in parts]
        if absent:
            raise CheckpointError(f"{weights_file}: module {path!r} lacks {absent}")
        keep = rank_pattern.get(path) if rank_pattern is not None else None
        if keep is not None and len(keep) != config.init_r:
            raise CheckpointError(
                f"{config_file}: rank_pattern['{path}.lora_E'] has {len(keep)} entries, init_r is {config.init_r}")
        r = sum(keep) if keep is not None else config.init_r
        expect = {"lora_A": (r, layer.in_features), "lora_E": (r, 1), "lora_B": (layer.out_features, r)}
        for name in LORA:
            if tuple(parts[name].shape) != expect[name] or not parts[name].dtype.is_floating_point:
                raise CheckpointError(f"{weights_file}: {PREFIX}{path}.{name} has shape {tuple(parts[name].shape)} "
                                      f"({parts[name].dtype}), expected {expect[name]}")
        plans.append(LayerPlan(path, keep, dict(parts)))
    return CheckpointPlan(config, plans, {})
