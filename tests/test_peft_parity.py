"""Side by side with PEFT 0.21: the config API, every config field, target selection and what save writes.

Each test runs the same input through PEFT and through fastadalora and compares the outcome: the
same adapted module paths (or both raising), the same errors and warnings, the same
``adapter_config.json`` and ``README.md``.  Models are tiny transformers models built from configs,
as PEFT's own suite builds them (``parity_models.py``).  PEFT 0.21's seq2seq task wrapper fails on
transformers 5, so T5 and BART go through ``get_peft_model`` without a task type.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import pickle
import warnings

import peft
import pytest
import torch
from peft.tuners.adalora.layer import AdaLoraLayer
from peft.tuners.tuners_utils import _find_minimal_target_modules, _maybe_include_all_linear_layers
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

import fastadalora
from fastadalora import AdaLoraConfig, targeting
from fastadalora.checkpoint import peft_format
from parity_models import PARITY_MODELS

TOTAL = dict(total_step=10)


def _outcome(fn):
    """``(result, exception, warning messages)`` of ``fn()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, exc = fn(), None
        except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
            result, exc = None, e
    return result, exc, [str(w.message) for w in caught]


def _peft_config(**kwargs):
    return peft.AdaLoraConfig(**{**TOTAL, **kwargs})


def _our_config(**kwargs):
    return AdaLoraConfig(**{**TOTAL, **kwargs})


def peft_adapted(model, **kwargs) -> list[str]:
    """The module paths PEFT adapts: ``get_peft_model`` on a copy, then the modules that got ``lora_A``."""
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(**kwargs))
    return sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, AdaLoraLayer))


def our_adapted(model, **kwargs) -> list[str]:
    return sorted(path for path, _ in targeting.find_targets(model, _our_config(**kwargs)))


# ============================================================================ the config API
def _normalised(d: dict) -> dict:
    """A PEFT or fastadalora ``to_dict()`` as JSON would hold it (sets sorted, enums by value)."""
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def test_every_peft_field_exists_with_peft_default():
    ours, theirs = AdaLoraConfig(), peft.AdaLoraConfig(total_step=1)
    peft_names = {f.name for f in dataclasses.fields(theirs)}
    from fastadalora.config import FASTADALORA_ONLY

    assert {f.name for f in dataclasses.fields(ours)} == peft_names | set(FASTADALORA_ONLY)
    d_ours, d_theirs = _normalised(ours.to_dict()), _normalised(theirs.to_dict())
    assert d_ours.keys() == d_theirs.keys() == peft_names - {"runtime_config"}
    d_theirs["total_step"] = None
    assert d_ours == d_theirs
    assert dataclasses.asdict(ours.runtime_config) == dataclasses.asdict(theirs.runtime_config)
    assert ours.peft_version == theirs.peft_version == fastadalora.config.PEFT_VERSION


@pytest.mark.parametrize("method", ["to_dict", "save_pretrained", "from_pretrained", "from_json_file"])
def test_config_methods(method):
    assert callable(getattr(AdaLoraConfig(), method)) and callable(getattr(peft.AdaLoraConfig(total_step=1), method))


@pytest.mark.parametrize("task_type", [*peft.TaskType, None])
def test_valid_task_types(task_type):
    _peft_config(task_type=task_type)
    _our_config(task_type=task_type)


def test_invalid_task_type_message_is_peft():
    msg = ("Invalid task type: 'invalid-task-type'. Must be one of the following task types: "
           f"{', '.join(peft.TaskType)}.")
    for make in (_peft_config, _our_config):
        with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
            make(task_type="invalid-task-type")


def _rich_kwargs():
    return dict(init_r=6, target_r=3, tinit=1, tfinal=2, deltaT=2, lora_alpha=16, lora_dropout=0.1,
                target_modules=["query", "value"], exclude_modules=["pooler.dense"], layers_to_transform=[0, 1],
                layers_pattern="layer", modules_to_save=["classifier"], bias="lora_only", task_type="SEQ_CLS",
                base_model_name_or_path="some/model", revision="main", inference_mode=True, ensure_weight_tying=True)


