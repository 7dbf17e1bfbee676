"""The CPU fast path and the reference backend against the reference maths."""

import pytest
import torch

from fastadalora import reference
from fastadalora.backends import (draw_dropout_seed, get_backend, reference_path, resolve_backend, torch_path,
                                  use_backend)


def _inputs(N=37, n_in=61, n_out=45, r=5, dtype=torch.float64, bias=True, mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, requires_grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    x = rnd(N, n_in)
    W = rnd(n_out, n_in, requires_grad=False)
    b = rnd(n_out, requires_grad=False) if bias else None
    A, E, B = rnd(r, n_in), rnd(r, 1), rnd(n_out, r)
    m = (torch.arange(r) % 2 == 0).to(dtype) if mask else None
    return x, W, b, A, E, B, m


@pytest.mark.parametrize("backend", [torch_path, reference_path])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(backend, mask, bias):
    x, W, b, A, E, B, m = _inputs(N=7, n_in=6, n_out=5, r=3, bias=bias, mask=mask)
    W.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)

    def f(x, W, b, A, E, B):
        return backend.adapter_linear(x, W, b, A, E, B, 0.37, m, 0.0)

    assert torch.autograd.gradcheck(f, (x, W, b, A, E, B))


def test_gradcheck_float64_with_dropout():
    """With a fixed seed the dropout mask is a constant, so the op is differentiable and gradcheck applies."""
    x, W, b, A, E, B, _ = _inputs(N=7, n_in=6, n_out=5, r=3)

    def f(x, A, E, B):
        torch.manual_seed(123)  # same seed -> same keep mask on every evaluation
        return torch_path.adapter_linear(x, W, b, A, E, B, 0.37, None, 0.3)

    assert torch.autograd.gradcheck(f, (x, A, E, B))


@pytest.mark.parametrize("mask", [False, True])
def test_torch_path_matches_reference(mask):
    x, W, b, A, E, B, m = _inputs(mask=mask)
    xs = [t.detach().clone().requires_grad_() for t in (x, A, E, B)]
    y = torch_path.adapter_linear(x, W, b, A, E, B, 0.37, m, 0.0)
    y_ref = reference.adapter_linear(xs[0], W, b, xs[1], xs[2], xs[3], 0.37, None, mask=m)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for ours, ref in zip((x, A, E, B), xs):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_dropout_mask_same_in_forward_and_backward_and_reproducible():
    p = 0.4
    x, W, b, A, E, B, _ = _inputs()
    torch.manual_seed(7)
    seed = draw_dropout_seed()
    keep = torch_path.keep_mask(x.detach(), seed, p)
    assert torch.equal(keep, reference.dropout_keep_mask(x.shape, p, seed=seed))  # the one law of every backend
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5  # 4 sigma

    torch.manual_seed(7)
    y = torch_path.adapter_linear(x, W, b, A, E, B, 0.37, None, p)
    y.backward(torch.ones_like(y))
    xs = [t.detach().clone().requires_grad_() for t in (x, A, E, B)]
    y_ref = reference.adapter_linear(xs[0], W, b, xs[1], xs[2], xs[3], 0.37, None, keep=keep, dropout_p=p)
    y_ref.backward(torch.ones_like(y_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for ours, ref in zip((x, A, E, B), xs):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)

    torch.manual_seed(7)
    y2 = torch_path.adapter_linear(x, W, b, A, E, B, 0.37, None, p)
    assert torch.equal(y.detach(), y2.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path_low_precision(dtype):
    x, W, b, A, E, B, _ = _inputs(N=64, n_in=96, n_out=80, r=12, dtype=torch.float64)
    low = [t.detach().to(dtype) for t in (x, W, b, A, E, B)]
    for t in (low[0], low[3], low[4], low[5]):
        t.requires_grad_()
    y = torch_path.adapter_linear(*low, 0.5, None, 0.0)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in low]
    y_ref = reference.adapter_linear(*ref_in, 0.5, None)
    g = torch.randn_like(y_ref)
    y.backward(g.to(dtype))
    y_ref.backward(g.to(dtype).double())
    tol = reference.fp_tolerance(dtype, 96)
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * scale)
    for ours, ref in zip((low[0], low[3], low[4], low[5]), (ref_in[0], ref_in[3], ref_in[4], ref_in[5])):
        k = 64 if ours is not low[0] else 80  # the reduction length behind each gradient
        tol = reference.fp_tolerance(dtype, k) * 4  # two chained reductions
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("FASTADALORA_BACKEND", raising=False)
    assert resolve_backend(cpu) == "torch"
    with use_backend("reference"):
        assert resolve_backend(cpu) == "reference"
        with use_backend("torch"):
            assert resolve_backend(cpu) == "torch"
        assert resolve_backend(cpu) == "reference"
    monkeypatch.setenv("FASTADALORA_BACKEND", "reference")
    assert resolve_backend(cpu) == "reference"
    monkeypatch.setenv("FASTADALORA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown fastadalora backend"):
        resolve_backend(cpu)
    monkeypatch.setenv("FASTADALORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(cpu) == "triton"
    assert get_backend("torch") is torch_path
