"""AdaLoRA over bitsandbytes 4-bit / 8-bit linears: equality with PEFT's SVDLinear4bit / SVDLinear8bitLt on the
same quantized weights, dropout, training with allocation, checkpoints, and the merge decisions."""

import copy
import types

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft.tuners.adalora.bnb import SVDLinear4bit, SVDLinear8bitLt  # noqa: E402

import fastadalora  # noqa: E402
from fastadalora import AdaLoraConfig, reference  # noqa: E402
from fastadalora.backends import draw_dropout_seed, torch_path  # noqa: E402
from fastadalora.layers.quantized import AdaLoraLinear4bit, AdaLoraLinear8bitLt  # noqa: E402
from fastadalora.peft_twin import copy_layer_into_peft  # noqa: E402
from support import forward_backward  # noqa: E402

IN, OUT = 64, 96  # multiples of 32: bitsandbytes' CPU eval path repacks 4-bit weights in blocks of 32 rows


def linear4bit(lin: nn.Linear, quant_type="nf4", compute_dtype=torch.float32):
    """A bitsandbytes ``Linear4bit`` holding ``lin``'s weight, quantized (on CPU)."""
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type=quant_type)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def linear8bit(lin: nn.Linear, threshold=6.0):
    """A bitsandbytes ``Linear8bitLt`` (int8 weights, LLM.int8() outlier threshold) holding ``lin``'s weight."""
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                            threshold=threshold)
    q.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")


KINDS = {  # name: (make base, PEFT class, our class, input dtype)
    "nf4-fp32": (lambda lin: linear4bit(lin, "nf4"), SVDLinear4bit, AdaLoraLinear4bit, torch.float32),
    "fp4-fp32": (lambda lin: linear4bit(lin, "fp4"), SVDLinear4bit, AdaLoraLinear4bit, torch.float32),
    "nf4-bf16": (lambda lin: linear4bit(lin, "nf4", torch.bfloat16), SVDLinear4bit, AdaLoraLinear4bit, torch.bfloat16),
    "int8-fp32": (linear8bit, SVDLinear8bitLt, AdaLoraLinear8bitLt, torch.float32),
    "int8-fp16": (linear8bit, SVDLinear8bitLt, AdaLoraLinear8bitLt, torch.float16),
}


def _pair(kind, r=5, dropout=0.0, seed=0):
    """PEFT's quantized layer and ours on copies of one quantized base, with identical non-zero fp32 adapters."""
    make, peft_cls, our_cls, _ = KINDS[kind]
    torch.manual_seed(seed)
    base = make(nn.Linear(IN, OUT))
    cfg = peft.AdaLoraConfig(total_step=10, init_r=r, lora_alpha=8, lora_dropout=dropout)
    theirs = peft_cls(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=8)
    ours = our_cls(base, r=r, lora_alpha=8, lora_dropout=dropout, adapter_dtype=torch.float32)
    with torch.no_grad():
        ours.lora_E.normal_()
    for name in ("lora_A", "lora_E", "lora_B"):  # fp32, as get_peft_model's autocast_adapter_dtype makes them
        p = getattr(theirs, name)["default"]
        p.data = p.data.float()
    copy_layer_into_peft(ours, theirs)
    return theirs, ours




def _inputs(dtype, n=(3, 7)):
    torch.manual_seed(3)
    return torch.randn(*n, IN).to(dtype), torch.randn(*n, OUT).to(dtype)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_equals_peft_quantized_layers(kind):
    theirs, ours = _pair(kind)
    for layer in (theirs, ours):
        layer.train()
    dtype = KINDS[kind][3]
    x, g = _inputs(dtype)
    got, want = forward_backward(ours, x, g), forward_backward(theirs, x, g)
    assert got[0].dtype == dtype  # PEFT's 8-bit layer returns fp32 for a half-precision input; ours keeps it
    # the base part is bitsandbytes' own on both sides; the branch reduces over in (output) and N=21 (weights)
    tol = reference.fp_tolerance(dtype, IN)
    for i, (o, t) in enumerate(zip(got, want)):
        scale = t.abs().max().item()
        torch.testing.assert_close(o.float(), t.float(), rtol=tol, atol=tol * scale, msg=f"{kind}: output {i}")


