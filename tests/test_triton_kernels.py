"""The Triton kernels, their launchers and the Triton backend's autograd op against the reference.

Runs on CPU under ``TRITON_INTERPRET=1`` (set by conftest).  Every comparison uses a bound from the
maths: the reference runs in float64 on the same (already rounded) inputs, and the error of each
entry must stay within ``fp_tolerance(dtype, K)`` times the same computation done on absolute
values (``|x|·|W|ᵀ + ...``), which bounds the rounding error of every sum of products whatever
cancellation happens.  Shapes are deliberately odd so every tile edge is ragged.
"""

from __future__ import annotations

import pytest
import torch

from fastadalora import reference
from fastadalora.backends import draw_dropout_seed, triton_path
from fastadalora.kernels import adapter_backward, adapter_forward
from fastadalora.kernels.dropout import dropout_keep_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE = 0.7


# --------------------------------------------------------------------------- helpers
def assert_within(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, K: int, what: str):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = reference.fp_tolerance(dtype, K)
    err = (out.double() - ref).abs()
    bound = tol * mag + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} exceeds the bound by {worst:.2f}x (tol {tol:.3g})"


def make_adapter(N, in_f, out_f, r, dtype, *, bias=True, with_mask=True, x=None):
    x = torch.randn(N, in_f).to(dtype) if x is None else x
    W = torch.randn(out_f, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    A = torch.randn(r, in_f).to(dtype)
    E = torch.randn(r, 1).to(dtype)
    B = torch.randn(out_f, r).to(dtype)
    mask = (torch.arange(r) % 3 != 1).float() if with_mask else None
    return x, W, b, A, E, B, mask


def reference_with_bounds(x, W, b, A, E, B, mask, g, keep=None, p=0.0):
    """float64 reference ``(y, grads)`` and the absolute-value bounds of each, via autograd."""
    def run(transform):
        leaves = [None if t is None else transform(t).double().requires_grad_() for t in (x, W, b, A, E, B)]
        m = None if mask is None else mask.double()
        y = reference.adapter_linear(*leaves, SCALE, None, mask=m, keep=keep, dropout_p=p)
        y.backward(transform(g).double())
        return y.detach(), [None if t is None else t.grad for t in leaves]

    return run(lambda t: t), run(torch.abs)


def run_op(x, W, b, A, E, B, mask, p=0.0, requires=(True,) * 6):
    leaves = [None if t is None else t.clone().requires_grad_(req) for t, req in zip((x, W, b, A, E, B), requires)]
    y = triton_path.adapter_linear(*leaves, SCALE, mask=mask, dropout_p=p)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    return y.detach(), [None if t is None else t.grad for t in leaves], g


def check_op(x, W, b, A, E, B, mask, dtype, p=0.0, keep=None, requires=(True,) * 6):
    y, grads, g = run_op(x, W, b, A, E, B, mask, p=p, requires=requires)
    (y_ref, g_ref), (y_mag, g_mag) = reference_with_bounds(x, W, b, A, E, B, mask, g, keep=keep, p=p)
    K = max(x.shape[0], x.shape[1], W.shape[0], A.shape[0])
    assert y.dtype == dtype
    assert_within(y, y_ref, y_mag, dtype, K, "y")
    for name, got, want, mag, req in zip(("dx", "dW", "db", "dA", "dE", "dB"), grads, g_ref, g_mag, requires):
        if want is None:
            continue
        if not req:
            assert got is None, f"{name} computed but not required"
            continue
        assert got is not None and got.dtype == dtype, name
        assert_within(got, want, mag, dtype, K, name)


# --------------------------------------------------------------------------- the autograd op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [5, 1, 17, 64, 256])
def test_op_matches_reference(dtype, r):
    check_op(*make_adapter(37, 61, 45, r, dtype, with_mask=r != 17), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_3d_input_flattened(dtype):
    x3 = torch.randn(2, 19, 61).to(dtype)
    check_op(*make_adapter(38, 61, 45, 5, dtype, x=x3.reshape(-1, 61)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_non_contiguous_x(dtype):
    x = torch.randn(61, 37).to(dtype).t()  # strides (1, 37)
    assert not x.is_contiguous()
    check_op(*make_adapter(37, 61, 45, 5, dtype, x=x), dtype)
    x = torch.randn(37, 122).to(dtype)[:, ::2]  # strides (122, 2)
    check_op(*make_adapter(37, 61, 45, 17, dtype, x=x, bias=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_zero_rows(dtype):
    x, W, b, A, E, B, mask = make_adapter(0, 61, 45, 5, dtype)
    y, grads, _ = run_op(x, W, b, A, E, B, mask)
    assert y.shape == (0, 45) and grads[0].shape == (0, 61)
    for got in grads[1:]:
        assert not got.any()


def test_op_only_required_grads():
    # frozen base, x without grad: only the adapter gets gradients (the usual fine-tuning case)
    check_op(*make_adapter(37, 61, 45, 5, torch.float32), torch.float32,
             requires=(False, False, False, True, True, True))
    # only x and E
    check_op(*make_adapter(37, 61, 45, 5, torch.float32), torch.float32,
             requires=(True, False, False, False, True, False))


def test_op_broadcast_grad_output():
    # y.sum().backward() hands backward an expanded g with zero strides
    x, W, b, A, E, B, mask = make_adapter(37, 61, 45, 5, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, A, E, B)]
    triton_path.adapter_linear(*leaves, SCALE, mask=mask).sum().backward()
    (_, g_ref), (_, g_mag) = reference_with_bounds(x, W, b, A, E, B, mask, torch.ones(37, 45))
    for name, t, want, mag in zip(("dx", "dW", "db", "dA", "dE", "dB"), leaves, g_ref, g_mag):
        assert_within(t.grad, want, mag, torch.float32, 61, name)


def test_op_saves_no_dropped_copy_of_x():
    x, W, b, A, E, B, mask = make_adapter(37, 61, 45, 5, torch.float32)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        triton_path.adapter_linear(x, W, b, A.requires_grad_(), E.requires_grad_(), B.requires_grad_(), SCALE,
                                   mask=mask, dropout_p=0.25)
    big = [t for t in saved if t.shape == x.shape]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, no dropped copy
    assert any(t.shape == (37, 5) and t.dtype == torch.float32 for t in saved)  # h


def test_op_deterministic():
    inputs = make_adapter(300, 61, 45, 5, torch.float32)
    torch.manual_seed(1)
    y1, g1, _ = run_op(*inputs)
    torch.manual_seed(1)
    y2, g2, _ = run_op(*inputs)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_dropout_uses_the_same_mask_in_backward(dtype):
    p = 0.3
    inputs = make_adapter(37, 61, 45, 5, dtype)
    torch.manual_seed(123)
    seed = draw_dropout_seed()  # the seed the op will draw after the same manual_seed
    keep = dropout_keep_mask(seed, (37, 61), p, device="cpu")
    torch.manual_seed(123)
    check_op(*inputs, dtype, p=p, keep=keep)


def test_op_dropout_non_contiguous_x_same_mask():
    p = 0.5
    x = torch.randn(61, 37).t()
    inputs = make_adapter(37, 61, 45, 5, torch.float32, x=x)
    torch.manual_seed(7)
    keep = dropout_keep_mask(draw_dropout_seed(), (37, 61), p, device="cpu")
    torch.manual_seed(7)
    check_op(*inputs, torch.float32, p=p, keep=keep)


def test_dropout_reproducible_under_manual_seed():
    inputs = make_adapter(37, 61, 45, 5, torch.float32)
    torch.manual_seed(5)
    y1, g1, _ = run_op(*inputs, p=0.4)
    torch.manual_seed(5)
    y2, g2, _ = run_op(*inputs, p=0.4)
    torch.manual_seed(6)
    y3, _, _ = run_op(*inputs, p=0.4)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    keep = dropout_keep_mask(12345, (128, 256), p, device="cpu", block=128)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # different seeds give different masks; the mask depends only on the logical index
    assert not torch.equal(keep, dropout_keep_mask(12346, (128, 256), p, device="cpu", block=128))
    assert torch.equal(keep[:5], dropout_keep_mask(12345, (5, 256), p, device="cpu"))
    assert torch.equal(keep.reshape(2, 64, 256), dropout_keep_mask(12345, (2, 64, 256), p, device="cpu", block=128))


# --------------------------------------------------------------------------- launchers one by one
def _rank_vectors(E, mask):
    return triton_path._rank_vectors(E, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_and_expand(dtype, p):
    N, I, O, r = 37, 61, 45, 17
    x, W, b, A, E, B, mask = make_adapter(N, I, O, r, dtype)
    e, _ = _rank_vectors(E, mask)
    seed = 99
    keep = dropout_keep_mask(seed, (N, I), p, device="cpu").double() / (1 - p) if p else torch.ones(N, I).double()
    h, s = adapter_forward.shrink(x, A, e, SCALE, seed, p)
    h_ref = (x.double() * keep) @ A.double().t()
    h_mag = (x.double().abs() * keep) @ A.double().abs().t()
    assert h.dtype == s.dtype == torch.float32
    assert_within(h, h_ref, h_mag, dtype, I, "h")
    assert_within(s, h_ref * e.double() * SCALE, h_mag * e.double().abs() * SCALE, dtype, I, "s")
    y = torch.randn(N, O).to(dtype)
    y0 = y.double().clone()
    out = adapter_forward.expand_(y, s, B)
    assert out is y
    ref = y0 + s.double() @ B.double().t()
    mag = y0.abs() + s.double().abs() @ B.double().abs().t()
    assert_within(y, ref, mag, dtype, r, "expand")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_launchers(dtype, p, monkeypatch):
    N, I, O, r = 150, 61, 45, 5
    x, W, b, A, E, B, mask = make_adapter(N, I, O, r, dtype)
    e, m = _rank_vectors(E, mask)
    seed = 4242
    keep = dropout_keep_mask(seed, (N, I), p, device="cpu").double() / (1 - p) if p else torch.ones(N, I).double()
    h = ((x.double() * keep) @ A.double().t()).float()
    g = torch.randn(N, O).to(dtype)
    gd, hd, ed = g.double(), h.double(), e.double()
    gs, gs_mag = gd @ B.double(), gd.abs() @ B.double().abs()

    dh, dE = adapter_backward.grad_s(g, B, h, e, m, SCALE)
    assert_within(dh, gs * ed * SCALE, gs_mag * ed.abs() * SCALE, dtype, O, "dh")
    assert_within(dE, (gs * hd).sum(0) * SCALE * m.double(), (gs_mag * hd.abs()).sum(0) * SCALE, dtype, N * O, "dE")

    dx = torch.randn(N, I).to(dtype)
    dx0 = dx.double().clone()
    adapter_backward.grad_x_(dx, dh, A, seed, p)
    assert_within(dx, dx0 + (dh.double() @ A.double()) * keep,
                  dx0.abs() + (dh.double().abs() @ A.double().abs()) * keep, dtype, r, "dx")

    # dA and dB reduce over N: also run them with N split over several programs
    for split in (1, 3):
        monkeypatch.setattr(adapter_backward, "_split_count", lambda *a, split=split: split)
        dA = adapter_backward.grad_a(dh, x, seed, p)
        assert dA.dtype == dtype
        assert_within(dA, dh.double().t() @ (x.double() * keep),
                      dh.double().abs().t() @ (x.double().abs() * keep), dtype, N, f"dA split={split}")
        dB = adapter_backward.grad_b(g, h, e, SCALE)
        assert dB.dtype == dtype
        assert_within(dB, gd.t() @ (hd * ed * SCALE), gd.abs().t() @ (hd * ed * SCALE).abs(), dtype, N,
                      f"dB split={split}")


def test_non_contiguous_g():
    N, I, O, r = 37, 61, 45, 5
    x, W, b, A, E, B, mask = make_adapter(N, I, O, r, torch.float32)
    e, m = _rank_vectors(E, mask)
    h = (x @ A.t()).contiguous()
    g = torch.randn(O, N).t()
    dh, dE = adapter_backward.grad_s(g, B, h, e, m, SCALE)
    dh2, dE2 = adapter_backward.grad_s(g.contiguous(), B, h, e, m, SCALE)
    assert torch.equal(dh, dh2) and torch.equal(dE, dE2)
    assert torch.equal(adapter_backward.grad_b(g, h, e, SCALE), adapter_backward.grad_b(g.contiguous(), h, e, SCALE))


def test_rank_tiles():
    assert [adapter_forward.rank_tile(r) for r in (1, 16, 17, 64, 65, 256)] == [16, 16, 64, 64, 256, 256]
    with pytest.raises(AssertionError):
        adapter_forward.rank_tile(257)
    for r in (1, 17, 256):
        for dtype in DTYPES:
            for reduces in (False, True):
                cfg = adapter_forward.kernel_config(r, dtype, reduces_rank=reduces)
                assert min(cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_OUT, cfg.BLOCK_R) >= 16


def test_launchers_assert_their_assumptions():
    x, W, b, A, E, B, mask = make_adapter(8, 16, 16, 4, torch.float32)
    e, _ = _rank_vectors(E, mask)
    with pytest.raises(AssertionError):
        adapter_forward.shrink(x, A.half(), e, SCALE)  # dtype mismatch
    with pytest.raises(AssertionError):
        adapter_forward.shrink(x, A.t().contiguous().t(), e, SCALE)  # A not contiguous
    with pytest.raises(AssertionError):
        adapter_forward.expand_(torch.zeros(16, 8).t(), torch.zeros(8, 4), B)  # y not contiguous
