"""``AdaLoraModel``: targeting, injection, the training-time hooks (orthogonal term, rank allocation).

``get_adalora_model(model, config)`` replaces every targeted ``nn.Linear`` / transformers
``Conv1D`` of ``model`` by an ``AdaLoraLinear`` *in place*, freezes everything except the
adapters and ``modules_to_save``, and returns an ``AdaLoraModel`` wrapping it.  The training
loop is PEFT's::

    loss = model(**batch).loss          # orthogonal term included (training mode)
    loss.backward()
    optimizer.step()
    model.update_and_allocate(step)     # step = 0, 1, 2, ... : the index of this optimizer step
    optimizer.zero_grad()

Rank-pattern keys.  PEFT's ``peft_model.peft_config["default"].rank_pattern`` is keyed by the
parameter name relative to the user's model, with the adapter name: while training
``"bert.encoder.layer.0.attention.self.query.lora_E.default"``; once saved (PEFT strips
``".default"`` and rewrites its live config) ``"bert.encoder.layer.0.attention.self.query.lora_E"``,
which is also the key in ``adapter_config.json``.  ``AdaLoraModel.rank_pattern`` uses the saved
form, ``"<module path in .model>.lora_E"``: the same string PEFT writes to disk.  PEFT's tensor
keys in ``adapter_model.safetensors`` add the prefix ``"base_model.model."``.

``DIFFERENCES`` lists every behaviour that differs from PEFT 0.21 on purpose.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import io
import operator
import re
import warnings

import torch
from torch import nn

from .config import AdaLoraConfig
from .layers import AdaLoraLinear

DIFFERENCES = """\
- The orthogonal term is added to `.loss` only in training mode (`model.train()`); PEFT also adds it in eval,
  so PEFT's eval losses include `orth_reg_weight * R` and ours do not.
- The orthogonal term does not depend on a `task_type`: PEFT skips it when the PeftModel has no task_type.
- `modules_to_save` modules are trained in place; PEFT trains a copy (`ModulesToSaveWrapper`) and keeps the
  original. The numbers are the same.
- `modules_to_save` entries match like `target_modules` (full name, or a suffix after a '.'); PEFT uses a bare
  `endswith`, so 'classifier' would also match 'my_classifier' there. A `modules_to_save` entry that matches
  nothing is an error (PEFT ignores it); the heads added for a `task_type` may be absent.
