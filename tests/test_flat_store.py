"""The flat parameter/gradient store behind ``update_and_allocate``'s fast path.

The adapter Parameters live in one flat buffer P and the backward writes their gradients into a
twin buffer G; ``update_and_allocate`` then works on P and G directly.  These tests check that
the aliasing really happens after a real backward, that the fast path and the gather fallback
give the same numbers (and PEFT's), and that every way of breaking the alignment (gradient
accumulation, ``zero_grad(set_to_none=False)``, hand-assigned gradients, a cast, new Parameters)
either keeps the fast path or falls back / re-flattens, never giving a wrong answer.
"""

import copy
import io

import pytest
import torch

from fastadalora import AdaLoraConfig, get_adalora_model
from fastadalora.backends import use_backend
from tiny_models import batches, cls_batch, tiny_bert

TARGETS = ["query", "key", "value", "dense"]
# masks at 2, 3, 4, 5; the final mask at 6; the fixed phase at 7
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, beta1=0.85, beta2=0.85)


def _model(dtype=torch.float64, orth=0.0, num_layers=2, **overrides):
    cfg = AdaLoraConfig(target_modules=TARGETS, orth_reg_weight=orth, **{**SCHEDULE, **overrides})
    torch.manual_seed(0)
    return get_adalora_model(tiny_bert(num_layers=num_layers, dtype=dtype), cfg).train()


def _adapter_params(model):
    return [p for layer in model.adapter_layers().values() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _inside(t, buf):
    start = buf.data_ptr()
    end = start + buf.numel() * buf.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


def _reassign_grads(params):
    """Hand-assigned gradients (same values, fresh tensors): the fallback path."""
    for p in params:
        p.grad = p.grad.clone()


def _assert_same_state(a, b, step=None):
    assert a.rank_pattern == b.rank_pattern, step
    sa, sb = a.allocator.state_dict(), b.allocator.state_dict()
    assert torch.equal(sa["ipt"], sb["ipt"]) and torch.equal(sa["unc"], sb["unc"]), step
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), (step, n)


# --------------------------------------------------------------------------- aliasing
def test_params_and_grads_alias_the_flat_buffers_after_a_real_backward():
    model = _model(torch.float32)
    store = model.allocator._store
    params = _adapter_params(model)
    assert store.flat and len(params) == len(store.params) == 3 * 13
    assert {id(p) for p in params} == {id(p) for p in store.params}
    assert all(_inside(p, store.P) for p in params)
    opt = torch.optim.SGD(_trainable(model), lr=0.1)  # built after flattening: same Parameter objects
    model(**cls_batch()).loss.backward()
    assert store.grads_aligned() is True
    assert all(_inside(p.grad, store.G) for p in params)
    before = store.P.clone()
    opt.step()  # the optimizer updates P through the Parameters
    assert not torch.equal(before, store.P)
    model.update_and_allocate(0)
    assert model.allocator._store is store  # nothing moved: no re-flatten


