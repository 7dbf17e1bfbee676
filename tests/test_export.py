"""Physical rank compaction and the export to a plain PEFT LoRA adapter."""

import copy
import json
import warnings

import peft
import pytest
import torch

import fastadalora
from fastadalora import AdaLoraConfig
from support import batches, cls_batch, lm_batch, tiny_bert, tiny_gpt2_lm

SCHED = dict(init_r=6, target_r=2, tinit=1, tfinal=4, deltaT=1, total_step=12, lora_alpha=8)


def _run(model, steps, opt, start=0, kind="cls"):
    losses = []
    model.train()
    for step, batch in enumerate(batches(steps, kind=kind, seed=start), start=start):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _logits(model, kind="cls"):
    batch = dict(cls_batch(seed=99) if kind == "cls" else lm_batch(seed=99))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    return out


def _bert(orth=0.0, dtype=torch.float64):
    return fastadalora.get_adalora_model(tiny_bert(dtype=dtype), AdaLoraConfig(
        **SCHED, orth_reg_weight=orth, target_modules=["query", "key", "value", "dense"],
        modules_to_save=["classifier"]))


# --------------------------------------------------------------------------- compaction
def test_compaction_in_the_final_phase_changes_nothing_but_the_size():
    """orth_reg_weight=0: a pruned triplet gets no gradient, so the compacted run must track the masked one."""
    masked = _bert()
    opt_m = torch.optim.AdamW([p for p in masked.parameters() if p.requires_grad], lr=0.02)
    switch = SCHED["total_step"] - SCHED["tfinal"]
    _run(masked, switch + 1, opt_m)  # through the phase switch: the pattern is fixed
    compact = copy.deepcopy(masked)
    opt_c = torch.optim.AdamW([p for p in compact.parameters() if p.requires_grad], lr=0.02)
    opt_c.load_state_dict(copy.deepcopy(opt_m.state_dict()))  # its tensors, not shared ones
    before = _logits(compact)
    total_before = sum(layer.r for layer in compact.adapter_layers().values())
    dropped = compact.compact_ranks(opt_c)
    ranks = [layer.r for layer in compact.adapter_layers().values()]
    assert dropped == total_before - sum(ranks) > 0 and sum(ranks) == SCHED["target_r"] * len(ranks)
    assert all(layer.ranknum == SCHED["init_r"] for layer in compact.adapter_layers().values())
    torch.testing.assert_close(_logits(compact), before, rtol=1e-12, atol=1e-12)  # outputs unchanged
    losses_m = _run(masked, 3, opt_m, start=switch + 1)
    losses_c = _run(compact, 3, opt_c, start=switch + 1)
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_m), rtol=1e-10, atol=0)
    torch.testing.assert_close(_logits(compact), _logits(masked), rtol=1e-10, atol=1e-12)
    assert losses_c[-1] < losses_c[0] or losses_c[-1] < 1.0


def test_adam_state_is_sliced_along():
    model = _bert(orth=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    _run(model, SCHED["total_step"] - SCHED["tfinal"] + 1, opt)
    masks = model.live_masks()
    layer = next(iter(model.adapter_layers().values()))
    path = next(iter(model.adapter_layers()))
    keep = torch.tensor(masks[path])
    old = {name: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
           for name, p in zip(("A", "E", "B"), layer.adapter_params())}
    model.compact_ranks(opt)
    A, E, B = layer.adapter_params()
    for name, p, dim in (("A", A, 0), ("E", E, 0), ("B", B, 1)):
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape
        torch.testing.assert_close(st["exp_avg"], old[name]["exp_avg"].index_select(dim, keep.nonzero().flatten()))
        assert torch.equal(st["step"], old[name]["step"])
    assert all(any(q is p for q in g["params"]) for p in (A, E, B) for g in opt.param_groups[:1])
    assert not any(p.shape[0] == SCHED["init_r"] and p is not q for g in opt.param_groups for p in g["params"]
                   for q in (A,) if p is A)
    # an optimizer built on the compacted parameters with that state steps identically
    twin = copy.deepcopy(model)
    opt_twin = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=0.02)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, opt_twin)):
        m.train()
        m(**cls_batch(seed=5)).loss.backward()
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n


