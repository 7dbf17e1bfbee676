"""Bytes saved for backward by one layer (recorded in extra_info), with the forward timed."""

import pytest
import torch

from bench import cases


@pytest.mark.parametrize("impl", ("bare", "ours", "peft_adalora", "peft_lora"))
@pytest.mark.parametrize("dropout", (0.0, 0.1))
def test_saved_activations(timed, device, impl, dropout):
    s = cases.setup_layers(4096, 1024, 1024, 12, torch.float32, device, dropout=dropout)
    layer, x = s[impl], s["x"]
    exclude = list(layer.parameters()) + list(layer.buffers()) + [x]
    nbytes = cases.saved_bytes(lambda: layer(x), exclude)
    timed(f"saved activations dropout={dropout}", lambda: layer(x), saved_bytes=nbytes)
