"""Adapter checkpoints in PEFT 0.21's on-disk format: ``adapter_model.safetensors`` + ``adapter_config.json``.

A directory written by :func:`save_pretrained` loads with ``peft.PeftModel.from_pretrained`` and one
written by PEFT loads with :func:`from_pretrained`, pruned ranks included.  The format (checked
against PEFT 0.21.0 by saving a model and listing what it wrote):

- ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``):
  ``base_model.model.<module path>.lora_A`` (r×in), ``.lora_E`` (r×1), ``.lora_B`` (out×r), no
  adapter name, no ``.weight`` suffix, no ``ranknum``.  With a rank pattern the tensors hold only
  the kept triplets: ``A[m]``, ``E[m]``, ``B[:, m]``.  Weights of ``modules_to_save`` are keyed
  ``base_model.model.<module path>.<tensor name>`` (``...classifier.weight``), i.e. without PEFT's
  ``modules_to_save.default`` wrapper level.
- ``adapter_config.json``: ``peft_type: "ADALORA"``, the schedule fields, ``target_modules``,
  ``modules_to_save``, ``task_type`` and ``rank_pattern`` = ``{"<module path>.lora_E": [bool] * init_r}``
  (``null`` before the first masking step).

Differences from PEFT, on purpose:

- Saving never mutates the live model or its config (PEFT rewrites ``config.rank_pattern``).
- Files are written under a temporary name in the target directory and moved into place with
  ``os.replace``: a failure or a kill mid-save leaves the previous checkpoint intact.
- Loading reads only safetensors and JSON (nothing is unpickled), and validates every key and
  shape against the model before touching it: a checkpoint that does not fit raises ``ValueError``
  and leaves the model exactly as it was, with no adapter injected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from torch import nn

import safetensors
import safetensors.torch

from .layers import AdaLoraLinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_LORA = ("lora_A", "lora_E", "lora_B")
# PEFT-only config fields that would change which modules are adapted or how; refused when set.
_UNSUPPORTED_IF_SET = ("layers_to_transform", "layers_pattern", "target_parameters", "trainable_token_indices",
                       "layer_replication", "use_dora", "lora_bias")
# attribute of an AdaLoraLinear resized at load: the positions (out of init_r) of the triplets it holds
_POSITIONS_ATTR = "_checkpoint_positions"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


# ============================================================================ helpers on the model


def _adapter_layers(adalora_model) -> dict[str, AdaLoraLinear]:
    layers = getattr(adalora_model, "adapter_layers", None)
    if callable(layers):
        return dict(layers())
    return {n: m for n, m in _inner(adalora_model).named_modules() if isinstance(m, AdaLoraLinear)}


def _inner(adalora_model) -> nn.Module:
    """The user's model inside an ``AdaLoraModel``."""
    return adalora_model.model


def _config(adalora_model):
    from .config import AdaLoraConfig

    cfg = adalora_model.__dict__.get("adalora_config")  # not via __getattr__: that forwards to .model
    if isinstance(cfg, AdaLoraConfig):
        return cfg
    raise TypeError(f"{type(adalora_model).__name__} has no AdaLoraConfig (expected .adalora_config)")


def _live_rank_pattern(adalora_model) -> dict | None:
    rp = getattr(adalora_model, "rank_pattern", None)
    if callable(rp):
        rp = rp()
    return rp


def _head_modules(adalora_model) -> dict[str, nn.Module]:
    """Modules besides the adapters whose weights a checkpoint carries (PEFT's ``modules_to_save``)."""
    getter = getattr(adalora_model, "modules_to_save_modules", None)
    if callable(getter):
        return dict(getter())
    names = _config(adalora_model).head_modules()
    return _match_heads(_inner(adalora_model), names)


def _match_heads(model: nn.Module, names) -> dict[str, nn.Module]:
    """PEFT's rule (``key.endswith(name)``) restricted to whole path components, outermost match only."""
    found: dict[str, nn.Module] = {}
    if not names:
        return found
    for path, module in model.named_modules():
        if not path:
            continue
        if any(path == n or path.endswith("." + n) for n in names):
            if any(path.startswith(p + ".") for p in found):
                continue
            found[path] = module
    return found


