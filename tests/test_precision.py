"""Half-precision bases, fp32 adapters and torch.autocast, against PEFT's layer on copied weights.

PEFT's ``get_peft_model`` (``autocast_adapter_dtype=True``) makes the adapters fp32 on a bf16/fp16
base; its ``SVDLinear`` reads x in the adapter dtype, computes the branch there and adds it into the
base output in place (one rounding).  Under ``torch.autocast`` its GEMMs run in the autocast dtype.
"""

import copy
import math
import re
import warnings

import peft
import pytest
import torch
from torch import nn

import fastadalora
from fastadalora import AdaLoraConfig, reference
from fastadalora.backends import use_backend
from fastadalora.peft_twin import copy_layer_into_peft, peft_twin
from support import adapter_grads, batches, cls_batch, forward_backward, tiny_bert

HALF = [torch.bfloat16, torch.float16]
N, D_IN, D_OUT, R = 37, 61, 45, 5


class Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _cfg(**kw):
    return dict(init_r=R, target_r=2, total_step=10, lora_alpha=8, target_modules=["lin"], **kw)


def _pair(dtype, dropout=0.0, seed=0):
    """Our layer and PEFT's SVDLinear over copies of one ``dtype`` base, fp32 adapters, identical weights."""
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    ours = fastadalora.get_adalora_model(Holder(copy.deepcopy(base)), AdaLoraConfig(**_cfg(lora_dropout=dropout)))
    theirs = peft.get_peft_model(Holder(copy.deepcopy(base)), peft.AdaLoraConfig(**_cfg(lora_dropout=dropout)))
    layer, svd = ours.model.lin, theirs.base_model.model.lin
    with torch.no_grad():
        layer.lora_E.normal_()
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    copy_layer_into_peft(layer, svd)
    return layer, svd


