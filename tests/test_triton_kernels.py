"""The Triton kernels, their launchers and the Triton backend's autograd op against the reference.

Runs on CPU under ``TRITON_INTERPRET=1`` (set by conftest).  Every comparison uses a bound from the
maths: the reference runs in float64 on the same (already rounded) inputs, and the error of each
entry must stay within ``fp_tolerance(dtype, K)`` times the same computation done on absolute
values (``|x|·|W|ᵀ + ...``), which bounds the rounding error of every sum of products whatever
cancellation happens.  ``dtype`` is the least precise one the entry went through: the base dtype for
y and dx (rounded into it), the compute dtype for the adapter's gradients.  Shapes are deliberately
odd so every tile edge is ragged.
"""

from __future__ import annotations

import pytest
import torch

from fastadalora import dropout, reference
from fastadalora.backends import draw_dropout_seed, triton_path
from fastadalora.functional import adalora_linear
from fastadalora.kernels import _config, adapter_backward, adapter_forward
from fastadalora.kernels.dropout import dropout_keep_mask, threshold16

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]  # PEFT's default: fp32 adapters
SCALE = 0.7


# --------------------------------------------------------------------------- helpers
def coarser(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def assert_within(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, K: int, what: str):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = reference.fp_tolerance(dtype, K)
    err = (out.double() - ref).abs()
    bound = tol * mag + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} exceeds the bound by {worst:.2f}x (tol {tol:.3g})"


def make_adapter(N, in_f, out_f, r, dtype, *, adapter_dtype=None, bias=True, with_mask=True, x=None):
    adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
    x = torch.randn(N, in_f).to(dtype) if x is None else x
    W = torch.randn(out_f, in_f).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    A = torch.randn(r, in_f).to(adapter_dtype)
    E = torch.randn(r, 1).to(adapter_dtype)
    B = torch.randn(out_f, r).to(adapter_dtype)
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


def run_op(x, W, b, A, E, B, mask, p=0.0, requires=(True,) * 6, cdt=None):
    leaves = [None if t is None else t.clone().requires_grad_(req) for t, req in zip((x, W, b, A, E, B), requires)]
    y = triton_path.adapter_linear(*leaves, SCALE, mask=mask, dropout_p=p, cdt=cdt)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    return y.detach(), [None if t is None else t.grad for t in leaves], g


def check_op(x, W, b, A, E, B, mask, p=0.0, keep=None, requires=(True,) * 6, cdt=None):
    cdt = A.dtype if cdt is None else cdt
    y, grads, g = run_op(x, W, b, A, E, B, mask, p=p, requires=requires, cdt=cdt)
    (y_ref, g_ref), (y_mag, g_mag) = reference_with_bounds(x, W, b, A, E, B, mask, g, keep=keep, p=p)
    (N, n_in), n_out, r = x.shape, W.shape[0], A.shape[0]
    # the reduction lengths chained into each entry (h over in, gs over out, sums over the tokens)
    lengths = {"y": n_in + r, "dx": n_out + r, "dW": N, "db": N, "dA": n_out + N, "dE": n_in + n_out + N,
               "dB": n_in + N}
    base = coarser(x.dtype, cdt)
    assert y.dtype == x.dtype
    assert_within(y, y_ref, y_mag, base, lengths["y"], "y")
    for name, got, want, mag, req, leaf in zip(("dx", "dW", "db", "dA", "dE", "dB"), grads, g_ref, g_mag, requires,
                                               (x, W, b, A, E, B)):
        if want is None:
            continue
        if not req:
            assert got is None, f"{name} computed but not required"
            continue
        assert got is not None and got.dtype == leaf.dtype, name
        dtype = base if name in ("dx", "dW", "db") else coarser(cdt, leaf.dtype)
        assert_within(got, want, mag, dtype, lengths[name], name)


# --------------------------------------------------------------------------- the autograd op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [5, 1, 17, 33, 64, 256])
def test_op_matches_reference(dtype, r):
    check_op(*make_adapter(37, 61, 45, r, dtype, with_mask=r != 17))


@pytest.mark.parametrize("base,adapter", MIXED, ids=str)
@pytest.mark.parametrize("r", [5, 33])
def test_op_mixed_dtypes_fp32_adapter(base, adapter, r):
    # no autocast: x read in its 16-bit dtype, the branch computed in fp32, y rounded once
    check_op(*make_adapter(37, 61, 45, r, base, adapter_dtype=adapter))