def test_equals_peft_through_get_peft_model_bf16_compute():
    """The way transformers hands PEFT a 4-bit model: ``is_loaded_in_4bit`` set, bf16 compute dtype."""

    def model():
        m = Tiny(quantize=lambda lin: linear4bit(lin, "nf4", torch.bfloat16))
        m.is_loaded_in_4bit = True
        return m

    ours = fastadalora.get_adalora_model(model(), AdaLoraConfig(target_modules=["fc1", "fc2"], **SCHED))
    twin = peft.get_peft_model(model(), peft.AdaLoraConfig(target_modules=["fc1", "fc2"], **SCHED))
    for path, layer in ours.adapter_layers().items():
        assert isinstance(layer, AdaLoraLinear4bit) and layer.lora_A.dtype == torch.float32
        theirs = twin.base_model.model.get_submodule(path)
        assert isinstance(theirs, SVDLinear4bit) and theirs.lora_A["default"].dtype == torch.float32
        with torch.no_grad():
            layer.lora_E.normal_()
        copy_layer_into_peft(layer, theirs)
    batch = _batch(0, torch.bfloat16)
    ours.train()
    twin.train()
    a, b = ours(**batch).logits, twin(**batch).logits
    torch.testing.assert_close(a.float(), b.float(), rtol=reference.fp_tolerance(torch.bfloat16, IN),
                               atol=reference.fp_tolerance(torch.bfloat16, IN) * b.abs().max().item())


@pytest.mark.parametrize("kind", ["nf4-fp32", "int8-fp32"])
def test_dropout_equals_formula_with_the_same_keep_mask(kind):
    _, ours = _pair(kind, dropout=0.3)
    ours.train()
    x, g = _inputs(torch.float32)
    torch.manual_seed(7)
    seed = draw_dropout_seed()  # the seed the layer will draw after the same manual_seed
    keep = torch_path.keep_mask(x.reshape(-1, IN), seed, 0.3).reshape(x.shape)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    torch.manual_seed(7)
    y = ours(xs[0])
    y.backward(g)
    got = [xs[0].grad, *(p.grad.clone() for p in ours.adapter_params())]
    ours.zero_grad()
    A, E, B = ours.adapter_params()
    y_ref = ours.base_layer(xs[1]) + ((xs[1] * keep / 0.7) @ (A * E).t() @ B.t()) * ours.scale
    y_ref.backward(g)
    want = [xs[1].grad, *(p.grad for p in ours.adapter_params())]
    tol = reference.fp_tolerance(torch.float32, 21)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    for o, t in zip(got, want):
        torch.testing.assert_close(o, t, rtol=tol, atol=tol * t.abs().max().item())


def test_errors_and_repr_read_no_values():
    torch.manual_seed(0)
    layer = AdaLoraLinear4bit(linear4bit(nn.Linear(IN, OUT)), r=3, name="mlp.fc1")
    with pytest.raises(ValueError, match=r"mlp\.fc1.*\(\.\.\., 64\).*got \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="must be bitsandbytes Linear4bit"):
        AdaLoraLinear4bit(nn.Linear(IN, OUT), name="x")
    with pytest.raises(TypeError, match="must be bitsandbytes Linear8bitLt"):
        AdaLoraLinear8bitLt(linear4bit(nn.Linear(IN, OUT)), name="x")
    assert "quant_type=nf4" in repr(layer) and "compute_dtype=torch.float32" in repr(layer)
    assert "threshold=6.0" in repr(AdaLoraLinear8bitLt(linear8bit(nn.Linear(IN, OUT)), r=3))
    on_meta = AdaLoraLinear4bit(bnb.nn.Linear4bit(IN, OUT, device="meta"), r=3)
    assert on_meta.lora_A.device.type == "meta" and "r=3" in repr(on_meta)


# --------------------------------------------------------------------------- merge
def _adapter_of_size(layer, fraction):
    """Scale E so that ‖ΔW‖ = fraction·‖W0‖ (a trained adapter is a few percent of the base)."""
    w0 = layer.dequantized_weight().float()
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
        layer.lora_E.mul_(fraction * w0.norm() / layer.get_delta_weight().norm())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merging_into_4bit_is_refused_because_requantizing_loses_the_adapter(quant_type):
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    layer = AdaLoraLinear4bit(linear4bit(lin, quant_type), r=8)
    _adapter_of_size(layer, 0.05)
    with pytest.raises(NotImplementedError, match="merging into a 4-bit base is not supported"):
        layer.merge()
    with pytest.raises(NotImplementedError):
        layer.check_can_merge()
    assert not layer.merged
    # the measurement behind the decision: dequantize, add ΔW, quantize again (PEFT LoRA's 4-bit merge)
    merged = linear4bit(nn.Linear(256, 256), quant_type)
    with torch.no_grad():
        merged.weight = bnb.nn.Params4bit((layer.dequantized_weight() + layer.get_delta_weight()).clone(),
                                          requires_grad=False, quant_type=quant_type)
    merged = merged.to("cpu")
    x = torch.randn(512, 256)
    with torch.no_grad():
        y_base, y, y_merged = layer.base_layer(x), layer(x), merged(x)
    error = (y_merged - y).norm() / (y - y_base).norm()
    assert error > 1.0  # the merged layer is further from the adapted one than the plain base is (~1.3)


def test_int8_merge_within_the_quantization_step_and_unmerge_exact():
    torch.manual_seed(0)
    layer = AdaLoraLinear8bitLt(linear8bit(nn.Linear(IN, OUT), threshold=0.0), r=4)
    _adapter_of_size(layer, 0.05)
    x = torch.randn(32, IN)
    with torch.no_grad():
        y_adapted = layer(x)  # also moves bitsandbytes' scales from the weight to the layer state
        w0 = layer.dequantized_weight().clone()
        int8_before = layer.base_layer.weight.data.clone()
        exact = layer.merged_weight()
        assert torch.equal(layer.dequantized_weight(), w0)  # merged_weight changes nothing
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
        assert layer.merged
        w_merged = layer.dequantized_weight()
        # row-wise absmax int8: at most half a step (absmax/127) per weight, after fp16 rounding of the sum
        step = exact.abs().amax(1, keepdim=True) / 127
        assert ((w_merged - exact).abs() <= 0.5 * step + exact.abs() * 2.0**-11 + 1e-7).all()
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight.data, int8_before)
        assert torch.equal(layer(x), y_adapted)


