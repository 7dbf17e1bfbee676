"""Named adapters as PEFT names them: adapter_name=, load_adapter / set_adapter / delete_adapter for
inference with several, checkpoints laid out as PEFT lays them out, and from_pretrained's keywords."""

import os
import warnings

import peft
import pytest
import safetensors.torch
import torch

import fastadalora
from fastadalora import AdaLoraConfig
from fastadalora.peft_twin import copy_adapters_into_peft
from support import batches, cls_batch, tiny_bert, train

KW = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=8,
          target_modules=["query", "value"])


def _trained(seed, adapter_name="default", steps=5, **kw):
    model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**{**KW, **kw}), adapter_name=adapter_name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_E.normal_()
    train(model, batches(steps, seed=seed), model.update_and_allocate)
    return model.eval()


def _logits(model):
    batch = dict(cls_batch(seed=33))
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


def test_a_named_adapter_saves_where_peft_saves_it(tmp_path):
    ours = _trained(0, adapter_name="mine")
    ours.save_pretrained(tmp_path / "ours")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "ours" / "mine"))
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(**KW), adapter_name="mine")
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert os.path.isfile(tmp_path / "peft" / "mine" / "adapter_model.safetensors")
    keys_ours = safetensors.torch.load_file(tmp_path / "ours" / "mine" / "adapter_model.safetensors").keys()
    keys_peft = safetensors.torch.load_file(tmp_path / "peft" / "mine" / "adapter_model.safetensors").keys()
    assert keys_ours == keys_peft  # no adapter name in the keys, as PEFT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_peft = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "ours" / "mine"), adapter_name="mine")
    torch.testing.assert_close(_logits(loaded_peft.eval()), _logits(ours), rtol=1e-5, atol=1e-6)
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path / "ours" / "mine", adapter_name="mine")
    assert loaded.active_adapter == "mine" and list(loaded.peft_config) == ["mine"]
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=1e-5, atol=1e-6)


def test_several_adapters_for_inference(tmp_path):
    first, second = _trained(0), _trained(1, target_modules=["query"])  # the second adapts a subset
    second.save_pretrained(tmp_path / "second")
    want_first, want_second = _logits(first), _logits(second)
    first.load_adapter(tmp_path / "second", adapter_name="other")
    assert first.adapter_names() == ["default", "other"] and set(first.peft_config) == {"default", "other"}
    torch.testing.assert_close(_logits(first), want_first)  # the trainable adapter stays active
    first.set_adapter("other")
    assert first.active_adapter == "other"
    torch.testing.assert_close(_logits(first), want_second, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="set_adapter\\('default'\\) to train"):
        first.update_and_allocate(10)
    first.save_pretrained(tmp_path / "both")  # default at the root, the other in its sub-folder
    again = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path / "both" / "other")
    torch.testing.assert_close(_logits(again), want_second, rtol=1e-5, atol=1e-6)
    first.set_adapter("default")
    first.delete_adapter("other")
    assert first.adapter_names() == ["default"]
    torch.testing.assert_close(_logits(first), want_first)
    with pytest.raises(ValueError, match="trainable adapter"):
        first.delete_adapter("default")
    with pytest.raises(ValueError, match="is_trainable"):
        first.load_adapter(tmp_path / "second", adapter_name="x", is_trainable=True)


def test_load_adapter_refuses_layers_this_model_did_not_adapt(tmp_path):
    wide = _trained(0, target_modules=["query", "value", "key"])
    wide.save_pretrained(tmp_path)
    narrow = _trained(1)
    with pytest.raises(fastadalora.checkpoint.CheckpointError, match="key"):
        narrow.load_adapter(tmp_path, adapter_name="wide")
    assert narrow.adapter_names() == ["default"]


def test_from_pretrained_keywords(tmp_path):
    model = _trained(0)
    model.save_pretrained(tmp_path)
    want = _logits(model)
    override = AdaLoraConfig(**{**KW, "lora_alpha": 16})  # config= replaces the saved one, as PEFT
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path, config=override)
    assert loaded.adalora_config.lora_alpha == 16
    peft_cfg = peft.AdaLoraConfig(**KW)
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path, config=peft_cfg, device_map="cpu",
                                                      low_cpu_mem_usage=True)
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-5, atol=1e-6)
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path, device_map="auto")
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="device_map"):
        fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path, device_map={"": 0, "bert": "cpu"})


# --------------------------------------------------------------------------- add_adapter
def test_add_adapter_matches_peft_and_saves(tmp_path):
    """A fresh inference adapter: PEFT's init and RNG order (so the same weights as PEFT's add_adapter
    after the same seed), selected by set_adapter, saved to <dir>/<name> and loaded back."""
    kw = dict(init_r=4, target_r=2, total_step=10, target_modules=["query", "value"])
    ours = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**kw)).eval()
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(**kw)).eval()
    second = dict(init_r=3, target_r=2, target_modules=["query"], total_step=10, inference_mode=True,
                  init_lora_weights=False)
    torch.manual_seed(5)
    ours.add_adapter("other", AdaLoraConfig(**second))
    torch.manual_seed(5)
    theirs.add_adapter("other", peft.AdaLoraConfig(**second))
    batch = {k: v for k, v in cls_batch(seed=3).items() if k != "labels"}
    copy_adapters_into_peft(ours, theirs)  # the trainable adapters' weights; "other" is each one's own draw
    for name in ("other", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
    assert ours.adapter_names() == ["default", "other"] and not any(
        p.requires_grad for n, p in ours.named_parameters() if "inference_adapters" in n)
    ours.set_adapter("other")
    with torch.no_grad():
        want = ours(**batch).logits
    ours.save_pretrained(tmp_path)
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path / "other").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want)


def test_add_adapter_refuses_what_peft_refuses_and_changes_nothing():
    model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(init_r=4, total_step=10, target_r=2,
                                                                     target_modules=["query"]))
    with pytest.raises(ValueError, match="AdaLoraModel supports only 1 trainable adapter"):
        model.add_adapter("second", AdaLoraConfig(init_r=4, total_step=10, target_r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("second", AdaLoraConfig(total_step=10, target_modules=["query"], inference_mode=True,
                                                  bias="all"))
    with pytest.raises(ValueError, match="matches none of the layers this model adapts"):
        model.add_adapter("second", AdaLoraConfig(total_step=10, target_modules=["key"], inference_mode=True))
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("default", AdaLoraConfig(total_step=10, target_modules=["query"], inference_mode=True))
    assert model.adapter_names() == ["default"] and "second" not in model.peft_config
    assert not any("inference_adapters" in n for n, _ in model.named_modules())
