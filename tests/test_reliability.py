"""No silent wrong answers, no crashes on unlucky-but-legal use: each test is one defect found by trying
the library the way a careless or unlucky user would (each fails on the code before the fix)."""

import copy
import json
import math
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import fastadalora
from fastadalora import AdaLoraConfig
from fastadalora.checkpoint import CheckpointError
from support import batches, tiny_bert, tiny_gpt2_lm, train

CFG = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, lora_alpha=8,
           target_modules=["query", "value"])


def _trained(steps=5, **kw):
    model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**{**CFG, **kw}))
    train(model, batches(steps), model.update_and_allocate)
    return model


# --------------------------------------------------------------------------- 1. call discipline
def test_a_step_allocated_twice_or_backwards_is_an_error_naming_both_steps():
    model = _trained(steps=3)
    ipt = model.allocator._ipt.clone()
    with pytest.raises(ValueError, match=r"step 2 comes after step 2"):
        model.update_and_allocate(2)  # a manual call plus AdaLoraCallback
    with pytest.raises(ValueError, match=r"step 1 comes after step 2"):
        model.update_and_allocate(1)
    assert torch.equal(model.allocator._ipt, ipt)  # the EMAs were not updated twice


def test_a_loaded_state_carries_its_last_step():
    model = _trained(steps=3)
    twin = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**CFG))
    twin.allocator.load_state_dict(model.allocator.state_dict())
    assert twin.allocator.last_step == 2
    with pytest.raises(ValueError, match="step 2 comes after step 2"):
        twin.update_and_allocate(2)


# --------------------------------------------------------------------------- 3. numeric config fields
@pytest.mark.parametrize("field,value,message", [
    ("lora_alpha", float("nan"), "lora_alpha.*finite"), ("lora_alpha", float("inf"), "lora_alpha.*finite"),
    ("orth_reg_weight", float("nan"), "orth_reg_weight.*finite"), ("orth_reg_weight", math.inf, "orth_reg_weight"),
    ("beta1", float("nan"), "beta1"), ("lora_dropout", float("nan"), "lora_dropout"),
    ("lora_alpha", "8", "lora_alpha.*number"), ("init_r", None, "init_r.*int"), ("beta2", None, "beta2.*number"),
    ("deltaT", 2.0, "deltaT.*int"), ("fan_in_fan_out", "no", "fan_in_fan_out"),
    ("target_modules", "(query", "target_modules.*regular expression"),
])
def test_numeric_and_typed_fields_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**{**CFG, field: value})


@pytest.mark.parametrize("field,value", [("lora_alpha", float("nan")), ("orth_reg_weight", float("inf")),
                                         ("beta1", "0.85"), ("target_modules", "(query")])
def test_bad_fields_in_adapter_config_json_are_a_checkpoint_error(tmp_path, field, value):
    _trained().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=field):
        fastadalora.AdaLoraModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, fastadalora.AdaLoraLinear) for m in model.modules())


def test_a_missing_checkpoint_is_a_checkpoint_error_too(tmp_path):
    with pytest.raises(CheckpointError):
        fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path / "nope")


# --------------------------------------------------------------------------- 4. allocator state
def _state():
    return _trained(steps=4).allocator.state_dict()


def _corrupt(sd, key, value):
    sd = dict(sd)
    if value is KeyError:
        del sd[key]
    else:
        sd[key] = value
    return sd


@pytest.mark.parametrize("key,make", [
    ("ipt", lambda sd: sd["ipt"][:1]),  # length 1: used to broadcast to every element
    ("keep", lambda sd: sd["keep"][:1]),  # a 1-entry keep mask: likewise
    ("unc", lambda sd: sd["unc"].long()),  # integer EMAs: used to be cast silently
    ("ipt", lambda sd: torch.full_like(sd["ipt"], float("nan"))),
    ("unc", lambda sd: -sd["unc"] - 1),
    ("final_keep", lambda sd: torch.ones(3)),
    ("last_step", lambda sd: -4),
    ("init_bgt", lambda sd: "8"),
    ("keep", lambda sd: KeyError),  # a missing key: used to raise KeyError after part of the state was copied
])
def test_a_bad_allocator_state_is_rejected_before_anything_is_written(key, make):
    sd = _state()
    target = _trained(steps=2).allocator
    before = target.state_dict()
    with pytest.raises(ValueError, match=repr(key)):
        target.load_state_dict(_corrupt(sd, key, make(sd)))
    after = target.state_dict()
    for k in before:
        a, b = before[k], after[k]
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), k