@pytest.mark.parametrize("kwargs", [{}, _rich_kwargs()], ids=["defaults", "rich"])
def test_save_pretrained_and_from_pretrained_round_trip_both_ways(tmp_path, kwargs):
    ours, theirs = _our_config(**kwargs), _peft_config(**kwargs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    written_theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for d in (written_ours, written_theirs):
        for key in ("target_modules", "exclude_modules"):
            if isinstance(d[key], list):
                d[key] = sorted(d[key])
    assert written_ours == written_theirs
    assert AdaLoraConfig.from_pretrained(tmp_path / "ours").to_dict() == ours.to_dict()
    # PEFT writes its target sets in set order: compare the lists as sets
    assert _sorted_lists(AdaLoraConfig.from_pretrained(tmp_path / "theirs").to_dict()) == _sorted_lists(ours.to_dict())
    assert _normalised(peft.AdaLoraConfig.from_pretrained(str(tmp_path / "ours")).to_dict()) == \
        _normalised(theirs.to_dict())


def test_from_json_file_drops_runtime_config_with_peft_warning(tmp_path):
    config = _our_config()
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    assert AdaLoraConfig.from_json_file(path) == config.to_dict()
    data = json.loads(path.read_text())
    data["runtime_config"] = {"ephemeral_gpu_offload": True}
    path.write_text(json.dumps(data))
    for cls in (AdaLoraConfig, peft.AdaLoraConfig):
        with pytest.warns(UserWarning, match="contains a `runtime_config` key. This is ignored"):
            assert cls.from_json_file(str(path)) == config.to_dict()


def test_copy_deepcopy_pickle():
    config = _our_config(**_rich_kwargs())
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.to_dict() == config.to_dict()


def test_from_pretrained_forward_compatible_unknown_keys(tmp_path):
    for cls, make in ((AdaLoraConfig, _our_config), (peft.AdaLoraConfig, _peft_config)):
        d = tmp_path / cls.__module__
        config = make()
        config.save_pretrained(d)
        data = json.loads((d / "adapter_config.json").read_text())
        data.update(foobar="baz", spam=123)
        (d / "adapter_config.json").write_text(json.dumps(data))
        msg = "Unexpected keyword arguments ['foobar', 'spam'] for class AdaLoraConfig, these are ignored."
        _, exc, messages = _outcome(lambda: cls.from_pretrained(str(d)))
        assert exc is None and len(messages) == 1 and messages[0].startswith(msg), (cls, messages)
        assert _normalised(cls.from_pretrained(str(d)).to_dict()) == _normalised(config.to_dict())


def test_from_pretrained_sanity_check(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar", "baz": 123}))
    msg = "The AdaLoraConfig config that is trying to be loaded is missing required keys: {'peft_type'}."
    for cls in (AdaLoraConfig, peft.AdaLoraConfig):
        with pytest.raises(TypeError, match=msg.replace(".", r"\.").replace("{", r"\{").replace("}", r"\}")):
            cls.from_pretrained(str(tmp_path))


def test_from_pretrained_of_another_peft_type_is_refused(tmp_path):
    peft.LoraConfig(target_modules=["q"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="'LORA' adapter config, not an AdaLoRA one"):
        AdaLoraConfig.from_pretrained(tmp_path)
    assert type(peft.AdaLoraConfig.from_pretrained(str(tmp_path))) is peft.LoraConfig  # PEFT switches class


def test_from_pretrained_kwargs_fill_only_what_the_file_lacks(tmp_path):
    _our_config(init_r=6, target_r=2).save_pretrained(tmp_path)
    for cls in (AdaLoraConfig, peft.AdaLoraConfig):
        loaded = cls.from_pretrained(str(tmp_path), init_r=9, cache_dir="ignored")
        assert loaded.init_r == 6


def test_missing_directory_message_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        AdaLoraConfig.from_pretrained(tmp_path / "nope")


def test_peft_version_is_stored_and_kept_on_load(tmp_path):
    config = _our_config(peft_version="0.10")
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == "0.10"
    assert AdaLoraConfig.from_pretrained(tmp_path).peft_version == "0.10"
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).peft_version == "0.10"


def test_r_warning_is_peft_and_defaults_do_not_warn():
    kwargs = {"peft_type": "ADALORA", "task_type": "SEQ_2_SEQ_LM", "init_r": 12, "lora_alpha": 32, "total_step": 1}
    for cls in (AdaLoraConfig, peft.AdaLoraConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls(**kwargs)
        with pytest.warns(UserWarning, match="Note that `r` is not used in AdaLora and will be ignored."):
            cls(r=10, total_step=1)


@pytest.mark.parametrize("timing", [dict(total_step=100, tinit=0, tfinal=0), dict(total_step=100, tinit=10, tfinal=10),
                                    dict(total_step=100, tinit=79, tfinal=20), dict(total_step=100, tinit=80, tfinal=19)])
def test_valid_timing_works(timing):
    AdaLoraConfig(**timing)
    peft.AdaLoraConfig(**timing)


@pytest.mark.parametrize("timing", [dict(total_step=100, tinit=20, tfinal=80), dict(total_step=100, tinit=80, tfinal=20),
                                    dict(total_step=10, tinit=20, tfinal=0), dict(total_step=10, tinit=0, tfinal=10),
                                    dict(total_step=10, tinit=10, tfinal=0), dict(total_step=10, tinit=20, tfinal=20),
                                    dict(total_step=10, tinit=0, tfinal=20)])
def test_timing_bounds_error_is_peft(timing):
    for cls in (AdaLoraConfig, peft.AdaLoraConfig):
        with pytest.raises(ValueError, match="The supplied schedule values don't allow for a budgeting phase"):
            cls(**timing)


def test_total_step_none_is_refused_later_than_peft():
    """Deliberate difference: None is allowed so AdaLoraCallback can fill it; PEFT refuses it in the config."""
    with pytest.raises(ValueError, match="AdaLoRA does not work when `total_step` is None"):
        peft.AdaLoraConfig(total_step=None)
    config = AdaLoraConfig(total_step=None)  # accepted; the first update_and_allocate raises
    with pytest.raises(ValueError, match="total_step"):
        config.require_total_step()


def test_layers_to_transform_validation_is_peft():
    for cls in (AdaLoraConfig, peft.AdaLoraConfig):
        with pytest.raises(ValueError, match="When `layers_pattern` is specified, `layers_to_transform` must also"):
            cls(total_step=1, target_modules=["query", "value"], layers_pattern="model.layers")
        config = cls(total_step=1, target_modules=["query"], layers_to_transform=[0, 1, 2], layers_pattern="x")
        assert config.layers_to_transform == [0, 1, 2] and config.layers_pattern == "x"
        config = cls(total_step=1, layers_to_transform=0, layers_pattern="model.layers")  # 0 is a valid index
        assert config.layers_to_transform == 0
        for key in ("layers_to_transform", "layers_pattern"):
            value = [0] if key == "layers_to_transform" else "h"
            with pytest.raises(ValueError, match=f"`{key}` cannot be used when `target_modules` is a str."):
                cls(total_step=1, target_modules="all-linear", **{key: value})


# ============================================================================ every field, PEFT vs us
# (field value, what we do): "same" = PEFT's outcome (accepted silently, or its warning, or its error);
# "no_effect" = accepted with a warning that AdaLoRA ignores it (PEFT ignores it silently);
# "unsupported" = a ValueError naming the field and saying "not supported" (PEFT accepts it).
PROBES = {
    "r": (16, "same"),
    "use_rslora": (True, "no_effect"),
    "alpha_pattern": ({"query": 16}, "no_effect"),
    "lora_bias": (True, "no_effect"),
    "use_qalora": (True, "no_effect"),
    "qalora_group_size": (8, "same"),
    "eva_config": ({}, "same"),
    "corda_config": ({}, "same"),
    "lora_ga_config": ({}, "same"),
    "loftq_config": ({"loftq_bits": 4}, "same"),
    "velora_config": ({}, "no_effect"),
    "monteclora_config": ({}, "no_effect"),
    "use_bdlora": ({}, "no_effect"),
    "arrow_config": ({}, "no_effect"),
    "kasa_config": ({}, "no_effect"),
    "use_dora": (True, "same"),
    "layer_replication": ([[0, 1]], "unsupported"),
    "trainable_token_indices": ([0, 1], "unsupported"),
    "target_parameters": (["weight"], "unsupported"),
    "megatron_config": ({"tensor_model_parallel_size": 1}, "unsupported"),
    "alora_invocation_tokens": ([1, 2], "unsupported"),
    "init_lora_weights": ("gaussian", "no_effect"),
    "bias": ("all", "same"),
    "inference_mode": (True, "same"),
    "ensure_weight_tying": (True, "same"),
    "base_model_name_or_path": ("org/model", "same"),
    "revision": ("v1", "same"),
    "peft_version": ("0.20.0", "same"),
    "auto_mapping": ({"base_model_class": "X", "parent_library": "y"}, "same"),
    "megatron_core": ("my.megatron", "same"),
    "runtime_config": ({"ephemeral_gpu_offload": True}, "same"),
    "layers_to_transform": ([0], "same"),
    "layers_pattern": ("layers", "same"),  # with layers_to_transform, below
    "exclude_modules": (["x"], "same"),
    "modules_to_save": (["classifier"], "same"),
    "target_modules": ("all-linear", "same"),
    "task_type": ("CAUSAL_LM", "same"),
    "fan_in_fan_out": (True, "same"),
    "rank_pattern": ({"a.lora_E": [True, False]}, "same"),
    "peft_type": ("ADALORA", "same"),
}
# fields with their own tests (test_config.py, test_reliability.py, the timing tests above)
NUMERIC_FIELDS = {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                  "lora_alpha", "lora_dropout"}


def test_every_peft_field_is_probed():
    peft_names = {f.name for f in dataclasses.fields(peft.AdaLoraConfig)}
    assert peft_names == set(PROBES) | NUMERIC_FIELDS


@pytest.mark.parametrize("name", sorted(PROBES))
def test_field_outcome_against_peft(name):
    value, expect = PROBES[name]
    extra = {"layers_to_transform": [0]} if name == "layers_pattern" else {}
    kwargs = {name: value, **extra}
    _, peft_exc, peft_warnings = _outcome(lambda: _peft_config(**kwargs))
    ours, our_exc, our_warnings = _outcome(lambda: _our_config(**kwargs))
    if expect == "unsupported":
        assert peft_exc is None
        assert isinstance(our_exc, ValueError) and f"`{name}=" in str(our_exc) and "not supported" in str(our_exc)
        return
    if peft_exc is not None:
        assert our_exc is not None and isinstance(our_exc, type(peft_exc)), (peft_exc, our_exc)
        assert str(peft_exc).replace("PeftType.", "") in str(our_exc)
        return
    assert our_exc is None, our_exc
    for message in peft_warnings:
        if "is_gradient_checkpointing" not in message:
            assert message in our_warnings, (message, our_warnings)
    ours_only = [m for m in our_warnings if m not in peft_warnings]
    if expect == "no_effect":
        assert any(f"`{name}" in m and ("no effect" in m or "does not have" in m) for m in ours_only), ours_only
    else:
        assert not ours_only, ours_only
    if name == "runtime_config":
        assert ours.runtime_config.ephemeral_gpu_offload is True
    else:
        assert ours.to_dict()[name] == ({} if name == "loftq_config" else _normalised({name: value})[name])


@pytest.mark.parametrize("kwargs", [
    dict(init_lora_weights="loftq"), dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
    dict(lora_bias=True, init_lora_weights="gaussian"), dict(target_parameters="weight"),
    dict(use_dora=True, megatron_config={"a": 1}),
], ids=["loftq", "loftq_with_config", "lora_bias_init", "target_parameters_str", "dora_megatron"])
def test_combinations_peft_rejects_are_rejected(kwargs):
    _, peft_exc, _ = _outcome(lambda: _peft_config(**kwargs))
    _, our_exc, _ = _outcome(lambda: _our_config(**kwargs))
    assert peft_exc is not None and our_exc is not None
    # PEFT raises ImportError for 'loftq' when scipy is missing; with scipy a ValueError, as we do
    expected = ValueError if isinstance(peft_exc, ImportError) else type(peft_exc)
    assert isinstance(our_exc, expected), (peft_exc, our_exc)


@pytest.mark.parametrize("name", sorted(n for n, (_, e) in PROBES.items() if e != "unsupported" and n != "use_dora"))
def test_from_peft_converts_every_field(name):
    value, _ = PROBES[name]
    kwargs = {name: value, **({"layers_to_transform": [0]} if name == "layers_pattern" else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _peft_config(**kwargs)
        converted = AdaLoraConfig.from_peft(theirs)
        direct = _our_config(**kwargs)
    expected = direct.to_dict()
    if dataclasses.is_dataclass(getattr(theirs, name)):  # PEFT turns a sub-config dict into its dataclass
        expected[name] = _normalised(dataclasses.asdict(getattr(theirs, name)))
    if name == "loftq_config":
        assert theirs.loftq_config == {}  # PEFT dropped it, with its warning
    if name == "r":
        assert converted.r == 16
    assert converted.to_dict() == expected
    assert converted.runtime_config == direct.runtime_config


def test_from_peft_strips_the_adapter_name_of_a_live_rank_pattern():
    theirs = _peft_config(rank_pattern={"a.b.lora_E.default": [True, False]})
    assert AdaLoraConfig.from_peft(theirs).rank_pattern == {"a.b.lora_E": [True, False]}


# ============================================================================ matching rules
_KEYS = ["foo", "foo.bar.1.baz", "bar.1.baz", "foo.bar.10.baz", "foo.bar.001.baz", "foo.bar.1.spam.2.baz",
         "foo.bar.2.spam.1.baz", "blocks.1.weight", "mlp.blocks.1.weight", "transformer.h.1.attn.q_proj",
         "transformer.h.1.attn.q_proj.foo", "model.layers.1.mlp.experts.0.up_proj",
         "model.layers.2.mlp.experts.1.up_proj", "x.layer.2.sub.3.q", "q", "layers.0.q", "a.layers.3.q",
         "encoder.block.1.layer.0.SelfAttention.q", "baz"]
_TARGETS = [["baz"], ["q"], ["q_proj", "up_proj"], ["weight", "q"], ["foo.bar.1.baz", "q"], "q.*", r".*\.q",
            ".*(baz|q_proj)"]
_LAYERS = [None, 0, 1, [1], [0, 2], [], [10]]
_PATTERNS = [None, "", [], "layers", ["h", "layers"], "bar", "blocks", "l.yers", "layer", ["block", "layer"]]


def test_target_rule_matches_peft_check_target_module_exists():
    """``targeting.target_matches`` vs PEFT's ``check_target_module_exists`` on every key and combination."""
    compared = 0
    for targets, layers, pattern in itertools.product(_TARGETS, _LAYERS, _PATTERNS):
        if isinstance(targets, str) and (layers is not None or pattern is not None):
            continue  # both configs refuse it (tested above)
        if pattern and layers is None:
            continue
        config = peft.LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
        for key in _KEYS:
            expected = bool(check_target_module_exists(config, key))
            assert targeting.target_matches(targets, key, layers, pattern) == expected, (key, targets, layers,
                                                                                        pattern)
            compared += 1
    assert compared > 3000


def _tree(paths) -> nn.Module:
    """A module tree with exactly these paths (and their parents)."""
    root = nn.Module()
    for path in paths:
        node = root
        for part in path.split("."):
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
    return root


def test_exclusions_match_peft_check_target_module_exists():
    """``exclude_modules`` and ``modules_to_save`` keep modules from being adapted exactly where PEFT's rule does."""
    tree = _tree(_KEYS)
    keys = [k for k, _ in tree.named_modules() if k]
    for exclude, save in itertools.product([None, ["baz"], "foo.*", ["bar.1.baz"], ["1"]],
                                           [None, ["bar"], ["spam"], ["bar.1"], ["q"]]):
        config = peft.LoraConfig(target_modules=["baz", "q"], exclude_modules=exclude, modules_to_save=save)
        heads = targeting.find_heads(tree, save or [])
        for key in keys:
            excluded = type(check_target_module_exists(config, key)).__name__ == "_ExcludedModule"
            ours = targeting.name_matches(exclude, key) or targeting.within(heads, key)
            assert ours == excluded, (key, exclude, save)


@pytest.mark.parametrize("model_name", sorted(PARITY_MODELS))
@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_all_linear_expansion_matches_peft(model_name, task_type):
    model = PARITY_MODELS[model_name]["build"]()
    config = peft.LoraConfig(target_modules="all-linear", task_type=task_type)
    expected = _maybe_include_all_linear_layers(config, model).target_modules
    assert targeting.linear_module_names(model, task_type) == expected


@pytest.mark.parametrize("model_name", sorted(PARITY_MODELS))
def test_minimal_target_modules_match_peft(model_name):
    model = PARITY_MODELS[model_name]["build"]()
    names = [n for n, _ in model.named_modules()]
    linear = sorted(targeting.linear_module_names(model))
    for targets in (linear, linear[::2], [n for n in linear if ".0." in n or ".1." in n]):
        if not targets:
            continue
        others = [n for n in names if n not in targets and not targeting.name_matches(targets, n)]
        assert targeting.minimal_target_modules(targets, others) == _find_minimal_target_modules(targets, others)


def test_default_target_table_is_peft():
    from peft.utils import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as peft_table

    assert targeting.DEFAULT_TARGET_MODULES == peft_table


@pytest.mark.parametrize("model_name", sorted(PARITY_MODELS))
@pytest.mark.parametrize("target_modules", [None, "all-linear"])
def test_resolved_target_modules_are_what_peft_leaves_in_its_config(model_name, target_modules):
    model = PARITY_MODELS[model_name]["build"]()
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(target_modules=target_modules))
    theirs = pm.peft_config["default"].target_modules
    assert targeting.resolve_target_modules(model, _our_config(target_modules=target_modules)) == sorted(theirs)


# ============================================================================ targeting grid on real models
def _grid(spec, model):
    t, pattern, ex = spec["targets"], spec["pattern"], spec["exclude"]
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) or targeting.is_conv1d(m))
    cases = {
        "defaults": {},
        "all_linear": dict(target_modules="all-linear"),
        "all_linear_upper": dict(target_modules="ALL-Linear"),
        "list": dict(target_modules=t),
        "layer_int": dict(target_modules=t, layers_to_transform=0),
        "layer_list": dict(target_modules=t, layers_to_transform=[1]),
        "layer_pattern": dict(target_modules=t, layers_to_transform=[0, 1], layers_pattern=pattern),
        "layer_pattern_list": dict(target_modules=t, layers_to_transform=1, layers_pattern=[pattern]),
        "layer_pattern_layer": dict(target_modules=t, layers_to_transform=[1], layers_pattern="layer"),
        "layer_pattern_missing": dict(target_modules=t, layers_to_transform=[1], layers_pattern="nope"),
        "layer_pattern_empty": dict(target_modules=t, layers_to_transform=[0], layers_pattern=""),
        "layer_empty_list": dict(target_modules=t, layers_to_transform=[]),
        "layer_out_of_range": dict(target_modules=t, layers_to_transform=[7]),
        "defaults_layer": dict(layers_to_transform=[0]),
        "exclude_list": dict(target_modules=t, exclude_modules=[ex]),
        "exclude_regex": dict(target_modules=t, exclude_modules=ex.replace(".", r"\.")),
        "exclude_suffix_all_linear": dict(target_modules="all-linear", exclude_modules=[t[0]]),
        "exclude_unused": dict(target_modules=t, exclude_modules=["does_not_exist"]),
        "regex_target_regex_exclude": dict(target_modules=rf".*\.{t[0]}", exclude_modules=r".*\.0\..*"),
        "everything_excluded": dict(target_modules=t, exclude_modules=t),
        "no_match": dict(target_modules=["not_a_module"]),
        "full_path_bypasses_layers": dict(target_modules=[ex, *t[1:]], layers_to_transform=[1]),
        "all_full_paths_with_layers": dict(target_modules=linear, layers_to_transform=[1]),
        "all_full_paths": dict(target_modules=linear),
        "modules_to_save": dict(target_modules=t, modules_to_save=[t[0]]),
        "all_linear_layers": dict(target_modules="all-linear", layers_to_transform=[0]),  # refused
    }
    if hasattr(model, "score") or hasattr(model, "classifier"):
        cases["all_linear_seq_cls"] = dict(target_modules="all-linear", task_type="SEQ_CLS")
        cases["list_seq_cls"] = dict(target_modules=t, task_type="SEQ_CLS")
    return cases


def _grid_ids():
    ids = []
    for name, spec in sorted(PARITY_MODELS.items()):
        ids += [(name, case) for case in _grid(spec, spec["build"]())]
    return ids


GRID = _grid_ids()


@pytest.fixture(scope="module")
def built_models():
    return {name: spec["build"]() for name, spec in PARITY_MODELS.items()}


@pytest.mark.parametrize("model_name, case", GRID, ids=[f"{m}-{c}" for m, c in GRID])
def test_adapted_modules_match_peft(built_models, model_name, case):
    model = built_models[model_name]
    kwargs = _grid(PARITY_MODELS[model_name], model)[case]
    theirs, peft_exc, peft_warnings = _outcome(lambda: peft_adapted(model, **kwargs))
    ours, our_exc, our_warnings = _outcome(lambda: our_adapted(model, **kwargs))
    if peft_exc is not None:
        assert isinstance(peft_exc, ValueError) and isinstance(our_exc, ValueError), (peft_exc, our_exc)
        for phrase in ("All modules were excluded", "No modules were targeted", "not found in the base model",
                       "cannot be used when"):
            assert (phrase in str(peft_exc)) == (phrase in str(our_exc)), (peft_exc, our_exc)
        return
    assert our_exc is None, our_exc
    assert ours == theirs
    unused = "but no modules were excluded"
    assert any(unused in m for m in peft_warnings) == any(unused in m for m in our_warnings)


def test_find_targets_changes_nothing(built_models):
    model = built_models["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    targeting.find_targets(model, _our_config(target_modules="all-linear"))
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_full_paths_outside_layers_to_transform_warn(built_models):
    spec = PARITY_MODELS["bert"]
    with pytest.warns(UserWarning, match="names them in full"):
        our_adapted(built_models["bert"], target_modules=[spec["exclude"], "value"], layers_to_transform=[1])


def test_ensure_weight_tying_on_a_tied_target_is_refused_as_peft_fails(built_models):
    model = built_models["gpt2"]
    kwargs = dict(target_modules=["c_attn", "lm_head"], ensure_weight_tying=True)
    _, peft_exc, _ = _outcome(lambda: peft_adapted(model, **kwargs))
    _, our_exc, _ = _outcome(lambda: our_adapted(model, **kwargs))
    assert isinstance(peft_exc, ValueError)
    assert isinstance(our_exc, ValueError) and "ensure_weight_tying" in str(our_exc)
    assert our_adapted(model, target_modules=["c_attn", "lm_head"]) == peft_adapted(model, target_modules=["c_attn",
                                                                                                          "lm_head"])


def test_get_adalora_model_accepts_a_peft_config(built_models):
    model = built_models["llama"]
    config = _peft_config(target_modules="all-linear", exclude_modules=["o_proj"])
    adapted = fastadalora.get_adalora_model(copy.deepcopy(model), config)
    assert sorted(adapted.adapter_layers()) == peft_adapted(model, target_modules="all-linear",
                                                           exclude_modules=["o_proj"])


# ============================================================================ what save_pretrained writes
SAVE_CASES = {
    "bert_seq_cls": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bert_no_task": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert4_all_linear": ("bert4", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    "gpt2_defaults": ("gpt2", dict()),
    "gpt2_causal_lm": ("gpt2", dict(target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")),
    "t5_defaults_layers": ("t5", dict(layers_to_transform=[0], layers_pattern="block")),
    "bart_all_linear": ("bart", dict(target_modules="all-linear", exclude_modules=["fc2"])),
    "llama_all_linear_causal": ("llama", dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "llama_cls_all_linear": ("llama_cls", dict(target_modules="all-linear", task_type="SEQ_CLS", init_r=4,
                                               target_r=2, lora_alpha=16)),
}


def _written_by_peft(model, kwargs, directory):
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(**kwargs))
    pm.save_pretrained(str(directory))
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, (directory / "README.md").read_text()


def _sorted_lists(d):
    return {k: sorted(v) if k in ("target_modules", "exclude_modules") and isinstance(v, list) else v
            for k, v in d.items()}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_adapter_config_and_model_card_match_peft(built_models, tmp_path, case):
    model_name, kwargs = SAVE_CASES[case]
    model = built_models[model_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, their_card = _written_by_peft(model, kwargs, tmp_path / "peft")
        am = fastadalora.get_adalora_model(copy.deepcopy(model), _our_config(**kwargs))
    ours = peft_format.config_dict(am.adalora_config, am.model, am.adapter_layers(), am.head_modules(),
                                   am.live_masks())
    assert _sorted_lists(ours) == _sorted_lists(theirs)
    assert json.loads(json.dumps(ours)) == ours  # JSON-ready as it is
    assert peft_format.model_card(am.model, am.adalora_config) == their_card
    # saving into a directory that has the card already updates it as PEFT does (no second version line)
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "peft"))
    assert peft_format.model_card(am.model, am.adalora_config, existing=their_card) == \
        (tmp_path / "peft" / "README.md").read_text()


def test_model_card_of_a_plain_module_and_a_custom_card():
    model = nn.Sequential(nn.Linear(4, 4))
    card = peft_format.model_card(model, _our_config(target_modules=["0"]))
    assert card.startswith("---\nlibrary_name: peft\n---\n") and card.endswith("### Framework versions\n\n- PEFT "
                                                                                + fastadalora.config.PEFT_VERSION)
    custom = "---\nlicense: mit\n---\n# My adapter\n\n### Framework versions\n\n- Transformers 5\n"
    updated = peft_format.model_card(model, _our_config(target_modules=["0"]), existing=custom)
    assert "license: mit" in updated and "# My adapter" in updated
    assert updated.count("- PEFT ") == 1 and "### Framework versions\n\n- PEFT" in updated


def test_model_card_without_huggingface_hub(monkeypatch, built_models):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    card = peft_format.model_card(built_models["llama"], _our_config(task_type="CAUSAL_LM"))
    assert card.startswith('---\nbase_model: ""\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n')
    assert card.endswith("### Framework versions\n\n- PEFT " + fastadalora.config.PEFT_VERSION)


def test_saved_config_loads_back_to_the_same_targets(built_models, tmp_path):
    """all-linear is written resolved (full paths), as PEFT writes it, and selects the same modules again."""
    model = built_models["bart"]
    am = fastadalora.get_adalora_model(copy.deepcopy(model), _our_config(target_modules="all-linear"))
    d = peft_format.config_dict(am.adalora_config, am.model, am.adapter_layers(), am.head_modules(),
                                am.live_masks())
    loaded = peft_format.config_from_dict(d, "adapter_config.json", [n for n, _ in model.named_modules() if n])
    assert loaded.inference_mode is True
    assert sorted(p for p, _ in targeting.find_targets(model, loaded)) == sorted(am.adapter_layers())


# ============================================================================ model semantics (model.py wiring)
def _trainable_outside_adapters(named_parameters):
    """Trainable non-adapter parameters, named as in the user's model (PEFT's wrappers' names undone)."""
    names = set()
    for n, p in named_parameters:
        if not p.requires_grad or ".lora_" in n or "original_module" in n:
            continue
        for prefix in ("base_model.model.", "model."):
            n = n[len(prefix):] if n.startswith(prefix) else n
        names.add(n.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."))
    return names


@pytest.mark.parametrize("bias", ["all", "lora_only", "adalora_only"])
def test_bias_modes_train_peft_biases(built_models, bias):
    model = built_models["bert"]
    kwargs = dict(target_modules=["query", "dense"], bias=bias, modules_to_save=["classifier"])
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(**kwargs))
    am = fastadalora.get_adalora_model(copy.deepcopy(model), _our_config(**kwargs))
    assert _trainable_outside_adapters(am.named_parameters()) == _trainable_outside_adapters(pm.named_parameters())


@pytest.mark.parametrize("bias", ["all", "lora_only", "adalora_only"])
def test_bias_modes_save_and_load_both_ways(built_models, tmp_path, bias):
    """The trained biases are saved under PEFT's keys and load in PEFT and back."""
    model = built_models["bert"]
    kwargs = dict(target_modules=["query", "dense"], bias=bias)
    am = fastadalora.get_adalora_model(copy.deepcopy(model), _our_config(**kwargs))
    with torch.no_grad():  # as after training: adapters and the biases PEFT's setting trains
        for layer in am.adapter_layers().values():
            layer.lora_E.normal_()
        for n, p in am.model.named_parameters():
            if p.requires_grad and n.endswith(".bias"):
                p.add_(0.1)
    batch = {"input_ids": torch.arange(1, 17).reshape(2, 8)}
    expected = am(**batch).logits
    am.save_pretrained(tmp_path / "ours")
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(**kwargs))
    pm.save_pretrained(str(tmp_path / "peft"))
    import safetensors.torch
    keys = lambda d: set(safetensors.torch.load_file(d / "adapter_model.safetensors"))  # noqa: E731
    assert keys(tmp_path / "ours") == keys(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    torch.testing.assert_close(loaded_peft(**batch).logits, expected)
    back = fastadalora.AdaLoraModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    torch.testing.assert_close(back(**batch).logits, expected)


def test_inference_mode_freezes_everything_as_peft(built_models):
    model = built_models["bert"]
    kwargs = dict(target_modules=["query"], inference_mode=True, modules_to_save=["classifier"])
    pm = peft.get_peft_model(copy.deepcopy(model), _peft_config(**kwargs))
    am = fastadalora.get_adalora_model(copy.deepcopy(model), _our_config(**kwargs))
    assert not any(p.requires_grad for p in pm.parameters())
    assert not any(p.requires_grad for p in am.parameters())


@pytest.mark.parametrize("kwargs", [dict(target_modules=["query", "dense"], layers_to_transform=[1], layers_pattern="layer"),
                                    dict(target_modules="all-linear", exclude_modules=["pooler.dense"]),
                                    dict(layers_to_transform=0)], ids=["layers", "all_linear", "defaults_layer"])
def test_checkpoint_with_selection_options_loads_in_peft_and_back(built_models, tmp_path, kwargs):
    model = built_models["bert"]
    am = fastadalora.get_adalora_model(copy.deepcopy(model), _our_config(modules_to_save=["classifier"], **kwargs))
    with torch.no_grad():
        for layer in am.adapter_layers().values():
            layer.lora_E.normal_()
    batch = {"input_ids": torch.arange(1, 17).reshape(2, 8)}
    expected = am(**batch).logits
    am.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    assert sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)) == \
        sorted(am.adapter_layers())
    torch.testing.assert_close(pm(**batch).logits, expected)
    back = fastadalora.AdaLoraModel.from_pretrained(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(back(**batch).logits, expected)
