"""Which modules get adapters: the name rule, heads, supported layer types and their features.

Every rule that decides "is this module targeted" (PEFT 0.21's: target names, regexes,
``layers_to_transform`` / ``layers_pattern``, ``exclude_modules``, "all-linear", the default
targets), "is this a head", "is this a Conv1D" or "what are its in/out features" lives here,
once.  The model (injection), the checkpoint code (validation, the saved config) and the demo
all call these functions.
"""

from __future__ import annotations

import re
import sys
import warnings

from torch import nn

from .config import INCLUDE_LINEAR_LAYERS_SHORTHAND

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
# PEFT 0.21 constants (peft.utils.constants)
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20


def is_all_linear(target_modules) -> bool:
    """PEFT's ``target_modules="all-linear"`` shorthand (case-insensitive)."""
    return isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def layer_index(key: str, layers_pattern=None) -> int | None:
    """The layer index PEFT reads from a module path for ``layers_to_transform``, or None.

    Without a pattern (None, "" or []) it is the first number that is the third or later path
    component (``model.layers.3.mlp`` -> 3); with one it is the number right after the first
    ``<pattern>.`` that starts a component (each pattern is a regex, tried in order).
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _uses_layer_indexes(layers_to_transform) -> bool:
    return layers_to_transform is not None and (
        len(layers_to_transform) != 0 if isinstance(layers_to_transform, (list, tuple)) else True)


def _in_layers(key: str, layers_to_transform, layers_pattern) -> bool:
    index = layer_index(key, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def target_matches(targets, key: str, layers_to_transform=None, layers_pattern=None) -> bool:
    """PEFT 0.21's ``check_target_module_exists`` for resolved ``targets``, exclusions aside.

    A string is a full-match regex.  A list matches ``key`` equal to an entry — then, as in PEFT,
    ``layers_to_transform`` is not applied — or ending with ``'.' + entry``, in which case the
    layer index (``layer_index``) must be in ``layers_to_transform`` when that is set.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not name_matches(targets, key):
        return False
    if _uses_layer_indexes(layers_to_transform):
        return _in_layers(key, layers_to_transform, layers_pattern)
    return True


def _is_linear(module: nn.Module) -> bool:
    """PEFT's "all-linear" layer test: ``nn.Linear`` (bitsandbytes layers included) or transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (transformers is only looked at when imported)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _first_path(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _module_names(model: nn.Module, adapted=()) -> list[str]:
    """``named_modules`` paths as they were before injection: nothing inside an ``adapted`` path."""
    return [k for k, _ in model.named_modules() if not any(k.startswith(p + ".") for p in adapted)]


def linear_module_names(model: nn.Module, task_type=None, adapted=()) -> set[str]:
    """What PEFT 0.21 expands ``target_modules="all-linear"`` to: every ``nn.Linear`` / ``Conv1D`` path,
    without the output layer of a transformers model (``get_output_embeddings()``) or, when it has
    none and ``task_type`` is ``SEQ_CLS``, without its ``score`` / ``classifier`` head.

    ``adapted``: paths already holding adapters (a model after injection); they count as the linear
    layers they wrap and what is inside them is skipped.
    """
    adapted = set(adapted)
    names = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in adapted):
            continue
        if name in adapted or _is_linear(module):
            names.add(name)
    if is_transformers_model(model):
        output = model.get_output_embeddings()
        if output is not None:
            names.discard(_first_path(model, output))
        elif getattr(task_type, "value", task_type) == "SEQ_CLS":
            for head_name in SEQ_CLS_HEAD_NAMES:
                head = getattr(model, head_name, None)
                if head is not None:
                    names.discard(_first_path(model, head))
                    break
    return names


def minimal_target_modules(targets, other_module_names) -> set[str]:
    """PEFT 0.21's ``_find_minimal_target_modules``: the fewest name suffixes that select exactly ``targets``
    among ``other_module_names`` (PEFT applies it to lists of 20 names or more)."""
    if isinstance(targets, str) or not targets:
        raise ValueError("target_modules should be a list or set of strings.")
    targets = set(targets)
    if "" in targets:
        raise ValueError("`target_modules` should not contain an empty string.")

    def suffixes(s):
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    others = {suffix for item in other_module_names for suffix in suffixes(item)}
    required: set[str] = set()
    for item, item_suffixes in sorted(((t, suffixes(t)) for t in targets), key=lambda tup: tup[1]):
        for suffix in item_suffixes:
            if suffix in required or suffix in others:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return required or targets


def resolve_target_modules(model: nn.Module, config, adapted=()):
    """What PEFT 0.21's ``config.target_modules`` holds once it has injected: a regex string, or a sorted list.

    None becomes PEFT's default for ``model.config.model_type``; "all-linear" the set of linear
    layer paths (``linear_module_names``); a list of 20 names or more PEFT's minimal suffixes
    (``minimal_target_modules``) when that is shorter.  ``adapted``: see ``linear_module_names``.
    """
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                "`target_modules` is None and there is no default for this model"
                + (f" (model_type={model_type!r})" if model_type else "")
                + ": pass target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'."
            )
        targets = DEFAULT_TARGET_MODULES[model_type]
    if is_all_linear(targets):
        targets = linear_module_names(model, config.task_type, adapted)
    if isinstance(targets, str):
        return targets
    targets = set(targets)
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        names = _module_names(model, adapted)
        others = [n for n in names if n not in targets and not name_matches(sorted(targets), n)]
        minimal = minimal_target_modules(targets, others)
        if len(minimal) < len(targets):
            targets = minimal
    return sorted(targets)


def _no_match_error(config, targets, excluded, unmatched, model) -> ValueError:
    """PEFT 0.21's three "nothing targeted" errors (``ValueError``, as its NoMatchingPeftModuleError is)."""
    notes = ""
    if config.layers_to_transform is not None:
        notes += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if config.layers_pattern is not None:
        notes += f" You also specified 'layers_pattern': {config.layers_pattern}."
    names = [k for k, m in model.named_modules() if is_adaptable(m)]
    have = f" Modules of a supported type it has: {names[:12]}{' ...' if len(names) > 12 else ''}"
    if excluded and not unmatched:
        return ValueError("All modules were excluded. This is likely unintended. Check your `target_modules`, "
                          f"`exclude_modules` and `modules_to_save` configuration (target_modules={targets!r} "
                          f"matched no module of the model that is not excluded).{notes}")
    if not excluded:
        return ValueError(f"Target modules {targets!r} not found in the base model: they matched no module of the "
                          f"model. Please check the target modules and try again.{notes}{have}")
    return ValueError(
        "No modules were targeted for adaptation. This might be caused by a combination of mismatched target "
        "modules and excluded modules. Please check your `target_modules` and `exclude_modules` configuration. "
        "You may also have only targeted modules that are marked to be saved (`modules_to_save`). "
        f"(target_modules={targets!r} matched no module of the model that is not excluded.){notes}{have}")


