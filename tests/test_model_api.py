"""PEFT's model API on an AdaLoraModel: adapter switches, merging, state-dict functions, parameter counts."""

import copy
import warnings

import peft
import pytest
import torch

import fastadalora
from fastadalora import AdaLoraConfig
from fastadalora.peft_twin import peft_twin
from support import batches, cls_batch, tiny_bert, train

KW = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, lora_alpha=8,
          target_modules=["query", "value", "dense"], modules_to_save=["classifier"])


def _model(seed=0, steps=0):
    model = fastadalora.get_adalora_model(tiny_bert(seed=seed), AdaLoraConfig(**KW))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_E.normal_()
    if steps:
        train(model, batches(steps), model.update_and_allocate)
    return model.eval()


def _logits(model, batch=None):
    batch = dict(batch or cls_batch(seed=9))
    batch.pop("labels", None)
    with torch.no_grad():
        return model(**batch).logits


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.model.named_parameters() if ".base_layer." in n}


def test_disable_adapter_runs_the_base_model():
    base = tiny_bert()
    model = _model()
    with model.disable_adapter():
        off = _logits(model)
    # the base model with the trained head: the head is a modules_to_save module, trained in place
    base.classifier.load_state_dict(model.model.classifier.state_dict())
    torch.testing.assert_close(off, _logits(base.eval()), rtol=0, atol=0)
    assert not torch.equal(_logits(model), off)  # enabled again afterwards
    model.merge_adapter()
    with model.disable_adapter():  # a merged adapter is taken out first, as PEFT does
        torch.testing.assert_close(_logits(model), off, rtol=1e-5, atol=1e-6)


def test_generate_goes_through_the_adapters_and_equals_the_merged_model():
    """``model.generate`` (through attribute fall-through) runs the adapted layers, as PEFT's does."""
    from support import lm_batch, tiny_gpt2_lm

    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=10, target_modules=["c_attn"],
                        init_lora_weights=False)  # B ≠ 0 from the start, so the adapter changes the output
    model = fastadalora.get_peft_model(tiny_gpt2_lm(), cfg).eval()
    ids = lm_batch()["input_ids"][:2, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)  # the adapter changes what generate sees
    res = model.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    torch.testing.assert_close(res.logits[0], adapted[:, -1], rtol=1e-5, atol=1e-5)  # the adapted model's logits
    out = res.sequences
    assert out.shape == (2, 9) and out[:, :4].equal(ids)
    merged = copy.deepcopy(model).merge_and_unload()  # ΔW folded into the base: the same greedy tokens
    assert merged.generate(input_ids=ids, **kwargs).equal(out)


def test_merge_unmerge_and_unload():
    model = _model(steps=4)
    on, weights = _logits(model), _base_weights(model)
    model.merge_adapter()
    assert all(layer.merged for layer in model.adapter_layers().values())
    torch.testing.assert_close(_logits(model), on, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    for n, w in _base_weights(model).items():
        torch.testing.assert_close(w, weights[n], rtol=1e-5, atol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, fastadalora.AdaLoraLinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), on, rtol=1e-5, atol=1e-6)
    plain = model.unload()
    assert not any(isinstance(m, fastadalora.AdaLoraLinear) for m in plain.modules())
    for n, p in plain.named_parameters():
        key = n.replace(".weight", ".base_layer.weight") if n.replace(".weight", ".base_layer.weight") in weights \
            else None
        if key:
            torch.testing.assert_close(p, weights[key], rtol=1e-5, atol=1e-6)


def test_training_while_merged_says_to_unmerge():
    model = _model()
    model.merge_adapter()
    model.train()
    model(**cls_batch()).loss.backward()  # the merged forward: only the head gets gradients
    with pytest.raises(RuntimeError, match=r"has no gradient.* is merged \(merge_adapter\(\)\).*unmerge_adapter\(\)"):
        model.update_and_allocate(0)
    model.unmerge_adapter()
    model.zero_grad()
    model(**cls_batch()).loss.backward()
    model.update_and_allocate(0)