def test_flattening_keeps_values_outputs_and_model_order_state():
    """Layers of two shapes, interleaved: the flat order (grouped by shape) is not the model order."""
    from fastadalora.allocator import RankAllocator
    from fastadalora.layers import AdaLoraLinear

    torch.manual_seed(0)
    dims = [(8, 5), (6, 9), (8, 5), (6, 9)]
    layers = {f"l{i}": AdaLoraLinear(torch.nn.Linear(i_, o_).double(), r=3, init_lora_weights=False)
              for i, (i_, o_) in enumerate(dims)}
    xs = {k: torch.randn(4, layer.in_features, dtype=torch.float64) for k, layer in layers.items()}
    before = {k: layer(xs[k]) for k, layer in layers.items()}
    values = {k: [p.detach().clone() for p in (m.lora_A, m.lora_E, m.lora_B)] for k, m in layers.items()}
    alloc = RankAllocator(list(layers.items()), init_r=3, target_r=2, tinit=0, tfinal=1, total_step=10, deltaT=1,
                          beta1=0.85, beta2=0.85)
    store = alloc._store
    assert store.order == [0, 2, 1, 3] and store.flat
    for k, layer in layers.items():
        assert all(torch.equal(p, v) for p, v in zip((layer.lora_A, layer.lora_E, layer.lora_B), values[k]))
        assert torch.equal(layer(xs[k]), before[k])
        layer(xs[k]).sum().backward()
    assert store.grads_aligned() is True
    alloc.update_and_allocate(0)
    # state_dict is in model order: [A_0..A_3 | B_0..B_3 | E_0..E_3], ipt = (1 - beta1)|p g|
    parts = [[getattr(m, n) for m in layers.values()] for n in ("lora_A", "lora_B", "lora_E")]
    want = torch.cat([(p.detach() * p.grad).abs().reshape(-1) for ps in parts for p in ps]) * (1 - 0.85)
    torch.testing.assert_close(alloc.state_dict()["ipt"], want, rtol=1e-15, atol=0)
    alloc.update_and_allocate(1)  # a mask
    pattern = alloc.rank_pattern
    assert list(pattern) == [f"{k}.lora_E" for k in layers]
    for k, layer in layers.items():
        flags = torch.tensor(pattern[f"{k}.lora_E"])
        assert not layer.lora_E[~flags].any() and layer.lora_E[flags].all()
    # set_rank_pattern / state round trip through the model order
    twin = RankAllocator(list(layers.items()), init_r=3, target_r=2, tinit=0, tfinal=1, total_step=10, deltaT=1,
                         beta1=0.85, beta2=0.85)
    twin.load_state_dict(alloc.state_dict())
    assert twin.rank_pattern == pattern
    assert torch.equal(twin._ipt, alloc._ipt) and torch.equal(twin._keep, alloc._keep)
    twin.set_rank_pattern(pattern)
    assert torch.equal(twin._keep, alloc._keep)


# --------------------------------------------------------------------------- fast path == fallback == PEFT
def test_fast_path_and_fallback_give_identical_results():
    fast, slow = _model(), _model()
    opt_f = torch.optim.AdamW(_trainable(fast), lr=0.05)
    opt_s = torch.optim.AdamW(_trainable(slow), lr=0.05)
    for step, batch in enumerate(batches(SCHEDULE["total_step"])):
        fast(**batch).loss.backward()
        slow(**batch).loss.backward()
        _reassign_grads(_adapter_params(slow))
        assert fast.allocator._store.grads_aligned() is True
        assert slow.allocator._store.grads_aligned() is False
        opt_f.step()
        opt_s.step()
        fast.update_and_allocate(step)
        slow.update_and_allocate(step)
        _assert_same_state(fast, slow, step)
        opt_f.zero_grad()
        opt_s.zero_grad()
    assert fast.rank_pattern is not None


def test_fast_path_matches_peft_float64():
    peft = pytest.importorskip("peft")
    schedule = {**SCHEDULE, "lora_alpha": 8}
    torch.manual_seed(0)
    base = tiny_bert(dtype=torch.float64)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        task_type="SEQ_CLS", target_modules=TARGETS, orth_reg_weight=0.0, **schedule))
    torch.manual_seed(1)
    ours = get_adalora_model(copy.deepcopy(base), AdaLoraConfig(
        target_modules=TARGETS, modules_to_save=["classifier"], orth_reg_weight=0.0, **schedule)).train()
    theirs.train()
    our_params = dict(ours.named_parameters())
    pairs = []
    for name, p in theirs.named_parameters():
        if p.requires_grad and "ranknum" not in name:
            ours_name = name.replace("base_model.model.", "model.", 1).replace(".modules_to_save.default", "")
            pairs.append((p, our_params[ours_name.removesuffix(".default")]))
        elif "ranknum" in name:
            p.requires_grad_(False)
    with torch.no_grad():
        for p_t, p_o in pairs:
            p_o.copy_(p_t)
    opt_t = torch.optim.AdamW([p for p, _ in pairs], lr=0.05)
    opt_o = torch.optim.AdamW([p for _, p in pairs], lr=0.05)
    for step, batch in enumerate(batches(SCHEDULE["total_step"])):
        theirs(**batch).loss.backward()
        ours(**batch).loss.backward()
        assert ours.allocator._store.grads_aligned() is True  # the fast path
        opt_t.step()
        opt_o.step()
        theirs.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        pattern = theirs.peft_config["default"].rank_pattern
        want = None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}
        assert ours.rank_pattern == want, step
        opt_t.zero_grad()
        opt_o.zero_grad()
    assert ours.rank_pattern is not None
    for p_t, p_o in pairs:
        torch.testing.assert_close(p_o, p_t, rtol=1e-9, atol=1e-12)


