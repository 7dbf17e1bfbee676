"""update_and_allocate (masking step) and the orthogonal term on a 24-layer BERT-style model, width 256."""

import functools

import pytest

from bench import cases


@functools.lru_cache(maxsize=1)
def _models(device):
    return cases.setup_deep_models(24, 256, 12, device)


@pytest.mark.parametrize("impl", ("ours", "peft_adalora"))
def test_update_and_allocate(timed, device, impl):
    m = _models(device)[impl]
    allocate = m.update_and_allocate if impl == "ours" else m.base_model.update_and_allocate
    steps = cases.masking_steps()
    timed("update_and_allocate 144 adapters", lambda: allocate(next(steps)), rounds=10)


@pytest.mark.parametrize("impl", ("ours", "peft_adalora"))
def test_orth_reg(timed, device, impl):
    m = _models(device)[impl]
    loss = m.orth_reg_loss if impl == "ours" else (lambda: cases.peft_orth_reg(m))
    timed("orth_reg fwd+bwd 144 adapters", lambda: loss().backward(), rounds=10)
