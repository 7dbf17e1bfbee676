"""``orth.orth_reg_loss`` against ``reference.orth_reg`` (PEFT's loop), its analytic backward, its op count."""

import pytest
import torch

from fastadalora import reference
from fastadalora.orth import orth_reg_loss
from support import OpCounter

# (r, in, out): a square-ish adapter whose A and Bᵀ share a shape, two odd ones
WIDTHS = [(4, 9, 9), (3, 5, 7), (4, 6, 2)]


def adapters(n_layers, dtype=torch.float64, widths=WIDTHS):
    As, Bs = [], []
    for i in range(n_layers):
        r, fan_in, fan_out = widths[i % len(widths)]
        As.append((0.3 * torch.randn(r, fan_in, dtype=dtype)).requires_grad_())
        Bs.append((0.3 * torch.randn(fan_out, r, dtype=dtype)).requires_grad_())
    return As, Bs


def test_value_matches_reference_float64():
    As, Bs = adapters(6)
    got, want = orth_reg_loss(As, Bs), reference.orth_reg(As, Bs)
    assert got.shape == () and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_grads_match_autograd_through_reference():
    As, Bs = adapters(6)
    got = torch.autograd.grad(orth_reg_loss(As, Bs) * 1.7, As + Bs)
    want = torch.autograd.grad(reference.orth_reg(As, Bs) * 1.7, As + Bs)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_gradcheck_float64():
    As, Bs = adapters(3)
    n = len(As)
    assert torch.autograd.gradcheck(lambda *t: orth_reg_loss(t[:n], t[n:]), (*As, *Bs))


def test_zero_norm_gives_zero_grad_not_nan():
    A = torch.eye(3, 5, dtype=torch.float64, requires_grad=True)  # orthonormal rows: ‖AAᵀ − I‖ = 0
    B = torch.eye(4, 3, dtype=torch.float64, requires_grad=True)  # orthonormal columns
    B2 = (2 * torch.eye(4, 3, dtype=torch.float64)).requires_grad_()
    loss = orth_reg_loss([A, A], [B, B2])
    gA, gB, gB2 = torch.autograd.grad(loss, [A, B, B2])
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
    assert not gA.any() and not gB.any()
    want = torch.autograd.grad(reference.orth_reg([A, A], [B, B2]), [B2])[0]
    torch.testing.assert_close(gB2, want, rtol=1e-12, atol=1e-14)


def test_float32_and_empty():
    As, Bs = adapters(4, dtype=torch.float32)
    torch.testing.assert_close(orth_reg_loss(As, Bs), reference.orth_reg(As, Bs), rtol=1e-5, atol=1e-6)
    assert orth_reg_loss([], []).item() == 0.0


def _fwd_bwd_ops(n_layers):
    As, Bs = adapters(n_layers, widths=WIDTHS[:2])  # same widths: 3 groups of M shapes either way
    with OpCounter() as counter:
        orth_reg_loss(As, Bs).backward()
    return counter.ops


def test_op_count_grows_only_by_grad_accumulation():
    two, eight = _fwd_bwd_ops(2), _fwd_bwd_ops(8)
    added_tensors = 2 * (8 - 2)  # one A and one B per added layer
    print(f"orth fwd+bwd ops: 2 layers {len(two)}, 8 layers {len(eight)}")
    assert len(eight) - len(two) <= added_tensors, (two, eight)
    # the forward alone is flat in the number of layers
    for n in (2, 8):
        As, Bs = adapters(n, widths=WIDTHS[:2])
        with OpCounter() as counter:
            orth_reg_loss(As, Bs)
        if n == 2:
            forward_two = counter.ops
    assert counter.ops == forward_two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_runs_and_is_close(dtype):
    As, Bs = adapters(3, dtype=dtype)
    loss = orth_reg_loss(As, Bs)
    loss.backward()
    ref = reference.orth_reg([a.double() for a in As], [b.double() for b in Bs])
    assert abs(loss.double().item() - ref.item()) <= reference.fp_tolerance(dtype, 9) * ref.item() * 8
    assert all(t.grad is not None and t.grad.dtype == dtype for t in As + Bs)
