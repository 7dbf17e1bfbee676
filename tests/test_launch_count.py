"""Device launches per adapted layer, forward + backward, on the Triton path.

Two counters run together: a ``TorchDispatchMode`` records every aten op (the two custom ops are
replaced by their plain implementations for the count, so the ops inside them are seen too), and a
wrapper around every ``@triton.jit`` kernel of ``fastadalora.kernels`` records each launch.  An aten
op "launches" unless it only allocates, views or reads a host scalar (``NO_LAUNCH``).

What a layer costs (dropout on, every gradient needed; the base weight frozen):

* forward: the base GEMM (``addmm``), the shrink and the expand kernels: 3 launches;
* backward: the base ``g·W`` (``mm``), one pass over g, [the gs partial sum when g has several out
  tiles], dx, dA and one final partial sum: 5 or 6 launches.

Nothing else reaches the device: no casts, copies, ``E·mask`` vectors or partial sums in torch.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastadalora.backends import triton_path
from fastadalora.kernels import _config, adapter_backward, adapter_forward, dropout

NO_LAUNCH = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "view", "_unsafe_view",
             "t", "transpose", "reshape", "as_strided", "detach", "alias", "expand", "select", "slice", "unsqueeze",
             "squeeze", "permute", "_local_scalar_dense", "randint", "lift_fresh", "_to_copy_noop"}
KERNEL_MODULES = (adapter_forward, adapter_backward, dropout)


class _Counted:
    """A kernel that counts its launches (and pauses the aten count while it runs: the interpreter
    moves data with torch ops of its own)."""

    def __init__(self, fn, name: str, counts: "Counts"):
        self.fn, self.name, self.counts = fn, name, counts

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            self.counts.kernels[self.name] += 1
            self.counts.paused += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.counts.paused -= 1

        return run


class Counts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels: Counter = Counter()
        self.aten: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.aten[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def launching_aten(self) -> Counter:
        return Counter({k: v for k, v in self.aten.items() if k not in NO_LAUNCH})

    def launches(self) -> int:
        return sum(self.kernels.values()) + sum(self.launching_aten().values())


@pytest.fixture
def counts(monkeypatch):
    c = Counts()
    for module in KERNEL_MODULES:
        for name, obj in list(vars(module).items()):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Counted(obj, name, c))
    # the custom ops are opaque to a dispatch mode: count through their plain implementations
    monkeypatch.setattr(triton_path, "adapter_forward", triton_path._adapter_forward)
    monkeypatch.setattr(triton_path, "adapter_backward", triton_path._adapter_backward)
    return c


def _layer(N, n_in, n_out, r, base=torch.bfloat16, adapter=torch.float32):
    x = torch.randn(N, n_in).to(base).requires_grad_()
    W = torch.randn(n_out, n_in).to(base)
    b = torch.randn(n_out).to(base)
    A, E, B = (torch.randn(*s).to(adapter).requires_grad_() for s in ((r, n_in), (r, 1), (n_out, r)))
    return x, W, b, A, E, B


def _fwd_bwd(counts, layer, p, sms=1):
    x, W, b, A, E, B = layer
    g = torch.randn(x.shape[0], W.shape[0]).to(x.dtype)
    with counts:
        y = triton_path.adapter_linear(x, W, b, A, E, B, 0.5, dropout_p=p)
        fwd = counts.launches()
        y.backward(g)
    return fwd, counts.launches() - fwd


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_one_out_tile(counts, p):
    assert _config.kernel_config("grad_g", 12, torch.float32).BLOCK_K >= 29  # g is one out tile
    fwd, bwd = _fwd_bwd(counts, _layer(150, 61, 29, 12), p)
    assert counts.kernels == Counter(_shrink_kernel=1, _rank_expand_kernel=2, _grad_g_kernel=1, _grad_a_kernel=1,
                                     _reduce_kernel=1), counts.kernels
    assert counts.launching_aten() == Counter(addmm=1, mm=1), counts.aten
    assert (fwd, bwd) == (3, 5)


def test_several_out_tiles_add_the_gs_partial_sum(counts, monkeypatch):
    monkeypatch.setattr(_config, "sm_count", lambda device: 132)  # split the token reductions too
    layer = _layer(300, 61, 300, 12)
    assert _config.kernel_config("grad_g", 12, torch.float32).BLOCK_K < 300
    fwd, bwd = _fwd_bwd(counts, layer, 0.1)
    assert counts.kernels["_reduce_kernel"] == 2 and counts.kernels["_grad_g_kernel"] == 1
    assert counts.launching_aten() == Counter(addmm=1, mm=1), counts.aten
    assert (fwd, bwd) == (3, 6)


def test_frozen_input_and_no_bias(counts):
    # the usual fine-tuning layer: x needs no gradient, so neither the base dx GEMM nor the dx kernel runs
    x, W, b, A, E, B = _layer(150, 61, 29, 12)
    fwd, bwd = _fwd_bwd(counts, (x.detach(), W, None, A, E, B), 0.1)
    assert counts.launching_aten() == Counter(mm=1), counts.aten  # the bias-free base GEMM
    assert (fwd, bwd) == (3, 3)