# --------------------------------------------------------------------------- in a model
class Tiny(nn.Module):
    """Two quantized hidden layers and a plain head; ``forward(x, labels)`` returns ``.loss``."""

    def __init__(self, quantize, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = quantize(nn.Linear(IN, IN))
        self.fc2 = quantize(nn.Linear(IN, OUT))
        self.head = nn.Linear(OUT, 3)

    def forward(self, x, labels=None):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        logits = self.head(h.to(self.head.weight.dtype))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


SCHED = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=14, lora_alpha=8)
QUANTIZERS = {"nf4": lambda lin: linear4bit(lin, "nf4"), "int8": linear8bit}


def _batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(8, IN, generator=g).to(dtype), "labels": torch.randint(0, 3, (8,), generator=g)}


def _trained(quant, steps):
    model = fastadalora.get_adalora_model(Tiny(QUANTIZERS[quant]), AdaLoraConfig(target_modules=["fc1", "fc2"],
                                                                                 **SCHED))
    cls = AdaLoraLinear4bit if quant == "nf4" else AdaLoraLinear8bitLt
    assert all(isinstance(layer, cls) for layer in model.adapter_layers().values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        loss = model(**_batch(step)).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        assert torch.isfinite(loss)
    return model


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_training_with_allocation_changes_ranks(quant):
    model = _trained(quant, 14)
    kept = {k: sum(v) for k, v in model.rank_pattern.items()}
    assert sum(kept.values()) == SCHED["target_r"] * 2 and all(k < SCHED["init_r"] for k in kept.values())


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_save_and_load_round_trip(tmp_path, quant):
    model = _trained(quant, 9)
    assert any(not all(v) for v in model.rank_pattern.values())
    batch = _batch(100)
    model.train()  # bitsandbytes' CPU eval path computes the 4-bit base differently; train mode, no grad, both sides
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = fastadalora.AdaLoraModel.from_pretrained(Tiny(QUANTIZERS[quant]), tmp_path)
    for path, layer in loaded.adapter_layers().items():
        assert layer.r == sum(model.rank_pattern[f"{path}.lora_E"])
    loaded.train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_adapter_sized_state_dict_round_trips_strictly(quant):
    """The trainable state dict leaves the quantized base (weight and its quantization state) out, both ways."""
    model = _trained(quant, 4)
    sd = model.state_dict()
    assert not any(".base_layer." in k for k in sd)
    twin = fastadalora.get_adalora_model(Tiny(QUANTIZERS[quant]), AdaLoraConfig(target_modules=["fc1", "fc2"],
                                                                                **SCHED))
    result = twin.load_state_dict(sd)  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n


def test_merge_adapter_refuses_a_4bit_layer_before_changing_any():
    model = fastadalora.get_adalora_model(Tiny(QUANTIZERS["nf4"]), AdaLoraConfig(target_modules=["fc1", "fc2"],
                                                                               **SCHED))
    with pytest.raises(NotImplementedError):
        model.merge_adapter()
    assert not any(layer.merged for layer in model.adapter_layers().values())