def test_orthogonal_term_takes_the_gather_path_and_matches():
    """A and B also get the orthogonal term's gradient: autograd sums it outside G, so they are gathered."""
    fast, slow = _model(orth=0.5), _model(orth=0.5)
    for step, batch in enumerate(batches(4)):
        fast(**batch).loss.backward()
        slow(**batch).loss.backward()
        _reassign_grads(_adapter_params(slow))
        assert fast.allocator._store.grads_aligned() is False
        fast.update_and_allocate(step)
        slow.update_and_allocate(step)
        _assert_same_state(fast, slow, step)
        fast.zero_grad()
        slow.zero_grad()


def test_partly_hand_assigned_gradients_fall_back():
    fast, mixed = _model(), _model()
    for step, batch in enumerate(batches(5)):
        fast(**batch).loss.backward()
        mixed(**batch).loss.backward()
        params = _adapter_params(mixed)
        _reassign_grads(params[::2])
        assert mixed.allocator._store.grads_aligned() is False
        fast.update_and_allocate(step)
        mixed.update_and_allocate(step)
        _assert_same_state(fast, mixed, step)
        fast.zero_grad()
        mixed.zero_grad()


# --------------------------------------------------------------------------- accumulation, zero_grad
def test_gradient_accumulation_over_two_micro_batches():
    model, ref = _model(), _model()
    for layer in ref.adapter_layers().values():  # no sinks: plain fresh gradients
        layer._grad_sink = None
    mb = batches(2, seed=5)
    for m in (model, ref):
        for batch in mb:
            m(**batch).loss.backward()
    assert model.allocator._store.grads_aligned() is True  # accumulated in place, still in G
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=0, msg=n)
    model.update_and_allocate(3)
    ref.update_and_allocate(3)
    _assert_same_state(model, ref)


def test_zero_grad_set_to_none_false_keeps_the_fast_path():
    model, ref = _model(), _model()
    opt_m = torch.optim.SGD(_trainable(model), lr=0.1)
    opt_r = torch.optim.SGD(_trainable(ref), lr=0.1)
    for step, batch in enumerate(batches(SCHEDULE["total_step"])):
        model(**batch).loss.backward()
        ref(**batch).loss.backward()
        assert model.allocator._store.grads_aligned() is True, step
        _reassign_grads(_adapter_params(ref))
        opt_m.step()
        opt_r.step()
        model.update_and_allocate(step)
        ref.update_and_allocate(step)
        _assert_same_state(model, ref, step)
        opt_m.zero_grad(set_to_none=False)
        opt_r.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- moves and replacements
def test_cast_to_float64_reflattens():
    model = _model(torch.float32)
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    for step, batch in enumerate(batches(3)):
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    old_store = model.allocator._store
    model.to(torch.float64)
    ref = copy.deepcopy(model)
    assert not _inside(_adapter_params(model)[0], old_store.P)
    for step, batch in enumerate(batches(5, seed=3), start=3):
        model(**batch).loss.backward()
        ref(**batch).loss.backward()
        _reassign_grads(_adapter_params(ref))
        model.update_and_allocate(step)
        ref.update_and_allocate(step)
        store = model.allocator._store
        assert store is not old_store and store.flat and store.P.dtype == torch.float64
        assert all(_inside(p, store.P) for p in _adapter_params(model))
        if step > 3:  # re-flattened at step 3: from the next backward on, the gradients land in G again
            assert all(_inside(p.grad, store.G) for p in _adapter_params(model))
        _assert_same_state(model, ref, step)
        model.zero_grad()
        ref.zero_grad()
    assert model.allocator._ipt.dtype == torch.float64