@pytest.mark.parametrize("base,adapter", MIXED, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_op_mixed_dtypes_autocast_compute(base, adapter, p):
    # autocast: the adapter dots take operands in the 16-bit dtype, the parameters stay fp32
    inputs = make_adapter(37, 61, 45, 17, base, adapter_dtype=adapter)
    torch.manual_seed(11)
    keep = reference.dropout_keep_mask((37, 61), p, seed=draw_dropout_seed()) if p else None
    torch.manual_seed(11)
    check_op(*inputs, p=p, keep=keep, cdt=base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_functional_under_autocast(dtype):
    # the real entry point: fp32 layer and adapter under torch.autocast
    x, W, b, A, E, B, _ = make_adapter(37, 61, 45, 12, torch.float32, with_mask=False)
    leaves = [t.clone().requires_grad_() for t in (x, A, E, B)]
    with torch.autocast("cpu", dtype=dtype):
        y = adalora_linear(leaves[0], W, b, *leaves[1:], SCALE, backend="triton")
    assert y.dtype == dtype
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    rounded = [t.to(dtype) for t in (x, W, b, A, E, B)]  # what autocast hands the GEMMs
    (y_ref, g_ref), (y_mag, g_mag) = reference_with_bounds(*rounded, None, g)
    assert_within(y, y_ref, y_mag, dtype, 61, "y")
    for name, leaf, i in (("dx", leaves[0], 0), ("dA", leaves[1], 3), ("dE", leaves[2], 4), ("dB", leaves[3], 5)):
        assert leaf.grad.dtype == torch.float32
        assert_within(leaf.grad, g_ref[i], g_mag[i], dtype, 61, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_3d_input_flattened(dtype):
    x3 = torch.randn(2, 19, 61).to(dtype)
    check_op(*make_adapter(38, 61, 45, 5, dtype, x=x3.reshape(-1, 61)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_non_contiguous_x(dtype):
    x = torch.randn(61, 37).to(dtype).t()  # strides (1, 37)
    assert not x.is_contiguous()
    check_op(*make_adapter(37, 61, 45, 5, dtype, x=x))
    x = torch.randn(37, 122).to(dtype)[:, ::2]  # strides (122, 2)
    check_op(*make_adapter(37, 61, 45, 17, dtype, x=x, bias=False))


def test_op_transposed_weight_and_strided_adapter():
    x, W, b, A, E, B, mask = make_adapter(37, 61, 45, 5, torch.float32)
    check_op(x, W.t().contiguous().t(), b, A.t().contiguous().t(), E, B.t().contiguous().t(), mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_zero_rows(dtype):
    x, W, b, A, E, B, mask = make_adapter(0, 61, 45, 5, dtype)
    y, grads, _ = run_op(x, W, b, A, E, B, mask)
    assert y.shape == (0, 45) and grads[0].shape == (0, 61)
    for got in grads[1:]:
        assert not got.any()


def test_op_only_required_grads():
    # frozen base, x without grad: only the adapter gets gradients (the usual fine-tuning case)
    check_op(*make_adapter(37, 61, 45, 5, torch.float32), requires=(False, False, False, True, True, True))
    # only x and E; only B
    check_op(*make_adapter(37, 61, 45, 5, torch.float32), requires=(True, False, False, False, True, False))
    check_op(*make_adapter(37, 61, 45, 5, torch.float32), requires=(False, False, False, False, False, True))


def test_op_broadcast_grad_output():
    # y.sum().backward() hands backward an expanded g with zero strides
    x, W, b, A, E, B, mask = make_adapter(37, 61, 45, 5, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, A, E, B)]
    triton_path.adapter_linear(*leaves, SCALE, mask=mask).sum().backward()
    (_, g_ref), (_, g_mag) = reference_with_bounds(x, W, b, A, E, B, mask, torch.ones(37, 45))
    for name, t, want, mag in zip(("dx", "dW", "db", "dA", "dE", "dB"), leaves, g_ref, g_mag):
        assert_within(t.grad, want, mag, torch.float32, 61, name)


def test_op_saves_no_dropped_copy_of_x():
    x, W, b, A, E, B, mask = make_adapter(37, 61, 45, 5, torch.bfloat16, adapter_dtype=torch.float32)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        triton_path.adapter_linear(x, W, b, A.requires_grad_(), E.requires_grad_(), B.requires_grad_(), SCALE,
                                   mask=mask, dropout_p=0.25)
    big = [t for t in saved if t.shape == x.shape]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself: no dropped or cast copy
    assert any(t.shape == (37, 5) and t.dtype == torch.float32 for t in saved)  # h


def test_op_deterministic():
    inputs = make_adapter(300, 61, 45, 5, torch.float32)
    torch.manual_seed(1)
    y1, g1, _ = run_op(*inputs, p=0.1)
    torch.manual_seed(1)
    y2, g2, _ = run_op(*inputs, p=0.1)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_fp32_dot_precision_follows_torch():
    assert torch.get_float32_matmul_precision() == "highest"
    assert adapter_forward._dot_args(torch.float32)["PRECISION"] == "ieee"
    assert adapter_forward._dot_args(torch.bfloat16)["PRECISION"] == "tf32"  # ignored by 16-bit dots: one compile
    try:
        torch.set_float32_matmul_precision("high")
        assert _config.fp32_precision() == "tf32"
        assert adapter_forward._dot_args(torch.float32)["PRECISION"] == "tf32"
        assert adapter_forward._dot_args(torch.bfloat16)["PRECISION"] == "tf32"
        run_op(*make_adapter(37, 61, 45, 5, torch.float32))  # launches (the interpreter computes in fp32)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert _config.fp32_precision() == "ieee"


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_dropout_uses_the_same_mask_in_backward(dtype):
    p = 0.3
    inputs = make_adapter(37, 61, 45, 5, dtype)
    torch.manual_seed(123)
    seed = draw_dropout_seed()  # the seed the op will draw after the same manual_seed
    keep = dropout_keep_mask(seed, (37, 61), p, device="cpu")
    torch.manual_seed(123)
    check_op(*inputs, p=p, keep=keep)


def test_op_dropout_non_contiguous_x_same_mask():
    p = 0.5
    x = torch.randn(61, 37).t()
    inputs = make_adapter(37, 61, 45, 5, torch.float32, x=x)
    torch.manual_seed(7)
    keep = dropout_keep_mask(draw_dropout_seed(), (37, 61), p, device="cpu")
    torch.manual_seed(7)
    check_op(*inputs, p=p, keep=keep)


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


@pytest.mark.parametrize("shape,seed,p", [((37, 61), 5, 0.3), ((130, 70), 2**31 - 2, 0.1), ((2, 3, 129), 0, 0.9),
                                          ((1, 1), 77, 0.5), ((300, 1), 9, 0.25), ((700, 13), 3, 0.4),
                                          ((4, 2), 1, 1e-6)])
def test_three_mask_implementations_agree_bit_for_bit(shape, seed, p):
    want = reference.dropout_keep_mask(shape, p, seed=seed)
    assert torch.equal(dropout_keep_mask(seed, shape, p, device="cpu"), want)  # Triton
    assert torch.equal(dropout.keep_mask(shape, seed, p), want)  # the CPU path
    scale = dropout.keep_scale(shape, seed, p, dtype=torch.float32)
    assert torch.equal(scale != 0, want) and torch.all(scale[want] == 1.0 / (1.0 - p))


def test_three_backends_drop_the_same_elements():
    # torch, Triton and the reference backend, each drawing its own seed after the same manual_seed
    from fastadalora.backends import reference_path, torch_path

    x, W, b, A, E, B, _ = make_adapter(37, 61, 45, 5, torch.float32)
    outs = []
    for backend in (torch_path, reference_path, triton_path):
        xs = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = backend.adapter_linear(xs, W, b, A, E, B, SCALE, None, 0.5)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xs.grad))
    for y, dx in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-4, atol=1e-4)  # a dropped element would differ by O(1)
        torch.testing.assert_close(dx, outs[0][1], rtol=1e-4, atol=1e-4)


def test_keep_mask_row_window_and_threshold():
    full = dropout_keep_mask(99, (300, 40), 0.3, device="cpu")
    assert torch.equal(dropout_keep_mask(99, (20, 40), 0.3, device="cpu", row_start=250), full[250:270])
    assert torch.equal(dropout.keep_mask((20, 40), 99, 0.3, row_start=250), full[250:270])
    assert threshold16(0.0) == 0 and threshold16(0.1) == 6554 and threshold16(0.99999999) == 65535
    assert dropout_keep_mask(1, (16, 16), 0.0, device="cpu").all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    keep = dropout_keep_mask(12345, (128, 256), p, device="cpu")
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # the two columns of a pair, neighbouring rows, and another seed are uncorrelated
    z = (keep.float() - (1 - p)) / (p * (1 - p)) ** 0.5
    for a, b in ((z[:, 0::2], z[:, 1::2]), (z[1:], z[:-1]), (z[:, 1:], z[:, :-1])):
        assert abs((a * b).mean().item()) < 5 / a.numel() ** 0.5
    other = (dropout_keep_mask(12346, (128, 256), p, device="cpu").float() - (1 - p)) / (p * (1 - p)) ** 0.5
    assert abs((z * other).mean().item()) < 5 / n ** 0.5
    # the mask depends only on the logical index
    assert torch.equal(keep[:5], dropout_keep_mask(12345, (5, 256), p, device="cpu"))
    assert torch.equal(keep.reshape(2, 64, 256), dropout_keep_mask(12345, (2, 64, 256), p, device="cpu"))


# --------------------------------------------------------------------------- launchers one by one
def _es(E, mask):
    e = E.double().reshape(-1) * SCALE
    return e if mask is None else e * mask.double()


def _mask_vec(E, mask):
    return triton_path._mask_vector(E, mask)


@pytest.mark.parametrize("dtype,adapter", [(d, d) for d in DTYPES] + MIXED, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_and_expand(dtype, adapter, p):
    N, I, O, r = 37, 61, 45, 17
    x, W, b, A, E, B, mask = make_adapter(N, I, O, r, dtype, adapter_dtype=adapter)
    seed = 99
    keep = dropout_keep_mask(seed, (N, I), p, device="cpu").double() / (1 - p) if p else torch.ones(N, I).double()
    h = adapter_forward.shrink(x, A, seed, p)
    h_ref = (x.double() * keep) @ A.double().t()
    h_mag = (x.double().abs() * keep) @ A.double().abs().t()
    assert h.dtype == torch.float32
    assert_within(h, h_ref, h_mag, adapter, I, "h")
    y = torch.randn(N, O).to(dtype)
    y0 = y.double().clone()
    es = _es(E, mask)
    out = adapter_forward.expand_(y, h, E, _mask_vec(E, mask), B, SCALE)
    assert out is y
    ref = y0 + (h.double() * es) @ B.double().t()
    mag = y0.abs() + (h.double() * es).abs() @ B.double().abs().t()
    assert_within(y, ref, mag, coarser(dtype, adapter), r, "expand")


@pytest.mark.parametrize("dtype,adapter", [(d, d) for d in DTYPES] + MIXED[:1], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_launchers(dtype, adapter, p):
    N, I, O, r = 150, 61, 45, 5
    x, W, b, A, E, B, mask = make_adapter(N, I, O, r, dtype, adapter_dtype=adapter)
    m = _mask_vec(E, mask)
    seed = 4242
    keep = dropout_keep_mask(seed, (N, I), p, device="cpu").double() / (1 - p) if p else torch.ones(N, I).double()
    h = ((x.double() * keep) @ A.double().t()).float()
    g = torch.randn(N, O).to(dtype)
    gd, hd, es = g.double(), h.double(), _es(E, mask)
    gs_ref, gs_mag = gd @ B.double(), gd.abs() @ B.double().abs()
    tol_dtype = coarser(dtype, adapter)

    # one pass over g; sms forces several out tiles and token splits (the interpreter's own choice is 1)
    for sms in (1, 50):
        gs, p_part, de_part = adapter_backward.grad_g(g, B, h, sms=sms)
        assert_within(gs, gs_ref, gs_mag, tol_dtype, O, f"gs sms={sms}")
        assert_within(p_part.sum(0), gd.t() @ hd, gd.abs().t() @ hd.abs(), tol_dtype, N, f"P sms={sms}")
        assert_within(de_part.sum(0), (gs_ref * hd).sum(0), (gs_mag * hd.abs()).sum(0), tol_dtype, N * O, "dE part")
    assert p_part.shape[0] > 1  # the forced split did split

    dx = torch.randn(N, I).to(dtype)
    dx0 = dx.double().clone()
    adapter_backward.grad_x_(dx, gs, E, m, A, SCALE, seed, p)
    dh = gs.double() * es
    assert_within(dx, dx0 + (dh @ A.double()) * keep, dx0.abs() + (dh.abs() @ A.double().abs()) * keep,
                  tol_dtype, r, "dx")

    for sms in (1, 40):
        part = adapter_backward.grad_a(gs, E, m, x, SCALE, seed, p, sms=sms)
        assert sms == 1 or part.shape[0] > 1
        assert_within(part.sum(0), dh.t() @ (x.double() * keep), dh.abs().t() @ (x.double().abs() * keep),
                      tol_dtype, N, f"dA partials sms={sms}")

    # the whole backward, partial sums included, in the parameters' dtypes
    dA, dE, dB = adapter_backward.backward(g, x, h, A, E, m, B, SCALE, seed, p, adapter, None, True, True, True,
                                           sms=40)
    assert dA.dtype == dE.dtype == dB.dtype == adapter and dE.shape == E.shape
    assert_within(dA, dh.t() @ (x.double() * keep), dh.abs().t() @ (x.double().abs() * keep), tol_dtype, N, "dA")
    assert_within(dB, (gd.t() @ hd) * es, (gd.abs().t() @ hd.abs()) * es.abs(), tol_dtype, N, "dB")
    want_dE = (gs_ref * hd).sum(0) * SCALE * mask.double()
    assert_within(dE.reshape(-1), want_dE, (gs_mag * hd.abs()).sum(0) * SCALE, tol_dtype, N * O, "dE")


def test_reduce_sums_parts_in_a_fixed_order():
    parts = torch.randn(5, 7, 300)
    out = torch.empty(7, 300, dtype=torch.bfloat16)
    adapter_backward.reduce_(a=(parts, out))
    in_order = parts[0].clone()
    for part in parts[1:]:
        in_order += part
    assert torch.equal(out, in_order.to(torch.bfloat16))
    inplace = parts.clone()
    adapter_backward.reduce_(a=(inplace, inplace[0]))  # the gs finish: in place into the first part
    assert torch.equal(inplace[0], in_order)


def test_non_contiguous_g():
    N, I, O, r = 37, 61, 45, 5
    x, W, b, A, E, B, mask = make_adapter(N, I, O, r, torch.float32)
    h = (x @ A.t()).contiguous()
    g = torch.randn(O, N).t()
    for a, b_ in zip(adapter_backward.grad_g(g, B, h), adapter_backward.grad_g(g.contiguous(), B, h)):
        assert torch.equal(a, b_)


# --------------------------------------------------------------------------- launch settings
def test_rank_tiles_and_configs():
    assert [_config.rank_tile(r) for r in (1, 16, 17, 32, 33, 64, 65, 128, 129, 256)] == \
        [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
    with pytest.raises(AssertionError):
        _config.rank_tile(257)
    for kernel in _config.KERNELS:
        for tier in _config.RANK_TIERS:
            for cdt in DTYPES:
                for ieee in (False, True):
                    cfg = _config.kernel_config(kernel, tier, cdt, ieee)
                    assert min(cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_R) >= 16
                    assert cfg.BLOCK_R == (tier if kernel != "expand" else min(tier, cfg.BLOCK_R))


def test_split_count():
    assert _config.split_count(1, 10, 132) == 1  # never more splits than token blocks
    assert _config.split_count(100, 1000, 132) == 1  # enough tiles already
    assert _config.split_count(100, 10, 132) == 27
    for n_blocks in (1, 7, 33, 100):
        for split in (1, 2, 5, n_blocks):  # the kernel's ranges cover every block once, none empty
            if split > n_blocks:
                continue
            ranges = [((s * n_blocks) // split, ((s + 1) * n_blocks) // split) for s in range(split)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_blocks
            assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(split - 1))


@pytest.mark.parametrize("N", [2048, 4096, 8192])
def test_token_reductions_fill_the_design_gpu(N):
    # >= 2 programs per SM at in = out = 4096 on 132 SMs, for every configuration of the two reductions
    import triton

    target = _config.SPLIT_PROGRAMS_PER_SM * _config.DESIGN_SMS
    for kernel in ("grad_g", "grad_a"):
        for tier in _config.RANK_TIERS:
            for cdt, ieee in ((torch.float32, True), (torch.float32, False), (torch.bfloat16, False)):
                cfg = _config.kernel_config(kernel, tier, cdt, ieee)
                tiles = triton.cdiv(4096, cfg.BLOCK_K)
                split = _config.split_count(triton.cdiv(N, cfg.BLOCK_N), tiles, _config.DESIGN_SMS)
                assert tiles * split >= target, (kernel, tier, cdt, ieee, tiles, split)


def test_launchers_assert_their_assumptions():
    x, W, b, A, E, B, mask = make_adapter(8, 16, 16, 4, torch.float32)
    with pytest.raises(AssertionError):
        adapter_forward.shrink(x, A[:, :8])  # shape mismatch
    with pytest.raises(AssertionError):
        adapter_forward.expand_(torch.zeros(16, 8).t(), torch.zeros(8, 4), E, None, B, 1.0)  # y not contiguous
    with pytest.raises(AssertionError):
        adapter_forward.expand_(torch.zeros(8, 16), torch.zeros(8, 4), E, torch.ones(4, dtype=torch.float64), B, 1.0)
    with pytest.raises(AssertionError):
        adapter_forward.shrink(x, A, seed=2**31)
