"""One adapted linear layer: forward, backward, full; bare frozen nn.Linear, fastadalora, PEFT AdaLoRA, PEFT LoRA."""

import functools

import pytest
import torch

from bench import cases
from bench.hbm import hbm_bytes

IMPLS = ("bare", "ours", "peft_adalora", "peft_lora")
SHAPES = [  # (N, in, out, r): the headline case first
    (4096, 1024, 1024, 12),
    (2048, 768, 768, 8),
]
CUDA_SHAPES = [(8192, 4096, 4096, 64), (512, 1024, 1024, 64)]


@functools.lru_cache(maxsize=2)
def _setup(shape, dtype, device):
    return cases.setup_layers(*shape, dtype, device)


def _shapes():
    return SHAPES + (CUDA_SHAPES if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ("forward", "backward", "full"))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: "N{}-{}x{}-r{}".format(*s))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_layer(timed, device, shape, mode, impl, dtype):
    if dtype == torch.bfloat16 and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        pytest.skip("bf16 layer timings run on CUDA only (CPU bf16 is in `python -m bench`)")
    s = _setup(shape, dtype, device)
    fn = cases.layer_callables(s, mode)[impl]
    n, d_in, d_out, r = shape
    analysis = hbm_bytes(n, d_in, d_out, r, torch.finfo(dtype).bits // 8)
    timed(f"layer {mode} N={n} {d_in}->{d_out} r={r} {dtype}", fn,
          analytic_hbm_bytes=analysis.get(impl if impl != "ours" else "fastadalora"))