def _close(got, want, dtype, k, what):
    tol = reference.fp_tolerance(dtype, k)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=what)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_base_fp32_adapters_equal_peft(backend, dtype):
    layer, svd = _pair(dtype)
    assert layer.lora_A.dtype == svd.lora_A["default"].dtype == torch.float32
    assert layer.base_layer.weight.dtype == dtype and isinstance(layer.ranknum, float)
    x, g = torch.randn(N, D_IN).to(dtype), torch.randn(N, D_OUT).to(dtype)
    y_t, dx_t, *_ = forward_backward(svd, x, g)
    with use_backend(backend):
        y_o, dx_o, *_ = forward_backward(layer, x, g)
    assert y_o.dtype == y_t.dtype == dtype and dx_o.dtype == dtype
    # the output: one rounding of base + branch into the half dtype; dx: a half base GEMM plus the branch
    _close(y_o, y_t, dtype, D_IN, "y")
    _close(dx_o, dx_t, dtype, D_OUT, "dx")
    for name, got, want in zip(("dA", "dE", "dB"), adapter_grads(layer), adapter_grads(svd)):
        assert got.dtype == torch.float32
        _close(got, want, torch.float32, N * R, name)  # fp32 maths over a half input: fp32 rounding of the sums


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_branch_alone_equals_the_reference(backend, dtype, dropout):
    """``weight=None`` (a base that computes its own output, e.g. 4-bit): y is the branch alone in the
    adapter dtype and dx the branch's alone, in x's dtype, on every backend."""
    from fastadalora.functional import adalora_linear

    x = torch.randn(N, D_IN).to(dtype).requires_grad_()
    A, E, B = (torch.randn(*shape, requires_grad=True) for shape in ((R, D_IN), (R, 1), (D_OUT, R)))
    mask, scale, g = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), 0.7, torch.randn(N, D_OUT)
    torch.manual_seed(3)
    y = adalora_linear(x, None, None, A, E, B, scale, mask, dropout, backend=backend)
    torch.manual_seed(3)
    keep = reference.dropout_keep_mask(x.shape, dropout) if dropout else None
    xr = x.detach().clone().requires_grad_()
    Ar, Er, Br = (t.detach().clone().requires_grad_() for t in (A, E, B))
    y_ref = reference.adapter_linear(xr, None, None, Ar, Er, Br, scale, None, mask, keep, dropout)
    assert y.dtype == y_ref.dtype == torch.float32 and y.shape == (N, D_OUT)
    y.backward(g)
    y_ref.backward(g)
    assert x.grad.dtype == dtype
    _close(y, y_ref, torch.float32, D_IN * R, "y")
    _close(x.grad, xr.grad, dtype, D_OUT * R, "dx")
    for name, got, want in zip(("dA", "dE", "dB"), (A.grad, E.grad, B.grad), (Ar.grad, Er.grad, Br.grad)):
        _close(got, want, torch.float32, N * R, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_fused_path_and_is_close_to_peft(backend):
    layer, svd = _pair(torch.float32)
    x, g = torch.randn(N, D_IN), torch.randn(N, D_OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_t, dx_t, *_ = forward_backward(svd, x, g.bfloat16())
        with use_backend(backend):
            xo = x.detach().clone().requires_grad_()
            y_o = layer(xo)
            node = type(y_o.grad_fn).__name__
            y_o.backward(g.bfloat16())
    assert "AdapterLinearFunction" in y_o.grad_fn.next_functions[0][0].__class__.__name__ or \
        "AdapterLinearFunction" in node, node  # the fused op, not the reference
    assert y_o.dtype == y_t.dtype == torch.bfloat16
    _close(y_o, y_t, torch.bfloat16, D_IN, "y")
    _close(xo.grad, dx_t, torch.bfloat16, D_OUT, "dx")
    for name, got, want in zip(("dA", "dE", "dB"), adapter_grads(layer), adapter_grads(svd)):
        assert got.dtype == torch.float32
        _close(got, want, torch.bfloat16, N, name)  # bf16 GEMM operands, fp32 accumulation, as autocast


def _saved(layer, x):
    """The tensors the forward saves for backward that are new (neither parameters, buffers nor x)."""
    exclude = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    exclude.add(x.untyped_storage().data_ptr())
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return saved


def _saved_bytes(layer, x):
    return sum(t.numel() * t.element_size() for t in _saved(layer, x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_with_dropout_saves_almost_nothing(backend):
    layer, svd = _pair(torch.float32, dropout=0.1)
    layer.train()
    svd.train()
    x = torch.randn(2048, D_IN).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with use_backend(backend):
            ours = _saved(layer, x)
        theirs = _saved_bytes(svd, x)
    # ours: the N×r intermediate alone (the bf16 cast of the frozen weight is made again in backward, not
    # kept); PEFT: that cast, the dropped x, its mask, ...
    assert [tuple(t.shape) for t in ours] == [(2048, R)], [tuple(t.shape) for t in ours]
    assert ours[0].element_size() <= 4 and theirs > 2048 * D_IN * 2  # PEFT keeps at least a dropped copy of x


def test_fp32_adapter_layer_refuses_a_half_input_without_autocast():
    layer, _ = _pair(torch.float32)
    with pytest.raises(TypeError, match=r"lin.*float16.*base layer's dtype torch.float32"):
        layer(torch.randn(3, D_IN, dtype=torch.float16))


def test_autocast_adapter_dtype_false_keeps_the_base_dtype_and_must_be_a_bool():
    model = fastadalora.get_adalora_model(Holder(nn.Linear(8, 4).bfloat16()), AdaLoraConfig(**{
        **_cfg(), "init_r": 4}), autocast_adapter_dtype=False)
    assert model.model.lin.lora_A.dtype == torch.bfloat16
    fp64 = fastadalora.get_adalora_model(Holder(nn.Linear(8, 4).double()), AdaLoraConfig(**{**_cfg(), "init_r": 4}))
    assert fp64.model.lin.lora_A.dtype == torch.float64  # fp32 and fp64 bases are unchanged
    base = Holder(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="autocast_adapter_dtype"):
        fastadalora.get_adalora_model(base, AdaLoraConfig(**{**_cfg(), "init_r": 4}), autocast_adapter_dtype="yes")
    assert isinstance(base.lin, nn.Linear)  # untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_orth_term_is_fp32_under_autocast_and_for_half_parameters(dtype):
    model = fastadalora.get_adalora_model(tiny_bert().to(dtype), AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=["query", "value"]), autocast_adapter_dtype=False)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        R = model.orth_reg_loss()
    assert R.dtype == torch.float32
    R.backward()
    layers = list(model.adapter_layers().values())
    want = reference.orth_reg([lay.lora_A.double() for lay in layers], [lay.lora_B.double() for lay in layers])
    assert abs(R.item() - want.item()) <= 1e-5 * want.item()
    assert all(lay.lora_A.grad.dtype == dtype for lay in layers)


def test_short_bf16_training_run_has_peft_rank_patterns():
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=8,
              target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    ours = fastadalora.get_adalora_model(tiny_bert().bfloat16(), AdaLoraConfig(**kw))
    theirs = peft_twin(tiny_bert().bfloat16(), ours)
    assert all(lay.lora_A.dtype == torch.float32 for lay in ours.adapter_layers().values())
    params_o = [p for p in ours.parameters() if p.requires_grad]
    params_t = [p for n, p in theirs.named_parameters() if p.requires_grad]
    opt_o, opt_t = torch.optim.SGD(params_o, lr=0.05), torch.optim.SGD(params_t, lr=0.05)
    ours.train()
    theirs.train()
    for step, batch in enumerate(batches(kw["total_step"])):
        for model, opt, allocate in ((ours, opt_o, ours.update_and_allocate),
                                     (theirs, opt_t, theirs.base_model.update_and_allocate)):
            model(**batch).loss.backward()
            opt.step()
            allocate(step)
            opt.zero_grad()
        want = {k.replace(".default", ""): v for k, v in (theirs.peft_config["default"].rank_pattern or {}).items()}
        assert (ours.rank_pattern or {}) == want, step
    assert ours.allocator._ipt.dtype == torch.float32


# --------------------------------------------------------------------------- skipped steps
def test_non_finite_gradients_never_reach_the_scores():
    """A GradScaler-style loop: some steps overflow (inf gradients) and the optimizer skips them.

    Our loop calls update_and_allocate every step (it detects the overflow and skips the EMA update
    and the masking, with one warning); PEFT's twin is told which steps were skipped and allocates only
    on the others.  The rank patterns end equal, and our EMAs stay finite.
    """
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, lora_alpha=8,
              target_modules=["query", "value"], task_type="SEQ_CLS")
    ours = fastadalora.get_adalora_model(tiny_bert().double(), AdaLoraConfig(**kw))
    theirs = peft_twin(tiny_bert().double(), ours)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    overflow = {2, 5}
    ours.train()
    theirs.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate(batches(kw["total_step"])):
            for model in (ours, theirs):
                model(**batch).loss.backward()
            if step in overflow:  # inf in one gradient: the scaler skips optimizer.step()
                next(iter(ours.adapter_layers().values())).lora_B.grad[0, 0] = math.inf
            else:
                opt_o.step()
                opt_t.step()
                theirs.base_model.update_and_allocate(step)
            ours.update_and_allocate(step)
            opt_o.zero_grad()
            opt_t.zero_grad()
    nonfinite = [w for w in caught if "non-finite gradients" in str(w.message)]
    assert len(nonfinite) == 1 and "step 2" in str(nonfinite[0].message) and "lora_B" in str(nonfinite[0].message)
    assert torch.isfinite(ours.allocator._ipt).all() and torch.isfinite(ours.allocator._unc).all()
    want = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.rank_pattern == want


def test_a_non_finite_parameter_is_named_in_the_warning():
    """fp16 parameters stepped by AdamW without fp32 master weights turn NaN with finite gradients: the
    warning names the parameter itself, and the EMAs stay as they were."""
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, target_modules=["query", "value"])
    model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**kw))
    model(**cls_batch()).loss.backward()
    layer_path, layer = next(iter(model.adapter_layers().items()))
    with torch.no_grad():
        layer.lora_A[0, 0] = math.nan
    before = model.allocator._ipt.clone()
    with pytest.warns(RuntimeWarning, match=rf"step 0 has a non-finite parameter \({re.escape(layer_path)}.lora_A "
                                            "itself, after the optimizer step"):
        model.update_and_allocate(0)
    assert torch.equal(model.allocator._ipt, before)