def _held_positions(layer: AdaLoraLinear) -> list[int]:
    """Which of the ``init_r`` triplets the layer holds now (all, unless resized at load)."""
    held = getattr(layer, _POSITIONS_ATTR, None)
    if held is None or len(held) != layer.r:  # never resized at load, or resized since: keep the count
        return list(range(layer.r))
    return list(held)


def _layer_mask(adalora_model, path: str, layer: AdaLoraLinear) -> list[bool] | None:
    """The live keep-mask over the triplets ``layer`` holds now (None: keep all).

    The model's ``rank_pattern`` may give it over the held triplets or over ``init_r`` positions.
    """
    rp = _live_rank_pattern(adalora_model)
    if not rp:
        return None
    for key in (f"{path}.lora_E", f"{path}.lora_E.default"):
        if key in rp and rp[key] is not None:
            mask = rp[key]
            if isinstance(mask, torch.Tensor):
                mask = mask.detach().reshape(-1).tolist()
            mask = [bool(v) for v in mask]
            if len(mask) == layer.r:
                return mask
            if len(mask) == layer.init_r:
                return [mask[pos] for pos in _held_positions(layer)]
            raise CheckpointError(f"rank_pattern[{key!r}] has {len(mask)} entries; layer {path!r} holds "
                                  f"{layer.r} triplets (init_r={layer.init_r})")
    return None


# ============================================================================ save