# --------------------------------------------------------------------------- 5. duplicate tensor keys
def test_a_tensor_saved_under_two_spellings_is_rejected(tmp_path):
    _trained().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = safetensors.torch.load(path.read_bytes())
    key = next(k for k in sd if k.endswith("lora_A"))
    sd[key + ".default"] = sd[key] + 1  # PEFT's adapter-named spelling, another value
    safetensors.torch.save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="saved twice"):
        fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path)


# --------------------------------------------------------------------------- 6. targeting
def test_targeting_base_layer_of_an_adapted_model_is_the_already_adapted_error():
    model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**CFG))
    with pytest.raises(ValueError, match="already an AdaLoRA adapter"):
        fastadalora.get_adalora_model(model.model, AdaLoraConfig(**{**CFG, "target_modules": ["base_layer"]}))


def test_a_linear_registered_at_two_paths_is_an_error_naming_both():
    net = nn.Module()
    shared = nn.Linear(4, 4)
    net.a, net.b = nn.Sequential(shared), nn.Sequential(shared)
    with pytest.raises(ValueError, match=r"\['a.0', 'b.0'\]"):
        fastadalora.get_adalora_model(net, AdaLoraConfig(**{**CFG, "target_modules": ["0"]}))
    assert net.a[0] is shared and net.b[0] is shared


# --------------------------------------------------------------------------- 7. resume with a rank-0 layer
def test_resuming_with_a_layer_pruned_to_rank_zero_trains(tmp_path):
    model = _trained(steps=5)
    path = next(iter(model.adapter_layers()))
    with torch.no_grad():  # a checkpoint where one layer lost every triplet
        model.adapter_layers()[path].lora_E.zero_()
    pattern = model.allocator.rank_pattern
    pattern[f"{path}.lora_E"] = [False] * 4
    model.allocator.set_rank_pattern(pattern)
    model.save_pretrained(tmp_path)
    resumed = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert resumed.adapter_layers()[path].r == 0
    losses = train(resumed, batches(3, seed=20), lambda s: resumed.update_and_allocate(s + 5))
    assert all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------- 8. meta device
def test_meta_device_workflow_trains():
    reference = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**CFG))
    full = {f"model.{k}": v for k, v in reference.model.state_dict().items()}
    full["_extra_state"] = reference.state_dict()["_extra_state"]
    with torch.device("meta"):
        base = tiny_bert(seed=None)
    model = fastadalora.get_adalora_model(base, AdaLoraConfig(**CFG))
    assert "AdaLoraLinear" in repr(model)  # printing works on meta
    model.to_empty(device="cpu")
    model.load_state_dict(full)
    with torch.no_grad():  # BERT's position_ids is a non-persistent buffer: no state dict restores it
        for name, buf in reference.model.named_buffers():
            model.model.get_buffer(name).copy_(buf)
    losses = train(model, batches(4), model.update_and_allocate)
    assert all(math.isfinite(v) for v in losses) and model.allocator._ipt.device.type == "cpu"
    assert model.allocator._ipt.any()


def test_repr_makes_no_host_sync_per_layer():
    from support import OpCounter

    model = fastadalora.get_adalora_model(tiny_bert(num_layers=4), AdaLoraConfig(**CFG))
    with OpCounter() as ops:
        repr(model)
    assert "_local_scalar_dense" not in ops.ops and "count_nonzero" not in ops.ops


# --------------------------------------------------------------------------- 9. tied lm_head
def test_tie_weights_after_adapting_a_tied_lm_head():
    model = fastadalora.get_adalora_model(tiny_gpt2_lm(), AdaLoraConfig(**{**CFG, "target_modules": ["lm_head"]}))
    model.tie_weights()  # KeyError: attribute 'weight' already exists, before
    inner = model.model
    assert inner.lm_head.base_layer.weight is inner.transformer.wte.weight
    with pytest.raises(ValueError, match="Resize the base model's embeddings before get_adalora_model"):
        model.resize_token_embeddings(80)


def test_extra_state_has_a_fixed_size_so_dcp_checkpoints_load(tmp_path):
    """torch.distributed.checkpoint loads into tensors of the current size: the allocator blob must not change size."""
    import torch.distributed.checkpoint as dcp

    model = _trained(steps=5)
    fresh = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**CFG))
    assert fresh.state_dict()["_extra_state"].shape == model.state_dict()["_extra_state"].shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(model.state_dict(), checkpoint_id=str(tmp_path))
        target = fresh.state_dict()
        dcp.load(target, checkpoint_id=str(tmp_path))
    fresh.load_state_dict(target)
    assert fresh.rank_pattern == model.rank_pattern
    assert torch.equal(fresh.allocator.state_dict()["ipt"], model.allocator.state_dict()["ipt"])
