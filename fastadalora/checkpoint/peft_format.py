"""PEFT 0.21's AdaLoRA checkpoint format: tensor keys, rank-pattern slicing and the config dict.

Checked against PEFT 0.21.0 by saving a model and listing what it wrote:

- ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``):
  ``base_model.model.<module path>.lora_A`` (r×in), ``.lora_E`` (r×1), ``.lora_B`` (out×r), no
  adapter name, no ``.weight`` suffix, no ``ranknum``.  With a rank pattern the tensors hold only
  the kept triplets: ``A[m]``, ``E[m]``, ``B[:, m]``.  Weights of ``modules_to_save`` are keyed
  ``base_model.model.<module path>.<tensor name>`` (``...classifier.weight``), i.e. without PEFT's
  ``modules_to_save.default`` wrapper level.
- ``adapter_config.json``: every ``AdaLoraConfig`` field but ``runtime_config`` (``config_dict``),
  with what PEFT's ``save_pretrained`` fills in: ``inference_mode: true``, ``target_modules``
  resolved (defaults, "all-linear"), the task heads appended to ``modules_to_save``,
  ``base_model_name_or_path`` and ``auto_mapping`` from the model, ``peft_version``, and
  ``rank_pattern`` = ``{"<module path>.lora_E": [bool] * init_r}`` (``null`` before the first
  masking step).
- ``README.md``: PEFT's model card (``model_card``).

Every function here takes plain data (layers, masks, modules, dicts) and returns plain data.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .. import targeting

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
LORA = ("lora_A", "lora_E", "lora_B")
MODEL_CARD_NAME = "README.md"


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
def _name_or_path(model: nn.Module) -> str | None:
    """PEFT's ``base_model_name_or_path`` source: the model's own ``name_or_path`` attribute ("" counts as none)."""
    return model.__dict__.get("name_or_path", None) or None


def saved_modules_to_save(config) -> list[str] | None:
    """``modules_to_save`` as PEFT writes it: the user's entries, then the task type's heads (PEFT appends
    them), each once."""
    from ..config import TASK_HEADS, _plain

    names = list(config.modules_to_save) if config.modules_to_save is not None else None
    task_heads = TASK_HEADS.get(_plain(config.task_type))
    if task_heads:
        names = list(task_heads) if names is None else names + list(task_heads)
    return None if names is None else list(dict.fromkeys(names))


def config_dict(config, model: nn.Module, layers: Mapping[str, nn.Module], heads: Mapping[str, nn.Module],
                masks: Mapping[str, list[bool] | None]) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT 0.21's ``PeftModel.save_pretrained`` writes, built without
    mutating anything.

    ``model`` is the user's (adapted) model: it resolves default and "all-linear" targets (adapted
    paths count as the layers they wrap), and gives ``base_model_name_or_path`` (its ``name_or_path``)
    and, without a ``task_type``, ``auto_mapping``.  ``heads`` is accepted for the call signature;
    ``modules_to_save`` is written from the config, as PEFT does.
    """
    del heads
    d = config.to_dict()
    d["peft_type"] = "ADALORA"
    d["target_modules"] = targeting.resolve_target_modules(model, config, adapted=list(layers))
    d["modules_to_save"] = saved_modules_to_save(config)
    d["fan_in_fan_out"] = bool(config.fan_in_fan_out or any(layer.fan_in_fan_out for layer in layers.values()))
    d["rank_pattern"] = saved_rank_pattern(layers, masks)
    d["base_model_name_or_path"] = config.base_model_name_or_path or _name_or_path(model)
    d["inference_mode"] = True
    if config.task_type is None:
        d["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return dict(sorted(d.items()))


def config_from_dict(cfg: dict, where: str, module_names=None):
    """An ``AdaLoraConfig`` from a parsed ``adapter_config.json`` (``CheckpointError`` naming ``where``).

    As PEFT's loader: unknown keys (a newer PEFT's) are dropped with PEFT's warning, a
    ``runtime_config`` entry with PEFT's warning, and a ``peft_type`` other than ADALORA is an error.
    ``rank_pattern`` is left to ``normalise_rank_pattern``.  ``modules_to_save`` entries that match
    none of ``module_names`` are dropped: PEFT writes duplicates and the task heads whether the model
    has them or not.
    """
    from ..config import AdaLoraConfig

    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: the adapter config must be a JSON object, got {type(cfg).__name__}")
    kwargs = {k: v for k, v in cfg.items() if k != "rank_pattern"}
    if "runtime_config" in kwargs:
        warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                      "configurations are only valid at runtime.")
        del kwargs["runtime_config"]
    if kwargs.get("modules_to_save") and isinstance(kwargs["modules_to_save"], list):
        heads = list(dict.fromkeys(kwargs["modules_to_save"]))
        if module_names is not None:
            heads = [h for h in heads if not isinstance(h, str)
                     or any(targeting.name_matches([h], n) for n in module_names)]
        kwargs["modules_to_save"] = heads or None
    try:
        return AdaLoraConfig.from_peft_type(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid AdaLoRA config ({exc})") from exc


# ============================================================================ model card
def model_card(model: nn.Module, config, existing: str | None = None) -> str:
    """The ``README.md`` text PEFT 0.21's ``save_pretrained`` writes (``create_or_update_model_card``).

    ``model`` is the user's base model, ``config`` the adapter's; ``existing`` the current
    ``README.md`` of the save directory, if there is one (it is updated, as PEFT does).  Offline: the
    card template is huggingface_hub's bundled one (PEFT's); without huggingface_hub a minimal card
    with the same metadata and "### Framework versions" block is produced.  Metadata: ``library_name:
    peft``; ``tags``: the model's ``model_tags``, ``transformers`` for a transformers model and
    ``base_model:adapter:<name_or_path>`` when the model has a ``name_or_path``; ``base_model``: the
    model config's ``_name_or_path``; ``pipeline_tag: text-generation`` for ``task_type='CAUSAL_LM'``.
    Like PEFT 0.21 it never adds the quantization block (PEFT's check for it is always false).
    """
    from ..config import PEFT_VERSION, _plain

    tags = set(getattr(model, "model_tags", None) or []) if hasattr(model, "model_tags") else set()
    if targeting.is_transformers_model(model):
        tags.add("transformers")
    if hasattr(model, "name_or_path"):
        tags.add(f"base_model:adapter:{model.name_or_path}")
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    elif dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        model_config = dataclasses.asdict(model_config)
    base_model = model_config["_name_or_path"] if isinstance(model_config, dict) and "_name_or_path" in model_config \
        else None
    causal_lm = _plain(config.task_type) == "CAUSAL_LM"
    version_line, heading = f"- PEFT {PEFT_VERSION}", "### Framework versions"

    def add_version(lines: list[str]) -> list[str]:
        if version_line not in lines:
            if heading in lines:
                lines.insert(lines.index(heading) + 2, version_line)
            else:
                lines.append(f"{heading}\n\n{version_line}")
        return lines

    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        ModelCard = None
    if ModelCard is not None:
        card = ModelCard(existing) if existing is not None else ModelCard.from_template(ModelCardData())
        card.data["library_name"] = "peft"
        if tags:
            card.data["tags"] = sorted(tags)
        if not card.data.pipeline_tag and causal_lm:
            card.data.pipeline_tag = "text-generation"
        if base_model is not None:
            card.data["base_model"] = base_model
        card.text = "\n".join(add_version(card.text.splitlines()))
        return str(card)
    # no huggingface_hub: the same metadata as YAML (JSON strings are YAML strings), a bare body
    meta = {} if base_model is None else {"base_model": base_model}
    meta["library_name"] = "peft"
    if causal_lm:
        meta["pipeline_tag"] = "text-generation"
    if tags:
        meta["tags"] = sorted(tags)
    def scalar(v: str) -> str:
        return v if re.fullmatch(r"[A-Za-z][A-Za-z0-9_./-]*", v) else json.dumps(v)

    header = "".join(f"{k}: {scalar(v)}\n" if not isinstance(v, list) else
                     f"{k}:\n" + "".join(f"- {scalar(t)}\n" for t in v) for k, v in sorted(meta.items()))
    body = existing or ""
    if body.startswith("---\n") and "\n---\n" in body[3:]:
        body = body[3:].split("\n---\n", 1)[1]  # the old metadata block is replaced
    return f"---\n{header}---\n\n" + "\n".join(add_version(body.splitlines()))


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
