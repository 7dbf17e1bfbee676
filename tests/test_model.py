"""AdaLoraModel: targeting, injection, trainability, the training hooks, state, and the Trainer callback."""

import copy
import dataclasses
import inspect
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastadalora
from fastadalora import AdaLoraConfig, AdaLoraLinear, get_adalora_model, reference
from fastadalora.model import AdaLoraModel
from support import RowsDataset, batches, cls_batch, lm_batch, tiny_bert, tiny_gpt2_cls, tiny_gpt2_lm

BERT_TARGETS = ["query", "key", "value", "dense"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def _cfg(**kwargs):
    kwargs.setdefault("total_step", 10)
    kwargs.setdefault("init_r", 4)
    kwargs.setdefault("target_r", 2)
    return AdaLoraConfig(**kwargs)


def _snapshot(model):
    """What injection could change: module types, parameter names, flags and values."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()])


def _same(a, b):
    assert a[0] == b[0]
    assert [(n, rg) for n, rg, _ in a[1]] == [(n, rg) for n, rg, _ in b[1]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a[1], b[1]))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _step(model, batch, opt, step):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    model.update_and_allocate(step)
    opt.zero_grad()
    return loss


# --------------------------------------------------------------------------- injection
def test_bert_injection():
    base = tiny_bert()
    batch = cls_batch()
    with torch.no_grad():
        ref = base(**batch).logits
    model = get_adalora_model(base, _cfg(target_modules=BERT_TARGETS))
    assert isinstance(model, AdaLoraModel) and isinstance(model, nn.Module) and model.model is base
    layers = model.adapter_layers()
    expected = [n for n, m in base.named_modules() if isinstance(m, AdaLoraLinear)]
    assert list(layers) == expected  # named_modules order
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert expected == [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in per_layer] + ["bert.pooler.dense"]
    for path, layer in layers.items():
        assert base.get_submodule(path) is layer and isinstance(layer.base_layer, nn.Linear)
        assert not layer.fan_in_fan_out and layer.r == layer.init_r == 4 and layer.ranknum == 4.0
    assert isinstance(base.classifier, nn.Linear)  # not matched
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)  # E = 0: exact no-op


def test_gpt2_conv1d_injection_is_fan_in_fan_out():
    base = tiny_gpt2_cls()
    batch = cls_batch()
    with torch.no_grad():
        ref = base(**batch).logits
    model = get_adalora_model(base, _cfg(target_modules=GPT2_TARGETS, fan_in_fan_out=True))
    layers = model.adapter_layers()
    assert list(layers) == [f"transformer.h.{i}.{s}" for i in range(2)
                            for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for layer in layers.values():
        assert isinstance(layer.base_layer, Conv1D) and layer.fan_in_fan_out
    assert layers["transformer.h.0.attn.c_attn"].out_features == 3 * 32
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)


def test_regex_targets_full_match():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=r".*\.attention\.self\.(query|value)"))
    assert list(model.adapter_layers()) == [f"bert.encoder.layer.{i}.attention.self.{s}" for i in range(2)
                                            for s in ("query", "value")]
    with pytest.raises(ValueError, match="matched no module"):  # full match: a bare suffix is not enough
        get_adalora_model(tiny_bert(), _cfg(target_modules=r"query"))


def test_default_targets_follow_peft_mapping():
    model = get_adalora_model(tiny_bert(), _cfg())  # PEFT's default for bert: query, value
    assert sorted({p.rsplit(".", 1)[1] for p in model.adapter_layers()}) == ["query", "value"]
    with pytest.raises(ValueError, match="no default"):
        get_adalora_model(nn.Sequential(nn.Linear(4, 4)), _cfg())


def test_exclude_modules():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=["dense"], exclude_modules=["pooler.dense"]))
    assert "bert.pooler.dense" not in model.adapter_layers() and len(model.adapter_layers()) == 6


def test_unmatched_targets_error_leaves_model_untouched():
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"matched no module.*query"):
        get_adalora_model(base, _cfg(target_modules=["not_a_module"]))
    _same(before, _snapshot(base))


@pytest.mark.parametrize("targets, culprit", [
    (["query", "LayerNorm"], "bert.embeddings.LayerNorm"),  # nn.LayerNorm, after a valid match
    (["attention"], "bert.encoder.layer.0.attention"),  # a container module
])
def test_unsupported_module_type_names_it_and_changes_nothing(targets, culprit):
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(TypeError, match=rf"'{culprit}'.*only torch.nn.Linear, transformers Conv1D"):
        get_adalora_model(base, _cfg(target_modules=targets))
    _same(before, _snapshot(base))


def test_failure_while_building_leaves_model_untouched(monkeypatch):
    import fastadalora.allocator

    def boom(*args, **kwargs):
        raise RuntimeError("allocator failed")

    monkeypatch.setattr(fastadalora.allocator, "RankAllocator", boom)
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(RuntimeError, match="allocator failed"):
        get_adalora_model(base, _cfg(target_modules=BERT_TARGETS))
    _same(before, _snapshot(base))


def test_conv3d_is_unsupported():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv3d(3, 4, 3))
    with pytest.raises(TypeError, match="'conv'.*Conv3d.*cannot adapt"):
        get_adalora_model(net, _cfg(target_modules=["conv"]))


def test_adapting_twice_is_an_error():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=["query"]))
    with pytest.raises(ValueError, match="already an AdaLoRA adapter"):
        get_adalora_model(model.model, _cfg(target_modules=["query"]))


# --------------------------------------------------------------------------- trainability
def test_only_adapters_train_by_default():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=BERT_TARGETS))
    expected = {f"model.{p}.{t}" for p in model.adapter_layers() for t in ("lora_A", "lora_E", "lora_B")}
    assert _trainable(model) == expected
    assert not any(isinstance(v, torch.Tensor) for v in vars(next(iter(model.adapter_layers().values()))).values())


@pytest.mark.parametrize("kwargs", [dict(modules_to_save=["classifier"]), dict(task_type="SEQ_CLS")])
def test_modules_to_save_stay_trainable(kwargs):
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=BERT_TARGETS, **kwargs))
    adapters = {n for n in _trainable(model) if ".lora_" in n}
    assert _trainable(model) - adapters == {"model.classifier.weight", "model.classifier.bias"}


def test_modules_to_save_are_never_adapted_and_typos_are_errors():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=["dense"], modules_to_save=["pooler"]))
    assert "bert.pooler.dense" not in model.adapter_layers()
    assert {"model.bert.pooler.dense.weight", "model.bert.pooler.dense.bias"} <= _trainable(model)
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match="'clasifier' matches no module"):
        get_adalora_model(base, _cfg(target_modules=["query"], modules_to_save=["clasifier"]))
    _same(before, _snapshot(base))


def test_config_is_never_mutated():
    cfg = _cfg(target_modules=GPT2_TARGETS, modules_to_save=["score"], total_step=6, tinit=1, tfinal=1)
    frozen = copy.deepcopy(cfg)
    model = get_adalora_model(tiny_gpt2_cls(), cfg)  # PEFT would flip fan_in_fan_out to True here
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step, batch in enumerate(batches(6)):
        _step(model, batch, opt, step)
    assert cfg == frozen and model.adalora_config is not cfg
    exported = model.export_config()
    assert exported.rank_pattern == model.rank_pattern and cfg.rank_pattern is None
    assert dataclasses.replace(exported, rank_pattern=None) == frozen


# --------------------------------------------------------------------------- hooks
def test_orth_term_added_in_training_only():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=BERT_TARGETS, orth_reg_weight=0.3))
    batch = cls_batch()
    model.train()
    plain = model.model(**batch).loss
    R = model.orth_reg_loss()
    assert R.item() > 0
    torch.testing.assert_close(model(**batch).loss, plain + 0.3 * R, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(**batch).loss, model.model(**batch).loss, rtol=0, atol=0)  # unlike PEFT
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "in training mode only" in readme  # listed under Differences from PEFT
    no_orth = get_adalora_model(tiny_bert(), _cfg(target_modules=BERT_TARGETS, orth_reg_weight=0.0)).train()
    torch.testing.assert_close(no_orth(**batch).loss, no_orth.model(**batch).loss, rtol=0, atol=0)
    model.train()
    out = model(input_ids=batch["input_ids"])  # no labels: no loss, nothing added
    assert out.loss is None


def test_orth_reg_loss_order_and_value_match_reference():
    model = get_adalora_model(tiny_gpt2_lm(), _cfg(target_modules=GPT2_TARGETS))
    layers = list(model.adapter_layers().values())
    expected = reference.orth_reg([l.lora_A for l in layers], [l.lora_B for l in layers])
    torch.testing.assert_close(model.orth_reg_loss(), expected, rtol=1e-6, atol=0)
    model.train()
    out = model(**lm_batch())
    torch.testing.assert_close(out.loss, model.model(**lm_batch()).loss + 0.5 * expected, rtol=1e-6, atol=0)


def test_update_and_allocate_without_grads_is_a_clear_error():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=BERT_TARGETS))
    with pytest.raises(RuntimeError, match="no gradient.*zero_grad"):
        model.update_and_allocate(0)
    with pytest.raises(ValueError, match="global_step"):
        model.update_and_allocate(-1)
    with pytest.raises(ValueError, match="global_step"):
        model.update_and_allocate(1.5)


def test_training_loop_masks_to_target_budget():
    cfg = _cfg(target_modules=BERT_TARGETS, modules_to_save=["classifier"], total_step=8, tinit=1, tfinal=2,
               init_r=4, target_r=2)
    model = get_adalora_model(tiny_bert(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    assert model.rank_pattern is None
    for step, batch in enumerate(batches(8)):
        _step(model, batch, opt, step)
    pattern = model.rank_pattern
    assert list(pattern) == [f"{p}.lora_E" for p in model.adapter_layers()]
    assert all(len(v) == 4 for v in pattern.values()) and sum(map(sum, pattern.values())) == 2 * len(pattern)
    for path, layer in model.adapter_layers().items():  # masked triplets have E == 0
        keep = torch.tensor(pattern[f"{path}.lora_E"])
        assert torch.all(layer.lora_E[~keep] == 0)
    assert model.base_model is model  # PEFT-style model.base_model.update_and_allocate(step) works


def test_state_dict_carries_allocator_state_and_is_safetensors_friendly(tmp_path):
    cfg = _cfg(target_modules=BERT_TARGETS, total_step=8, tinit=1, tfinal=2)
    base = tiny_bert()
    model = get_adalora_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step, batch in enumerate(batches(5)):
        _step(model, batch, opt, step)
    sd = model.state_dict()
    assert sd["_extra_state"].dtype == torch.uint8
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "m.safetensors")

    twin = get_adalora_model(copy.deepcopy(base), cfg)
    twin.load_state_dict(loaded)
    assert twin.rank_pattern == model.rank_pattern is not None
    a, b = model.allocator.state_dict(), twin.allocator.state_dict()
    assert torch.equal(a["ipt"], b["ipt"]) and torch.equal(a["unc"], b["unc"])
    with pytest.raises(ValueError, match="Unrecognised extra state"):
        twin.set_extra_state({"something": "else"})


def test_merge_and_unload():
    model = get_adalora_model(tiny_bert(), _cfg(target_modules=BERT_TARGETS))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_E.normal_()
    batch = cls_batch()
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdaLoraLinear) for m in plain.modules())
        assert isinstance(plain.bert.encoder.layer[0].attention.self.query, nn.Linear)
        torch.testing.assert_close(plain(**batch).logits, ref, rtol=1e-5, atol=1e-6)


def test_attribute_forwarding_and_parameter_counts(capsys):
    base = tiny_bert()
    model = get_adalora_model(base, _cfg(target_modules=["query"], modules_to_save=["classifier"]))
    assert model.config is base.config and model.get_base_model() is base
    # Trainer keeps the batch columns named in forward's signature: advertise the wrapped model's
    assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
    trainable, total = model.get_nb_trainable_parameters()
    layer = model.adapter_layers()["bert.encoder.layer.0.attention.self.query"]
    assert trainable == 2 * (layer.lora_A.numel() + layer.lora_E.numel() + layer.lora_B.numel()) + 2 * 32 + 2
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    with pytest.raises(AttributeError):
        model.no_such_attribute


# --------------------------------------------------------------------------- Trainer
def test_callback_drives_a_trainer_run(tmp_path):
    from transformers import Trainer, TrainingArguments

    max_steps = 6
    cfg = _cfg(target_modules=BERT_TARGETS, task_type="SEQ_CLS", total_step=max_steps, tinit=1, tfinal=2)
    model = get_adalora_model(tiny_bert(), cfg)
    rows = [{k: v[i] for k, v in cls_batch(batch=4 * max_steps).items()} for i in range(4 * max_steps)]
    steps = []
    allocate = model.update_and_allocate

    def spy(step, optimizer=None):
        steps.append(step)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # before zero_grad
        assert optimizer is not None  # the Trainer's, for compact_at_final
        allocate(step, optimizer=optimizer)

    model.update_and_allocate = spy
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=0.05, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=RowsDataset(rows),
                      callbacks=[fastadalora.AdaLoraCallback()])
    trainer.train()
    assert steps == list(range(max_steps))  # 0-based, like a manual enumerate() loop
    pattern = model.rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 2 * len(pattern)


def test_callback_unwraps_wrappers_and_rejects_a_non_adalora_model():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = get_adalora_model(tiny_bert(), _cfg(target_modules=["query"]))
    seen = []
    model.update_and_allocate = lambda step, optimizer=None: seen.append(step)
    wrapper = nn.Module()
    wrapper.module = model  # a DDP-like wrapper
    state = TrainerState()
    state.global_step = 3
    cb = fastadalora.AdaLoraCallback()
    cb.on_optimizer_step(TrainingArguments(output_dir="unused", report_to=[]), state, TrainerControl(), model=wrapper)
    assert seen == [3]
    skipped = types.SimpleNamespace(step_was_skipped=True)  # accelerate's optimizer after a GradScaler overflow
    cb.on_optimizer_step(TrainingArguments(output_dir="unused", report_to=[]), state, TrainerControl(), model=wrapper,
                         optimizer=skipped)
    assert seen == [3]  # the allocator skips the step the optimizer skipped
    taken = types.SimpleNamespace(step_was_skipped=False)
    cb.on_optimizer_step(TrainingArguments(output_dir="unused", report_to=[]), state, TrainerControl(), model=wrapper,
                         optimizer=taken)
    assert seen == [3, 3]
    with pytest.raises(TypeError, match="not a fastadalora.AdaLoraModel"):
        cb.on_optimizer_step(TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl(),
                             model=nn.Linear(2, 2))


def test_multihead_attention_out_proj_is_refused():
    """nn.MultiheadAttention reads out_proj.weight directly: an adapter there would silently do nothing."""

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.lin = nn.Linear(16, 4)

        def forward(self, x):
            return self.lin(self.attn(x, x, x)[0])

    base = WithMHA()
    before = [type(m) for m in base.modules()]
    with pytest.raises(ValueError, match=r"'attn.out_proj' is the output projection of an nn.MultiheadAttention"):
        get_adalora_model(base, _cfg(target_modules=["lin", "out_proj"]))
    assert [type(m) for m in base.modules()] == before and all(p.requires_grad for p in base.parameters())
    with pytest.warns(UserWarning, match=r"'all-linear': \['attn.out_proj'\] not adapted"):
        all_linear = get_adalora_model(WithMHA(), _cfg(target_modules="all-linear"))
    assert list(all_linear.adapter_layers()) == ["lin"]
    model = get_adalora_model(base, _cfg(target_modules=["lin", "out_proj"], exclude_modules=["attn.out_proj"]))
    assert list(model.adapter_layers()) == ["lin"]