def test_safe_merge_is_all_or_nothing():
    model = _model()
    last = list(model.adapter_layers().values())[-1]
    with torch.no_grad():
        last.lora_E[0] = float("nan")  # only the last layer is broken: the earlier ones must not be merged either
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    with pytest.raises(ValueError, match=f"{last.name}.*NaN"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for n, p in model.model.named_parameters():  # every base weight byte-identical
        assert torch.equal(p.view(torch.uint8) if p.dtype != torch.bool else p,
                           before[n].view(torch.uint8) if p.dtype != torch.bool else before[n]), n
    assert not any(layer.merged for layer in model.adapter_layers().values())


def test_state_dict_functions_equal_peft_and_load_both_ways():
    ours = _model(steps=5)
    theirs = peft_twin(tiny_bert(), ours, task_type="SEQ_CLS")
    with torch.no_grad():  # the same trained adapter in PEFT (its rank pattern too)
        theirs.base_model.model.classifier.modules_to_save["default"].load_state_dict(
            ours.model.classifier.state_dict())
    theirs.peft_config["default"].rank_pattern = {f"{k[:-len('.lora_E')]}.lora_E.default": v
                                                  for k, v in ours.rank_pattern.items()}
    sd_ours = fastadalora.get_peft_model_state_dict(ours)
    sd_theirs = peft.get_peft_model_state_dict(theirs)
    assert sd_ours.keys() == sd_theirs.keys()
    for k in sd_ours:
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], rtol=0, atol=0, msg=k)
    # and back into a fresh model of ours, resized to the live rank pattern
    fresh = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**KW))
    fresh.allocator.set_rank_pattern(ours.rank_pattern)
    result = fastadalora.set_peft_model_state_dict(fresh, sd_ours)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_logits(fresh.eval()), _logits(ours), rtol=1e-5, atol=1e-6)
    with pytest.raises(fastadalora.checkpoint.CheckpointError, match="lora_A"):
        fastadalora.set_peft_model_state_dict(fresh, {k: v[:1] if k.endswith("lora_A") else v
                                                      for k, v in sd_ours.items()})


def test_parameter_counts_equal_peft():
    ours = _model()
    theirs = peft_twin(tiny_bert(), ours, task_type="SEQ_CLS")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_bookkeeping_and_names():
    model = fastadalora.get_peft_model(tiny_bert(), AdaLoraConfig(**KW), adapter_name="mine")
    assert model.active_adapter == "mine" and model.active_adapters == ["mine"]
    assert model.peft_config["mine"] is model.adalora_config
    with pytest.raises(ValueError, match="adapter_name"):
        fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**KW), adapter_name="a.b")
    with pytest.raises(ValueError, match="'mine'"):
        fastadalora.get_peft_model_state_dict(model)  # adapter_name="default" is not this model's


def test_prepare_model_for_gradient_checkpointing_reaches_the_adapters():
    model = _model()
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.prepare_model_for_gradient_checkpointing()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**cls_batch()).loss.backward()
    assert all(p.grad is not None for layer in model.adapter_layers().values() for p in layer.adapter_params())


@pytest.mark.parametrize("kw", [dict(task_type="SEQ_CLS"), dict(), dict(modules_to_save=["classifier"]),
                                dict(task_type="SEQ_CLS", modules_to_save=["pooler"])],
                         ids=["task-heads", "none", "modules_to_save", "both"])
def test_peft_type_and_modules_to_save_are_peft(kw):
    kw = dict(kw, total_step=10, target_modules=["query"])
    ours = fastadalora.get_peft_model(tiny_bert(), AdaLoraConfig(**copy.deepcopy(kw)))
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(**copy.deepcopy(kw)))
    assert ours.modules_to_save == theirs.modules_to_save
    assert ours.peft_type == theirs.peft_type


def test_disable_and_enable_adapter_layers_and_the_context_restores_them():
    base = tiny_bert()
    model = _model()
    on = _logits(model)
    base.classifier.load_state_dict(model.model.classifier.state_dict())
    off = _logits(base.eval())
    model.disable_adapter_layers()
    torch.testing.assert_close(_logits(model), off)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), off)
    torch.testing.assert_close(_logits(model), off)  # disabled before the context: still disabled after it
    model.enable_adapter_layers()
    torch.testing.assert_close(_logits(model), on)


def test_merging_twice_warns_as_peft():
    model = _model()
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        model.merge_adapter()


def test_peft_wording_and_bookkeeping(tmp_path):
    model = _model()
    assert model.prefix == "lora_" and all(model.prefix in n for n, _ in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):  # PEFT's words
        model.delete_adapter("unknown-adapter")
    msg = "`orth_reg_weight` should be greater than or equal to 0, but the value passed is -0.5"
    for make in (AdaLoraConfig, peft.AdaLoraConfig):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            make(target_modules=["query"], total_step=1, orth_reg_weight=-0.5)
    config = model.adalora_config
    assert config.peft_type == peft.PeftType.ADALORA and config.peft_type.value == "ADALORA"
    model.save_pretrained(tmp_path)
    assert '"peft_type": "ADALORA"' in (tmp_path / "adapter_config.json").read_text()
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path, device_map={"": "cpu"})
    torch.testing.assert_close(_logits(loaded), _logits(model))