def test_a_nan_score_never_prunes_a_triplet():
    from fastadalora.allocator import RankAllocator

    layer = fastadalora.AdaLoraLinear(nn.Linear(6, 5), r=4, init_lora_weights=False, name="l")
    alloc = RankAllocator([("l", layer)], init_r=4, target_r=1, tinit=0, tfinal=0, total_step=100, deltaT=1,
                          beta1=0.85, beta2=0.85)
    scores = torch.tensor([float("nan"), 1.0, 2.0, 3.0])
    alloc._mask_to_budget(alloc._current_params(), scores, budget=2)  # prune 2 of 4
    assert alloc.rank_pattern["l.lora_E"] == [True, False, False, True]  # the NaN one stays, like PEFT (NaN <= τ)


# --------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    kw = dict(init_r=4, target_r=2, total_step=10, lora_dropout=0.1, target_modules=["query", "value", "dense"])
    grads = []
    for checkpointing in (False, True):
        model = fastadalora.get_adalora_model(tiny_bert(), AdaLoraConfig(**kw))
        with torch.no_grad():
            for layer in model.adapter_layers().values():
                layer.lora_E.normal_()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()
        model.train()
        torch.manual_seed(3)
        model(**batches(1)[0]).loss.backward()
        grads.append([p.grad.clone() for layer in model.adapter_layers().values() for p in layer.adapter_params()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
