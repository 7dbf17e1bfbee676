"""AdaLoraConfig: PEFT's defaults, help text, and every validation error."""

import dataclasses

import peft
import pytest

import fastadalora
from fastadalora import AdaLoraConfig

SHARED = ["init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "lora_alpha",
          "lora_dropout", "target_modules", "modules_to_save", "fan_in_fan_out", "bias", "init_lora_weights",
          "rank_pattern", "exclude_modules", "task_type", "layers_to_transform", "layers_pattern", "inference_mode",
          "r", "use_rslora", "alpha_pattern", "use_dora", "lora_bias", "ensure_weight_tying", "peft_version",
          "base_model_name_or_path", "revision", "auto_mapping", "megatron_core", "qalora_group_size"]


def test_defaults_equal_peft():
    ours = AdaLoraConfig(total_step=100)
    theirs = peft.AdaLoraConfig(total_step=100)
    for name in SHARED:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.total_step == theirs.total_step == 100
    assert ours.peft_type == "ADALORA" == theirs.peft_type.value


def test_every_field_has_help():
    for f in dataclasses.fields(AdaLoraConfig):
        assert f.metadata.get("help"), f.name


def test_accepts_peft_style_arguments():
    cfg = AdaLoraConfig(peft_type="ADALORA", task_type=peft.TaskType.SEQ_CLS, init_r=12, lora_alpha=32,
                        target_modules=["q", "v"], lora_dropout=0.01, total_step=1000)
    assert cfg.head_modules() == ("classifier", "score")
    assert AdaLoraConfig(total_step=3, modules_to_save=["head"], task_type="QUESTION_ANS").head_modules() == (
        "head", "qa_outputs")
    assert AdaLoraConfig(total_step=3, target_modules=r".*\.(query|value)").target_modules == r".*\.(query|value)"


@pytest.mark.parametrize("total_step", [0, -5, 2.5, "100"])
def test_total_step_must_be_a_positive_int(total_step):
    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(total_step=total_step)


def test_total_step_none_is_an_error_at_the_first_step_not_before():
    """None is allowed so that AdaLoraCallback can fill it from the Trainer; a manual loop is told what is missing."""
    import fastadalora
    from support import tiny_bert

    model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"total_step.*AdaLoraCallback"):
        model.update_and_allocate(0)
    model.set_total_step(10)
    assert model.adalora_config.total_step == 10 and model.allocator.total_step == 10
    late = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(target_modules=["query"], tinit=5))
    with pytest.raises(ValueError, match="don.t allow for a budgeting phase"):
        late.set_total_step(5)
    assert late.adalora_config.total_step is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_step=10, tinit=10), "don.t allow for a budgeting phase"),
    (dict(total_step=10, tinit=5, tfinal=5), "don.t allow for a budgeting phase"),
    (dict(total_step=10, tinit=-1), "tinit"),
    (dict(total_step=10, tfinal=-1), "tfinal"),
    (dict(total_step=10, init_r=8, target_r=8), "target_r"),
    (dict(total_step=10, init_r=4, target_r=6), "target_r"),
    (dict(total_step=10, target_r=-1), "target_r"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, beta1=0.0), "beta1"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, beta2=1.5), "beta2"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, bias="some"), "bias"),
    (dict(total_step=10, bias=None), "bias"),
    (dict(total_step=10, lora_dropout=1.0), "lora_dropout"),
    (dict(total_step=10, init_r=2.5), "init_r"),
    (dict(total_step=10, target_modules=[]), "target_modules"),
    (dict(total_step=10, target_modules=["q", 3]), "target_modules"),
    (dict(total_step=10, modules_to_save="classifier"), "modules_to_save"),
    (dict(total_step=10, task_type="NOPE"), "task_type"),
    (dict(total_step=10, r=2.0), "`r`"),
    (dict(total_step=10, qalora_group_size=0), "qalora_group_size"),
    (dict(total_step=10, layers_to_transform=-1), "layers_to_transform.*int >= 0"),
    (dict(total_step=10, layers_to_transform=[0, "1"]), "layers_to_transform"),
    (dict(total_step=10, layers_to_transform=True), "layers_to_transform"),
    (dict(total_step=10, layers_to_transform=[0], layers_pattern=3), "layers_pattern"),
    (dict(total_step=10, layers_to_transform=[0], layers_pattern=["h", 1]), "layers_pattern"),
    (dict(total_step=10, init_lora_weights="pisa"), "init_lora_weights.*gaussian"),
    (dict(total_step=10, init_lora_weights=1), "init_lora_weights"),
    (dict(total_step=10, inference_mode="yes"), "inference_mode"),
    (dict(total_step=10, ensure_weight_tying=1), "ensure_weight_tying"),
    (dict(total_step=10, use_rslora=None), "use_rslora"),
    (dict(total_step=10, base_model_name_or_path=3), "base_model_name_or_path"),
    (dict(total_step=10, revision=1), "revision"),
    (dict(total_step=10, auto_mapping="x"), "auto_mapping"),
    (dict(total_step=10, alpha_pattern=[1]), "alpha_pattern"),
    (dict(total_step=10, eva_config="x"), "eva_config"),
    (dict(total_step=10, runtime_config={"other": 1}), "runtime_config"),
    (dict(total_step=10, target_modules="all-linear", layers_to_transform=0), "layers_to_transform"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kwargs)