def test_state_that_cannot_be_sliced_raises_before_anything_changes():
    model = _bert()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    _run(model, SCHED["total_step"] - SCHED["tfinal"] + 1, opt)
    masks = model.live_masks()
    layer = next(lay for p, lay in model.adapter_layers().items() if not all(masks[p]))  # one that shrinks
    opt.state[layer.lora_A]["weird"] = torch.zeros(3, 3)
    ranks = [lay.r for lay in model.adapter_layers().values()]
    with pytest.raises(ValueError, match="weird.*cannot be sliced"):
        model.compact_ranks(opt)
    assert [lay.r for lay in model.adapter_layers().values()] == ranks


def test_a_compacted_model_saves_in_peft_format_and_loads_back(tmp_path):
    model = _bert(dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    _run(model, SCHED["total_step"] - SCHED["tfinal"] + 1, opt)
    expected = _logits(model)
    model.compact_ranks(opt)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(len(v) == SCHED["init_r"] for v in cfg["rank_pattern"].values())  # positions out of init_r
    ours = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    torch.testing.assert_close(_logits(theirs), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- plain LoRA export
CASES = {
    "bert": (lambda: tiny_bert(), ["query", "key", "value", "dense"], "cls", ["classifier"]),
    "gpt2": (lambda: tiny_gpt2_lm(), ["c_attn", "c_proj", "c_fc"], "lm", None),
}


def _trained(case):
    build, targets, kind, heads = CASES[case]
    model = fastadalora.get_adalora_model(build(), AdaLoraConfig(**SCHED, target_modules=targets,
                                                                  modules_to_save=heads))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    _run(model, 8, opt, kind=kind)  # mid-budgeting: ranks differ per layer, some masked
    return model


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_export_loads_in_peft_as_lora(tmp_path, case, uniform):
    model = _trained(case)
    build, _, kind, _ = CASES[case]
    expected = _logits(model, kind)
    model.save_lora(tmp_path, uniform_rank=uniform)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    kept = {p: sum(m) for p, m in model.live_masks().items()}
    if uniform:
        assert cfg["rank_pattern"] == {} and cfg["r"] == max(kept.values())
    else:
        assert {p: cfg["rank_pattern"].get(p, cfg["r"]) for p in cfg["target_modules"]} == \
            {p: k for p, k in kept.items() if k > 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    torch.testing.assert_close(_logits(lora, kind), expected, rtol=1e-5, atol=1e-6)
    # merging gives the same merged weights
    ours_merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    theirs_merged = dict(lora.merge_and_unload().named_parameters())
    for name, w in theirs_merged.items():
        torch.testing.assert_close(w, ours_merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compact_at_final_compacts_when_the_loop_passes_the_optimizer():
    model = fastadalora.get_adalora_model(tiny_bert(dtype=torch.float64), AdaLoraConfig(
        **SCHED, target_modules=["query", "value"], compact_at_final=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    with pytest.raises(ValueError, match="optimizer=optimizer"):
        model.update_and_allocate(0)
    switch = SCHED["total_step"] - SCHED["tfinal"]
    model.train()
    for step, batch in enumerate(batches(SCHED["total_step"])):
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step, optimizer=opt)
        opt.zero_grad()
        total = sum(layer.r for layer in model.adapter_layers().values())
        assert total == (SCHED["init_r"] * 4 if step < switch else SCHED["target_r"] * 4), step
    assert all(p.shape[0] == layer.r for layer in model.adapter_layers().values() for p in layer.adapter_params()[:2])
    assert "compact_at_final" not in model.adalora_config.to_dict()  # a training option, not saved
