"""AdaLoraLinear: equality with PEFT's SVDLinear, drop-in behaviour, errors, memory."""

import copy

import peft
import pytest
import torch
from peft.tuners.adalora.layer import SVDLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastadalora import AdaLoraLinear, reference
from fastadalora.backends import use_backend
from support import forward_backward


def _pair(base, r=5, lora_alpha=8, dropout=0.0, fan_in_fan_out=False, seed=1):
    """PEFT's SVDLinear and ours on copies of one base layer, with identical (non-zero) adapters."""
    cfg = peft.AdaLoraConfig(total_step=10, init_r=r, lora_alpha=lora_alpha, lora_dropout=dropout,
                             fan_in_fan_out=fan_in_fan_out)
    torch.manual_seed(seed)
    theirs = SVDLinear(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=lora_alpha)
    torch.manual_seed(seed)
    ours = AdaLoraLinear(copy.deepcopy(base), r=r, lora_alpha=lora_alpha, lora_dropout=dropout,
                         fan_in_fan_out=fan_in_fan_out)
    assert torch.equal(theirs.lora_A["default"], ours.lora_A)  # same init, same RNG stream
    assert torch.equal(theirs.lora_B["default"], ours.lora_B)
    with torch.no_grad():
        e = torch.randn(r, 1, dtype=ours.lora_E.dtype)
        theirs.lora_E["default"].copy_(e)
        ours.lora_E.copy_(e)
    return theirs, ours


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                           ("triton", torch.float32)])
@pytest.mark.parametrize("conv1d", [False, True])
def test_equals_peft_svdlinear(backend, dtype, conv1d):
    torch.manual_seed(0)
    base = (Conv1D(45, 61) if conv1d else nn.Linear(61, 45)).to(dtype)
    theirs, ours = _pair(base, fan_in_fan_out=conv1d)
    x = torch.randn(3, 37, 61, dtype=dtype)
    g = torch.randn(3, 37, 45, dtype=dtype)
    y_t, dx_t, *grads_t = forward_backward(theirs, x, g)
    with use_backend(backend):
        y_o, dx_o, *grads_o = forward_backward(ours, x, g)
    tol = 1e-12 if dtype == torch.float64 else reference.fp_tolerance(dtype, 111)
    torch.testing.assert_close(y_o, y_t, rtol=tol, atol=tol)
    torch.testing.assert_close(dx_o, dx_t, rtol=tol, atol=tol)
    for go, gt in zip(grads_o, grads_t):
        # weight gradients reduce over all N=111 tokens
        torch.testing.assert_close(go, gt, rtol=tol, atol=tol * gt.abs().max().item())


def test_init_and_names_follow_peft():
    base = nn.Linear(16, 8)
    layer = AdaLoraLinear(base, r=4, lora_alpha=8)
    assert layer.base_layer is base and not base.weight.requires_grad
    assert layer.lora_A.shape == (4, 16) and layer.lora_E.shape == (4, 1) and layer.lora_B.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_E) == 0  # the adapter starts as an exact no-op
    assert layer.scaling == 8 and layer.ranknum == 4.0 and not isinstance(layer.ranknum, torch.Tensor)
    assert AdaLoraLinear(nn.Linear(16, 8), r=4, lora_alpha=0).scaling == 4.0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_E", "lora_B"}
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), base(x))
    assert "r=4" in repr(layer) and "init_r=4" in repr(layer) and layer.current_rank() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adapter_follows_base_device_and_dtype(dtype):
    layer = AdaLoraLinear(nn.Linear(16, 8).to(dtype), r=4)
    assert all(p.dtype == dtype for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    layer.to(torch.float32)
    assert layer.lora_A.dtype == torch.float32 == layer.base_layer.weight.dtype
    on_meta = AdaLoraLinear(nn.Linear(16, 8, device="meta", dtype=dtype), r=4)
    assert on_meta.lora_B.device.type == "meta" and on_meta.lora_B.dtype == dtype


def test_merge_unmerge_and_delta_weight():
    torch.manual_seed(0)
    for base, fifo in ((nn.Linear(16, 8).double(), False), (Conv1D(8, 16).double(), True)):
        layer = AdaLoraLinear(base, r=4, fan_in_fan_out=fifo)
        nn.init.normal_(layer.lora_E)
        w0 = base.weight.detach().clone()
        x = torch.randn(5, 16, dtype=torch.float64)
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y)
        torch.testing.assert_close(layer.get_delta_weight(), base.weight - w0)
        layer.unmerge()
        torch.testing.assert_close(base.weight, w0)
        torch.testing.assert_close(layer(x), y)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    layer = AdaLoraLinear(nn.Linear(16, 8), r=4, lora_dropout=0.5)
    nn.init.normal_(layer.lora_E)
    x = torch.randn(64, 16)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    layer.train()
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    y2 = layer(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y_eval)


def test_zero_rows_and_3d_noncontiguous():
    layer = AdaLoraLinear(nn.Linear(16, 8), r=4)
    assert layer(torch.randn(0, 16)).shape == (0, 8)
    assert layer(torch.randn(2, 0, 16)).shape == (2, 0, 8)
    x = torch.randn(16, 3, 5).permute(1, 2, 0)  # (3, 5, 16), non-contiguous
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


def test_resize_rank_keeps_ranknum_and_output():
    torch.manual_seed(0)
    layer = AdaLoraLinear(nn.Linear(16, 8).double(), r=4)
    nn.init.normal_(layer.lora_E)
    keep = [True, False, True, False]
    with torch.no_grad():
        layer.lora_E[1] = 0
        layer.lora_E[3] = 0
    x = torch.randn(5, 16, dtype=torch.float64)
    y = layer(x)
    layer.resize_rank(keep)
    assert layer.r == 2 and layer.ranknum == 4.0 and layer.lora_A.requires_grad
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(ValueError, match="keep mask has 3 entries"):
        layer.resize_rank([True, True, False])


def test_bad_input_errors_name_the_layer():
    layer = AdaLoraLinear(nn.Linear(16, 8), r=4, name="encoder.layer.0.query")
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.query.*\(\.\.\., 16\).*got \(5, 15\)"):
        layer(torch.randn(5, 15))
    with pytest.raises(TypeError, match=r"encoder\.layer\.0\.query.*float64.*float32"):
        layer(torch.randn(5, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.0\.query.*is on meta.*cpu"):
        layer(torch.randn(5, 16, device="meta"))  # stands in for an input on another device
    with pytest.raises(TypeError, match="must be torch.nn.Linear or transformers Conv1D"):
        AdaLoraLinear(nn.Embedding(4, 4), name="emb")


def test_autocast_runs_reference_path():
    layer = AdaLoraLinear(nn.Linear(16, 8), r=4)
    nn.init.normal_(layer.lora_E)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def _saved_bytes(layer, x):
    """Bytes saved for backward beyond the parameters and the input itself."""
    exclude = {t.data_ptr() for t in layer.parameters()} | {x.data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in exclude:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum()
    return total


def test_saved_activation_memory_at_most_half_of_peft():
    base = nn.Linear(256, 256)
    theirs, ours = _pair(base, r=12, dropout=0.1)
    theirs.train()
    ours.train()
    x = torch.randn(512, 256, requires_grad=True)
    ours_bytes, theirs_bytes = _saved_bytes(ours, x), _saved_bytes(theirs, x)
    assert ours_bytes <= 0.5 * theirs_bytes, (ours_bytes, theirs_bytes)
    assert ours_bytes == 512 * 12 * 4  # the N×r intermediate only
