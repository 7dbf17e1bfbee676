"""A full training step (forward, backward, AdamW, update_and_allocate) of BERT- and GPT-2-style models."""

import functools

import pytest

from bench import cases


@functools.lru_cache(maxsize=1)
def _steps(kind, device):
    return cases.setup_train_models(kind, num_layers=4, hidden=256, init_r=12, batch=8, seq=128, device=device)


@pytest.mark.parametrize("impl", ("ours", "peft_adalora", "peft_lora"))
@pytest.mark.parametrize("kind", ("bert", "gpt2"))
def test_train_step(timed, device, kind, impl):
    timed(f"train step {kind} 4x256 batch 8x128", _steps(kind, device)[impl], rounds=5)
