"""PEFT 0.21's AdaLoRA checkpoint format: tensor keys, rank-pattern slicing and the config dict.

Checked against PEFT 0.21.0 by saving a model and listing what it wrote:

- ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``):
  ``base_model.model.<module path>.lora_A`` (r×in), ``.lora_E`` (r×1), ``.lora_B`` (out×r), no
  adapter name, no ``.weight`` suffix, no ``ranknum``.  With a rank pattern the tensors hold only
  the kept triplets: ``A[m]``, ``E[m]``, ``B[:, m]``.  Weights of ``modules_to_save`` are keyed
  ``base_model.model.<module path>.<tensor name>`` (``...classifier.weight``), i.e. without PEFT's
  ``modules_to_save.default`` wrapper level.
- ``adapter_config.json``: ``peft_type: "ADALORA"``, the schedule fields, ``target_modules``,
  ``modules_to_save``, ``task_type`` and ``rank_pattern`` = ``{"<module path>.lora_E": [bool] * init_r}``
  (``null`` before the first masking step).

Every function here takes plain data (layers, masks, modules, dicts) and returns plain data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from .. import targeting

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
LORA = ("lora_A", "lora_E", "lora_B")
# PEFT-only config fields that would change which modules are adapted or how; refused when set.
_UNSUPPORTED_IF_SET = ("layers_to_transform", "layers_pattern", "target_parameters", "trainable_token_indices",
                       "layer_replication", "use_dora", "lora_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory or one of its files does not exist."""


def _plain(value):
    """PEFT's ``TaskType``/``PeftType`` are str enums: compare and write by value."""
    return getattr(value, "value", value)


