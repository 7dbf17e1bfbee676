"""Which modules get adapters: the name rule, heads, supported layer types and their features.

Every rule that decides "is this module targeted", "is this a head", "is this a Conv1D" or "what
are its in/out features" lives here, once.  The model (injection), the checkpoint loader
(validation) and the demo all call these functions.
"""

from __future__ import annotations

import re
import sys

from torch import nn

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


# --------------------------------------------------------------------------- names
def name_matches(patterns, key: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches ``key == p`` or ``key.endswith('.' + p)``."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith("." + p) for p in patterns)


def within(paths, key: str) -> bool:
    """True when ``key`` is one of the module ``paths`` or lies inside one."""
    return any(key == p or key.startswith(p + ".") for p in paths)


def find_heads(model: nn.Module, names) -> dict[str, nn.Module]:
    """``{path: module}`` of the ``modules_to_save`` heads: the outermost modules matching ``names``.

    ``names`` match by the list rule of ``name_matches`` (a dot boundary; PEFT's bare ``endswith``
    would also match ``my_classifier`` for ``classifier``).
    """
    found: dict[str, nn.Module] = {}
    if not names:
        return found
    names = list(names)
    for path, module in model.named_modules():
        if path and name_matches(names, path) and not within(found, path):
            found[path] = module
    return found


# --------------------------------------------------------------------------- layer types
def conv1d_type():
    """transformers' ``Conv1D`` class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def _bnb_kind(module: nn.Module) -> str | None:
    """'linear4bit' / 'linear8bit' for bitsandbytes layers (bitsandbytes is only looked at when imported)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    import bitsandbytes.nn as bnn

    if isinstance(module, bnn.Linear4bit):
        return "linear4bit"
    if isinstance(module, bnn.Linear8bitLt):
        return "linear8bit"
    return None


def layer_kind(module: nn.Module) -> str | None:
    """What kind of base layer AdaLoRA can wrap ``module`` as, or None.

    ``"linear"`` (``nn.Linear``), ``"conv1d"`` (transformers ``Conv1D``, weight stored (in, out)),
    ``"embedding"`` (``nn.Embedding``), ``"conv2d"`` (``nn.Conv2d``), ``"linear4bit"`` /
    ``"linear8bit"`` (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``).
    """
    kind = _bnb_kind(module)  # before nn.Linear: the bitsandbytes layers subclass it
    if kind is not None:
        return kind
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def is_adaptable(module: nn.Module) -> bool:
    """A base layer type that AdaLoRA can wrap (see ``layer_kind``)."""
    return layer_kind(module) is not None


SUPPORTED_TYPES_TEXT = ("torch.nn.Linear, transformers Conv1D, torch.nn.Embedding, torch.nn.Conv2d and "
                        "bitsandbytes Linear4bit / Linear8bitLt")


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of the adapter over a supported base layer.

    ``lora_A`` is (r, in), ``lora_B`` is (out, r): for an embedding ``in`` is the vocabulary size and
    ``out`` the embedding width; for a Conv2d ``in`` is ``in_channels·kh·kw`` (PEFT's ``SVDConv2d``).
    """
    kind = layer_kind(module)
    if kind in ("linear", "linear4bit", "linear8bit"):
        return int(module.in_features), int(module.out_features)
    if kind == "conv1d":
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    if kind == "embedding":
        return int(module.num_embeddings), int(module.embedding_dim)
    if kind == "conv2d":
        kh, kw = module.kernel_size
        return int(module.in_channels * kh * kw), int(module.out_channels)
    raise TypeError(f"{type(module).__name__} is not a supported base layer ({SUPPORTED_TYPES_TEXT})")


# --------------------------------------------------------------------------- targets
def resolve_target_modules(model: nn.Module, target_modules):
    """``target_modules``, or PEFT's default for ``model.config.model_type`` when it is None."""
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        "`target_modules` is None and there is no default for this model"
        + (f" (model_type={model_type!r})" if model_type else "")
        + ": pass target_modules, e.g. ['q_proj', 'v_proj']."
    )


def find_targets(model: nn.Module, config, adapter_types: tuple = ()) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs to adapt, in ``model.named_modules()`` order (PEFT's injection order).

    Heads (``config.head_modules()``) and everything inside them are never adapted.  Raises
    ``ValueError`` when nothing matches or a matched module already is an adapter (one of
    ``adapter_types``), and ``TypeError`` naming the module when a matched module is not a
    supported base layer.  Changes nothing.
    """
    targets = resolve_target_modules(model, config.target_modules)
    heads = find_heads(model, config.head_modules())
    paths_of: dict[int, list[str]] = {}
    for key, module in model.named_modules(remove_duplicate=False):
        paths_of.setdefault(id(module), []).append(key)
    adapters = [k for k, m in model.named_modules() if adapter_types and isinstance(m, adapter_types)]
    found = []
    for key, module in model.named_modules():
        if not key or name_matches(config.exclude_modules, key) or within(heads, key):
            continue
        if not name_matches(targets, key):
            continue
        if within(adapters, key):
            raise ValueError(f"Module {key!r} is already an AdaLoRA adapter or part of one: the model was adapted "
                             "before. Adapt a fresh base model.")
        if not is_adaptable(module):
            raise TypeError(
                f"Target module {key!r} is a {type(module).__module__}.{type(module).__name__}, which AdaLoRA "
                f"cannot adapt: only {SUPPORTED_TYPES_TEXT} are supported. Narrow `target_modules` so that "
                "it does not match this module."
            )
        if within([p for p, _ in found], key):
            continue  # inside a module already targeted
        if len(paths_of[id(module)]) > 1:
            raise ValueError(
                f"Target module {key!r} is registered at several paths {paths_of[id(module)]}: one module object "
                "shared by two parents cannot get one adapter without the other path silently keeping the plain "
                "layer. Give each path its own module, or exclude it with `exclude_modules`.")
        found.append((key, module))
    if not found:
        names = [k for k, m in model.named_modules() if is_adaptable(m)]
        raise ValueError(
            f"Target modules {targets!r} matched no module of the model. Linear layers it has: "
            f"{names[:12]}{' ...' if len(names) > 12 else ''}"
        )
    return found