def adapter_state_dict(adalora_model) -> dict[str, torch.Tensor]:
    """The tensors PEFT 0.21 saves, keyed and sliced as PEFT does (fresh CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in _adapter_layers(adalora_model).items():
        mask = _layer_mask(adalora_model, path, layer)
        A, E, B = (getattr(layer, n).detach() for n in _LORA)
        if mask is not None and not all(mask):
            m = torch.tensor(mask, dtype=torch.bool, device=A.device)
            A, E, B = A[m], E[m], B[:, m]
        for name, t in zip(_LORA, (A, E, B)):
            out[f"{PREFIX}{path}.{name}"] = t.to("cpu", copy=True).contiguous()
    for path, module in _head_modules(adalora_model).items():
        for name, t in module.state_dict().items():
            out[f"{PREFIX}{path}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    return out


def saved_rank_pattern(adalora_model) -> dict[str, list[bool]] | None:
    """``{"<path>.lora_E": [bool] * init_r}`` as PEFT writes it, or None while nothing is pruned."""
    layers = _adapter_layers(adalora_model)
    patterns: dict[str, list[bool]] = {}
    any_pruned = False
    for path, layer in layers.items():
        mask = _layer_mask(adalora_model, path, layer)
        held = _held_positions(layer)
        keep = [False] * layer.init_r
        for i, pos in enumerate(held):
            keep[pos] = True if mask is None else mask[i]
        if mask is not None or layer.r != layer.init_r:
            any_pruned = True
        patterns[f"{path}.lora_E"] = keep
    return patterns if any_pruned else None


def _target_modules_for_save(adalora_model, config, layers) -> Any:
    tm = config.target_modules
    if isinstance(tm, str):
        return tm
    if tm:
        return sorted(set(tm))
    # resolved by the model from defaults: the last path components, if they pick exactly these layers
    leaves = sorted({p.rsplit(".", 1)[-1] for p in layers})
    picked = {n for n, m in _inner(adalora_model).named_modules()
              if n and any(n == t or n.endswith("." + t) for t in leaves) and _is_adaptable(m)}
    return leaves if picked == set(layers) else sorted(layers)


def _is_adaptable(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, AdaLoraLinear)):
        return True
    from .layers import _is_conv1d

    return _is_conv1d(module)


def _plain(value):
    return getattr(value, "value", value)


def adapter_config_dict(adalora_model) -> dict[str, Any]:
    """The ``adapter_config.json`` content: PEFT 0.21's AdaLoRA fields, built without mutating anything."""
    config = _config(adalora_model)
    layers = _adapter_layers(adalora_model)
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (set, tuple, frozenset)):
            value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        d[f.name] = _plain(value)
    d["peft_type"] = "ADALORA"
    d["task_type"] = _plain(getattr(config, "task_type", None))
    d["target_modules"] = _target_modules_for_save(adalora_model, config, layers)
    # the user's modules_to_save plus the task head, those the model has (PEFT writes the task head too)
    present = _match_heads(_inner(adalora_model), config.head_modules())
    heads = [h for h in config.head_modules() if any(p == h or p.endswith("." + h) for p in present)]
    d["modules_to_save"] = heads or None
    d["fan_in_fan_out"] = bool(config.fan_in_fan_out or any(l.fan_in_fan_out for l in layers.values()))
    d["rank_pattern"] = saved_rank_pattern(adalora_model)
    base_cfg = getattr(_inner(adalora_model), "config", None)
    d.setdefault("base_model_name_or_path", getattr(base_cfg, "name_or_path", None) or None)
    d.setdefault("revision", None)
    d.setdefault("inference_mode", True)
    d.setdefault("r", 8)  # PEFT's LoraConfig default; unused by AdaLoRA
    d.setdefault("layers_to_transform", None)
    d.setdefault("layers_pattern", None)
    d.setdefault("alpha_pattern", {})
    return dict(sorted(d.items()))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_path(directory: Path, name: str) -> Path:
    """A new, empty file next to ``name`` (same filesystem, so ``os.replace`` is atomic), mode 0666 & ~umask."""
    for _ in range(100):
        tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file in {directory}")  # pragma: no cover


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    mode = path.stat().st_mode & 0o777  # 0666 & ~umask, from _tmp_path; safetensors writes 0600
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_json(obj: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_pretrained(adalora_model, save_directory: str | os.PathLike, *, safe_serialization: bool = True,
                    is_main_process: bool = True) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT 0.21's format.

    The live model and its config are not modified.  Both files are first written to temporary
    names in ``save_directory`` and then moved into place with ``os.replace``, so an error or a
    kill during the save leaves any previous checkpoint in the directory loadable.

    ``safe_serialization`` and ``is_main_process`` are PEFT's keywords: only safetensors is written
    (``False`` raises), and nothing is written when ``is_main_process`` is False.
    """
    if not safe_serialization:
        raise ValueError("save_pretrained: fastadalora writes safetensors only (safe_serialization=False "
                         "would write a pickle, which from_pretrained refuses to load)")
    if not is_main_process:
        return
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(adalora_model)
    config = adapter_config_dict(adalora_model)
    tmp_w = _tmp_path(directory, WEIGHTS_NAME)
    tmp_c = None
    try:
        _write_weights(tensors, tmp_w)
        tmp_c = _tmp_path(directory, CONFIG_NAME)
        _write_json(config, tmp_c)
        # weights first: PEFT reads the config first, and a mismatch is caught by our shape checks
        os.replace(tmp_w, directory / WEIGHTS_NAME)
        os.replace(tmp_c, directory / CONFIG_NAME)
    finally:
        for tmp in (tmp_w, tmp_c):
            if tmp is not None and tmp.exists():
                tmp.unlink()
    _fsync_dir(directory)


# ============================================================================ load: reading files


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; ``ValueError`` naming the file when it is not valid JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: not a PEFT/fastadalora adapter directory")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid JSON adapter config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type != "ADALORA":
        raise CheckpointError(f"{path}: peft_type is {peft_type!r}, expected 'ADALORA'")
    return cfg


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The safetensors file as CPU tensors (never unpickles); ``ValueError`` naming the file when corrupt."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{directory} holds only adapter_model.bin (a pickle); fastadalora loads safetensors only. "
                "Re-save it with safe_serialization=True from a trusted environment.")
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}")
    # read the bytes, then parse: no memory map, so a file replaced or truncated while we read cannot crash us
    data = path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupted ({exc})") from exc
    return tensors


def _config_from_dict(cfg: dict, where: str, model: nn.Module | None = None):
    from .config import AdaLoraConfig

    for name in _UNSUPPORTED_IF_SET:
        value = cfg.get(name)
        if value not in (None, False, [], {}):
            raise CheckpointError(f"{where}: `{name}={value!r}` is not supported by fastadalora")
    names = {f.name for f in dataclasses.fields(AdaLoraConfig)}
    kwargs = {k: v for k, v in cfg.items() if k in names and k != "rank_pattern"}
    if kwargs.get("modules_to_save") and isinstance(kwargs["modules_to_save"], list):
        # PEFT writes duplicates and the task heads (e.g. "score" for a BERT classifier) whether the model has
        # them or not; entries that match no module of the model carry no weights and are dropped
        heads = list(dict.fromkeys(kwargs["modules_to_save"]))
        if model is not None:
            names = [n for n, _ in model.named_modules() if n]
            heads = [h for h in heads if not isinstance(h, str)
                     or any(n == h or n.endswith("." + h) for n in names)]
        kwargs["modules_to_save"] = heads or None
    try:
        config = AdaLoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid AdaLoRA config ({exc})") from exc
    return config


def _normalise_rank_pattern(rp, where: str) -> dict[str, list[bool]] | None:
    if rp is None:
        return None
    if not isinstance(rp, dict):
        raise CheckpointError(f"{where}: rank_pattern must be an object, got {type(rp).__name__}")
    out = {}
    for key, mask in rp.items():
        path = key
        if path.endswith(".default"):
            path = path[: -len(".default")]
        if not path.endswith(".lora_E"):
            raise CheckpointError(f"{where}: rank_pattern key {key!r} does not end in '.lora_E'")
        path = path[: -len(".lora_E")]
        if not isinstance(mask, list) or not all(isinstance(v, bool) or v in (0, 1) for v in mask):
            raise CheckpointError(f"{where}: rank_pattern[{key!r}] must be a list of booleans")
        out[path] = [bool(v) for v in mask]
    return out


# ============================================================================ load: plan, then apply


@dataclasses.dataclass
class _LayerPlan:
    path: str
    keep: list[bool] | None  # over init_r; None: all kept
    tensors: dict[str, torch.Tensor]


def _plan(model: nn.Module, config, rank_pattern, tensors: dict, weights_file: str, config_file: str):
    """Validate the checkpoint against ``model`` without touching it; return what to load where."""
    from . import model as fa_model

    if any(isinstance(m, AdaLoraLinear) for m in model.modules()):
        raise CheckpointError("from_pretrained: the model already holds AdaLoRA adapters; pass a fresh base model")

    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights_file}: unexpected key {key!r} (keys start with {PREFIX!r})")
        rel = key[len(PREFIX):]
        head, _, leaf = rel.rpartition(".")
        if leaf == "default" and head.rsplit(".", 1)[-1] in _LORA:  # an adapter-named key
            head, _, leaf = head.rpartition(".")
        if leaf in _LORA:
            lora.setdefault(head, {})[leaf] = t
        elif leaf == "ranknum":
            continue
        else:
            other[rel] = t

    modules = dict(model.named_modules())
    try:
        targeted = _targeted_paths(fa_model, model, config)
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
    plans = []
    for path in sorted(lora):
        parts = lora[path]
        absent = [n for n in _LORA if n not in parts]
        if absent:
            raise CheckpointError(f"{weights_file}: module {path!r} lacks {absent}")
        base = modules[path]
        if not _is_adaptable(base):
            raise CheckpointError(f"{weights_file}: module {path!r} is a {type(base).__name__}, not Linear/Conv1D")
        in_f, out_f = _features(base)
        keep = rank_pattern.get(path) if rank_pattern is not None else None
        if keep is not None and len(keep) != init_r:
            raise CheckpointError(
                f"{config_file}: rank_pattern['{path}.lora_E'] has {len(keep)} entries, init_r is {init_r}")
        r = sum(keep) if keep is not None else init_r
        A, E, B = parts["lora_A"], parts["lora_E"], parts["lora_B"]
        expect = {"lora_A": (r, in_f), "lora_E": (r, 1), "lora_B": (out_f, r)}
        for name, t in (("lora_A", A), ("lora_E", E), ("lora_B", B)):
            if tuple(t.shape) != expect[name]:
                why = (f"rank_pattern keeps {r} of init_r={init_r}" if keep is not None else f"init_r={init_r}")
                raise CheckpointError(
                    f"{weights_file}: {PREFIX}{path}.{name} has shape {tuple(t.shape)}, expected {expect[name]} "
                    f"(module {path}: in_features={in_f}, out_features={out_f}; {why})")
            if not t.dtype.is_floating_point:
                raise CheckpointError(f"{weights_file}: {PREFIX}{path}.{name} has dtype {t.dtype}, not floating")
        plans.append(_LayerPlan(path, keep, dict(parts)))

    heads = _match_heads(model, config.head_modules())
    head_tensors: dict[tuple[str, str], torch.Tensor] = {}  # (module path, tensor name) -> tensor
    for rel, t in other.items():
        owner = next((p for p in heads if rel.startswith(p + ".")), None)
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
    return plans, head_tensors


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # Conv1D stores (in, out)
    return int(in_f), int(out_f)


def _targeted_paths(fa_model, model: nn.Module, config) -> set[str]:
    """The module paths ``get_adalora_model(model, config)`` would adapt, computed without injecting."""
    return {path for path, _ in fa_model.find_targets(model, config)}


def from_pretrained(model: nn.Module, pretrained_path: str | os.PathLike, is_trainable: bool = False):
    """Load an AdaLoRA adapter saved by PEFT 0.21 or by :func:`save_pretrained` onto ``model``.

    Adapters are injected at ``init_r``, each resized to its saved rank (``ranknum`` stays
    ``init_r``, so the scale is PEFT's), and the weights copied in; weights of ``modules_to_save``
    are copied into the model's modules.  Everything is validated first: on any error the model
    is left untouched.  ``is_trainable=False`` freezes the adapters and puts the model in eval
    mode; ``True`` leaves adapters and ``modules_to_save`` trainable (train/eval mode unchanged, as
    PEFT) and training continues with the budget computed from the loaded ranks.
    """
    from . import model as fa_model

    directory = Path(pretrained_path)
    if not directory.is_dir():
        raise FileNotFoundError(f"from_pretrained: {directory} is not a directory (only local adapters load)")
    config_file, weights_file = str(directory / CONFIG_NAME), str(directory / WEIGHTS_NAME)
    raw = read_adapter_config(directory)
    config = _config_from_dict(raw, config_file, model)
    rank_pattern = _normalise_rank_pattern(raw.get("rank_pattern"), config_file)
    tensors = read_adapter_weights(directory)
    plans, head_tensors = _plan(model, config, rank_pattern, tensors, weights_file, config_file)

    # ---- nothing above touched the model; apply
    adalora_model = fa_model.get_adalora_model(model, config)
    layers = _adapter_layers(adalora_model)
    with torch.no_grad():
        for plan in plans:
            layer = layers[plan.path]
            if plan.keep is not None and not all(plan.keep):
                layer.resize_rank(plan.keep)
                setattr(layer, _POSITIONS_ATTR, [i for i, k in enumerate(plan.keep) if k])
            for name in _LORA:
                getattr(layer, name).copy_(plan.tensors[name])
        inner = _inner(adalora_model)
        for (owner, name), t in head_tensors.items():
            inner.get_submodule(owner).state_dict(keep_vars=True)[name].copy_(t)
    _after_load(adalora_model, is_trainable)
    return adalora_model


def _after_load(adalora_model, is_trainable: bool) -> None:
    allocator = getattr(adalora_model, "allocator", None)
    refresh = getattr(allocator, "refresh", None)
    if callable(refresh):
        refresh()
    if is_trainable:  # as PEFT: trainable, and the train/eval mode left as the model had it
        return
    for layer in _adapter_layers(adalora_model).values():
        for name in _LORA:
            getattr(layer, name).requires_grad_(False)
    for module in _head_modules(adalora_model).values():
        module.requires_grad_(False)
    adalora_model.eval()
