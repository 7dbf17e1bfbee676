"""AdaLoraConfig: PEFT's defaults, help text, and every validation error."""

import dataclasses

import peft
import pytest

from fastadalora import AdaLoraConfig

SHARED = ["init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "lora_alpha",
          "lora_dropout", "target_modules", "modules_to_save", "fan_in_fan_out", "bias", "init_lora_weights",
          "rank_pattern", "exclude_modules", "task_type"]


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
    with pytest.raises(ValueError, match="no budgeting phase"):
        late.set_total_step(5)
    assert late.adalora_config.total_step is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_step=10, tinit=10), "no budgeting phase"),
    (dict(total_step=10, tinit=5, tfinal=5), "no budgeting phase"),
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
    (dict(total_step=10, bias="all"), "bias"),
    (dict(total_step=10, bias="lora_only"), "bias"),
    (dict(total_step=10, lora_dropout=1.0), "lora_dropout"),
    (dict(total_step=10, init_r=2.5), "init_r"),
    (dict(total_step=10, target_modules=[]), "target_modules"),
    (dict(total_step=10, target_modules=["q", 3]), "target_modules"),
    (dict(total_step=10, modules_to_save="classifier"), "modules_to_save"),
    (dict(total_step=10, task_type="NOPE"), "task_type"),
    (dict(total_step=10, peft_type="LORA"), "peft_type"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kwargs)


def test_unknown_peft_field_is_rejected():
    with pytest.raises(TypeError):
        AdaLoraConfig(total_step=10, r=16)  # PEFT ignores `r` with a warning; we refuse it


def test_peft_crashes_later_where_we_refuse():
    """The configs we reject up front are accepted by PEFT's config (they fail later, in training)."""
    peft.AdaLoraConfig(total_step=10, init_r=8, target_r=8)
    peft.AdaLoraConfig(total_step=10, deltaT=0)
