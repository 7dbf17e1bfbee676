"""The reference as a backend: plain autograd over ``fastadalora.reference``."""

from __future__ import annotations

from .. import reference
from . import draw_dropout_seed


def adapter_linear(x, weight, bias, A, E, B, scale: float, mask=None, dropout_p: float = 0.0, cdt=None):
    # cdt is implied here: plain autograd under the caller's autocast state, as PEFT's layer
    keep = None
    if dropout_p > 0.0:
        keep = reference.dropout_keep_mask(x.shape, dropout_p, device=x.device, seed=draw_dropout_seed())
    return reference.adapter_linear(x, weight, bias, A, E, B, scale, None, mask=mask, keep=keep,
                                    dropout_p=dropout_p)
