"""AdaLoraConv2d: equality with PEFT's SVDConv2d (with and without dropout), merge, errors, a ConvNet with
allocation, and checkpoints both ways with PEFT."""

import copy
import json
import types
import warnings

import peft
import pytest
import torch
from peft.tuners.adalora.layer import SVDConv2d
from torch import nn

import fastadalora
from fastadalora import AdaLoraConfig, reference
from fastadalora.layers.conv2d import AdaLoraConv2d
from fastadalora.peft_twin import copy_layer_into_peft
from support import OpCounter, forward_backward

GEOMETRIES = {  # in, out, kernel, conv kwargs
    "3x3-pad1": (5, 7, 3, dict(padding=1)),
    "stride2-dil2": (4, 6, (3, 2), dict(stride=2, padding=(2, 1), dilation=2)),
    "1x1": (6, 5, 1, dict()),
}


def _pair(geometry, r=4, dropout=0.0, dtype=torch.float64, adapter_dtype=None, seed=1):
    """PEFT's SVDConv2d and ours on copies of one base conv, with identical non-zero adapters."""
    cin, cout, k, kw = GEOMETRIES[geometry]
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, k, **kw).to(dtype)
    cfg = peft.AdaLoraConfig(total_step=10, init_r=r, lora_alpha=8, lora_dropout=dropout)
    torch.manual_seed(seed)
    theirs = SVDConv2d(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=8)
    ours = AdaLoraConv2d(copy.deepcopy(base), r=r, lora_alpha=8, lora_dropout=dropout, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        ours.lora_E.normal_()
    for name in ("lora_A", "lora_E", "lora_B"):  # PEFT's in the adapter dtype (get_peft_model's autocast_adapter_dtype)
        p = getattr(theirs, name)["default"]
        p.data = p.data.to(ours.lora_A.dtype)
    copy_layer_into_peft(ours, theirs)
    return theirs, ours


def _inputs(layer, n=3, hw=(9, 8)):
    """An input and an output gradient for ``layer`` (in its base dtype)."""
    base = layer.base_layer
    torch.manual_seed(2)
    x = torch.randn(n, base.in_channels, *hw, dtype=base.weight.dtype)
    with torch.no_grad():
        return x, torch.randn_like(base(x))


def _kernel(geometry):
    k = GEOMETRIES[geometry][2]
    return (k, k) if isinstance(k, int) else k


def _assert_all_close(ours, theirs, tol):
    for i, (o, t) in enumerate(zip(ours, theirs)):
        scale = max(1.0, t.abs().max().item()) if i >= 2 else 1.0  # weight gradients reduce over N·H'·W'
        torch.testing.assert_close(o.to(t.dtype), t, rtol=tol, atol=tol * scale, msg=f"output {i}")


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_peft_svdconv2d(geometry, dtype):
    theirs, ours = _pair(geometry, dtype=dtype)
    x, g = _inputs(ours)
    k = GEOMETRIES[geometry][0] * _kernel(geometry)[0] * _kernel(geometry)[1]
    n_out = g[:, 0].numel()
    tol = 1e-12 if dtype == torch.float64 else reference.fp_tolerance(dtype, max(k, n_out))
    _assert_all_close(forward_backward(ours, x, g), forward_backward(theirs, x, g), tol)


@pytest.mark.parametrize("geometry", ["3x3-pad1", "stride2-dil2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_equals_peft_with_the_same_seed(geometry, dtype):
    theirs, ours = _pair(geometry, dropout=0.3, dtype=dtype)
    theirs.train()
    ours.train()
    x, g = _inputs(ours)
    tol = 1e-12 if dtype == torch.float64 else reference.fp_tolerance(dtype, g[:, 0].numel())
    got, want = forward_backward(ours, x, g, seed=11), forward_backward(theirs, x, g, seed=11)  # one seed: torch's dropout mask, PEFT's
    _assert_all_close(got, want, tol)
    assert not torch.allclose(forward_backward(ours, x, g, seed=12)[0], got[0])  # the mask does change with the seed


def test_dropout_equals_formula_with_the_same_keep_mask():
    _, ours = _pair("3x3-pad1", dropout=0.5)
    ours.train()
    x, g = _inputs(ours)
    torch.manual_seed(5)
    keep = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)  # the mask the layer will draw
    torch.manual_seed(5)
    y = ours(x)
    base = ours.base_layer
    expected = base(x) + nn.functional.conv2d(x * keep, ours.get_delta_weight(), padding=1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_base_matches_peft(adapter_dtype):
    """A half-precision base keeps the branch separate (a small ΔW would round away against W0 in bf16)."""
    theirs, ours = _pair("3x3-pad1", dtype=torch.bfloat16, adapter_dtype=adapter_dtype)
    assert ours.lora_A.dtype == theirs.lora_A["default"].dtype == adapter_dtype
    x, g = _inputs(ours)
    got, want = forward_backward(ours, x, g), forward_backward(theirs, x, g)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    _assert_all_close(got, want, reference.fp_tolerance(torch.bfloat16, g[:, 0].numel()))


def _convolutions(fn):
    with OpCounter() as c:
        fn()
    return sum(op.startswith("convolution") for op in c.ops)


def test_one_convolution_each_way_without_dropout():
    theirs, ours = _pair("3x3-pad1")
    x, g = _inputs(ours)
    x.requires_grad_()
    for layer in (ours, theirs):
        layer.train()
    assert _convolutions(lambda: ours(x)) == 1  # W0 + ΔW in one pass over the activations
    assert _convolutions(lambda: theirs(x)) == 2
    assert _convolutions(lambda: ours(x).backward(g)) == 2  # forward + one backward (dx and dW together)
    assert _convolutions(lambda: theirs(x).backward(g)) == 4


def test_padding_mode_is_the_base_layers():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double()
    for p in (0.0, 0.2):
        layer = AdaLoraConv2d(copy.deepcopy(base), r=3, lora_dropout=p)
        nn.init.normal_(layer.lora_E)
        layer.eval()
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        merged = copy.deepcopy(base)
        with torch.no_grad():
            merged.weight += layer.get_delta_weight()
        torch.testing.assert_close(layer(x), merged(x), rtol=1e-12, atol=1e-12)


def test_merge_unmerge_and_resize():
    _, layer = _pair("stride2-dil2")
    x, _ = _inputs(layer)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    assert layer.get_delta_weight().shape == w0.shape
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-15)
    with torch.no_grad():
        layer.lora_E[1] = 0
    y = layer(x)
    layer.resize_rank([True, False, True, True])
    assert layer.r == 3 and layer.ranknum == 4.0
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_groups_refused_as_peft_cannot_run_them():
    grouped = nn.Conv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match=r"AdaLoraConv2d\(features\.2\): groups=2 is not supported"):
        AdaLoraConv2d(grouped, r=2, name="features.2")
    theirs = SVDConv2d(grouped, "default", config=peft.AdaLoraConfig(total_step=10, init_r=2), r=2, lora_alpha=8)
    with pytest.raises(RuntimeError):  # PEFT: ΔW (out, in·k) does not reshape to the grouped weight
        theirs(torch.randn(1, 4, 5, 5))


def test_errors_and_repr_reads_no_values():
    layer = AdaLoraConv2d(nn.Conv2d(3, 4, 3), r=2, name="stem")
    with pytest.raises(ValueError, match=r"stem.*\(N, 3, H, W\).*got \(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(TypeError, match=r"stem.*float64.*float32"):
        layer(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be torch.nn.Conv2d"):
        AdaLoraConv2d(nn.Linear(3, 3))
    on_meta = AdaLoraConv2d(nn.Conv2d(3, 4, 3, device="meta"), r=2)
    assert on_meta.lora_A.shape == (2, 27) and "kernel_size=(3, 3)" in repr(on_meta)


# --------------------------------------------------------------------------- in a model
class ConvNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, pixel_values, labels=None):
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        logits = self.head(torch.relu(self.conv3(h)).mean((2, 3)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


SCHED = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=14, lora_alpha=8)
TARGETS = ["conv1", "conv2", "conv3"]


def _batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(6, 3, 8, 8, generator=g).to(dtype),
            "labels": torch.randint(0, 4, (6,), generator=g)}


def _train(model, steps, allocate, dtype=torch.float32):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**_batch(step, dtype)).loss
        loss.backward()
        opt.step()
        allocate(step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _fa_trained(steps):
    model = fastadalora.get_adalora_model(ConvNet(), AdaLoraConfig(target_modules=TARGETS, **SCHED))
    assert all(isinstance(model.model.get_submodule(t), AdaLoraConv2d) for t in TARGETS)
    _train(model, steps, model.update_and_allocate)
    return model


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(**_batch(100)).logits


def test_convnet_trains_with_allocation():
    model = _fa_trained(14)
    kept = {k: sum(v) for k, v in model.rank_pattern.items()}
    assert sum(kept.values()) == SCHED["target_r"] * len(TARGETS)
    assert all(k < SCHED["init_r"] for k in kept.values())
    assert torch.isfinite(_logits(model)).all()


def test_trains_like_peft_float64():
    model = fastadalora.get_adalora_model(ConvNet().double(), AdaLoraConfig(target_modules=TARGETS, **SCHED))
    twin = peft.get_peft_model(ConvNet().double(), peft.AdaLoraConfig(target_modules=TARGETS, **SCHED))
    for path, layer in model.adapter_layers().items():
        copy_layer_into_peft(layer, twin.base_model.model.get_submodule(path))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_E.normal_(std=0.1)  # non-zero E: A and B get task gradients from step 0
        for path, layer in model.adapter_layers().items():
            twin.base_model.model.get_submodule(path).lora_E["default"].copy_(layer.lora_E)
    ours = _train(model, 14, model.update_and_allocate, torch.float64)
    # PEFT adds the orthogonal term only with a task type: add it here as ours does
    orth = fastadalora.AdaLoraConfig(total_step=10).orth_reg_weight

    class WithOrth(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            out = self.inner(**batch)
            mats = [(p, "lora_A" in n) for n, p in self.inner.named_parameters() if "lora_A" in n or "lora_B" in n]
            covs = [p @ p.T if a else p.T @ p for p, a in mats]
            reg = sum(torch.norm(c - torch.eye(c.shape[0], dtype=c.dtype)) for c in covs) / len(covs)
            out.loss = out.loss + orth * reg
            return out

    theirs = _train(WithOrth(twin), 14, lambda s: twin.base_model.update_and_allocate(s), torch.float64)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-9, atol=1e-9)
    ranks = {p: (twin.base_model.model.get_submodule(p).lora_E["default"] != 0).reshape(-1).tolist() for p in TARGETS}
    assert {f"{p}.lora_E": v for p, v in ranks.items()} == model.rank_pattern


def test_checkpoint_fastadalora_to_peft(tmp_path):
    model = _fa_trained(9)
    assert any(not all(v) for v in model.rank_pattern.values())
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["rank_pattern"]) == {f"{t}.lora_E" for t in TARGETS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(ConvNet(), str(tmp_path))
    assert isinstance(theirs.base_model.model.conv2, SVDConv2d)
    torch.testing.assert_close(_logits(theirs), expected, rtol=1e-5, atol=1e-6)
    ours = fastadalora.AdaLoraModel.from_pretrained(ConvNet(), tmp_path)
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_peft_to_fastadalora(tmp_path):
    twin = peft.get_peft_model(ConvNet(), peft.AdaLoraConfig(target_modules=TARGETS, **SCHED))
    _train(twin, 9, lambda s: twin.base_model.update_and_allocate(s))
    expected = _logits(twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about a layer pruned to rank 0 (0-sized tensors)
        twin.save_pretrained(str(tmp_path))
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and any(not all(v) for v in pattern.values())
    ours = fastadalora.AdaLoraModel.from_pretrained(ConvNet(), tmp_path)
    for path, layer in ours.adapter_layers().items():
        assert layer.r == sum(pattern[f"{path}.lora_E"]) and layer.ranknum == float(SCHED["init_r"])
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-6)


def test_lora_export_loads_in_peft_lora(tmp_path):
    model = _fa_trained(9)
    expected = _logits(model)
    model.save_lora(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.PeftModel.from_pretrained(ConvNet(), str(tmp_path))
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    torch.testing.assert_close(_logits(lora), expected, rtol=1e-5, atol=1e-6)