def find_targets(model: nn.Module, config, adapter_types: tuple = ()) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs to adapt, in ``model.named_modules()`` order (PEFT's injection order).

    PEFT 0.21's selection: ``target_modules`` resolved (``resolve_target_modules``) and matched by
    ``target_matches`` with ``layers_to_transform`` / ``layers_pattern``; ``exclude_modules`` and
    the heads (``config.head_modules()``, everything inside them included) are never adapted.
    Raises ``ValueError`` when nothing is selected (PEFT's messages), when a selected module already
    is an adapter (one of ``adapter_types``) or is registered at several paths, or when
    ``ensure_weight_tying`` would need a tied adapter; ``TypeError`` naming the module when a
    selected module is not a supported base layer.  Warns, as PEFT does, when ``exclude_modules``
    excluded nothing.  Changes nothing.
    """
    targets = resolve_target_modules(model, config)
    heads = find_heads(model, config.head_modules())
    paths_of: dict[int, list[str]] = {}
    for key, module in model.named_modules(remove_duplicate=False):
        paths_of.setdefault(id(module), []).append(key)
    adapters = [k for k, m in model.named_modules() if adapter_types and isinstance(m, adapter_types)]
    # nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: an adapter there does nothing
    uncalled = {f"{k}.out_proj" if k else "out_proj" for k, m in model.named_modules()
                if isinstance(m, nn.MultiheadAttention)}
    layers = (config.layers_to_transform, config.layers_pattern)
    found, excluded, unmatched, named_in_full, skipped = [], [], [], [], []
    for key, module in model.named_modules():
        if not key:
            continue
        if name_matches(config.exclude_modules, key) or within(heads, key):
            excluded.append(key)
            continue
        if not target_matches(targets, key, *layers):
            unmatched.append(key)
            continue
        if within(adapters, key):
            raise ValueError(f"Module {key!r} is already an AdaLoRA adapter or part of one: the model was adapted "
                             "before. Adapt a fresh base model.")
        if key in uncalled and is_all_linear(config.target_modules):
            skipped.append(key)
            continue
        if key in uncalled:
            raise ValueError(
                f"Target module {key!r} is the output projection of an nn.MultiheadAttention, which uses its weight "
                "directly and never calls the module: an adapter there would have no effect (PEFT's AdaLoRA adapts "
                "it without effect). Narrow `target_modules`, or add it to `exclude_modules`.")
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
        if _uses_layer_indexes(config.layers_to_transform) and not _in_layers(key, *layers):
            named_in_full.append(key)
        found.append((key, module))
    if not found:
        raise _no_match_error(config, targets, excluded, unmatched, model)
    if skipped:
        warnings.warn(f"target_modules='all-linear': {skipped} not adapted: the output projection of an "
                      "nn.MultiheadAttention is read directly by the attention, so an adapter there would have no "
                      "effect (PEFT adapts it, without effect).")
    if config.exclude_modules and not excluded:
        warnings.warn(f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. "
                      "Please check that exclude_modules was set correctly.")
    if named_in_full:
        warnings.warn(f"Modules {named_in_full} are adapted although they are outside layers_to_transform="
                      f"{config.layers_to_transform}: target_modules names them in full, and PEFT 0.21 applies "
                      "layers_to_transform only to modules matched by a name suffix.")
    if config.ensure_weight_tying:
        _check_no_tied_target(model, found)
    return found


def _check_no_tied_target(model: nn.Module, found) -> None:
    """``ensure_weight_tying``: a target whose weight another module shares would need a tied adapter."""
    target_paths = [p for p, _ in found]
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(path)
    for path, module in found:
        for p in module.parameters(recurse=False):
            others = [o for o in owners.get(id(p), []) if not within(target_paths, o)]
            if others:
                raise ValueError(
                    f"`ensure_weight_tying=True`: target module {path!r} shares its weights with {others}, which "
                    "would need an adapter tied to this one. fastadalora does not tie adapters (PEFT's AdaLoRA "
                    "cannot either: the tied module is usually an nn.Embedding). Do not target it, or set "
                    "ensure_weight_tying=False.")