def test_load_state_dict_assign_reflattens():
    model = _model()
    for step, batch in enumerate(batches(3)):
        model(**batch).loss.backward()
        model.update_and_allocate(step)
        model.zero_grad()
    sd = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.load_state_dict(sd, assign=True)  # new Parameter objects, outside P
    layer = next(iter(model.adapter_layers().values()))
    assert not _inside(layer.lora_A, model.allocator._store.P)
    ref = copy.deepcopy(model)
    for step, batch in enumerate(batches(4, seed=3), start=3):
        model(**batch).loss.backward()
        ref(**batch).loss.backward()
        _reassign_grads(_adapter_params(ref))
        model.update_and_allocate(step)
        ref.update_and_allocate(step)
        assert {id(p) for p in model.allocator._store.params} == {id(p) for p in _adapter_params(model)}
        _assert_same_state(model, ref, step)
        model.zero_grad()
        ref.zero_grad()
    for name, flags in model.rank_pattern.items():  # the masks reached the new Parameters
        E = model.adapter_layers()[name.removesuffix(".lora_E")].lora_E
        assert not E[~torch.tensor(flags)].any()


def test_state_dict_round_trip_and_tensors_are_separate():
    model = _model()
    for step, batch in enumerate(batches(4)):
        model(**batch).loss.backward()
        model.update_and_allocate(step)
        model.zero_grad()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    twin = _model()
    twin.load_state_dict(torch.load(buf, weights_only=True))  # copies in place: twin stays flat
    assert twin.allocator._store.params_current()
    _assert_same_state(model, twin)
    from fastadalora.checkpoint import adapter_state_dict

    tensors = adapter_state_dict(model)
    store = model.allocator._store
    assert not any(_inside(t, store.P) for t in tensors.values())  # fresh copies, safetensors-safe
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save(tensors)


# --------------------------------------------------------------------------- the sink's safety rules
def test_autograd_grad_results_do_not_alias_the_buffer():
    model = _model()
    layer = next(iter(model.adapter_layers().values()))
    g1 = torch.autograd.grad(model(**cls_batch(seed=1)).loss, [layer.lora_A, layer.lora_B])
    keep = [g.clone() for g in g1]
    g2 = torch.autograd.grad(model(**cls_batch(seed=2)).loss, [layer.lora_A, layer.lora_B])
    store = model.allocator._store
    for a, b, k in zip(g1, g2, keep):
        assert not _inside(a, store.G) and not _inside(b, store.G)
        assert torch.equal(a, k)
    assert layer.lora_A.grad is None


def test_layer_applied_twice_in_one_backward():
    model, ref = _model(), _model()
    for layer in ref.adapter_layers().values():
        layer._grad_sink = None
    x = torch.randn(3, 32, dtype=torch.float64)
    for m in (model, ref):
        layer = m.adapter_layers()["bert.encoder.layer.0.attention.self.query"]
        layer(layer(x)).square().sum().backward()
        grads = [layer.lora_A.grad, layer.lora_E.grad, layer.lora_B.grad]
    ref_grads = grads
    layer = model.adapter_layers()["bert.encoder.layer.0.attention.self.query"]
    for g, r in zip([layer.lora_A.grad, layer.lora_E.grad, layer.lora_B.grad], ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=0)


def test_backward_with_inputs_leaving_out_the_adapter():
    model = _model()
    layer = next(iter(model.adapter_layers().values()))
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward(inputs=[x])
    assert layer.lora_A.grad is None and x.grad is not None


def test_resize_without_refresh_is_picked_up():
    model = _model()
    for step, batch in enumerate(batches(2)):
        model(**batch).loss.backward()
        model.update_and_allocate(step)
        model.zero_grad()
    layer = next(iter(model.adapter_layers().values()))
    layer.resize_rank([True, True, False, True])
    model(**cls_batch(seed=9)).loss.backward()
    model.update_and_allocate(2)  # new Parameters: laid out again, budget re-read
    assert model.allocator.ranks[0] == 3 and model.allocator._store.params_current()
    assert all(_inside(p, model.allocator._store.P) for p in _adapter_params(model))