- `ranknum` is a fixed Python float, never a Parameter (PEFT's ends up trainable with a non-fp32 base).
- The config is never mutated: PEFT rewrites `fan_in_fan_out` while injecting and `rank_pattern` while training
  and saving. The rank pattern lives on the model (`AdaLoraModel.rank_pattern`, `export_config()`).
- Invalid schedules (`target_r >= init_r`, `deltaT < 1`, betas outside (0, 1)) are rejected when the config is
  built; PEFT accepts some of them and crashes later.
- Every check (targets found, module types supported) runs before the model is changed; nothing is
  half-modified on error.
- `update_and_allocate` raises a RuntimeError naming the parameter when a gradient is missing (PEFT: a TypeError
  from `p * None`).
- `state_dict()` includes the allocator state (sensitivity EMAs, rank pattern) under `_extra_state`, as a uint8
  tensor so that safetensors (and `transformers.Trainer` checkpoints) can store it.
"""

# PEFT 0.21's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING: the targets used when
# `target_modules` is None, by `model.config.model_type`.
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

_EXTRA_STATE_FORMAT = "fastadalora.AdaLoraModel"


# --------------------------------------------------------------------------- matching
def name_matches(patterns, key: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches ``key == p`` or ``key.endswith('.' + p)``."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith("." + p) for p in patterns)


def _inside(heads, key: str) -> bool:
    """True when ``key`` is one of the ``heads`` modules or lies inside one (PEFT never adapts those)."""
    return any(re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", key) for h in heads)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _resolve_targets(model: nn.Module, config: AdaLoraConfig):
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        "`target_modules` is None and there is no default for this model"
        + (f" (model_type={model_type!r})" if model_type else "")
        + ": pass target_modules, e.g. ['q_proj', 'v_proj']."
    )


def find_targets(model: nn.Module, config: AdaLoraConfig) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs to adapt, in ``model.named_modules()`` order (PEFT's injection order).

    Raises ``ValueError`` when nothing matches, and ``TypeError`` naming the module when a matched
    module is not an ``nn.Linear`` or transformers ``Conv1D``.  Changes nothing.
    """
    targets = _resolve_targets(model, config)
    heads = config.head_modules()
    conv1d = _conv1d_type()
    supported = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    found = []
    for key, module in model.named_modules():
        if not key or name_matches(config.exclude_modules, key) or _inside(heads, key):
            continue
        if not name_matches(targets, key):
            continue
        if isinstance(module, AdaLoraLinear):
            raise ValueError(f"Module {key!r} is already an AdaLoraLinear: the model was adapted before.")
        if not isinstance(module, supported):
            raise TypeError(
                f"Target module {key!r} is a {type(module).__module__}.{type(module).__name__}, which AdaLoRA "
                "cannot adapt: only torch.nn.Linear and transformers Conv1D are supported. Narrow "
                "`target_modules` so that it does not match this module."
            )
        if any(key.startswith(p + ".") for p, _ in found):
            continue  # inside a module already targeted
        found.append((key, module))
    if not found:
        names = [k for k, m in model.named_modules() if isinstance(m, supported)]
        raise ValueError(
            f"Target modules {targets!r} matched no module of the model. Linear layers it has: "
            f"{names[:12]}{' ...' if len(names) > 12 else ''}"
        )
    return found


def _find_heads(model: nn.Module, config: AdaLoraConfig) -> list[nn.Module]:
    modules = []
    for head in config.head_modules():
        matched = [m for k, m in model.named_modules() if k and name_matches([head], k)]
        if not matched and head in (config.modules_to_save or ()):
            raise ValueError(f"`modules_to_save` entry {head!r} matches no module of the model.")
        modules.extend(matched)
    return modules


# --------------------------------------------------------------------------- model
class _BoundForward(functools.partial):
    """``AdaLoraModel.forward`` bound to an instance, whose signature is the wrapped model's forward.

    ``transformers.Trainer`` keeps only the batch columns named in ``inspect.signature(model.forward)``
    (it special-cases PEFT's PeftModel the same way); with a bare ``(*args, **kwargs)`` it would drop
    every input.  The signature is computed only when asked for.
    """

    @property
    def __signature__(self):
        return inspect.signature(self.args[0].model.forward)


class _advertises_model_signature:
    """Method descriptor returning a ``_BoundForward`` instead of a plain bound method."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, objtype=None):
        return self.fn if obj is None else _BoundForward(self.fn, obj)


class AdaLoraModel(nn.Module):
    """The user's model with AdaLoRA adapters, plus the hooks a training loop calls.

    Attributes:
        model: the user's model, changed in place (targets replaced by ``AdaLoraLinear``).
        adalora_config: a private copy of the config (the user's object is never touched).
        allocator: the ``RankAllocator`` (``state_dict``/``load_state_dict`` for exact resume).

    Unknown attributes are looked up on ``model`` (``.config``, ``.generate``, ...), as PEFT does.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig) -> None:
        super().__init__()
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(f"config must be a fastadalora.AdaLoraConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        # every check first: the model is untouched if any fails
        targets = find_targets(model, config)
        heads = _find_heads(model, config)
        conv1d = _conv1d_type()
        kinds = {conv1d is not None and isinstance(m, conv1d) for _, m in targets}
        if any(fifo != config.fan_in_fan_out for fifo in kinds):
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit every target; each module uses its own layout "
                "(Conv1D: fan_in_fan_out=True, nn.Linear: False), as PEFT ends up doing."
            )

        # Created in named_modules order, each drawing randn(A), randn(E), randn(B), randn(1) and then
        # the init, so the torch RNG stream (and the initial weights) are PEFT's.
        flags = [(p, p.requires_grad) for _, m in targets for p in m.parameters()]
        try:
            layers = {}
            for path, module in targets:
                layers[path] = AdaLoraLinear(
                    module, r=config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    fan_in_fan_out=conv1d is not None and isinstance(module, conv1d),
                    init_lora_weights=config.init_lora_weights, name=path,
                )
            from .allocator import RankAllocator

            allocator = RankAllocator(
                list(layers.items()), init_r=config.init_r, target_r=config.target_r, tinit=config.tinit,
                tfinal=config.tfinal, total_step=config.total_step, deltaT=config.deltaT, beta1=config.beta1,
                beta2=config.beta2,
            )
        except BaseException:
            for p, flag in flags:  # AdaLoraLinear froze its base layer: undo, the model stays as it was
                p.requires_grad_(flag)
            raise

        # from here on the model changes
        for path, layer in layers.items():
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        model.requires_grad_(False)
        for layer in layers.values():
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.requires_grad_(True)
        for head in heads:
            head.requires_grad_(True)

        self.model = model
        self.adalora_config = config
        self._adapters = layers  # plain dict (the layers are registered once, inside .model)
        self.allocator = allocator

    # ------------------------------------------------------------------ attribute forwarding
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_adapters", "allocator", "adalora_config"):
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> "AdaLoraModel":
        """``self``, so PEFT code written as ``model.base_model.update_and_allocate(step)`` keeps working.

        (In PEFT, ``PeftModel.base_model`` is the tuner and ``.base_model.model`` the user's model;
        here both paths lead to the same objects.)
        """
        return self

    def get_base_model(self) -> nn.Module:
        """The user's model (PEFT's ``PeftModel.get_base_model``)."""
        return self.model

    # ------------------------------------------------------------------ adapters
    def adapter_layers(self) -> dict[str, AdaLoraLinear]:
        """``{module path in .model: AdaLoraLinear}`` in ``named_modules`` order."""
        return dict(self._adapters)

    # ------------------------------------------------------------------ training hooks
    @_advertises_model_signature
    def forward(self, *args, **kwargs):
        """Call the model; in training mode add ``orth_reg_weight · orth_reg_loss()`` to a tensor ``.loss``.

        Unlike PEFT, nothing is added in eval mode (see ``DIFFERENCES``).
        """
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        weight = self.adalora_config.orth_reg_weight
        if self.training and isinstance(loss, torch.Tensor) and weight > 0 and self._adapters:
            outputs.loss = loss + weight * self.orth_reg_loss()
        return outputs

    def orth_reg_loss(self) -> torch.Tensor:
        """``R = mean over every A and B of ‖G − I‖_F`` (``G = A·Aᵀ``, ``Bᵀ·B``), PEFT's order: A then B per layer."""
        from .orth import orth_reg_loss

        layers = list(self._adapters.values())
        if not layers:
            raise RuntimeError("The model has no adapters left (merge_and_unload was called).")
        groups = self.allocator.orth_groups() if self.allocator is not None else None
        return orth_reg_loss([layer.lora_A for layer in layers], [layer.lora_B for layer in layers], groups)

    def update_and_allocate(self, global_step: int) -> None:
        """Update sensitivities and mask ranks; call once per optimizer step, after ``optimizer.step()``
        and before ``optimizer.zero_grad()``.  A missing gradient raises a ``RuntimeError`` naming the
        parameter.

        ``global_step`` is the 0-based index of the optimizer step just taken (0 on the first step),
        which is what ``transformers.Trainer`` passes as ``state.global_step`` in ``on_optimizer_step``
        and what PEFT's examples pass from their loop counter.  The last step of the run is
        ``total_step - 1``.
        """
        try:
            step = operator.index(global_step)  # int, numpy int, 0-d integer tensor
        except TypeError:
            step = -1
        if isinstance(global_step, bool) or step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        if self.allocator is None:
            raise RuntimeError("The model has no adapters left (merge_and_unload was called).")
        self.allocator.update_and_allocate(step)

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{"<module path in .model>.lora_E": [kept?] * r}`` from the last mask, or None before any.

        One flag per triplet the layer holds now (``init_r``, or the rank it was resized to at load).

        The keys equal PEFT's saved ``rank_pattern`` keys (PEFT's live keys carry a trailing ``.default``).
        """
        return None if self.allocator is None else self.allocator.rank_pattern

    def export_config(self) -> AdaLoraConfig:
        """A copy of the config with ``rank_pattern`` filled in, for writing a checkpoint."""
        pattern = self.rank_pattern
        return dataclasses.replace(
            copy.deepcopy(self.adalora_config),
            rank_pattern=None if pattern is None else {k: list(v) for k, v in pattern.items()},
        )

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> torch.Tensor:
        """The allocator state, torch-serialised into a uint8 tensor (so state dicts stay tensor-only)."""
        payload = {"format": _EXTRA_STATE_FORMAT, "version": 1,
                   "allocator": None if self.allocator is None else self.allocator.state_dict()}
        buf = io.BytesIO()
        torch.save(payload, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            device = next((layer.lora_A.device for layer in self._adapters.values()), torch.device("cpu"))
            state = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _EXTRA_STATE_FORMAT:
            raise ValueError("Unrecognised extra state: not written by fastadalora.AdaLoraModel.get_extra_state.")
        if state["allocator"] is not None and self.allocator is not None:
            self.allocator.load_state_dict(state["allocator"])

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the adapter in PEFT 0.21's format (see ``fastadalora.checkpoint.save_pretrained``)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, pretrained_path, is_trainable: bool = False) -> "AdaLoraModel":
        """Load an adapter saved by PEFT 0.21 or by us onto ``model`` (see ``fastadalora.checkpoint``)."""
        from .checkpoint import from_pretrained

        return from_pretrained(model, pretrained_path, is_trainable=is_trainable)

    # ------------------------------------------------------------------ export / info
    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """Fold every adapter into its base weight, put the base layers back and return the plain model."""
        for layer in self._adapters.values():
            layer.merge(safe_merge=safe_merge)
        for path, layer in self._adapters.items():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, layer.base_layer)
        self._adapters = {}
        self.allocator = None
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = total = 0
        for p in self.model.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")


def get_adalora_model(model: nn.Module, config: AdaLoraConfig) -> AdaLoraModel:
    """Adapt ``model`` in place and return the ``AdaLoraModel`` that wraps it (PEFT's ``get_peft_model``)."""
    return AdaLoraModel(model, config)
