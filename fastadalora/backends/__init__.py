"""Backend choice for the fused adapter op.

Every backend module exposes the same contract::

    adapter_linear(x, weight, bias, A, E, B, scale, mask, dropout_p, *, grad_sink=None) -> y

* ``x``      (N, in), any strides, dtype equal to the adapter's;
* ``weight`` (out, in) frozen base weight (may be a transposed view, e.g. GPT-2 ``Conv1D``);
* ``bias``   (out,) or None;
* ``A`` (r, in), ``E`` (r, 1), ``B`` (out, r): the trainable adapter (lora_A, lora_E, lora_B);
* ``scale``  python float, ``scaling / (ranknum + 1e-5)``;
* ``mask``   (r,) multiplier on E, or None;
* ``dropout_p`` float; 0 means no dropout (the caller passes 0 in eval mode);
* ``grad_sink`` optional, keyword only: a ``fastadalora.flat_store.GradSink`` (the layer's
  ``_grad_sink``, set by the allocator's flat store).  In backward a backend *may* call
  ``grad_sink.claim(ctx, (need_A, need_E, need_B))`` and write each gradient into the view it
  returns for that slot (a fresh tensor shaped like the parameter), returning that view as the
  gradient; for a None slot it returns a fresh tensor as usual.  Ignoring the sink is always
  correct (the allocator then gathers the gradients).  Never passed while compiling.

and returns ``y = x·Wᵀ + b + (dropout(x)·(A⊙(E·mask))ᵀ·Bᵀ)·scale`` with shape (N, out).

``triton`` is used for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``),
``torch`` otherwise.  ``FASTADALORA_BACKEND=triton|torch|reference`` or the
``use_backend(name)`` context manager override the choice.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("triton", "torch", "reference")
_local = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastadalora backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (thread-local, nests)."""
    previous = getattr(_local, "name", None)
    _local.name = _check(name)
    try:
        yield
    finally:
        _local.name = previous


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(x: torch.Tensor) -> str:
    """The backend that will run for input ``x``: override, else Triton on CUDA, else torch."""
    forced = getattr(_local, "name", None) or os.environ.get("FASTADALORA_BACKEND") or None
    if forced:
        name = _check(forced)
        if name == "triton" and not (x.is_cuda or triton_interpreted()):
            raise RuntimeError(
                "fastadalora backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                f"got a tensor on {x.device}"
            )
        return name
    return "triton" if x.is_cuda else "torch"


def draw_dropout_seed() -> int:
    """A dropout seed from torch's default CPU generator, so ``torch.manual_seed`` reproduces it.

    Every backend draws it in forward and regenerates the keep-mask from it in backward.  It fits
    Philox's 31-bit seed in the Triton kernels.
    """
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def save_adapter_context(ctx, saved, bias, seed, scale: float, dropout_p: float, grad_sink) -> None:
    """What every backend's autograd Function keeps for backward: ``saved`` = (x, h, weight, A, E, B,
    mask) as saved tensors, plus the dropout seed, the scale and the gradient sink as plain values."""
    ctx.save_for_backward(*saved)
    ctx.seed, ctx.scale, ctx.dropout_p = seed, scale, dropout_p
    ctx.has_bias = bias is not None
    ctx.grad_sink = grad_sink


def base_layer_grads(ctx, gy: torch.Tensor, x: torch.Tensor):
    """``(dW, db)`` of the base layer, each only when it requires grad (it is normally frozen)."""
    need_w, need_b = ctx.needs_input_grad[1:3]
    dW = torch.mm(gy.t(), x) if need_w else None
    db = gy.sum(0) if need_b and ctx.has_bias else None
    return dW, db


def get_backend(name: str):
    """The module implementing backend ``name`` (imported lazily: Triton is optional on CPU)."""
    if _check(name) == "triton":
        from . import triton_path as mod
    elif name == "torch":
        from . import torch_path as mod
    else:
        from . import reference_path as mod
    return mod
