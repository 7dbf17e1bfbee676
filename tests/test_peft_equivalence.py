"""fastadalora against PEFT 0.21, trained side by side from identical weights.

Each step both sides compute ``loss = model(**batch).loss`` (orthogonal term included),
backward, ``AdamW.step()``, ``update_and_allocate(step)``, ``zero_grad()``.  The schedule
(total_step=12, tinit=2, tfinal=3, deltaT=2, init_r=6 → target_r=3) masks at steps 4, 6, 8,
forces the final mask at step 9 and re-applies the fixed pattern at steps 10 and 11.
"""

import copy

import peft
import pytest
import torch

from fastadalora import AdaLoraConfig, get_adalora_model
from support import batches, tiny_bert, tiny_gpt2_cls

SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8, beta1=0.85,
                beta2=0.85, orth_reg_weight=0.5)
MODELS = {
    # name: (builder, targets, head, fan_in_fan_out)
    "bert": (tiny_bert, ["query", "key", "value", "dense"], "classifier", False),
    "gpt2": (tiny_gpt2_cls, ["c_attn", "c_proj", "c_fc"], "score", True),  # Conv1D
}


def _our_name(peft_name: str) -> str:
    """``base_model.model.<path>.lora_A.default`` → ``model.<path>.lora_A``; heads lose the wrapper."""
    name = peft_name.replace("base_model.model.", "model.", 1).replace(".modules_to_save.default", "")
    return name.removesuffix(".default")


def _build_pair(kind: str, dtype: torch.dtype, seed: int = 1):
    builder, targets, head, fifo = MODELS[kind]
    base = builder(dtype=dtype)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        task_type="SEQ_CLS", target_modules=targets, fan_in_fan_out=fifo, **SCHEDULE))
    torch.manual_seed(seed)
    ours = get_adalora_model(copy.deepcopy(base), AdaLoraConfig(
        target_modules=targets, modules_to_save=[head], fan_in_fan_out=fifo, **SCHEDULE))
    for name, p in theirs.named_parameters():
        if "ranknum" in name:  # PEFT leaves ranknum trainable when the base is not fp32; ours is a fixed float
            p.requires_grad_(False)
    return theirs, ours


def _trainable_pairs(theirs, ours):
    our_params = dict(ours.named_parameters())
    pairs = [(n, p, our_params[_our_name(n)]) for n, p in theirs.named_parameters() if p.requires_grad]
    assert {_our_name(n) for n, _, _ in pairs} == {n for n, p in our_params.items() if p.requires_grad}
    return pairs


def _peft_pattern(theirs):
    pattern = theirs.peft_config["default"].rank_pattern
    return None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_initial_adapters_equal_peft_from_same_seed(kind, dtype):
    """Injection order and RNG draws are PEFT's: same seed, bit-identical A and B (E is zero)."""
    theirs, ours = _build_pair(kind, dtype)
    pairs = _trainable_pairs(theirs, ours)
    assert len(pairs) > 3 * len(ours.adapter_layers())  # adapters plus the head
    for name, p_t, p_o in pairs:
        assert p_o.dtype == p_t.dtype == dtype
        assert torch.equal(p_o, p_t), name


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_matches_peft(kind, dtype):
    theirs, ours = _build_pair(kind, dtype)
    pairs = _trainable_pairs(theirs, ours)
    with torch.no_grad():  # identical starting adapters and head, whatever the RNG did
        for _, p_t, p_o in pairs:
            p_o.copy_(p_t)
    opt_t = torch.optim.AdamW([p for _, p, _ in pairs], lr=0.05)
    opt_o = torch.optim.AdamW([p for _, _, p in pairs], lr=0.05)
    theirs.train()
    ours.train()
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    patterns = []
    for step, batch in enumerate(batches(SCHEDULE["total_step"])):
        loss_t = theirs(**batch).loss
        loss_o = ours(**batch).loss
        torch.testing.assert_close(loss_o, loss_t, rtol=rtol, atol=0, msg=f"loss at step {step}")
        loss_t.backward()
        loss_o.backward()
        opt_t.step()
        opt_o.step()
        theirs.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        if dtype == torch.float64:
            assert ours.rank_pattern == _peft_pattern(theirs), f"rank pattern at step {step}"
        opt_t.zero_grad()
        opt_o.zero_grad()
        patterns.append(ours.rank_pattern)

    final = patterns[-1]
    assert final is not None and len({str(p) for p in patterns if p is not None}) >= 3  # masked several times
    kept = [sum(v) for v in final.values()]
    assert sum(kept) == SCHEDULE["target_r"] * len(final)
    assert len(set(kept)) > 1, "the schedule should give layers different ranks"
    if dtype == torch.float64:
        for name, p_t, p_o in pairs:
            torch.testing.assert_close(p_o, p_t, rtol=1e-9, atol=1e-12, msg=name)