def test_unknown_field_is_rejected():
    with pytest.raises(TypeError):
        AdaLoraConfig(total_step=10, rank=16)


@pytest.mark.parametrize("name, value", [
    ("layer_replication", [[0, 2], [1, 2]]), ("trainable_token_indices", [0, 1]),
    ("trainable_token_indices", {"embed_tokens": [0]}), ("target_parameters", ["mlp.experts.weight"]),
    ("megatron_config", {"tensor_model_parallel_size": 2}), ("alora_invocation_tokens", [5, 6]),
])
def test_unsupported_options_name_the_option_and_what_is_supported(name, value):
    with pytest.raises(ValueError, match=rf"`{name}=.*` is not supported: .* Use {name}=None\."):
        AdaLoraConfig(total_step=10, **{name: value})


@pytest.mark.parametrize("name", ["layer_replication", "trainable_token_indices", "target_parameters",
                                  "megatron_config", "alora_invocation_tokens"])
def test_unsupported_options_accept_their_empty_values(name):
    AdaLoraConfig(total_step=10, **{name: None})


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dora=True), "does not support DoRA.*use_dora"),
    (dict(init_lora_weights="loftq"), "loftq_config.*must be specified"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "does not support LOFTQ"),
    (dict(lora_bias=True, init_lora_weights="olora"), "lora_bias=True is only supported"),
])
def test_options_peft_rejects_for_adalora(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(total_step=10, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=4), "`r` is not used in AdaLora"),
    (dict(use_rslora=True), "`use_rslora` has no effect in AdaLoRA"),
    (dict(alpha_pattern={"query": 4}), "`alpha_pattern` has no effect"),
    (dict(lora_bias=True), "`lora_bias` has no effect"),
    (dict(use_qalora=True), "`use_qalora` has no effect"),
    (dict(kasa_config={}), "`kasa_config` has no effect"),
    (dict(init_lora_weights="pissa_niter_4"), "initialises as with init_lora_weights=True"),
    (dict(loftq_config={"loftq_bits": 4}), "`loftq_config` specified but will be ignored"),
    (dict(peft_type="LORA"), "`peft_type='LORA'` is ignored"),
])
def test_options_without_effect_warn(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        cfg = AdaLoraConfig(total_step=10, **kwargs)
    assert cfg.peft_type == "ADALORA" and cfg.loftq_config == {}


def test_accepted_peft_fields_are_stored_and_written(tmp_path):
    cfg = AdaLoraConfig(total_step=10, bias="lora_only", inference_mode=True, layers_to_transform=(0, 1),
                        layers_pattern=("layer",), revision="v2", base_model_name_or_path="org/m",
                        target_modules={"value", "query"})
    assert cfg.layers_to_transform == [0, 1] and cfg.layers_pattern == ["layer"]
    cfg.save_pretrained(tmp_path)
    loaded = AdaLoraConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.target_modules == ["query", "value"] and loaded.bias == "lora_only"
    assert loaded.peft_version == fastadalora.config.PEFT_VERSION


def test_peft_crashes_later_where_we_refuse():
    """The configs we reject up front are accepted by PEFT's config (they fail later, in training)."""
    peft.AdaLoraConfig(total_step=10, init_r=8, target_r=8)
    peft.AdaLoraConfig(total_step=10, deltaT=0)
