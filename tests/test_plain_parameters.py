"""Adapter Parameters are ordinary, separate ``nn.Parameter``s: gradients live where autograd puts them.

What a user of plain torch expects, through a whole model with the allocator and the orthogonal
term in play: old gradients stay as they were, no two gradients share memory, one Parameter
saves as itself, second-order gradients are right, and two threads' backwards add up.
"""

import io
import threading

import pytest
import torch
from torch import nn

import fastadalora
from fastadalora import AdaLoraLinear
from fastadalora.backends import use_backend
from support import batches, cls_batch, tiny_bert

CFG = dict(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=6, target_modules=["query", "value", "dense"])


def _model(dtype=torch.float32, orth=0.5):
    return fastadalora.get_adalora_model(tiny_bert(dtype=dtype),
                                         fastadalora.AdaLoraConfig(orth_reg_weight=orth, **CFG)).train()


def _adapter_params(model):
    return [p for layer in model.adapter_layers().values() for p in layer.adapter_params()]


def _step(model, opt, step):
    model(**cls_batch(seed=step)).loss.backward()
    opt.step()
    model.update_and_allocate(step)


def test_old_grad_reference_survives_zero_grad_and_a_new_backward():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _step(model, opt, 0)
    kept = [p.grad for p in _adapter_params(model)]
    values = [g.clone() for g in kept]
    opt.zero_grad(set_to_none=True)
    _step(model, opt, 1)
    for g, v, p in zip(kept, values, _adapter_params(model)):
        assert torch.equal(g, v)  # the old tensor was not written to
        assert p.grad is not g and not torch.equal(p.grad, v)


@pytest.mark.parametrize("orth", [0.5, 0.0])
def test_no_two_adapter_gradients_share_storage(orth):
    model = _model(orth=orth)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        _step(model, opt, step)
        params = _adapter_params(model)
        grads = {p.grad.untyped_storage().data_ptr() for p in params}
        assert len(grads) == len(params)
        weights = {p.untyped_storage().data_ptr() for p in params}
        assert len(weights) == len(params)


def test_torch_save_of_one_parameter_is_its_own_size():
    model = _model()
    layer = next(iter(model.adapter_layers().values()))
    buf = io.BytesIO()
    torch.save(layer.lora_A, buf)
    nbytes = layer.lora_A.numel() * layer.lora_A.element_size()
    assert nbytes <= len(buf.getvalue()) <= nbytes + 2048  # the tensor plus pickle framing, not the whole adapter


# --------------------------------------------------------------------------- second order
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradgradcheck_float64(backend, dropout):
    from fastadalora.functional import adalora_linear

    torch.manual_seed(0)
    W, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    A, E, B = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 7), (3, 1), (5, 3)))

    def f(x, A, E, B):
        torch.manual_seed(123)  # the same dropout mask on every call
        with use_backend(backend):
            return adalora_linear(x, W, b, A, E, B, 0.7, None, dropout)

    assert torch.autograd.gradgradcheck(f, (x, A, E, B), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_equals_reference(backend):
    """d/dθ of a gradient norm (a gradient penalty): the fused paths give the reference's numbers."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    results = {}
    for name in (backend, "reference"):
        torch.manual_seed(0)
        layer = AdaLoraLinear(nn.Linear(7, 5, dtype=dtype), r=3, init_lora_weights=False)
        x = torch.randn(6, 7, dtype=dtype, requires_grad=True)
        with use_backend(name):
            y = layer(x)
            gx, gA = torch.autograd.grad(y.square().sum(), (x, layer.lora_A), create_graph=True)
            penalty = gx.square().sum() + gA.square().sum()
            penalty.backward()
        results[name] = [x.grad] + [p.grad for p in layer.adapter_params()]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- threads
def test_two_threads_backward_add_up_like_plain_torch():
    model = _model(orth=0.0)
    b1, b2 = batches(2, seed=5)
    expected = {}
    for b in (b1, b2):
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for i, p in enumerate(_adapter_params(model)):
            expected[i] = expected.get(i, 0) + p.grad.clone()
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        losses = [model(**b).loss for b in (b1, b2)]
        barrier = threading.Barrier(2)
        errors = []

        def run(loss):
            try:
                barrier.wait()
                loss.backward()
            except Exception as exc:  # pragma: no cover - surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(loss,)) for loss in losses]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        for i, p in enumerate(_adapter_params(model)):
            torch.testing.assert_close(p.grad, expected[i], rtol=1e-5, atol=1e-7)
