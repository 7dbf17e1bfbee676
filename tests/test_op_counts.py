"""The training hooks dispatch a number of ops that does not grow with the number of layers.

A ``TorchDispatchMode`` counts every aten op that is not a view, for a 2-layer and an 8-layer
BERT of the same widths (13 vs 49 adapted modules): ``update_and_allocate`` must dispatch
the same count on a masking step, on the final forced mask and in the fixed phase, and
``orth_reg_loss()`` forward+backward may grow by at most one op per added A or B tensor
(autograd's per-leaf gradient accumulation).
"""

import torch

from fastadalora import AdaLoraConfig, get_adalora_model
from support import OpCounter, cls_batch, tiny_bert

TARGETS = ["query", "key", "value", "dense"]
# step 0: EMAs only; step 1: a budget mask; step 2 = total_step - tfinal: the forced final mask;
# step 3: the fixed phase (re-apply the pattern)
SCHEDULE = dict(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=3)


def _model(num_layers):
    model = get_adalora_model(tiny_bert(num_layers=num_layers), AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))
    return model.train()


def _allocate_counts(num_layers):
    """Op counts of update_and_allocate(step) for every step of the schedule."""
    model = _model(num_layers)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    counts = []
    for step in range(SCHEDULE["total_step"] + 1):
        model(**cls_batch(seed=step)).loss.backward()
        opt.step()
        with OpCounter() as mode:
            model.update_and_allocate(step)
        counts.append(len(mode.ops))
        opt.zero_grad()
    assert model.rank_pattern is not None
    return counts, len(model.adapter_layers())


def test_update_and_allocate_is_constant_in_layers():
    small, n_small = _allocate_counts(2)
    large, n_large = _allocate_counts(8)
    assert (n_small, n_large) == (13, 49)
    assert small == large, (small, large)
    assert small[1] > small[0] > 0  # a masking step does more than an EMA-only step


def _orth_count(num_layers):
    model = _model(num_layers)
    with OpCounter() as mode:
        model.orth_reg_loss().backward()
    return len(mode.ops), 2 * len(model.adapter_layers())


def test_orth_reg_loss_grows_at_most_one_op_per_tensor():
    small, tensors_small = _orth_count(2)
    large, tensors_large = _orth_count(8)
    assert large - small <= tensors_large - tensors_small, (small, large)


def test_counter_sees_ops():
    with OpCounter() as mode:
        torch.ones(3).add_(1)
    assert mode.ops and all("view" not in op for op in mode.ops)