def test_missing_gradient_still_names_the_parameter():
    model = _model()
    model(**cls_batch()).loss.backward()
    layer = model.adapter_layers()["bert.encoder.layer.1.output.dense"]
    layer.lora_E.grad = None
    with pytest.raises(RuntimeError, match=r"layer\.1\.output\.dense\.lora_E has no gradient"):
        model.update_and_allocate(0)


def test_triton_path_reads_the_flat_buffers():
    fast, ref = _model(torch.float32, num_layers=1), _model(torch.float32, num_layers=1)
    for layer in ref.adapter_layers().values():
        layer._grad_sink = None
    for step, batch in enumerate(batches(4, batch=2, seq=4)):
        with use_backend("triton"):
            fast(**batch).loss.backward()
            assert fast.allocator._store.grads_aligned() is True  # the Triton backward wrote into G
            fast.update_and_allocate(step)
        with use_backend("torch"):
            ref(**batch).loss.backward()
            ref.update_and_allocate(step)
        assert fast.rank_pattern == ref.rank_pattern, step
        torch.testing.assert_close(fast.allocator._ipt, ref.allocator._ipt, rtol=1e-4, atol=1e-9)
        fast.zero_grad()
        ref.zero_grad()
    assert fast.allocator._table is not None


# --------------------------------------------------------------------------- orthogonal term
def test_orth_term_reads_the_flat_buffer_and_equals_the_stacked_path():
    from fastadalora import reference
    from fastadalora.orth import orth_reg_loss

    model = _model(orth=0.5, num_layers=3)
    groups = model.allocator.orth_groups()
    assert groups is not None  # stacked views of P: no copy
    assert all(_inside(stacked, model.allocator._store.P) for _, _, stacked in groups)
    layers = list(model.adapter_layers().values())
    with torch.no_grad():
        for layer in layers:  # away from the init, so every gradient is non-trivial
            layer.lora_A.mul_(3.0)
            layer.lora_B.mul_(0.5)
    As, Bs = [layer.lora_A for layer in layers], [layer.lora_B for layer in layers]

    grouped = model.orth_reg_loss()
    grouped.backward()
    grads = [p.grad.clone() for p in As + Bs]
    for p in As + Bs:
        p.grad = None
    stacked = orth_reg_loss(As, Bs)  # no groups: torch.stack per shape
    stacked.backward()
    torch.testing.assert_close(grouped, stacked, rtol=1e-12, atol=0)
    torch.testing.assert_close(grouped, reference.orth_reg(As, Bs), rtol=1e-12, atol=0)
    for g, p in zip(grads, As + Bs):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-15)

    model.to(torch.float32)  # parameters leave P: the term falls back to stacking copies
    assert model.allocator.orth_groups() is None
    torch.testing.assert_close(model.orth_reg_loss().double(), stacked.detach(), rtol=1e-6, atol=0)


def test_gradients_swapped_between_slots_are_gathered_not_shuffled():
    """p1.grad and p2.grad exchanged (both still inside G): copying slot to slot would corrupt one."""
    fast, ref = _model(), _model()
    with torch.no_grad():  # E = 0 at init gives A and B zero gradients: make them non-trivial
        for model in (fast, ref):
            for k, layer in enumerate(model.adapter_layers().values()):
                layer.lora_E.copy_(torch.linspace(0.5, 1.5, layer.r).view(-1, 1) * (k + 1))
    batch = cls_batch(seed=0)
    fast(**batch).loss.backward()
    ref(**batch).loss.backward()
    fast_layers, ref_layers = list(fast.adapter_layers().values()), list(ref.adapter_layers().values())
    a0, a1 = fast_layers[0].lora_A, fast_layers[1].lora_A  # same shape: the grads can be exchanged
    a0.grad, a1.grad = a1.grad, a0.grad
    r0, r1 = ref_layers[0].lora_A, ref_layers[1].lora_A
    r0.grad, r1.grad = r1.grad.clone(), r0.grad.clone()
    assert fast.allocator._store.grads_aligned() is False
    fast.update_and_allocate(2)
    ref.update_and_allocate(2)
    _assert_same_state(fast, ref, 2)
