"""Backend choice for the fused adapter op.

Every backend module exposes the same entry point::

    adapter_linear(x, weight, bias, A, E, B, scale, mask, dropout_p) -> y

* ``x``      (N, in), any strides, the base dtype (the adapter may be wider: fp32 on a bf16 base);
* ``weight`` (out, in) frozen base weight (may be a transposed view, e.g. GPT-2 ``Conv1D``);
* ``bias``   (out,) or None;
* ``A`` (r, in), ``E`` (r, 1), ``B`` (out, r): the trainable adapter (lora_A, lora_E, lora_B);
* ``scale``  python float, ``scaling / (ranknum + 1e-5)``;
* ``mask``   (r,) multiplier on E, or None;
* ``dropout_p`` float; 0 means no dropout (the caller passes 0 in eval mode);

and returns ``y = x·Wᵀ + b + (dropout(x)·(A⊙(E·mask))ᵀ·Bᵀ)·scale`` with shape (N, out).  The fused
backends (``torch``, ``triton``) share one autograd skeleton (``_autograd``) and supply only their
forward and backward maths; ``reference`` is plain autograd over ``fastadalora.reference``.

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

    Every backend draws it in forward and regenerates the keep-mask from it in backward
    (``fastadalora.dropout``: the same mask on every backend).  It is 31-bit, a positive int32.
    """
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def get_backend(name: str):
    """The module implementing backend ``name`` (imported lazily: Triton is optional on CPU)."""
    if _check(name) == "triton":
        from . import triton_path as mod
    elif name == "torch":
        from . import torch_path as mod
    else:
        from . import reference_path as mod
    return mod