# ============================================================================ tensors
def adapter_tensors(layers: Mapping[str, nn.Module], masks: Mapping[str, list[bool] | None],
                    heads: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors PEFT 0.21 saves, keyed and sliced as PEFT does (fresh contiguous CPU copies).

    ``masks[path]`` is the live keep-mask over the triplets the layer holds (None: keep all).
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        A, E, B = (t.detach() for t in layer.adapter_params())
        mask = masks.get(path)
        if mask is not None and not all(mask):
            m = torch.tensor(mask, dtype=torch.bool, device=A.device)
            A, E, B = A[m], E[m], B[:, m]
        for name, t in zip(LORA, (A, E, B)):
            out[f"{PREFIX}{path}.{name}"] = t.to("cpu", copy=True).contiguous()
    for path, module in heads.items():
        for name, t in module.state_dict().items():
            out[f"{PREFIX}{path}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    return out


def saved_rank_pattern(layers: Mapping[str, nn.Module], masks: Mapping[str, list[bool] | None]
                       ) -> dict[str, list[bool]] | None:
    """``{"<path>.lora_E": [bool] * init_r}`` as PEFT writes it, or None while nothing is pruned."""
    patterns: dict[str, list[bool]] = {}
    any_pruned = False
    for path, layer in layers.items():
        mask = masks.get(path)
        keep = [False] * layer.init_r
        for i, pos in enumerate(layer.held_positions):
            keep[pos] = True if mask is None else mask[i]
        if mask is not None or layer.r != layer.init_r:
            any_pruned = True
        patterns[f"{path}.lora_E"] = keep
    return patterns if any_pruned else None


def split_keys(tensors: Mapping[str, torch.Tensor], weights_file: str
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``(adapters, others)``: ``{module path: {lora_X: t}}`` and ``{relative key: t}`` of the other tensors.

    Keys with PEFT's adapter name (``...lora_A.default``) are accepted; a tensor present under both
    spellings is an error (one of them would be silently dropped).
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    spelled: dict[tuple[str, str], str] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights_file}: unexpected key {key!r} (keys start with {PREFIX!r})")
        rel = key[len(PREFIX):]
        head, _, leaf = rel.rpartition(".")
        if leaf == "default" and head.rsplit(".", 1)[-1] in LORA:  # an adapter-named key
            head, _, leaf = head.rpartition(".")
        if leaf in LORA:
            if (head, leaf) in spelled:
                raise CheckpointError(f"{weights_file}: {spelled[(head, leaf)]!r} and {key!r} are the same tensor "
                                      "saved twice; keep one")
            spelled[(head, leaf)] = key
            lora.setdefault(head, {})[leaf] = t
        elif leaf == "ranknum":
            continue
        else:
            other[rel] = t
    return lora, other


# ============================================================================ config
def _target_modules_for_save(config, model: nn.Module, layer_paths) -> Any:
    tm = config.target_modules
    if isinstance(tm, str):
        return tm
    if tm:
        return sorted(set(tm))
    # resolved from defaults: the last path components, if they pick exactly these layers
    leaves = sorted({p.rsplit(".", 1)[-1] for p in layer_paths})
    picked = {n for n, m in model.named_modules()
              if n and targeting.name_matches(leaves, n) and (targeting.is_adaptable(m) or n in layer_paths)}
    return leaves if picked == set(layer_paths) else sorted(layer_paths)


def config_dict(config, model: nn.Module, layers: Mapping[str, nn.Module], heads: Mapping[str, nn.Module],
                masks: Mapping[str, list[bool] | None]) -> dict[str, Any]:
    """The ``adapter_config.json`` content: PEFT 0.21's AdaLoRA fields, built without mutating anything.

    ``model`` is the user's (adapted) model: its module names resolve default targets and its
    ``config.name_or_path`` (a transformers model's) fills ``base_model_name_or_path``.
    """
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        d[f.name] = _plain(value)
    d["peft_type"] = "ADALORA"
    d["task_type"] = _plain(config.task_type)
    d["target_modules"] = _target_modules_for_save(config, model, list(layers))
    # the user's modules_to_save plus the task head, those the model has (PEFT writes the task head too)
    d["modules_to_save"] = [h for h in config.head_modules() if any(targeting.name_matches([h], p) for p in heads)] \
        or None
    d["fan_in_fan_out"] = bool(config.fan_in_fan_out or any(layer.fan_in_fan_out for layer in layers.values()))
    d["rank_pattern"] = saved_rank_pattern(layers, masks)
    base_cfg = getattr(model, "config", None)  # transformers' PretrainedConfig, when there is one
    d.setdefault("base_model_name_or_path", getattr(base_cfg, "name_or_path", None) or None)
    d.setdefault("revision", None)
    d.setdefault("inference_mode", True)
    d.setdefault("r", 8)  # PEFT's LoraConfig default; unused by AdaLoRA
    d.setdefault("layers_to_transform", None)
    d.setdefault("layers_pattern", None)
    d.setdefault("alpha_pattern", {})
    return dict(sorted(d.items()))


def config_from_dict(cfg: dict, where: str, module_names=None):
    """An ``AdaLoraConfig`` from a parsed ``adapter_config.json`` (``CheckpointError`` naming ``where``).

    ``modules_to_save`` entries that match none of ``module_names`` are dropped: PEFT writes
    duplicates and the task heads whether the model has them or not.
    """
    from ..config import AdaLoraConfig

    for name in _UNSUPPORTED_IF_SET:
        value = cfg.get(name)
        if value not in (None, False, [], {}):
            raise CheckpointError(f"{where}: `{name}={value!r}` is not supported by fastadalora")
    names = {f.name for f in dataclasses.fields(AdaLoraConfig)}
    kwargs = {k: v for k, v in cfg.items() if k in names and k != "rank_pattern"}
    if kwargs.get("modules_to_save") and isinstance(kwargs["modules_to_save"], list):
        heads = list(dict.fromkeys(kwargs["modules_to_save"]))
        if module_names is not None:
            heads = [h for h in heads if not isinstance(h, str)
                     or any(targeting.name_matches([h], n) for n in module_names)]
        kwargs["modules_to_save"] = heads or None
    try:
        return AdaLoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid AdaLoRA config ({exc})") from exc


def normalise_rank_pattern(rp, where: str) -> dict[str, list[bool]] | None:
    """``{module path: [bool] * init_r}`` from the saved ``rank_pattern`` (keys ``<path>.lora_E[.default]``)."""
    if rp is None:
        return None
    if not isinstance(rp, dict):
        raise CheckpointError(f"{where}: rank_pattern must be an object, got {type(rp).__name__}")
    out = {}
    for key, mask in rp.items():
        path = key[: -len(".default")] if key.endswith(".default") else key
        if not path.endswith(".lora_E"):
            raise CheckpointError(f"{where}: rank_pattern key {key!r} does not end in '.lora_E'")
        path = path[: -len(".lora_E")]
        if not isinstance(mask, list) or not all(isinstance(v, bool) or v in (0, 1) for v in mask):
            raise CheckpointError(f"{where}: rank_pattern[{key!r}] must be a list of booleans")
        if path in out:
            raise CheckpointError(f"{where}: rank_pattern names {path!r} twice")
        out[path] = [bool(v) for v in mask]
    return out
